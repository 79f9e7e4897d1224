"""FREE's adaptive threshold in decoding: the labelled observations that kv='parallel' yields
as queued tokens catch up, against a teacher-forced full-depth reference; the refit cadence;
and the arguments it refuses."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from adaptive_depth import cli
from adaptive_depth import exits
from adaptive_depth import model as model_lib
from adaptive_depth.calibrate import beta_mixture
from adaptive_depth.decode import adaptive_threshold
from adaptive_depth.decode import generation
from adaptive_depth.decode import sampling as sampling_lib
from adaptive_depth.serving import api as serving_api
from tests import tiny_models
from tests.test_model import small_config

MAX_NEW, CAPACITY = 24, 3


@pytest.fixture(scope='module')
def tiny_model():
  """(cfg, random params, prompt [4, 6], full-depth forward: (params, tokens [B, T]) ->
  logits [E, B, T, V], start: the median max-prob of the first two exits over the prompt),
  shared by both parametrizations. The forward is compiled, one program per sequence length
  (the prompt, then prompt + generated tokens); op by op it compiled a program per
  operation and shape."""
  cfg = small_config(num_layers=4, vocab_size=40)
  params = tiny_models.random_params(cfg, scale=0.4)
  prompt = jnp.asarray(np.random.default_rng(0).integers(1, 40, (4, 6)).astype(np.int32))
  forward = jax.jit(functools.partial(model_lib.forward_train, cfg))
  scores = np.asarray(tiny_models.exit_max_probs(cfg, params, prompt))[:2]
  return cfg, params, prompt, forward, float(np.quantile(np.asarray(scores), 0.5))


def _reference_stats(cfg, forward, params, prompt, out, per_row: bool):
  """Sufficient statistics of every exit check whose full-depth label is known at the end,
  from a teacher-forced full-depth pass over prompt + generated tokens (kv='parallel' keeps
  the cache exact, so every check a token made saw the full-depth state of its exit).

  Token i >= 1 of a row was made from position P + i - 1. It checked every exit below the
  last up to the depth it left at. Its label is known if it went all the way, or if a later
  token of its row did (that deep pass took the queued token along)."""
  tokens, depth = np.asarray(out.tokens), np.asarray(out.exit_depth)
  batch, prompt_len = prompt.shape
  sequence = np.concatenate([np.asarray(prompt), tokens[:, :-1]], axis=1)
  logits = np.asarray(forward(params, sequence))  # [E, B, T, V]
  shifted = logits - logits.max(-1, keepdims=True)
  confidence = np.exp(shifted).max(-1) / np.exp(shifted).sum(-1)
  argmax = logits.argmax(-1)
  last = cfg.num_layers
  stats = np.zeros((batch, 2, 3))  # count, sum c, sum c^2 per component
  for row in range(batch):
    deep = depth[row] == last
    for i in range(1, MAX_NEW):
      if not deep[i:].any():
        continue  # still queued when decoding ended
      position = prompt_len + i - 1
      for number, d in enumerate(cfg.exit_depths):
        if d >= last or d > depth[row, i]:
          continue
        c = np.clip(confidence[number, row, position], 1e-4, 1 - 1e-4)
        k = int(argmax[number, row, position] == argmax[-1, row, position])
        stats[row, k] += (1.0, c, c * c)
  return stats if per_row else stats.sum(0)


@pytest.mark.parametrize('per_row', [False, True], ids=['shared', 'per_row'])
def test_observations_equal_a_teacher_forced_reference(tiny_model, per_row):
  cfg, params, prompt, forward, start = tiny_model
  policy = exits.ExitPolicy(measure='max_prob', threshold=start, schedule='adaptive',
                            zeta=0.6, refit_every=4, per_row_statistics=per_row)
  result = jax.jit(lambda p: generation.generate_tokens(
      cfg, p, prompt, jnp.full((4,), 6), max_new_tokens=MAX_NEW, policy=policy,
      sampling=sampling_lib.Greedy(), rng=jax.random.key(0), eos_id=-1, pad_id=0,
      kv='parallel', queue_capacity=CAPACITY, return_cache=True))(params)
  out, state = result.output, result.adaptive
  depth = np.asarray(out.exit_depth)[:, 1:]
  assert (depth < cfg.num_layers).any() and (depth == cfg.num_layers).any(), depth
  expected = _reference_stats(cfg, forward, params, prompt, out, per_row)
  got = np.stack([np.asarray(state.stats.count), np.asarray(state.stats.total),
                  np.asarray(state.stats.total_sq)], -1)
  assert expected[..., 0].sum() > 20  # enough checks were labelled for the comparison
  np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)
  # Refits happened: the threshold left its starting value for a grid value (or +inf).
  threshold = np.asarray(state.threshold)
  assert not np.allclose(threshold, start)
  assert all(t == np.inf or np.isclose(adaptive_threshold.GRID, t).any() for t in threshold)


def test_refit_cadence_and_threshold():
  """The threshold moves only once refit_every observations have accumulated since the
  last refit, and then to the fit of everything observed so far."""
  policy = exits.ExitPolicy(measure='max_prob', threshold=0.9, schedule='adaptive',
                            zeta=0.8, refit_every=5)
  # Each compiled once (as the decode loop traces them), not op by op.
  state = jax.jit(lambda: adaptive_threshold.AdaptiveThreshold.start(policy, batch=2))()
  observe = jax.jit(lambda state, seen: state.observe(policy, seen))
  fitted_threshold = jax.jit(lambda stats: beta_mixture.adaptive_threshold(
      beta_mixture.fit(stats), adaptive_threshold.GRID, 0.8))
  rng = np.random.default_rng(1)
  thresholds, fits = [], []
  for _ in range(4):
    conf = rng.uniform(size=(2, 2)).astype(np.float32)
    seen = adaptive_threshold.Observations(confidence=jnp.asarray(conf),
                                           agreed=jnp.asarray(conf > 0.4),
                                           observed=np.ones((2, 2), bool))
    state = observe(state, seen)
    thresholds.append(float(np.asarray(state.threshold)[0]))
    fits.append(float(fitted_threshold(state.stats)))
  # 4, then 8 (refit), then 4, then 8 (refit) observations since the last refit.
  assert thresholds[0] == pytest.approx(0.9)
  assert thresholds[1] == pytest.approx(fits[1]) and thresholds[2] == thresholds[1]
  assert thresholds[3] == pytest.approx(fits[3])
  # The refits follow the data, not the start: agreement is conf > 0.4 here, so the fitted
  # threshold lies well below the start 0.9 (and is finite: some grid value qualifies).
  assert all(0.0 < f < 0.9 for f in (fits[1], fits[3])), fits
  assert float(state.since_refit) == 0.0
  assert float(np.asarray(state.stats.count).sum()) == 16


def test_bad_adaptive_settings_are_refused():
  cfg = small_config(num_layers=4, vocab_size=40)
  params = tiny_models.random_params(cfg)
  prompt, lengths = np.ones((1, 4), np.int32), np.full((1,), 4, np.int32)
  run = lambda policy, kv: generation.generate_tokens(
      cfg, params, prompt, lengths, max_new_tokens=4, policy=policy,
      sampling=sampling_lib.Greedy(), rng=jax.random.key(0), eos_id=-1, pad_id=0, kv=kv)
  adaptive = exits.ExitPolicy(measure='max_prob', schedule='adaptive')
  with pytest.raises(ValueError, match="kv='parallel'"):
    run(adaptive, 'propagate')
  with pytest.raises(ValueError, match='allowed: max_prob'):
    run(adaptive.replace(measure='saturation'), 'parallel')
  with pytest.raises(ValueError, match='zeta'):
    run(adaptive.replace(zeta=1.0), 'parallel')
  with pytest.raises(ValueError, match='refit_every'):
    run(adaptive.replace(refit_every=0), 'parallel')
  shared = small_config(num_layers=4, num_blocks=1, schedule='cycle', vocab_size=40)
  with pytest.raises(cli.UserError, match="schedule='adaptive'"):
    serving_api.check_policy(shared, adaptive)
