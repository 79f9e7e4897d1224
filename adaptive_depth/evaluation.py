"""`evaluate_run(config, workdir)`: per-exit quality and early-exit quality-vs-compute curves.

For a trained run it measures, on the eval split:
  - per exit: loss, accuracy;
  - per confidence measure, for a sweep of thresholds: mean exit depth, FLOPs relative to
    full depth (confidence cost included), next-token argmax agreement with the full model,
    and loss of the early-exit logits;
  - how well max-probability and the learned classifier (when trained) predict agreement
    (ROC AUC over the non-final exits).
It writes WORKDIR/eval.json and WORKDIR/eval.png (the curve per measure).
"""
from __future__ import annotations

import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from adaptive_depth import cli
from adaptive_depth import config_lib
from adaptive_depth import costs
from adaptive_depth import mor_config
from adaptive_depth import depth as depth_lib
from adaptive_depth import exits
from adaptive_depth import metrics as metrics_lib
from adaptive_depth import model as model_lib
from adaptive_depth import saved_model
from adaptive_depth.calibrate import calibration_file
from adaptive_depth.data import pipeline
from adaptive_depth.train import classifier as classifier_lib
from adaptive_depth.train import losses

# Thresholds from conservative to aggressive, per measure (scores differ in range).
SWEEPS = {
    'softmax_diff': (0.99, 0.95, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2),
    'max_prob': (0.99, 0.95, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2),
    'neg_entropy': (-0.05, -0.1, -0.2, -0.3, -0.5, -0.75, -1.0, -1.5, -2.0, -3.0),
    'saturation': (0.999, 0.995, 0.99, 0.98, 0.95, 0.9, 0.85, 0.8, 0.7, 0.5),
    'classifier': (0.99, 0.95, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2),
}


def roc_auc(scores: np.ndarray, labels: np.ndarray) -> float:
  """Area under the ROC curve by the rank-sum formula (ties get average ranks)."""
  scores, labels = np.asarray(scores, np.float64).ravel(), np.asarray(labels, bool).ravel()
  positives, negatives = labels.sum(), (~labels).sum()
  if positives == 0 or negatives == 0:
    return float('nan')
  order = np.argsort(scores, kind='mergesort')
  ranks = np.empty(len(scores))
  sorted_scores = scores[order]
  # Average ranks over runs of equal scores.
  boundaries = np.flatnonzero(np.diff(sorted_scores)) + 1
  starts = np.concatenate([[0], boundaries])
  ends = np.concatenate([boundaries, [len(scores)]])
  for start, end in zip(starts, ends):
    ranks[order[start:end]] = (start + end + 1) / 2.0
  return float((ranks[labels].sum() - positives * (positives + 1) / 2) / (positives * negatives))


def make_adaptive_fn(cfg):
  """One jitted adaptive forward per measure; thresholds and the rest are traced."""
  def run(params, tokens, policy, classifier, oracle_tokens):
    return depth_lib.forward_adaptive(cfg, params, tokens, policy, classifier=classifier,
                                      oracle_tokens=oracle_tokens)
  return jax.jit(run)


# The per-batch arithmetic around the forward passes, each in one program (op by op every
# operation would compile a program of its own for each batch shape).
@jax.jit
def _token_figures(logits, targets, oracle):
  """logits [B, T, V], targets and oracle [B, T] -> (cross entropy [B, T], whether the
  argmax is the oracle's token [B, T])."""
  token_nll, _ = losses.per_exit_token_losses(logits[None], targets)
  return token_nll[0], jnp.argmax(logits, -1) == oracle


@jax.jit
def _exit_figures(logits, targets):
  """logits [E, B, T, V], targets [B, T] -> (mean cross entropy [E], mean accuracy [E],
  the last exit's argmax [B, T], whether each exit but the last agrees with it [E-1, B, T],
  each one's max-prob [E-1, B, T]). Reduced here, so no batch's logits outlive its step."""
  nll, correct = losses.per_exit_token_losses(logits, targets)
  last = jnp.argmax(logits[-1], -1)
  return (nll.mean(axis=(1, 2)), correct.mean(axis=(1, 2)), last,
          jnp.argmax(logits[:-1], -1) == last[None], exits.max_prob(logits[:-1]))


