"""config.model.attention: every implementation equals the 'xla' reference (layers.attend)
within 1e-5 in float32, forward and gradient, with grouped K/V heads. Splash runs in the
Pallas interpreter here (its TPU kernel cannot run on CPU)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import adaptive_depth as ad
from adaptive_depth import attention
from adaptive_depth import config_lib
from adaptive_depth import layers
from adaptive_depth import model as model_lib
from tests import tiny_models

HEADS, KV_HEADS, HEAD_DIM = 4, 2, 8


def _inputs(batch, q_len, kv_len, seed=0):
  """q [B, T, HEADS, HEAD_DIM], k and v [B, S, KV_HEADS, HEAD_DIM]: float32 draws (made in
  numpy: eager jax ops would each compile a program)."""
  rng = np.random.default_rng(seed)
  q = jnp.asarray(rng.standard_normal((batch, q_len, HEADS, HEAD_DIM), np.float32))
  k, v = (jnp.asarray(rng.standard_normal((batch, kv_len, KV_HEADS, HEAD_DIM), np.float32))
          for _ in range(2))
  return q, k, v


def _causal_mask(batch, length):
  """layers.causal_mask of positions 0..length-1 in every row, [B, T, T] (numpy)."""
  positions = np.broadcast_to(np.arange(length), (batch, length))
  return layers.causal_mask(positions, positions)


def _ragged_causal_mask(lengths, q_len):
  """Causal, and no key beyond each row's length (right-padded rows of ragged prompts);
  every query keeps at least its first key. [B, T, T] (numpy)."""
  valid = np.arange(q_len)[None, :] < np.asarray(lengths)[:, None]
  return _causal_mask(len(lengths), q_len) & valid[:, None, :]


def _check_against_xla(run, q, k, v, mask):
  """run(q, k, v, mask) against layers.attend's einsum: outputs, and the gradients of a
  fixed random projection of the output with respect to q, k and v."""
  weights = jnp.asarray(np.random.default_rng(9).standard_normal(q.shape, np.float32))
  reference = lambda q, k, v, mask: layers.attend(q, k, v, mask)

  @jax.jit  # one program each (eager ops would compile one by one)
  def output_and_grads(q, k, v):
    outputs = [fn(q, k, v, mask) for fn in (run, reference)]
    grads = [jax.grad(lambda q, k, v, fn=fn: jnp.sum(fn(q, k, v, mask) * weights),
                      argnums=(0, 1, 2))(q, k, v) for fn in (run, reference)]
    return outputs, grads

  (out, out_ref), (got, want) = output_and_grads(q, k, v)
  np.testing.assert_allclose(out, out_ref, atol=1e-5, rtol=1e-5)
  for g, w in zip(got, want):
    assert np.abs(np.asarray(w)).max() > 1e-3  # a gradient that is there to compare
    np.testing.assert_allclose(g, w, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize('implementation', ['heads_major', 'dot_product_attention'])
@pytest.mark.parametrize('shape', ['ragged_prompts', 'decode', 'a_row_sees_nothing'])
def test_implementation_equals_xla(implementation, shape):
  if shape == 'ragged_prompts':
    q, k, v = _inputs(3, 12, 12)
    mask = _ragged_causal_mask([12, 7, 3], 12)
  elif shape == 'a_row_sees_nothing':  # its queries average every value, with no gradient
    q, k, v = _inputs(2, 6, 6)        # reaching its scores (they were replaced by a constant)
    mask = _causal_mask(2, 6) & np.asarray([True, False])[:, None, None]
  else:  # one new token per row against a cache with its own filled length per row
    q, k, v = _inputs(3, 1, 20)
    mask = (np.arange(20)[None, :] < np.asarray([20, 9, 1])[:, None])[:, None, :]
  _check_against_xla(lambda q, k, v, mask: layers.attend(
      q, k, v, mask, implementation=implementation), q, k, v, mask)


def test_heads_major_in_bfloat16_keeps_each_gradient_in_its_input_dtype():
  """Its own backward (on CPU) gives every gradient in its input's dtype, near the 'xla'
  gradient at bfloat16 precision (about 1% of the largest entry)."""
  q, k, v = (x.astype(jnp.bfloat16) for x in _inputs(2, 8, 8))
  mask = _causal_mask(2, 8)
  loss = lambda fn: lambda q, k, v: jnp.sum(fn(q, k, v, mask).astype(jnp.float32) ** 2)
  got = jax.jit(jax.grad(loss(attention.heads_major), argnums=(0, 1, 2)))(q, k, v)
  want = jax.jit(jax.grad(loss(layers.attend), argnums=(0, 1, 2)))(q, k, v)
  for g, w in zip(got, want):
    assert g.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(w, np.float32),
                               atol=0.01 * float(jnp.max(jnp.abs(w))), rtol=0.02)


@pytest.mark.skipif(jax.default_backend() != 'cpu', reason='the custom VJP is used on CPU only')
def test_heads_major_differentiates_in_reverse_mode_only_on_cpu():
  """Its gradient is a custom VJP (on CPU): forward-mode differentiation is refused there
  with jax's own error, and 'xla' (the reference) takes it; forward over reverse works."""
  q, k, v = _inputs(1, 4, 4)
  mask = _causal_mask(1, 4)
  tangents = (jnp.ones_like(q), jnp.ones_like(k), jnp.ones_like(v))
  jax.jvp(lambda q, k, v: layers.attend(q, k, v, mask), (q, k, v), tangents)
  with pytest.raises(TypeError, match='custom_vjp'):
    jax.jvp(lambda q, k, v: attention.heads_major(q, k, v, mask), (q, k, v), tangents)
  hessian = lambda fn: jax.hessian(lambda q: jnp.sum(fn(q, k, v, mask) ** 2))(q)
  np.testing.assert_allclose(hessian(attention.heads_major), hessian(layers.attend),
                             atol=1e-4, rtol=1e-4)


