"""The model against an independent numpy implementation; shapes of large configs."""
import dataclasses
from unittest import mock

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from adaptive_depth import config_lib
from adaptive_depth import layers
from adaptive_depth import model as model_lib
from tests import numpy_reference as ref
from tests import tiny_models


_forward, _init_params = tiny_models.forward_train, tiny_models.init_params
random_tokens = tiny_models.random_tokens


def _random_normal(shape, seed):
  """N(0, 1) values [*shape] float32, drawn as random_tokens draws ids."""
  return jax.device_put(np.random.default_rng(seed).standard_normal(shape).astype(np.float32))


def small_config(**overrides):
  c = config_lib.base_config()
  c.model.width = 32
  c.model.num_heads = 4
  c.model.num_kv_heads = 2
  c.model.mlp_dim = 48
  c.model.num_layers = 4
  c.model.vocab_size = 40
  for key, value in overrides.items():
    c.model[key] = value
  return model_lib.ModelConfig.from_config(c.model)


@pytest.mark.parametrize('num_heads,num_kv_heads', [(4, 4), (4, 2), (6, 1)])
def test_attention_matches_numpy(num_heads, num_kv_heads):
  head_dim, width, length = 8, 24, 7
  c = layers.BlockConfig(width=width, num_heads=num_heads, num_kv_heads=num_kv_heads,
                         head_dim=head_dim, mlp_dim=16, rope_base=500.0)
  x = _random_normal((2, length, width), seed=1)
  positions = np.stack([np.arange(length), np.arange(length) + 5])  # row 1 offset: RoPE

  @jax.jit  # one program, not one per operation
  def init_and_apply(x, positions):
    mask = layers.causal_mask(positions, positions)
    params = nn.unbox(layers.Attention(c).init(jax.random.key(2), x, positions, mask)['params'])
    params = jax.tree.map(lambda p: p * 4.0, params)  # sharper softmax
    return params, layers.Attention(c).apply({'params': params}, x, positions, mask)[0]

  params, out = init_and_apply(x, positions)
  p = jax.tree.map(np.asarray, params)
  for row in range(2):
    want = ref.attention(np.asarray(x[row], np.float64), np.asarray(positions[row]),
                         p['q'], p['k'], p['v'], p['o'], 500.0)
    np.testing.assert_allclose(np.asarray(out[row]), want, atol=2e-5, rtol=1e-4)


def test_rope_is_relative():
  """Scores depend only on position differences: shifting every position changes nothing."""
  q = _random_normal((1, 5, 2, 16), seed=0)
  k = _random_normal((1, 5, 2, 16), seed=1)
  pos = jnp.arange(5)[None]
  score = jax.jit(lambda shift: jnp.einsum(  # shift traced: one program for both
      'btnh,bsnh->bnts', layers.apply_rope(q, pos + shift, 1e4),
      layers.apply_rope(k, pos + shift, 1e4)))
  np.testing.assert_allclose(score(0), score(37), atol=1e-4)
  assert not np.allclose(score(0)[..., 0, 1], score(0)[..., 0, 2])


def test_rope_table_is_the_cosine_and_sine_exactly():
  """The table passes through a product with the identity (so XLA does not recompute it in
  every consumer): that product must change no bit, at positions up to a long context."""
  positions = jnp.array([[0, 1, 7, 4095, 32767], [5, 3, 2, 1, 0]])
  frequencies = layers.rope_frequencies(64, 1e4)  # fixed here: pow may round otherwise in jit
  angles = positions.astype(jnp.float32)[..., None] * frequencies
  with mock.patch.object(layers, 'rope_frequencies', lambda *_: frequencies):
    cos, sin = jax.jit(layers._rope_table, static_argnums=(1, 2))(positions, 64, 1e4)
  np.testing.assert_array_equal(np.asarray(cos), np.asarray(jnp.cos(angles)))
  np.testing.assert_array_equal(np.asarray(sin), np.asarray(jnp.sin(angles)))