def sweep(cfg, params, batches, full_argmax, measure, thresholds, *, classifier=None,
          adaptive_fn=None, min_depth=1):
  """Rows {measure, threshold, mean_depth, relative_flops, agreement, loss} for one measure.

  batches: list of [B, T+1] int arrays; full_argmax: list of [B, T] full-depth argmax.
  """
  adaptive_fn = adaptive_fn or make_adaptive_fn(cfg)
  context = (batches[0].shape[1] - 1 + 1) / 2.0  # mean attention context over positions
  rows = []
  for threshold in thresholds:
    policy = exits.ExitPolicy(measure=measure, threshold=float(threshold), min_depth=min_depth)
    depths, agree, nll, steps = [], [], [], []
    for batch, oracle in zip(batches, full_argmax):
      out = adaptive_fn(params, jnp.asarray(batch[:, :-1]), policy, classifier, oracle)
      token_nll, agrees = _token_figures(out.logits, jnp.asarray(batch[:, 1:]), oracle)
      depths.append(np.asarray(out.exit_depth))
      steps.append(int(out.steps_run))
      agree.append(np.asarray(agrees))
      nll.append(np.asarray(token_nll))
    depths = np.concatenate([d.ravel() for d in depths])
    rows.append({
        'measure': measure, 'threshold': float(threshold),
        'mean_depth': float(depths.mean()),
        'relative_depth': float(depths.mean() / cfg.num_layers),
        # Per-token FLOPs with the K/V the skipped layers still compute for later tokens
        # (state propagation). A batch only stops looping when all its tokens have exited:
        # mean_steps_run says how far the batched loop actually ran.
        'relative_flops': costs.relative_flops(cfg, depths, measure, context, min_depth,
                                               kv='propagate'),
        'mean_steps_run': float(np.mean(steps)),
        'agreement': float(np.mean(np.concatenate([a.ravel() for a in agree]))),
        'loss': float(np.mean(np.concatenate([n.ravel() for n in nll]))),
    })
  return rows


def check_measures(measures) -> list[str]:
  """`measures` (e.g. --measures) as a list; a UserError unless each has a threshold sweep."""
  measures = [measures] if isinstance(measures, str) else list(measures)
  bad = [m for m in measures if m not in SWEEPS]
  if bad or not measures:
    problem = f'unknown {bad}' if bad else 'none given'
    raise cli.UserError(f'measures (--measures): {problem}; allowed: {", ".join(SWEEPS)}')
  return measures


def evaluate_run(config, workdir: str, *, measures=None, num_batches: int = 0) -> dict:
  """Evaluates the latest checkpoint in `workdir`; writes eval.json and eval.png there.

  measures: confidence measures to sweep, of SWEEPS (default: all; 'classifier' when the
  run has a trained exit classifier). The config and measures are checked before loading.
  """
  start = time.perf_counter()
  config_lib.validate(config)
  mor_config.refuse_routed(
      config, 'launch/evaluate.py (early-exit threshold sweeps)',
      "its validation loss, routing and decision agreement are in WORKDIR/summary.json "
      "('eval_routing'); launch/generate.py decodes it")
  measures = None if measures is None else check_measures(measures)
  calibrated = None  # config.generate.threshold='calibrated': also the calibrated point
  if config.generate.threshold == 'calibrated':
    if config.generate.measure not in SWEEPS:
      raise cli.UserError("config.generate.threshold='calibrated' evaluates the calibrated "
                          f'threshold of config.generate.measure={config.generate.measure!r};'
                          f' set it to one of {", ".join(SWEEPS)}')
    calibrated = calibration_file.calibrated_threshold(workdir, config.generate.measure)
  model = saved_model.load(workdir)
  classifier = classifier_lib.load_classifier(workdir, model_step=model.step)
  if measures and 'classifier' in measures and classifier is None:
    raise cli.UserError("measures (--measures): 'classifier' needs an exit classifier trained "
                        f'for this model in {workdir} (configs/exit_classifier.py)')
  measures = measures or [m for m in SWEEPS if m != 'classifier' or classifier is not None]
  cfg, params = model.model_config, model.params
  num_batches = num_batches or config.eval.num_batches or 16
  _, make_eval_data, _ = pipeline.make_train_and_eval_data(
      model.config.data, batch_size=model.config.train.batch_size,
      eval_batch_size=config.eval.batch_size, seed=model.config.seed)
  batches = [b for _, b in zip(range(num_batches), make_eval_data())]

  train_fn = jax.jit(lambda p, t: model_lib.forward_train(cfg, p, t))
  exit_nll, exit_correct, full_argmax, agreement_labels, max_probs = [], [], [], [], []
  for batch in batches:
    logits = train_fn(params, jnp.asarray(batch[:, :-1]))
    nll, correct, last_argmax, agrees, max_prob = _exit_figures(logits,
                                                                jnp.asarray(batch[:, 1:]))
    exit_nll.append(np.asarray(nll))
    exit_correct.append(np.asarray(correct))
    full_argmax.append(last_argmax)
    agreement_labels.append(np.asarray(agrees))
    max_probs.append(np.asarray(max_prob))
  per_exit = metrics_lib.per_exit_records(cfg.exit_depths, np.mean(exit_nll, 0),
                                          np.mean(exit_correct, 0))

  adaptive_fn = make_adaptive_fn(cfg)  # compiles once per measure (the measure is static)
  curves = {}
  for measure in measures:
    curves[measure] = sweep(cfg, params, batches, full_argmax, measure, SWEEPS[measure],
                            classifier=classifier, adaptive_fn=adaptive_fn)
    print(f'{measure}: ' + ', '.join(f"t={r['threshold']:g} depth={r['mean_depth']:.2f} "
                                     f"agree={r['agreement']:.3f}" for r in curves[measure]),
          flush=True)
  oracle = sweep(cfg, params, batches, full_argmax, 'oracle', [0.5],
                 adaptive_fn=adaptive_fn)[0]

  auc = _agreement_auc(cfg, params, batches, agreement_labels, max_probs, classifier)
  extra = {}
  if config.generate.threshold == 'calibrated':
    measure = config.generate.measure
    extra['calibrated'] = (
        {'measure': measure, 'threshold': None, 'mean_depth': float(cfg.num_layers),
         'agreement': 1.0} if calibrated is None else
        sweep(cfg, params, batches, full_argmax, measure, [calibrated], classifier=classifier,
              adaptive_fn=adaptive_fn)[0])
    extra['calibrated']['source'] = os.path.join(workdir, calibration_file.CALIBRATION_FILE)
  result = {
      'step': model.step,
      'num_eval_tokens': int(sum(b[:, 1:].size for b in batches)),
      'per_exit': per_exit,
      'sweeps': curves,
      'oracle': oracle,
      'agreement_auc': auc,
      'best': best_operating_points(curves, min_agreement=0.95),
      **extra,
      'seconds': round(time.perf_counter() - start, 1),
  }
  metrics_lib.write_json(os.path.join(workdir, 'eval.json'), result)
  plot_curves(result, os.path.join(workdir, 'eval.png'))
  return result


