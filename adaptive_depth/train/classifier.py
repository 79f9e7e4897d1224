"""Second training stage: a learned exit classifier on a frozen model.

Labels are "this exit's argmax equals the last exit's argmax" (CALM's consistency), per
token and non-final exit; the loss is binary cross entropy with the two classes weighted to
equal total weight in each batch, so that a classifier cannot win by predicting the common
class. The classifier sees the exit's normed hidden state and cheap statistics of its
distribution (exits.classifier_features).

    python launch/train.py --config=configs/exit_classifier.py --workdir=DIR

trains it for the model already trained in DIR and saves it to DIR/exit_classifier/.
"""
from __future__ import annotations

import json
import os
import time
from typing import Optional

import jax
import jax.numpy as jnp
import optax
import orbax.checkpoint as ocp

from adaptive_depth import cli
from adaptive_depth import exit_heads
from adaptive_depth import exits
from adaptive_depth import metrics as metrics_lib
from adaptive_depth import model as model_lib
from adaptive_depth import saved_model
from adaptive_depth.data import pipeline

CLASSIFIER_DIR = 'exit_classifier'


def exit_features(cfg: model_lib.ModelConfig, params, tokens):
  """Features and labels at every non-final exit.

  tokens: [B, T] -> (features [E-1, B, T, F], agrees [E-1, B, T] bool).
  """
  positions = model_lib.default_positions(tokens)
  hiddens = model_lib.run_all_steps(cfg, params, model_lib.embed(cfg, params, tokens),
                                    positions)
  exit_hidden = model_lib.at_exit_depths(cfg, hiddens)
  logits = model_lib.head_logits(cfg, params, exit_hidden, exit_heads.ALL_EXITS)
  normed = exit_heads.exit_normed(cfg, params, exit_hidden, exit_heads.ALL_EXITS)
  num_exits = len(cfg.exit_depths)
  features = jnp.stack([exits.classifier_features(logits[e], normed[e], e, num_exits)
                        for e in range(num_exits - 1)])
  agrees = jnp.argmax(logits[:-1], -1) == jnp.argmax(logits[-1], -1)[None]
  return features, agrees


def scores(cfg, params, classifier, tokens):
  """Classifier confidence at every non-final exit: [E-1, B, T]."""
  features, _ = exit_features(cfg, params, tokens)
  return exits.classifier_confidence(classifier, features)


def balanced_bce(logit, label):
  """Binary cross entropy with positives and negatives each carrying half the weight."""
  label = label.astype(jnp.float32)
  per_token = optax.sigmoid_binary_cross_entropy(logit, label)
  positives = jnp.maximum(label.sum(), 1.0)
  negatives = jnp.maximum((1.0 - label).sum(), 1.0)
  return 0.5 * (jnp.sum(per_token * label) / positives +
                jnp.sum(per_token * (1.0 - label)) / negatives)


def train_exit_classifier(config, workdir: str) -> dict:
  """Trains the classifier for the model in `workdir` (config.classifier.*); returns and
  writes WORKDIR/exit_classifier/summary.json."""
  start = time.perf_counter()
  model = saved_model.load(workdir)
  cfg, params = model.model_config, model.params
  c = config.classifier
  train_data, _, _ = pipeline.make_train_and_eval_data(
      model.config.data, batch_size=c.batch_size, eval_batch_size=c.batch_size,
      seed=config.seed + 1)
  feature_dim = cfg.width + 3 + len(cfg.exit_depths)
  classifier = exits.init_classifier(jax.random.key(config.seed), feature_dim, c.hidden)
  tx = optax.adam(optax.cosine_decay_schedule(c.learning_rate, c.num_steps))
  opt_state = tx.init(classifier)
  features_fn = jax.jit(lambda t: exit_features(cfg, params, t))

  @jax.jit
  def step(classifier, opt_state, features, labels):
    loss, grads = jax.value_and_grad(
        lambda p: balanced_bce(exits.classifier_logit(p, features), labels))(classifier)
    updates, opt_state = tx.update(grads, opt_state, classifier)
    return optax.apply_updates(classifier, updates), opt_state, loss

  losses = []
  for i in range(c.num_steps):
    features, labels = features_fn(jnp.asarray(next(train_data)[:, :-1]))
    classifier, opt_state, loss = step(classifier, opt_state, features, labels)
    if (i + 1) % max(1, c.num_steps // 10) == 0:
      losses.append(float(loss))
      print(f'exit classifier step {i + 1}/{c.num_steps}: balanced BCE {losses[-1]:.4f}',
            flush=True)
  save_classifier(workdir, classifier)
  summary = {'steps': c.num_steps, 'final_loss': losses[-1] if losses else None,
             'model_step': model.step, 'seconds': round(time.perf_counter() - start, 1)}
  metrics_lib.write_json(os.path.join(workdir, CLASSIFIER_DIR, 'summary.json'), summary)
  return summary


def save_classifier(workdir: str, classifier):
  path = os.path.abspath(os.path.join(workdir, CLASSIFIER_DIR, 'params'))
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(path, classifier, force=True)
  checkpointer.wait_until_finished()


def load_classifier(workdir: str, model_step: Optional[int] = None) -> Optional[dict]:
  """The classifier trained for the model in `workdir`, or None if there is none.

  model_step: the step of the model it will serve; a classifier trained on another step of
  the model is refused (its labels described a different model).
  """
  path = os.path.abspath(os.path.join(workdir, CLASSIFIER_DIR, 'params'))
  if not os.path.exists(path):
    return None
  summary_path = os.path.join(workdir, CLASSIFIER_DIR, 'summary.json')
  if model_step is not None and os.path.exists(summary_path):
    with open(summary_path) as f:
      trained_on = json.load(f).get('model_step')
    if trained_on is not None and trained_on != model_step:
      raise ValueError(f'{path} was trained on the model at step {trained_on}, but the model '
                       f'is at step {model_step}: re-run configs/exit_classifier.py')
  return ocp.StandardCheckpointer().restore(path)


def require_classifier(workdir: str, model_step: Optional[int] = None) -> dict:
  """load_classifier for a measure that cannot run without it: a missing classifier is a
  user error naming the path and the command that trains it."""
  classifier = load_classifier(workdir, model_step=model_step)
  if classifier is None:
    path = os.path.abspath(os.path.join(workdir, CLASSIFIER_DIR, 'params'))
    raise cli.PathError(f"measure 'classifier': no exit classifier at {path}; train it with "
                        'python launch/train.py --config=configs/exit_classifier.py '
                        f'--workdir={workdir}')
  return classifier
