"""`calibrate_run`: Learn-then-Test thresholds for a trained run, written to
WORKDIR/calibration.json; `validity_table`: the guarantee checked over random splits.

The calibration pool: `config.calibrate.num_examples` windows of the validation text, each a
prompt of `prompt_len` tokens followed by a reference of `new_tokens` tokens. Per example and
per grid threshold, the early-exit continuation comes from the batched decode path
(`generation.generate_tokens`, greedy, EOS ignored so every continuation has the same
length) with the threshold traced: one compile for the whole grid, one for full depth.
"""
from __future__ import annotations

import dataclasses
import os
import time
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from adaptive_depth import cli
from adaptive_depth import config_lib
from adaptive_depth import costs
from adaptive_depth import depth as depth_lib
from adaptive_depth import exits
from adaptive_depth import metrics as metrics_lib
from adaptive_depth import mor_config
from adaptive_depth import saved_model
from adaptive_depth.calibrate import calibration_file
from adaptive_depth.calibrate import ltt
from adaptive_depth.data import pipeline
from adaptive_depth.decode import generation
from adaptive_depth.decode import sampling as sampling_lib
from adaptive_depth.train import classifier as classifier_lib
from adaptive_depth.train import losses

CALIBRATION_FILE = calibration_file.CALIBRATION_FILE
# Threshold grids from conservative to aggressive, per measure (their scores differ in range).
_PROBABILITY_GRID = tuple(float(t) for t in np.round(np.linspace(1.0, 0.05, 20), 2))
GRIDS = {
    'max_prob': _PROBABILITY_GRID,
    'softmax_diff': _PROBABILITY_GRID,
    'softmax_diff_approx': _PROBABILITY_GRID,
    'classifier': _PROBABILITY_GRID,
    'neg_entropy': tuple(float(t) for t in np.round(-np.geomspace(0.01, 3.0, 20), 3)),
    'saturation': tuple(float(t) for t in np.round(1 - np.geomspace(1e-4, 0.5, 20), 4)),
}


@dataclasses.dataclass(frozen=True)
class RiskPool:
  """Per example and grid threshold: risks [N, G] of each kind, exit depths [N, G] (mean over
  the example's decoded tokens), relative FLOPs [G] (whole pool) and the model's depth."""
  measure: str
  grid: tuple
  risks: dict
  mean_depth: np.ndarray
  relative_flops: np.ndarray
  full_depth: int


def check_measure(measure: str):
  if measure not in GRIDS:
    raise cli.UserError(f'measure (--measure)={measure!r}; allowed: {", ".join(GRIDS)}')


def example_pool(model, calibrate_config) -> np.ndarray:
  """[N, prompt_len + new_tokens] token windows of the validation text, in order."""
  c = calibrate_config
  length = c.prompt_len + c.new_tokens
  data = model.config.data
  _, make_eval, _ = pipeline.make_train_and_eval_data(
      data, batch_size=model.config.train.batch_size, eval_batch_size=1, seed=model.config.seed)
  per_window = (data.seq_len + 1) // length
  if per_window < 1:
    raise cli.UserError(f'config.calibrate.prompt_len + new_tokens = {length} is longer than '
                        f'a window of the validation text ({data.seq_len + 1} tokens)')
  rows = []
  for window in make_eval():
    rows.extend(window[0, i * length:(i + 1) * length] for i in range(per_window))
    if len(rows) >= c.num_examples:
      return np.stack(rows[:c.num_examples]).astype(np.int32)
  raise cli.UserError(f'config.calibrate.num_examples={c.num_examples}: the validation text '
                      f'holds only {len(rows)} examples of {length} tokens')


def _rouge_l_f1(a, b) -> float:
  """ROUGE-L F1 of two token sequences (longest common subsequence)."""
  previous = np.zeros(len(b) + 1, np.int32)
  for x in a:
    current = np.zeros_like(previous)
    for j, y in enumerate(b):
      current[j + 1] = previous[j] + 1 if x == y else max(previous[j + 1], current[j])
    previous = current
  lcs = previous[-1]
  return 0.0 if lcs == 0 else 2.0 * lcs / (len(a) + len(b))


