"""Per-exit heads (exit norms, adapters), frozen-trunk training and init_from."""
import dataclasses
import functools
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import adaptive_depth as ad
from adaptive_depth import depth as depth_lib
from adaptive_depth import exit_heads
from adaptive_depth import exits
from adaptive_depth import model as model_lib
from adaptive_depth.data import pipeline
from adaptive_depth.decode import adaptive_decode
from adaptive_depth.decode import speculative
from adaptive_depth.train import losses
from adaptive_depth.train import state as state_lib
from tests import numpy_reference
from tests import tiny_models

REPO = pathlib.Path(__file__).resolve().parents[1]
EXITS_TINY = f'{REPO / "configs" / "smollm2_exits.py"}:tiny'
NUM_LAYERS = tiny_models.NUM_LAYERS


TRUNK = tiny_models.config(width=32, head_dim=16, mlp_dim=64, exit_depths=(2, 3, 4))
HEADS = dataclasses.replace(TRUNK, exit_norms=True, exit_adapter_rank=4)


def _random(cfg, seed=0):
  return tiny_models.random_params(cfg, seed=seed)


def _with_trunk(params, trunk):
  return {**trunk, 'exit_heads': params['exit_heads']}


def _tokens(batch=2, length=7, seed=1):
  ids = np.random.default_rng(seed).integers(0, 256, (batch, length))
  return jax.device_put(ids.astype(np.int32))  # cast by numpy: no program to compile


def _hidden(shape, seed=0):
  """Random hidden states [..., D] float32, drawn and cast with numpy: jax.random, or a
  cast by jnp, compiles a program per shape."""
  return jax.device_put(np.random.default_rng(seed).standard_normal(shape).astype(np.float32))


# Library functions run jitted, one program per config (static) and shapes: called eagerly
# they compile a program per operation, which took most of this module's time.
_forward = tiny_models.forward_train
_reference_forward = jax.jit(model_lib.reference_forward, static_argnums=0)
_init_params = tiny_models.init_params
# exit_number static (None or an int) or traced (an int array, one exit per token).
_head_logits = jax.jit(model_lib.head_logits, static_argnums=(0, 3))
_head_logits_per_token = jax.jit(model_lib.head_logits, static_argnums=0)
_init_exit_heads = jax.jit(exit_heads.init_exit_heads, static_argnums=0)
_multi_exit_loss = jax.jit(losses.multi_exit_loss, static_argnums=3)
_forward_adaptive = jax.jit(depth_lib.forward_adaptive, static_argnums=0)
_prefill = jax.jit(adaptive_decode.prefill, static_argnums=(0, 4))
_decode_step = jax.jit(adaptive_decode.decode_step, static_argnums=0)
_generate_speculative = jax.jit(
    speculative.generate_speculative, static_argnums=0,
    static_argnames=('max_new_tokens', 'draft_depth', 'num_draft'))


# ----------------------------------------------------------------------------- the model


def test_without_exit_heads_the_tree_and_logits_are_unchanged():
  params = _random(TRUNK)
  assert set(params) == {'embed', 'blocks', 'final_norm'}
  assert set(model_lib.param_logical_axes(TRUNK)) == set(params)
  tokens = _tokens()
  logits = np.asarray(_forward(TRUNK, params, tokens))
  for row in range(tokens.shape[0]):
    expected = numpy_reference.model_exit_logits(
        params, np.asarray(tokens[row]), range(NUM_LAYERS), TRUNK.exit_depths,
        TRUNK.norm_eps, TRUNK.rope_base)
    np.testing.assert_allclose(logits[:, row], np.stack(expected), atol=2e-4, rtol=2e-4)
  # Without heads, exit numbers change nothing: every exit reads through final_norm.
  h = _hidden((2, 3, TRUNK.width))
  np.testing.assert_array_equal(_head_logits(TRUNK, params, h, 0),
                                _head_logits(TRUNK, params, h, None))


