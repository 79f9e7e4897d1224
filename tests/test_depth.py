"""Adaptive depth loop, confidence measures, thresholds, costs, LoRA relaxation."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from adaptive_depth import costs
from adaptive_depth import depth
from adaptive_depth import evaluation
from adaptive_depth import exits
from adaptive_depth import model as model_lib
from adaptive_depth.train import classifier as classifier_lib
from tests import numpy_reference as ref
from tests import tiny_models
from tests.test_model import small_config


# Library functions run jitted, one program per config (static) and shapes: called eagerly
# they compile a program per operation.
_forward, random_tokens = tiny_models.forward_train, tiny_models.random_tokens
_forward_adaptive = jax.jit(depth.forward_adaptive, static_argnums=0)
_scores = {'max_prob': jax.jit(exits.max_prob), 'softmax_diff': jax.jit(exits.softmax_diff)}


@pytest.fixture(scope='module')
def setup():
  cfg = small_config(num_layers=5)
  params = tiny_models.random_params(cfg, scale=0.2)
  tokens = random_tokens((3, 12), cfg.vocab_size, seed=1)
  adaptive = jax.jit(lambda p, t, pol: depth.forward_adaptive(cfg, p, t, pol))
  return cfg, params, tokens, adaptive


@pytest.fixture(scope='module')
def full(setup):
  """The setup model's train-mode logits at every exit, [E, B, T, V], computed once."""
  cfg, params, tokens, _ = setup
  return _forward(cfg, params, tokens)


def _quantile_threshold(full, measure, q=0.7):
  """A threshold that some tokens clear at the first exits and others do not."""
  return float(np.quantile(np.asarray(_scores[measure](full[:2])), q))


def test_never_exit_equals_train_mode(setup, full):
  cfg, params, tokens, adaptive = setup
  out = adaptive(params, tokens, exits.ExitPolicy(measure='never'))
  np.testing.assert_allclose(out.logits, full[-1], atol=1e-5, rtol=1e-5)
  assert (np.asarray(out.exit_depth) == cfg.num_layers).all()
  assert int(out.steps_run) == cfg.num_layers


@pytest.mark.parametrize('k', [1, 2, 4])
def test_exit_at_depth_k_equals_truncated_model(setup, full, k):
  cfg, params, tokens, adaptive = setup
  out = adaptive(params, tokens, exits.ExitPolicy(exit_at=k))
  assert (np.asarray(out.exit_depth) == k).all()
  assert int(out.steps_run) == k  # the loop stops once nothing is active
  truncated = full[k - 1]
  np.testing.assert_allclose(out.logits, truncated, atol=1e-5, rtol=1e-5)
  # And against the independent numpy model cut at depth k.
  want = ref.model_exit_logits(params, np.asarray(tokens[0]), model_lib.block_table(cfg)[:k],
                               (k,), cfg.norm_eps, cfg.rope_base)[0]
  np.testing.assert_allclose(np.asarray(out.logits[0]), want, atol=1e-4, rtol=1e-4)


def test_exited_tokens_are_frozen_and_attended(setup, full):
  """A token exiting at depth e outputs the logits of its depth-e state. That state equals the
  full run's when no earlier token of its row left before depth e - 1 (deeper layers read
  K/V from exited tokens' frozen states, which is what state propagation means)."""
  cfg, params, tokens, adaptive = setup
  policy = exits.ExitPolicy(measure='max_prob', threshold=_quantile_threshold(full, 'max_prob'))
  out = adaptive(params, tokens, policy)
  d = np.asarray(out.exit_depth)
  assert 1 < d.mean() < cfg.num_layers and len(np.unique(d)) > 1, d
  prefix_min = np.minimum.accumulate(d, axis=1)
  checked = 0
  for b, t in zip(*np.nonzero(d < cfg.num_layers)):
    if prefix_min[b, t] >= d[b, t] - 1:
      np.testing.assert_allclose(out.logits[b, t], full[d[b, t] - 1, b, t], atol=1e-4,
                                 rtol=1e-4)
      checked += 1
  assert checked >= 3
  # A token after an early-exited one differs from the full run: it read frozen K/V.
  later = [(b, t) for b, t in zip(*np.nonzero(d == cfg.num_layers))
           if prefix_min[b, t] < cfg.num_layers - 1]
  assert later and any(not np.allclose(out.logits[b, t], full[-1, b, t], atol=1e-4)
                       for b, t in later)