def test_gated_silu_value_and_gradient_match_the_plain_product():
  """The hand-written gradient against jax's own derivative of silu(gate) * up and against
  float64 central differences."""
  rng = np.random.default_rng(0)
  gate, up, grad = (rng.normal(size=(3, 7)).astype(np.float32) * 4 for _ in range(3))
  plain = lambda g, u: jnp.sum(jax.nn.silu(g) * u * grad)
  fused = lambda g, u: jnp.sum(layers.gated_silu(g, u) * grad)
  np.testing.assert_allclose(layers.gated_silu(gate, up), jax.nn.silu(gate) * up, rtol=1e-6)
  want = jax.jit(jax.grad(plain, argnums=(0, 1)))(gate, up)
  got = jax.jit(jax.grad(fused, argnums=(0, 1)))(gate, up)
  for w, g in zip(want, got):
    np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6)
  f64 = lambda g, u: np.sum(g / (1 + np.exp(-g)) * u * grad.astype(np.float64))
  g64, u64, eps = gate.astype(np.float64), up.astype(np.float64), 1e-6
  numeric = np.zeros_like(g64)
  for i in np.ndindex(g64.shape):
    step = np.zeros_like(g64)
    step[i] = eps
    numeric[i] = (f64(g64 + step, u64) - f64(g64 - step, u64)) / (2 * eps)
  np.testing.assert_allclose(got[0], numeric, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize('schedule,num_blocks,num_layers', [
    ('unshared', 4, 4), ('cycle', 2, 4), ('sequence', 2, 4), ('middle_cycle', 3, 5),
    ('middle_sequence', 4, 6)])
def test_scanned_model_matches_numpy_loop(schedule, num_blocks, num_layers):
  cfg = small_config(schedule=schedule, num_blocks=num_blocks, num_layers=num_layers)
  params = tiny_models.random_params(cfg)
  tokens = random_tokens((2, 9), cfg.vocab_size)
  logits = _forward(cfg, params, tokens)
  assert logits.shape == (num_layers, 2, 9, cfg.vocab_size)
  table = model_lib.block_table(cfg)
  for row in range(2):
    want = ref.model_exit_logits(params, np.asarray(tokens[row]), table, cfg.exit_depths,
                                 cfg.norm_eps, cfg.rope_base)
    for e, w in enumerate(want):
      np.testing.assert_allclose(np.asarray(logits[e, row]), w, atol=1e-4, rtol=1e-4)
  # And against the library's own per-step Python loop (no scan, no gather), op by op: the
  # same function compiled differently, so rounding alone separates them (a few 1e-6 per
  # step at these magnitudes; 'heads_major' attention, the CPU default, reached 1.1e-5).
  # (Eagerly: its one-operation programs serve every case here, where a jitted loop would
  # compile once per schedule; both cost about the same.)
  loop = model_lib.reference_forward(cfg, params, tokens)
  for e, w in enumerate(loop):
    np.testing.assert_allclose(logits[e], w, atol=3e-5, rtol=1e-5)
  # Unrolling the scan (config.model.scan_unroll) changes how it compiles, not what it does.
  unrolled = _forward(dataclasses.replace(cfg, scan_unroll=num_layers), params, tokens)
  np.testing.assert_allclose(unrolled, logits, atol=3e-5, rtol=1e-5)


def test_unrolled_scan_gradient_equals_the_rolled_one():
  """A partial unroll (3 of 4 steps: one unrolled iteration and a remainder) with remat:
  the same gradient as the rolled scan."""
  cfg = small_config(remat=True)
  params = tiny_models.random_params(cfg)
  tokens = random_tokens((2, 9), cfg.vocab_size)
  grad = lambda c: jax.jit(jax.grad(
      lambda p: model_lib.forward_train(c, p, tokens).sum() * 1e-3))(params)
  rolled, unrolled = grad(cfg), grad(dataclasses.replace(cfg, scan_unroll=3))
  for a, b in zip(jax.tree.leaves(unrolled), jax.tree.leaves(rolled)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_untied_head_and_exit_subset():
  cfg = small_config(tie_embeddings=False, exit_layers='2,3')
  assert cfg.exit_depths == (2, 3, 4)
  params = tiny_models.random_params(cfg)
  assert params['lm_head']['kernel'].shape == (32, 40)
  tokens = random_tokens((1, 6), cfg.vocab_size)
  logits = _forward(cfg, params, tokens)
  want = ref.model_exit_logits(params, np.asarray(tokens[0]), model_lib.block_table(cfg),
                               cfg.exit_depths, cfg.norm_eps, cfg.rope_base, tied=False)
  assert logits.shape[0] == 3
  for e, w in enumerate(want):
    np.testing.assert_allclose(np.asarray(logits[e, 0]), w, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize('exit_layers', ['all', '2,3', 'every:2', 'last'])
def test_exit_states_by_static_slices_equal_an_index_array(exit_layers):
  """at_exit_depths against numpy-style indexing: the same states and the same gradient."""
  cfg = small_config(exit_layers=exit_layers)
  hiddens = _random_normal((cfg.num_layers, 2, 3, cfg.width), 0)
  cotangent = _random_normal((len(cfg.exit_depths), 2, 3, cfg.width), 1)
  want, want_vjp = jax.vjp(lambda h: h[np.asarray(cfg.exit_depths) - 1], hiddens)
  got, got_vjp = jax.vjp(lambda h: model_lib.at_exit_depths(cfg, h), hiddens)
  np.testing.assert_array_equal(got, want)
  np.testing.assert_array_equal(got_vjp(cotangent)[0], want_vjp(cotangent)[0])


def test_block_sharing_shares_gradients():
  """With a cycle schedule both uses of a block contribute to its one gradient."""
  cfg = small_config(schedule='cycle', num_blocks=2, num_layers=4)
  params = tiny_models.random_params(cfg)
  assert jax.tree.leaves(params['blocks'])[0].shape[0] == 2
  tokens = random_tokens((1, 6), cfg.vocab_size)
  # Jitted: one program per gradient instead of one per eager operation.
  grads = jax.jit(jax.grad(lambda p: model_lib.forward_train(cfg, p, tokens)[-1].sum()))(params)
  # Recompute the same gradient with the steps unrolled over 4 independent copies, then sum
  # (copies and sums in numpy: no programs to compile).
  unshared = dict(params)
  unshared['blocks'] = jax.tree.map(lambda p: np.asarray(p)[model_lib.block_table(cfg)],
                                    params['blocks'])
  cfg4 = small_config(num_layers=4)
  g4 = jax.jit(jax.grad(lambda p: model_lib.forward_train(cfg4, p, tokens)[-1].sum()))(
      unshared)
  folded = jax.tree.map(lambda g: np.asarray(g)[0:2] + np.asarray(g)[2:4],
                        g4['blocks'])  # steps [0,1,0,1]
  for a, b in zip(jax.tree.leaves(grads['blocks']), jax.tree.leaves(folded)):
    np.testing.assert_allclose(a, b, atol=1e-4, rtol=1e-4)


def test_bfloat16_compute_keeps_float32_params():
  cfg = small_config(dtype='bfloat16')
  params = _init_params(cfg, jax.random.key(0))
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(params))
  tokens = random_tokens((1, 6), cfg.vocab_size)
  low = _forward(cfg, params, tokens)
  high = _forward(small_config(), params, tokens)
  assert low.dtype == jnp.float32
  np.testing.assert_allclose(low, high, atol=0.05)


def test_schedules():
  idx = lambda s, b, n: list(model_lib.block_index(s, np.arange(n), n, b))
  assert idx('unshared', 4, 4) == [0, 1, 2, 3]
  assert idx('cycle', 2, 6) == [0, 1, 0, 1, 0, 1]
  assert idx('sequence', 2, 6) == [0, 0, 0, 1, 1, 1]
  assert idx('middle_cycle', 4, 8) == [0, 1, 2, 1, 2, 1, 2, 3]
  assert idx('middle_sequence', 4, 8) == [0, 1, 1, 1, 2, 2, 2, 3]
  traced = jax.jit(lambda s: model_lib.block_index('middle_cycle', s, 8, 4))
  assert [int(traced(jnp.int32(s))) for s in range(8)] == idx('middle_cycle', 4, 8)


def test_exit_layer_parsing():
  assert model_lib.parse_exit_layers('all', 4) == (1, 2, 3, 4)
  assert model_lib.parse_exit_layers('all', 4, min_exit_layer=3) == (3, 4)
  assert model_lib.parse_exit_layers('every:2', 5) == (2, 4, 5)
  assert model_lib.parse_exit_layers('last', 5) == (5,)
  assert model_lib.parse_exit_layers('1,3', 5) == (1, 3, 5)
  with pytest.raises(ValueError, match='config.model.exit_layers'):
    model_lib.parse_exit_layers('0,2', 4)
  with pytest.raises(ValueError, match='config.model.exit_layers'):
    model_lib.parse_exit_layers('every:x', 4)


def test_smollm2_sized_config_shapes_without_memory():
  """eval_shape of a SmolLM2-135M-sized model: the known parameter count, no allocation."""
  c = config_lib.base_config()
  c.model.update(dict(vocab_size=49152, width=576, num_layers=30, num_heads=9,
                      num_kv_heads=3, mlp_dim=1536, rope_base=100000.0))
  cfg = model_lib.ModelConfig.from_config(config_lib.validate(c).model)
  shapes = jax.eval_shape(lambda: model_lib.init_params(cfg, jax.random.key(0)))
  assert model_lib.count_params(shapes) == 134_515_008
  assert shapes['blocks']['attn']['k'].shape == (30, 576, 3, 64)
  logits = jax.eval_shape(lambda p, t: model_lib.forward_train(cfg, p, t), shapes,
                          jax.ShapeDtypeStruct((2, 16), jnp.int32))
  assert logits.shape == (30, 2, 16, 49152)
  axes = model_lib.param_logical_axes(cfg)
  assert axes['blocks']['attn']['q'] == ('layers', 'embed', 'heads', 'head_dim')
  assert axes['embed']['embedding'] == ('vocab', 'embed')