def test_exit_head_layout_and_logical_axes():
  params = jax.eval_shape(lambda: model_lib.init_params(HEADS, jax.random.key(0)))
  heads = jax.tree.map(lambda x: x.shape, params['exit_heads'])
  assert heads == {'norm': (2, 32), 'adapter': {'a': (2, 32, 4), 'b': (2, 4, 32)}}
  axes = model_lib.param_logical_axes(HEADS)
  assert jax.tree.structure(axes, is_leaf=lambda x: isinstance(x, tuple)) == (
      jax.tree.structure(params))
  assert axes['exit_heads']['norm'] == ('exits', 'norm')
  rules = dict(ad.base_config().sharding.rules)
  for names in jax.tree.leaves(axes['exit_heads'], is_leaf=lambda x: isinstance(x, tuple)):
    assert all(rules[n] is None for n in names), names  # small: replicated
  # The trunk's leaves are exactly the trunk-only model's, initialised identically.
  trunk = _init_params(TRUNK, jax.random.key(3))
  with_heads = _init_params(HEADS, jax.random.key(3))
  assert jax.tree.structure(trunk) == jax.tree.structure(
      {k: v for k, v in with_heads.items() if k != 'exit_heads'})
  for a, b in zip(jax.tree.leaves(trunk), jax.tree.leaves(
      {k: v for k, v in with_heads.items() if k != 'exit_heads'})):
    np.testing.assert_array_equal(a, b)


def test_last_exit_is_the_trunks_and_early_exits_use_their_heads():
  trunk = _random(TRUNK)
  params = _with_trunk(_random(HEADS, seed=5), trunk)
  tokens = _tokens()
  plain = np.asarray(_forward(TRUNK, trunk, tokens))
  logits = np.asarray(_forward(HEADS, params, tokens))
  np.testing.assert_array_equal(logits[-1], plain[-1])
  assert np.abs(logits[:-1] - plain[:-1]).max() > 1e-2
  # The Python loop, one exit at a time, agrees with the scan and ALL_EXITS.
  for e, ref in enumerate(_reference_forward(HEADS, params, tokens)):
    np.testing.assert_allclose(ref, logits[e], atol=1e-5, rtol=1e-5)
  # Per-token exit numbers pick each token's own exit.
  h = _hidden((2, 5, HEADS.width))
  number = jnp.asarray(np.random.default_rng(2).integers(0, 3, (2, 5)))
  each = np.stack([_head_logits(HEADS, params, h, e) for e in range(3)])
  picked = np.take_along_axis(each, np.asarray(number)[None, ..., None], 0)[0]
  np.testing.assert_allclose(_head_logits_per_token(HEADS, params, h, number), picked,
                             atol=1e-5, rtol=1e-5)
  traced = jax.jit(lambda e: model_lib.head_logits(HEADS, params, h, e))(jnp.int32(1))
  np.testing.assert_allclose(traced, each[1], atol=1e-5, rtol=1e-5)


def test_fresh_heads_copied_from_the_final_norm_read_as_before():
  trunk = _random(TRUNK)
  heads = _init_exit_heads(HEADS, jax.random.key(0), trunk['final_norm']['scale'])
  tokens = _tokens()
  np.testing.assert_allclose(_forward(HEADS, {**trunk, 'exit_heads': heads}, tokens),
                             _forward(TRUNK, trunk, tokens), atol=1e-6, rtol=1e-6)