def continuation_risks(early: np.ndarray, full: np.ndarray) -> dict:
  """Per-example textual risks of early-exit continuations against full depth's.
  early, full: [N, L] tokens -> {'textual', 'rouge', 'mismatch'}: [N] in [0, 1]."""
  same = early == full
  return {'textual': 1.0 - same.mean(axis=1),
          'mismatch': (~same.all(axis=1)).astype(np.float64),
          'rouge': np.array([1.0 - _rouge_l_f1(e.tolist(), f.tolist())
                             for e, f in zip(early, full)])}


def risk_pool(model, calibrate_config, measure: str, classifier=None,
              progress=print) -> RiskPool:
  """Decodes the pool at full depth and at every grid threshold; returns every risk kind."""
  check_measure(measure)
  c = calibrate_config
  cfg, params, eos = model.model_config, model.decode_params, -1  # -1: never stop early
  examples = example_pool(model, c)
  prompts, reference = examples[:, :c.prompt_len], examples[:, c.prompt_len:]
  grid = GRIDS[measure]

  def decode(params, prompt, policy, classifier):
    lengths = jnp.full((prompt.shape[0],), prompt.shape[1], jnp.int32)
    return generation.generate_tokens(
        cfg, params, prompt, lengths, max_new_tokens=c.new_tokens, policy=policy,
        sampling=sampling_lib.Greedy(), rng=jax.random.key(0), eos_id=eos, pad_id=0,
        classifier=classifier, kv=c.kv)

  def score(params, tokens, policy, classifier):  # teacher-forced, for the 'loss' risk
    out = depth_lib.forward_adaptive(cfg, params, tokens[:, :-1], policy, classifier=classifier)
    nll, _ = losses.per_exit_token_losses(out.logits[None], tokens[:, 1:])
    return nll[0, :, c.prompt_len - 1:].mean(axis=-1)  # [B] over the reference positions

  decode, score = jax.jit(decode), jax.jit(score)
  batches = [slice(i, i + c.batch_size) for i in range(0, len(examples), c.batch_size)]

  def run(policy, classifier):
    out = [decode(params, jnp.asarray(prompts[b]), policy, classifier) for b in batches]
    nll = [score(model.params, jnp.asarray(examples[b]), policy, classifier) for b in batches]
    tokens = np.concatenate([np.asarray(o.tokens) for o in out])
    depths = np.concatenate([np.asarray(o.exit_depth) for o in out])[:, 1:]  # 1st: prefill
    return tokens, depths, np.concatenate([np.asarray(x) for x in nll])

  start = time.perf_counter()
  full_tokens, _, full_nll = run(exits.ExitPolicy(measure='never'), None)
  progress(f'calibration pool: {len(examples)} examples ({c.prompt_len}-token prompts, '
           f'{c.new_tokens} new tokens), full depth in {time.perf_counter() - start:.1f} s')
  risks = {k: np.zeros((len(examples), len(grid))) for k in ltt.RISKS}
  mean_depth = np.zeros((len(examples), len(grid)))
  relative = np.zeros(len(grid))
  context = c.prompt_len + c.new_tokens / 2.0
  for g, threshold in enumerate(grid):
    policy = exits.ExitPolicy(measure=measure, threshold=threshold)
    tokens, depths, nll = run(policy, classifier)
    for kind, values in continuation_risks(tokens, full_tokens).items():
      risks[kind][:, g] = values
    risks['loss'][:, g] = np.clip(nll - full_nll, 0.0, 1.0)
    mean_depth[:, g] = depths.mean(axis=1)
    relative[g] = (costs.policy_token_flops(cfg, depths.ravel(), policy, context,
                                            kv=c.kv).mean() /
                   costs.full_depth_flops(cfg, context))
    progress(f'  {measure} {threshold:<7g} depth {mean_depth[:, g].mean():5.2f}  '
             + '  '.join(f'{k} {risks[k][:, g].mean():.3f}' for k in ltt.RISKS)
             + f'  [{time.perf_counter() - start:.0f} s]')
  return RiskPool(measure=measure, grid=grid, risks=risks, mean_depth=mean_depth,
                  relative_flops=relative, full_depth=cfg.num_layers)