def test_rows_are_independent(setup, full):
  cfg, params, tokens, adaptive = setup
  policy = exits.ExitPolicy(measure='softmax_diff',
                            threshold=_quantile_threshold(full, 'softmax_diff'))
  out = adaptive(params, tokens, policy)
  changed = tokens.at[1].set((tokens[1] * 7 + 3) % cfg.vocab_size)
  out2 = adaptive(params, changed, policy)
  assert not np.array_equal(out.exit_depth[1], out2.exit_depth[1]) or not np.allclose(
      out.logits[1], out2.logits[1])
  for row in (0, 2):
    np.testing.assert_array_equal(out.exit_depth[row], out2.exit_depth[row])
    np.testing.assert_allclose(out.logits[row], out2.logits[row], atol=1e-6)
  # Each row alone gives the same result as inside the batch.
  alone = adaptive(params, tokens[2:3], policy)
  np.testing.assert_array_equal(alone.exit_depth[0], out.exit_depth[2])
  np.testing.assert_allclose(alone.logits[0], out.logits[2], atol=1e-5)
  # Also when the batch loop runs longer than the row alone would (the early stop).
  forced = jnp.asarray([[1] * 12, [4] * 12, [2] * 12])
  batch = adaptive(params, tokens, exits.ExitPolicy(measure='never', exit_at=forced))
  first = adaptive(params, tokens[:1], exits.ExitPolicy(measure='never', exit_at=forced[:1]))
  assert int(first.steps_run) == 1 and int(batch.steps_run) == 4
  np.testing.assert_allclose(first.logits[0], batch.logits[0], atol=1e-6)


def test_threshold_sweep_compiles_once(setup, full):
  cfg, params, tokens, _ = setup
  fn = evaluation.make_adaptive_fn(cfg)  # what launch/evaluate.py sweeps with
  mean_depths = []
  top = _quantile_threshold(full, 'softmax_diff', 0.95)
  for threshold in np.linspace(0.0, top, 10):
    out = fn(params, tokens, exits.ExitPolicy(measure='softmax_diff', threshold=threshold),
             None, None)
    mean_depths.append(float(out.exit_depth.mean()))
  assert fn._cache_size() == 1  # compiled programs, not traces
  assert mean_depths == sorted(mean_depths) and mean_depths[0] < mean_depths[-1]
  # Python floats, ints and numpy scalars for every traced knob share that one program
  # per (measure, schedule).
  for value in (0, 1, 0.5, np.float64(0.25), np.int64(1)):
    fn(params, tokens, exits.ExitPolicy(measure='softmax_diff', threshold=value,
                                        min_depth=value or 1), None, None)
  assert fn._cache_size() == 1
  for tau in (0.5, 2, 8.0):
    fn(params, tokens, exits.ExitPolicy(measure='softmax_diff', schedule='decaying',
                                        threshold=0.5, tau=tau, max_len=12), None, None)
  assert fn._cache_size() == 2


def test_decaying_threshold_uses_each_rows_own_position(setup, full):
  cfg, params, tokens, adaptive = setup
  score = np.asarray(_scores['softmax_diff'](full[0]))  # first exit
  policy = exits.ExitPolicy(measure='softmax_diff', schedule='decaying', threshold=0.0,
                            tau=1.0, max_len=12)
  # Rows at different offsets in their own sequences get different thresholds.
  row_positions = jnp.asarray(np.arange(12)[None] + np.array([[0], [20], [40]]))
  out = _forward_adaptive(cfg, params, tokens, policy, row_positions=row_positions)
  thresholds = np.clip(0.1 * np.exp(-1.0 * np.asarray(row_positions) / 12), 0, 1)
  np.testing.assert_array_equal(np.asarray(out.exit_depth) == 1, score >= thresholds)
  assert (score >= thresholds).any() and not (score >= thresholds).all()