def test_adaptive_depth_and_decode_use_the_exit_heads():
  params = _with_trunk(_random(HEADS, seed=5), _random(TRUNK))
  tokens = _tokens()
  full = _forward(HEADS, params, tokens)
  for e, depth in enumerate(HEADS.exit_depths):  # exit_at is traced: one program for all
    out = _forward_adaptive(HEADS, params, tokens,
                            exits.ExitPolicy(measure='max_prob', exit_at=depth))
    np.testing.assert_array_equal(out.exit_depth, depth)
    np.testing.assert_allclose(out.logits, full[e], atol=1e-5, rtol=1e-5)

  # One decode step after a full-depth prefill: layers below the exit see exact K/V, so
  # the token forced out at depth 2 gets exit 0's head on the state forward_train has.
  prompt, next_token = tokens[:, :-1], tokens[:, -1]
  lengths = jnp.full((2,), prompt.shape[1], jnp.int32)
  cache, _ = _prefill(HEADS, params, prompt, lengths, prompt.shape[1] + 2)
  _, logits, exit_depth, _ = _decode_step(
      HEADS, params, cache, next_token, lengths, exits.ExitPolicy(measure='max_prob',
                                                                  exit_at=2), lengths)
  np.testing.assert_array_equal(exit_depth, 2)
  np.testing.assert_allclose(logits, full[0, :, -1], atol=1e-4, rtol=1e-4)


def test_speculative_drafts_read_an_exit_head():
  with pytest.raises(ValueError, match='draft_depth=1.*allowed: \\[2, 3\\]'):
    speculative.validate_args(HEADS, 1, 2)
  speculative.validate_args(TRUNK, 1, 2)  # no heads: any depth reads the final norm
  params = _with_trunk(_random(HEADS, seed=5), _random(TRUNK))
  prompt = _tokens(length=5)
  lengths = jnp.asarray([5, 3], jnp.int32)
  out = _generate_speculative(HEADS, params, prompt, lengths, max_new_tokens=6,
                              draft_depth=2, num_draft=2, eos_id=-1, pad_id=0)
  # Exact whatever the draft head: the verifier's greedy tokens are full depth's.
  want = tiny_models.greedy_reference(HEADS, params, [prompt[0].tolist(),
                                                      prompt[1, :3].tolist()], 6)
  np.testing.assert_array_equal(np.asarray(out.tokens), want)


# ----------------------------------------------------------------------------- training


@pytest.fixture(scope='module')
def source_run(tmp_path_factory) -> str:
  """A trained trunk: the tiny quickstart, the trunk configs/smollm2_exits.py:tiny names."""
  workdir = str(tmp_path_factory.mktemp('source'))
  config = ad.load_config(f'{REPO / "configs" / "quickstart.py"}:tiny')
  config.train.progress_bar = False
  ad.train_and_evaluate(config, workdir)
  return workdir


def _eval_batches(config, count=2):
  _, make_eval, _ = pipeline.make_train_and_eval_data(
      config.data, batch_size=config.train.batch_size, eval_batch_size=8, seed=0)
  return [jnp.asarray(b) for b, _ in zip(make_eval(), range(count))]


def _exit_losses(cfg, params, batches, kind):
  """Per-exit mean token CE ('lm') or KL from the last exit ('distill'), over batches."""
  return np.mean([_batch_exit_losses(cfg, kind, params, batch) for batch in batches], axis=0)


@functools.partial(jax.jit, static_argnums=(0, 1))
def _batch_exit_losses(cfg, kind, params, batch):
  """One batch [B, T + 1] of _exit_losses -> [E] (jitted: one program, not one per op)."""
  logits = model_lib.forward_train(cfg, params, batch[:, :-1])
  if kind == 'lm':
    return losses.multi_exit_loss(logits, batch[:, 1:], np.ones(len(logits)))[1]
  log_p = jax.nn.log_softmax(logits, -1)
  return jnp.sum(jnp.exp(log_p[-1]) * (log_p[-1] - log_p), -1).mean((1, 2))


def _numpy_exit_terms(seed: int):
  """Random logits [3 exits, 2, 5, 7], targets, exit weights, and numpy's log-softmax and
  per-exit mean cross entropy of them (the references of the loss tests)."""
  rng = np.random.default_rng(seed)
  logits = rng.standard_normal((3, 2, 5, 7)).astype(np.float32) * 2
  targets = rng.integers(0, 7, (2, 5))
  weights = np.asarray([0.2, 0.3, 0.5], np.float32)
  log_p = logits - logits.max(-1, keepdims=True)
  log_p = log_p - np.log(np.exp(log_p).sum(-1, keepdims=True))
  ce = -np.take_along_axis(log_p, targets[None, ..., None], -1)[..., 0].mean((1, 2))
  return logits, targets, weights, log_p, ce