def test_heads_major_off_cpu_keeps_autodiffs_gradient(monkeypatch):
  """Where jax's backend is not the CPU, heads_major is differentiated by autodiff (the
  custom VJP is for the CPU's dot library): forward mode works and the gradient is the
  'xla' one. (Checked here by making attention.tuned_for_cpu report False while tracing.)"""
  q, k, v = _inputs(2, 6, 6)
  mask = _ragged_causal_mask([6, 4], 6)
  monkeypatch.setattr(attention, 'tuned_for_cpu', lambda: False)
  tangents = (jnp.ones_like(q), jnp.ones_like(k), jnp.ones_like(v))
  jax.jvp(lambda q, k, v: attention.heads_major(q, k, v, mask), (q, k, v), tangents)
  _check_against_xla(attention.heads_major, q, k, v, mask)


@pytest.mark.parametrize('length', [128, 384])
def test_splash_equals_xla_in_the_interpreter(length):
  """Through layers.attend, as a block calls it: 128 and 384 tokens (blocks of 128, since
  512 does not divide 384). Off TPU the kernel runs in the Pallas interpreter."""
  pytest.importorskip('jax.experimental.pallas.ops.tpu.splash_attention',
                      reason='this jax has no Pallas splash attention')
  q, k, v = _inputs(1, length, length, seed=1)
  _check_against_xla(lambda q, k, v, mask: layers.attend(q, k, v, mask, implementation='splash'),
                     q, k, v, _causal_mask(1, length))


def test_splash_falls_back_where_it_cannot_run(monkeypatch):
  """A length that is not a multiple of 128 (a prefill padded to 16) runs heads_major."""
  monkeypatch.setattr(attention, 'splash', lambda *a, **k: pytest.fail('splash ran'))
  q, k, v = _inputs(2, 16, 16)
  mask = _ragged_causal_mask([16, 9], 16)
  both = jax.jit(lambda q, k, v: (layers.attend(q, k, v, mask, implementation='splash'),
                                  layers.attend(q, k, v, mask)))  # one program, not op by op
  np.testing.assert_allclose(*both(q, k, v), atol=1e-5, rtol=1e-5)


def test_the_config_key_reaches_the_blocks(monkeypatch):
  """config.model.attention reaches every block: under 'heads_major' (the CPU default) each
  block calls it (counted while tracing), and the model's exit logits equal those under
  'xla' on a tiny GQA model (outputs and gradients are compared above, per call)."""
  config = ad.load_config('configs/quickstart.py:tiny')
  config.model.num_kv_heads, config.model.num_layers = 2, 2
  # long enough for heads_major's causal split (test_causal_split_is_the_same_function)
  length = attention.CAUSAL_SPLIT_MIN_LEN
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, 256, (2, length)))
  names = ('xla', 'heads_major')  # the reference and the CPU default
  cfgs = []
  for name in names:
    config.model.attention = name
    cfgs.append(model_lib.ModelConfig.from_config(config.model))
    assert cfgs[-1].block_config.attention == name
  params = tiny_models.init_params(cfgs[0], jax.random.key(0))
  calls = []
  real = attention.heads_major
  monkeypatch.setattr(attention, 'heads_major', lambda *a: calls.append(a[4:]) or real(*a))
  logits = jax.jit(lambda p: [model_lib.forward_train(cfg, p, tokens) for cfg in cfgs])(params)
  # the scanned block traces once: heads_major was called by the model, told that its own
  # tokens' mask is causal
  assert calls and all(args == (True,) for args in calls)
  for got in logits[1:]:
    np.testing.assert_allclose(got, logits[0], atol=1e-5)