def calibrate(pool: RiskPool, risk: str, delta: float, epsilon: float,
              rows: Optional[np.ndarray] = None) -> dict:
  """The Learn-then-Test result on the pool (or its `rows`), as calibration.json records it."""
  ltt.check_risk(risk)
  values = pool.risks[risk] if rows is None else pool.risks[risk][rows]
  result = ltt.fixed_sequence_test(values, delta, epsilon, binary=risk in ltt.BINARY_RISKS)
  chosen = result.index
  return {
      'threshold': None if chosen is None else pool.grid[chosen],
      'valid': chosen is not None,
      'n': result.n,
      'empirical_risk': None if chosen is None else float(result.empirical_risk[chosen]),
      'mean_depth': None if chosen is None else float(pool.mean_depth[:, chosen].mean()),
      'grid': list(pool.grid),
      'p_values': [float(p) for p in result.p_values],
      'grid_empirical_risk': [float(r) for r in result.empirical_risk],
  }


def check_args(measures, risk: str, delta: float, epsilon: float):
  """Every argument problem as one UserError, before anything loads or compiles."""
  try:
    ltt.check_level(delta, epsilon)
    ltt.check_risk(risk)
  except ValueError as e:
    raise cli.UserError(str(e)) from None
  for measure in measures:
    check_measure(measure)


def calibrate_run(config, workdir: str, *, measures=('max_prob',), risk: str = 'textual',
                  delta: float = 0.1, epsilon: float = 0.05, splits: int = 0,
                  deltas=(0.05, 0.1, 0.2), progress=print) -> dict:
  """Calibrates each measure's threshold for the run in `workdir`; writes calibration.json.

  splits > 0 also checks the guarantee on the same pool: `validity_table` over that many
  random calibration/test splits at each of `deltas`, printed and written to
  calibration_validity.json. Arguments are checked before anything loads or compiles.
  """
  config_lib.validate(config)
  measures = [measures] if isinstance(measures, str) else list(measures)
  check_args(measures, risk, delta, epsilon)
  if splits < 0:
    raise cli.UserError(f'splits (--splits)={splits}: must be >= 0 (0 = no validity check)')
  for d in deltas:
    if not 0 < d < 1:
      raise cli.UserError(f'deltas (--deltas): {d} must be in (0, 1)')
  if splits:
    c = config.calibrate
    n_cal = int(round(c.calibration_fraction * c.num_examples))
    if not 1 <= n_cal < c.num_examples:
      raise cli.UserError(
          f'--splits={splits} with config.calibrate.num_examples={c.num_examples} and '
          f'calibration_fraction={c.calibration_fraction} leaves {n_cal} calibration and '
          f'{c.num_examples - n_cal} test examples: each needs at least 1')
  mor_config.refuse_routed(config, 'launch/calibrate.py (early-exit thresholds)',
                           "its routers decide at config.generate.threshold (sigmoid 0.5)")
  model = saved_model.load(workdir)
  classifier = None
  if 'classifier' in measures:
    classifier = classifier_lib.require_classifier(workdir, model_step=model.step)
  result = {'step': model.step, 'risk': risk, 'delta': delta, 'epsilon': epsilon,
            'kv': config.calibrate.kv, 'calibrate': config.calibrate.to_dict(),
            'measures': calibration_file.earlier_measures(workdir, model.step, risk, delta,
                                                          epsilon, config.calibrate.to_dict(),
                                                          progress)}
  validity = []
  for measure in measures:
    pool = risk_pool(model, config.calibrate, measure, classifier, progress)
    chosen = result['measures'][measure] = calibrate(pool, risk, delta, epsilon)
    progress(f'{measure}: ' + (f"threshold {chosen['threshold']:g} (risk {risk} "
                               f"{chosen['empirical_risk']:.3f}, depth {chosen['mean_depth']:.2f})"
                               if chosen['valid'] else 'none valid: stay at full depth'))
    if splits:
      rows = validity_table(pool, risk, deltas, epsilon, splits,
                            config.calibrate.calibration_fraction)
      validity.extend(dict(r, measure=measure) for r in rows)
      progress(format_validity(rows))
  metrics_lib.write_json(os.path.join(workdir, CALIBRATION_FILE), result)
  if validity:
    metrics_lib.write_json(os.path.join(workdir, 'calibration_validity.json'), validity)
    result['validity'] = validity
  return result