@pytest.mark.parametrize('kind', ['lm', 'distill', 'lm_distill'])
def test_multi_exit_loss_against_numpy(kind):
  """Each exit's term from a numpy log-softmax: cross entropy on the targets ('lm'), the KL
  from the last exit for early exits ('distill'), or both summed ('lm_distill'); the last
  exit always keeps its cross entropy. Only the early exits get the KL's gradient."""
  logits, targets, weights, log_p, ce = _numpy_exit_terms(seed=0)
  kl = (np.exp(log_p[-1]) * (log_p[-1] - log_p)).sum(-1).mean((1, 2))
  early = {'lm': ce, 'distill': kl, 'lm_distill': ce + kl}[kind]
  want = weights[:2] @ early[:2] + weights[2] * ce[2]
  loss, per_exit, _ = _multi_exit_loss(jnp.asarray(logits), jnp.asarray(targets), weights,
                                       kind)
  np.testing.assert_allclose(loss, want, rtol=1e-5)
  np.testing.assert_allclose(per_exit, ce, rtol=1e-5)
  if kind != 'lm':  # the teacher is held fixed: its KL term moves only the early exits
    early_only = lambda x: losses.multi_exit_loss(x, jnp.asarray(targets),
                                                  np.asarray([1.0, 1.0, 0.0]), kind)[0]
    grad = np.asarray(jax.jit(jax.grad(early_only))(jnp.asarray(logits)))
    assert np.abs(grad[-1]).max() == 0 and np.abs(grad[:2]).max() > 1e-3


def test_steady_exit_loss_against_numpy():
  """'lm_steady': each exit's cross entropy, plus for every exit after the first the KL from
  the exit before it; the earlier exit is held fixed (its KL moves only the later one)."""
  logits, targets, weights, log_p, ce = _numpy_exit_terms(seed=1)
  kl = (np.exp(log_p[:-1]) * (log_p[:-1] - log_p[1:])).sum(-1).mean((1, 2))  # [2]
  want = weights[0] * ce[0] + weights[1:] @ (ce[1:] + kl)
  loss, per_exit, _ = _multi_exit_loss(jnp.asarray(logits), jnp.asarray(targets), weights,
                                       'lm_steady')
  np.testing.assert_allclose(loss, want, rtol=1e-5)
  np.testing.assert_allclose(per_exit, ce, rtol=1e-5)
  # Exit i's term moves exit i only: the exit before it is held fixed.
  grad_of = jax.jit(jax.grad(lambda x, w: losses.multi_exit_loss(
      x, jnp.asarray(targets), w, 'lm_steady')[0]))
  for only in (1, 2):
    grad = np.abs(np.asarray(grad_of(jnp.asarray(logits), jnp.asarray(np.eye(3)[only],
                                                                       jnp.float32))))
    assert grad[only].max() > 1e-3
    assert all(grad[other].max() == 0 for other in range(3) if other != only)