@pytest.mark.parametrize('mask_kind', ['ragged_prompts', 'rows_see_nothing'])
def test_causal_split_is_the_same_function(monkeypatch, mask_kind):
  """heads_major(causal=True) runs a long enough sequence as two halves of its queries, the
  first against the first half of the keys, and equals 'xla' forward and gradient: on ragged
  prompts, and with rows that see no key (keys masked as a Mixture-of-Recursions gather
  masks its invalid slots), in the first half and in the second."""
  length = attention.CAUSAL_SPLIT_MIN_LEN
  q, k, v = _inputs(3, length, length, seed=4)
  mask = _ragged_causal_mask([length, length - 50, 9], length)
  if mask_kind == 'rows_see_nothing':
    valid = np.ones((3, length), bool)
    valid[1, :length // 2 + 10] = False  # row 1's first 74 queries see no key
    valid[2, ::3] = False                # row 2's query 0 sees no key
    mask = mask & valid[:, None, :]
    assert not mask[1, length // 2 + 5].any() and not mask[1, 3].any()
  calls = []
  real = attention._heads_major
  monkeypatch.setattr(attention, '_heads_major',
                      lambda q, k, *a: calls.append((q.shape[1], k.shape[1])) or real(q, k, *a))
  _check_against_xla(lambda q, k, v, mask: attention.heads_major(q, k, v, mask, causal=True),
                     q, k, v, mask)
  half = length // 2
  assert set(calls) == {(half, half), (half, length)}  # the split, not the whole function
  calls.clear()
  odd = lambda x: x[:, :-1]  # an odd length is not split
  jax.jit(lambda q, k, v: attention.heads_major(q, k, v, mask[:, :-1, :-1], causal=True))(
      *map(odd, (q, k, v)))
  assert calls == [(length - 1, length - 1)]


def test_auto_picks_the_platforms_best_and_bad_values_are_named():
  assert [attention.resolve('auto', p) for p in ('cpu', 'gpu', 'tpu')] == [
      'heads_major', 'dot_product_attention', 'splash']
  config = ad.load_config('configs/quickstart.py:tiny')
  config.model.attention = 'flash'
  with pytest.raises(config_lib.ConfigError, match="attention='flash'; allowed: auto, xla"):
    config_lib.validate(config)
  if jax.default_backend() != 'tpu':
    config.model.attention = 'splash'
    with pytest.raises(config_lib.ConfigError, match='runs on TPU only'):
      config_lib.validate(config)


@pytest.mark.parametrize('kwargs, message', [
    (dict(implementations=['flash']), "--attention='flash'; allowed: auto, xla"),
    (dict(implementations=['xla'], rounds=-1), '--rounds=-1: must be >= 0'),
])
def test_train_benchmark_refuses_bad_settings(tmp_path, kwargs, message):
  """launch/train_benchmark.py: bad settings are named before anything compiles. (Its
  timings are figures quoted in the README, not tested.)"""
  from adaptive_depth.train import step_benchmark  # pylint: disable=g-import-not-at-top
  with pytest.raises(config_lib.ConfigError, match=message):
    step_benchmark.run_step_benchmark(ad.load_config('configs/quickstart.py:tiny'),
                                      str(tmp_path / 'out.json'), **kwargs)


def test_a_workdir_trained_with_splash_loads_off_tpu(tmp_path):
  """How attention runs is the machine's choice: a run saved with 'splash' loads off TPU
  as 'auto' (on TPU it stays 'splash')."""
  import json  # pylint: disable=g-import-not-at-top
  from adaptive_depth import saved_model  # pylint: disable=g-import-not-at-top
  workdir = tiny_models.save_workdir(str(tmp_path / 'run'), 'configs/shared_exit.py:tiny')
  path = tmp_path / 'run' / 'config.json'
  saved = json.loads(path.read_text())
  saved['model']['attention'] = 'splash'
  path.write_text(json.dumps(saved))
  config = saved_model.load_run_config(workdir)
  assert config.model.attention == ('splash' if jax.default_backend() == 'tpu' else 'auto')