def format_validity(rows) -> str:
  """The validity rows as a markdown table."""
  lines = ['| delta | splits with test risk > delta (allowed) | none valid | median threshold '
           '| mean test risk | mean depth | speedup |', '|' + ' --- |' * 7]
  for r in rows:
    shown = '-' if r['threshold_median'] is None else f"{r['threshold_median']:g}"
    lines.append(f"| {r['delta']:g} | {r['exceed']} of {r['splits']} ({r['allowed']}) | "
                 f"{r['none_valid']} | {shown} | {r['test_risk_mean']:.3f} | "
                 f"{r['mean_depth']:.2f} | {r['speedup_mean']:.2f}x |")
  return '\n'.join(lines)


def validity_table(pool: RiskPool, risk: str, deltas, epsilon: float, splits: int = 100,
                   calibration_fraction: float = 0.5, seed: int = 0) -> list[dict]:
  """Learn-then-Test on `splits` random calibration/test splits of the pool, per delta.

  Per delta: how many splits' test risk exceeded delta (the guarantee allows epsilon of
  them, plus binomial slack), and the means over splits of the chosen threshold, the test
  risk, the mean depth and the theoretical speedup (full-depth FLOPs over spent; 1 when none
  is valid, since decoding then stays at full depth).
  """
  ltt.check_risk(risk)
  values = pool.risks[risk]
  n_pool = values.shape[0]
  n_cal = int(round(calibration_fraction * n_pool))
  if not 1 <= n_cal < n_pool:
    raise ValueError(f'calibration_fraction={calibration_fraction}: leaves no calibration or '
                     f'no test examples of {n_pool}')
  rng = np.random.default_rng(seed)
  order = np.stack([rng.permutation(n_pool) for _ in range(splits)])
  cal_rows, test_rows = order[:, :n_cal], order[:, n_cal:]
  grid = np.asarray(pool.grid)
  depth = pool.mean_depth
  rows = []
  for delta in deltas:
    chosen = ltt.fixed_sequence_index(values, delta, epsilon, risk in ltt.BINARY_RISKS,
                                      cal_rows)
    valid = chosen >= 0
    pick = np.maximum(chosen, 0)
    test_risk = np.where(valid, values[test_rows, pick[:, None]].mean(axis=1), 0.0)
    test_depth = np.where(valid, depth[test_rows, pick[:, None]].mean(axis=1),
                          pool.full_depth)
    speedup = np.where(valid, 1.0 / pool.relative_flops[pick], 1.0)
    rows.append({
        'risk': risk, 'delta': delta, 'epsilon': epsilon, 'splits': splits,
        'calibration_examples': n_cal, 'test_examples': n_pool - n_cal,
        'exceed': int((test_risk > delta).sum()),
        'allowed': int(np.ceil(epsilon * splits)) + 4,
        'none_valid': int((~valid).sum()),
        'threshold_median': (float(np.median(grid[pick[valid]])) if valid.any() else None),
        'test_risk_mean': float(test_risk.mean()),
        'mean_depth': float(test_depth.mean()),
        'speedup_mean': float(speedup.mean()),
    })
  return rows