@pytest.mark.parametrize('exit_loss', ['lm', 'distill'])
def test_frozen_trunk_fine_tune(source_run, tmp_path, exit_loss):
  config = ad.load_config(EXITS_TINY)
  config.train.init_from = source_run
  config.train.exit_loss = exit_loss
  config.train.learning_rate = 1e-2
  summary = ad.train_and_evaluate(config, str(tmp_path))
  assert all(0 <= r['agreement'] <= 1 for r in summary['eval'])
  assert summary['eval'][-1]['agreement'] == 1.0

  source, tuned = ad.load(source_run), ad.load(str(tmp_path))
  assert set(tuned.params) == set(source.params) | {'exit_heads'}
  for key in source.params:  # the trunk is bit for bit the source's
    for a, b in zip(jax.tree.leaves(source.params[key]), jax.tree.leaves(tuned.params[key])):
      np.testing.assert_array_equal(a, b)
  cfg = tuned.model_config
  fresh = _init_exit_heads(cfg, jax.random.key(config.seed),
                           source.params['final_norm']['scale'])
  for a, b in zip(jax.tree.leaves(fresh), jax.tree.leaves(tuned.params['exit_heads'])):
    assert np.abs(np.asarray(a) - np.asarray(b)).max() > 1e-4  # every head leaf trained

  # The early exits' objective went down on held-out text (the heads started as the
  # source's own reading, so `before` is the source model).
  batches = _eval_batches(config)
  before = _exit_losses(cfg, {**source.params, 'exit_heads': fresh}, batches, exit_loss)
  after = _exit_losses(cfg, tuned.params, batches, exit_loss)
  assert np.all(after[:-1] < before[:-1]), (before, after)
  np.testing.assert_allclose(after[-1], before[-1], rtol=1e-6)


def test_frozen_trunk_has_no_optimizer_state():
  config = ad.load_config(EXITS_TINY)
  cfg = model_lib.ModelConfig.from_config(config.model)
  # Shapes only (what count_params reads): nothing to compile.
  params = jax.eval_shape(lambda: model_lib.init_params(cfg, jax.random.key(0)))
  state = jax.eval_shape(state_lib.make_optimizer(config.train).init, params)
  heads = model_lib.count_params(params['exit_heads'])
  assert model_lib.count_params(state) <= 2 * heads + 8  # Adam moments + counters


def test_init_from_mismatch_names_the_keys(source_run, tmp_path):
  config = ad.load_config(EXITS_TINY)
  config.train.init_from = source_run
  config.model.mlp_dim = 96
  with pytest.raises(ad.ConfigError) as error:
    ad.train_and_evaluate(config, str(tmp_path / 'a'))
  message = str(error.value)
  assert 'config.train.init_from' in message and 'config.model.mlp_dim: 128' in message
  assert 'width' not in message

  config = ad.load_config(EXITS_TINY)
  config.train.init_from = str(tmp_path / 'missing')
  with pytest.raises(ad.ConfigError, match='config.train.init_from=.*no config.json'):
    ad.train_and_evaluate(config, str(tmp_path / 'b'))

  config = ad.load_config(EXITS_TINY)  # a frozen random trunk is a mistake
  with pytest.raises(ad.ConfigError, match="trainable='exit_heads'.*config.train.init_from"):
    ad.train_and_evaluate(config, str(tmp_path / 'c'))


BAD_VALUES = [
    ({'train.exit_loss': 'kl'}, 'config.train.exit_loss', 'distill'),
    ({'train.trainable': 'trunk'}, 'config.train.trainable', 'exit_heads'),
    ({'model.exit_adapter_rank': -1}, 'config.model.exit_adapter_rank', '-1'),
    ({'model.exit_layers': 'last'}, 'config.model.exit_layers', 'only the last layer'),
    ({'model.exit_norms': False, 'model.exit_adapter_rank': 0}, 'config.train.trainable',
     'config.model.exit_norms=True'),
    ({'model.exit_layers': '2,4', 'benchmark.speculative': '3x2'},
     'config.benchmark.speculative', '[2]'),
]


@pytest.mark.parametrize('overrides,key,shown', BAD_VALUES, ids=[b[1] for b in BAD_VALUES])
def test_config_errors(overrides, key, shown):
  config = ad.load_config(EXITS_TINY)
  for name, value in overrides.items():
    group, field = name.split('.')
    config[group][field] = value
  with pytest.raises(ad.ConfigError) as error:
    ad.validate(config)
  lines = [l for l in str(error.value).splitlines() if key in l]
  assert lines and shown in lines[0], str(error.value)