def test_min_depth(setup):
  cfg, params, tokens, adaptive = setup
  out = adaptive(params, tokens, exits.ExitPolicy(measure='max_prob', threshold=0.0,
                                                  min_depth=3))
  assert (np.asarray(out.exit_depth) == 3).all()


def test_decaying_threshold_formula():
  policy = exits.ExitPolicy(schedule='decaying', threshold=0.8, tau=4.0, max_len=16)
  t = np.arange(16)[None]
  want = np.clip(0.9 * 0.8 + 0.1 * np.exp(-4.0 * t / 16), 0, 1)
  threshold_at = jax.jit(exits.threshold_at)  # one program, not one per operation
  np.testing.assert_allclose(threshold_at(policy, t), want, rtol=1e-6)
  constant = threshold_at(exits.ExitPolicy(threshold=0.3), t)
  np.testing.assert_allclose(constant, np.full((1, 16), 0.3), rtol=1e-6)


def test_confidence_measures_against_numpy():
  logits = np.random.default_rng(0).normal(size=(3, 50)) * 3
  # Each measure jitted: one program, not one per operation.
  softmax_diff = jax.jit(exits.softmax_diff, static_argnames='approx')
  p = np.exp(logits - logits.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  top = np.sort(p, -1)[:, ::-1]
  np.testing.assert_allclose(softmax_diff(logits), top[:, 0] - top[:, 1], atol=1e-6)
  np.testing.assert_allclose(softmax_diff(logits, approx=True), top[:, 0] - top[:, 1],
                             atol=1e-6)
  np.testing.assert_allclose(_scores['max_prob'](logits), top[:, 0], atol=1e-6)
  np.testing.assert_allclose(jax.jit(exits.neg_entropy)(logits), (p * np.log(p)).sum(-1),
                             atol=1e-5)
  a, b = np.random.default_rng(1).normal(size=(2, 4, 8))
  cos = (a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)
  np.testing.assert_allclose(jax.jit(exits.saturation)(a, b), cos, atol=1e-6)


def test_oracle_exits_where_the_exit_agrees(setup, full):
  cfg, params, tokens, _ = setup
  argmax = np.argmax(np.asarray(full), -1)  # [E, B, T]
  out = _forward_adaptive(cfg, params, tokens, exits.ExitPolicy(measure='oracle'),
                          oracle_tokens=jnp.asarray(argmax[-1]))
  d = np.asarray(out.exit_depth)
  assert d.mean() < cfg.num_layers
  np.testing.assert_array_equal(np.argmax(np.asarray(out.logits), -1)[d < cfg.num_layers],
                                argmax[-1][d < cfg.num_layers])
  # Position 0 attends only to itself, so its first agreeing depth is the full run's.
  first_agree = (argmax == argmax[-1][None]).argmax(0) + 1
  np.testing.assert_array_equal(d[:, 0], first_agree[:, 0])


def test_relaxed_recursion_matches_numpy_with_merged_lora():
  cfg = small_config(schedule='cycle', num_blocks=2, num_layers=4, lora_rank=3)
  params = tiny_models.random_params(cfg, scale=0.2)
  tokens = random_tokens((1, 7), cfg.vocab_size, seed=1)
  logits = _forward(cfg, params, tokens)
  # Numpy: per step, the shared block plus that step's A @ B, then a plain unshared model.
  merged = {k: v for k, v in params.items() if k not in ('blocks', 'lora')}
  table = model_lib.block_table(cfg)
  blocks = jax.tree.map(lambda x: np.asarray(x)[table], params['blocks'])
  for (group, name), in_dims in model_lib.LORA_TARGETS.items():
    f = params['lora'][group][name]
    delta = np.einsum('sir,sro->sio', np.asarray(f['a']), np.asarray(f['b']))
    blocks[group][name] = blocks[group][name] + delta.reshape(blocks[group][name].shape)
  merged['blocks'] = blocks
  want = ref.model_exit_logits(merged, np.asarray(tokens[0]), range(4), cfg.exit_depths,
                               cfg.norm_eps, cfg.rope_base)
  for e, w in enumerate(want):
    np.testing.assert_allclose(np.asarray(logits[e, 0]), w, atol=1e-4, rtol=1e-4)
  # Zero-initialised B: a fresh relaxed model equals its shared model.
  fresh = tiny_models.init_params(cfg, jax.random.key(0))
  shared = {k: v for k, v in fresh.items() if k != 'lora'}
  np.testing.assert_allclose(_forward(cfg, fresh, tokens), _forward(cfg, shared, tokens),
                             atol=1e-6)
  # The adaptive loop selects the same per-step LoRA.
  out = _forward_adaptive(cfg, params, tokens, exits.ExitPolicy(measure='never'))
  np.testing.assert_allclose(out.logits, logits[-1], atol=1e-5)


def test_costs():
  cfg = small_config(num_layers=4)
  full = costs.full_depth_flops(cfg, 10)
  assert costs.relative_flops(cfg, np.full(5, 4), 'never', 10) == pytest.approx(1.0)
  # Exiting at depth 2 after checking exits 1 and 2: two blocks + two heads with softmax.
  spent = costs.token_flops(cfg, np.array([2]), 'max_prob', 10)[0]
  block = costs.block_flops(cfg, 10)
  assert spent == pytest.approx(2 * block + 2 * (costs.head_flops(cfg) + 5 * cfg.vocab_size))
  # A full-depth token that checked 3 exits costs more than full depth without checks.
  assert costs.token_flops(cfg, np.array([4]), 'max_prob', 10)[0] > full
  assert block == pytest.approx(2 * 32 * (4 * 8 + 2 * 2 * 8) + 2 * 32 * 32 + 6 * 32 * 48
                                + 4 * 4 * 8 * 10)


def test_roc_auc_against_pair_count():
  rng = np.random.default_rng(0)
  scores = rng.integers(0, 5, 200).astype(float)
  labels = rng.random(200) < 0.3 + 0.1 * scores
  pos, neg = scores[labels], scores[~labels]
  want = ((pos[:, None] > neg[None]).sum() + 0.5 * (pos[:, None] == neg[None]).sum()) / (
      len(pos) * len(neg))
  assert evaluation.roc_auc(scores, labels) == pytest.approx(want)


def test_balanced_bce_weighs_classes_equally():
  logit = jnp.array([2.0, 2.0, 2.0, -1.0])
  label = jnp.array([1, 1, 1, 0])
  bce = lambda x, y: np.log1p(np.exp(-x)) if y else np.log1p(np.exp(x))
  want = 0.5 * bce(2.0, 1) + 0.5 * bce(-1.0, 0)
  assert float(jax.jit(classifier_lib.balanced_bce)(logit, label)) == pytest.approx(want,
                                                                                   rel=1e-5)


def test_given_positions_keep_attention_causal_in_token_order():
  """forward_adaptive with RoPE positions that restart halfway (two segments numbered
  0..63): attention stays causal in token order, so 'heads_major' (which skips the keys a
  causal mask hides, from attention.CAUSAL_SPLIT_MIN_LEN tokens) equals the 'xla' einsum."""
  from adaptive_depth import attention
  length = attention.CAUSAL_SPLIT_MIN_LEN
  cfgs = [small_config(num_layers=2, attention=name) for name in ('xla', 'heads_major')]
  params = tiny_models.random_params(cfgs[0], scale=0.2)
  tokens = random_tokens((2, length), cfgs[0].vocab_size, seed=3)
  positions = jnp.asarray(np.tile(np.arange(length // 2), 2)[None].repeat(2, 0))
  never = exits.ExitPolicy(measure='never')
  run = jax.jit(lambda p, t, pos: [depth.forward_adaptive(c, p, t, never, positions=pos).logits
                                   for c in cfgs])
  want, got = run(params, tokens, positions)
  np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)
  # the positions matter: the same tokens at 0..T-1 give other logits
  assert np.abs(np.asarray(run(params, tokens, None)[0]) - np.asarray(want)).max() > 1e-3