def best_operating_points(curves: dict, min_agreement: float) -> dict:
  """Per measure, the lowest-depth threshold whose agreement is at least min_agreement."""
  best = {}
  for measure, rows in curves.items():
    ok = [r for r in rows if r['agreement'] >= min_agreement]
    if ok:
      best[measure] = min(ok, key=lambda r: r['mean_depth'])
  return best


def _agreement_auc(cfg, params, batches, labels, max_probs, classifier) -> dict:
  """AUC of max-prob (and the classifier) at predicting 'this exit agrees with the last'.
  labels, max_probs: per batch, [num_exits - 1, B, T] (_exit_figures)."""
  num_checked = len(cfg.exit_depths) - 1
  clf_scores = []  # [num_checked, tokens] per batch
  if classifier is not None:
    for batch in batches:
      clf_scores.append(np.asarray(classifier_lib.scores(
          cfg, params, classifier, jnp.asarray(batch[:, :-1]))).reshape(num_checked, -1))
  join = lambda parts: np.concatenate([p.reshape(num_checked, -1) for p in parts], axis=1)
  labels, max_probs = join(labels), join(max_probs)
  # Pooled over exits, and per exit: within one exit the classifier's exit one-hot is
  # constant, so the per-exit AUCs show what it gains from the hidden state itself.
  result = {'max_prob': roc_auc(max_probs, labels),
            'max_prob_per_exit': [roc_auc(max_probs[e], labels[e]) for e in range(num_checked)]}
  if classifier is not None:
    clf_scores = join(clf_scores)
    result['classifier'] = roc_auc(clf_scores, labels)
    result['classifier_per_exit'] = [roc_auc(clf_scores[e], labels[e])
                                     for e in range(num_checked)]
  return result


def plot_curves(result: dict, path: str):
  """Agreement (left) and loss (right) against relative FLOPs, one line per measure."""
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  fig, axes = plt.subplots(1, 2, figsize=(11, 4))
  for measure, rows in result['sweeps'].items():
    x = [r['relative_flops'] for r in rows]
    axes[0].plot(x, [r['agreement'] for r in rows], marker='o', label=measure)
    axes[1].plot(x, [r['loss'] for r in rows], marker='o', label=measure)
  o = result['oracle']
  axes[0].scatter([o['relative_flops']], [o['agreement']], marker='*', s=120, c='k',
                  label='oracle')
  for e in result['per_exit']:
    axes[1].axhline(e['loss'], color='grey', lw=0.5)
  axes[0].set(xlabel='FLOPs relative to full depth', ylabel='agreement with full model')
  axes[1].set(xlabel='FLOPs relative to full depth', ylabel='loss (nats/token)')
  axes[0].legend(fontsize=8)
  fig.suptitle(f"early exit at step {result['step']}: quality vs compute")
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)
