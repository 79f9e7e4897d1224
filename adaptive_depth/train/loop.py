"""`train_and_evaluate(config, workdir)`: the whole training job, resumable.

Resume order, checked once at start:
  1. the latest complete checkpoint in WORKDIR/checkpoints (state and data position);
  2. otherwise, with config.train.init_from, that run's parameters (train/init_from.py);
  3. otherwise a fresh state from config.seed.
With config.train.trainable='exit_heads' only params['exit_heads'] train: the loss is
differentiated with respect to them alone, so no backward pass runs through the trunk.
A SIGTERM (preemption) finishes the current step, saves a checkpoint and returns; running
the same command again continues from there and ends with the same parameters as a run that
was never interrupted.
"""
from __future__ import annotations

import json
import os
import signal
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from adaptive_depth import checkpoint as checkpoint_lib
from adaptive_depth import config_lib
from adaptive_depth import exit_heads
from adaptive_depth import forward as forward_lib
from adaptive_depth import host_memory
from adaptive_depth import metrics as metrics_lib
from adaptive_depth import model as model_lib
from adaptive_depth import routers
from adaptive_depth import sharding
from adaptive_depth.data import pipeline
from adaptive_depth.train import init_from as init_from_lib
from adaptive_depth.train import losses
from adaptive_depth.train import state as state_lib


def _global_norm(tree):
  # Written out: optax renamed its global-norm helper across the supported versions.
  return jnp.sqrt(sum(jnp.sum(jnp.square(x)) for x in jax.tree.leaves(tree)))


def _refuse_split_of_routed_model(splits: int, cfg: model_lib.ModelConfig) -> None:
  if splits > 1 and cfg.routing is not None:
    raise config_lib.ConfigError(
        f'config.train.batch_splits={splits}: a Mixture-of-Recursions model routes over the '
        'whole batch; allowed: 0 (automatic) or 1')


def batch_splits(config, cfg: model_lib.ModelConfig) -> int:
  """config.train.batch_splits with 0 (automatic) resolved: 2 on a single CPU device
  when the batch is even, else 1. On CPU, XLA runs most of a step's operations on one
  thread each, side by side where they do not depend on each other; two independent halves
  of the batch give it that work (README, Scale). Accelerators and meshes gain nothing from
  it, nor a Mixture-of-Recursions model, whose routing is over the whole batch (an explicit
  split of one is refused, here and by make_train_step)."""
  splits = config.train.batch_splits
  _refuse_split_of_routed_model(splits, cfg)
  if splits:
    return splits
  if cfg.routing is not None:
    return 1
  single_cpu = jax.device_count() == 1 and jax.default_backend() == 'cpu'
  return 2 if single_cpu and config.train.batch_size % 2 == 0 else 1


def make_train_step(cfg: model_lib.ModelConfig, tx, weights, constrain, *,
                    exit_loss: str = 'lm', trainable: str = 'all', loss_chunk_tokens: int = 0,
                    splits: int = 1):
  """(state, batch [B, T+1]) -> (state, metrics); pure, for jax.jit. loss_chunk_tokens > 0:
  the multi-exit loss over chunks of that many positions, never holding every exit's
  logits at once (losses.chunked_multi_exit_loss). splits > 1: the loss as the mean of that
  many independent equal parts of the batch (the same loss and gradient; see batch_splits).
  A Mixture-of-Recursions model takes splits=1 only."""
  _refuse_split_of_routed_model(splits, cfg)

  def train_step(state, batch):
    def loss_fn(trained, frozen):
      params = {**frozen, **trained}
      if splits == 1:
        return part_loss(params, batch)
      # Each part traced on its own (not vmapped), so that the parts stay independent
      # operations the compiler can run side by side.
      results = [part_loss(params, part) for part in jnp.split(batch, splits)]
      loss = sum(loss for loss, _ in results) / splits
      exit_loss_, exit_acc, _ = jax.tree.map(lambda *x: sum(x) / splits,
                                             *[aux for _, aux in results])
      return loss, (exit_loss_, exit_acc, {})

    def part_loss(params, part):  # part: [b, T+1]
      inputs, targets = part[:, :-1], part[:, 1:]
      out = forward_lib.forward_outputs(cfg, params, inputs, constrain)
      if loss_chunk_tokens:
        heads = lambda h: model_lib.head_logits(cfg, params, h, exit_heads.ALL_EXITS)
        loss, exit_loss_, exit_acc = losses.chunked_multi_exit_loss(
            heads, out.exit_states, targets, weights, exit_loss, loss_chunk_tokens)
      else:
        logits = model_lib.head_logits(cfg, params, out.exit_states, exit_heads.ALL_EXITS)
        loss, exit_loss_, exit_acc = losses.multi_exit_loss(logits, targets, weights,
                                                            exit_loss)
      routing_metrics = {}
      if out.routing is not None:  # MoR: the router losses join the LM loss
        loss = loss + out.routing.aux_loss
        routing_metrics = out.routing.metrics
      return loss, (exit_loss_, exit_acc, routing_metrics)

    trained, frozen = state_lib.split_trainable(state.params, trainable)
    (loss, (exit_loss_, exit_acc, routing_metrics)), grads = jax.value_and_grad(
        loss_fn, has_aux=True)(trained, frozen)
    # The optimizer wants a gradient per leaf; the frozen ones' zeros go to set_to_zero,
    # which ignores them (the compiler drops them), and their parameters pass through.
    all_grads = {**jax.tree.map(jnp.zeros_like, frozen), **grads}
    updates, opt_state = tx.update(all_grads, state.opt_state, state.params)
    params = {**state.params, **optax.apply_updates(trained, {k: updates[k] for k in trained})}
    new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state)
    return new_state, {'loss': loss, 'exit_loss': exit_loss_, 'exit_accuracy': exit_acc,
                       'grad_norm': _global_norm(grads), 'routing': routing_metrics}
  return train_step


def make_eval_step(cfg: model_lib.ModelConfig, constrain):
  """(params, batch) -> per-exit sums of token NLL, correct argmax and argmax agreeing with
  the last exit's, the token count, and for a MoR model the sums of
  routers.decision_agreement_sums (how often decoding's causal router decision matches the
  training-time selection) under 'routing' (an empty dict otherwise)."""
  def eval_step(params, batch):
    inputs, targets = batch[:, :-1], batch[:, 1:]
    out = forward_lib.forward_outputs(cfg, params, inputs, constrain)
    logits = model_lib.head_logits(cfg, params, out.exit_states, exit_heads.ALL_EXITS)
    nll, correct = losses.per_exit_token_losses(logits, targets)
    argmax = jnp.argmax(logits, axis=-1)
    agree = (argmax == argmax[-1:]).astype(jnp.float32)
    routing = {}
    if out.routing is not None:
      agreeing, counted = routers.decision_agreement_sums(cfg.routing, out.routing)
      routing = {'agreeing': agreeing, 'counted': counted,
                 'selected': out.routing.selected.sum(axis=(1, 2)).astype(jnp.float32)}
    return (nll.sum(axis=(1, 2)), correct.sum(axis=(1, 2)), agree.sum(axis=(1, 2)),
            jnp.float32(targets.size), routing)
  return eval_step


class _Preemption:
  """Turns SIGTERM into a flag the loop polls between steps."""

  def __init__(self):
    self.requested = False
    self._previous = None

  def __enter__(self):
    try:
      self._previous = signal.signal(signal.SIGTERM, self._handle)
    except ValueError:  # not the main thread (e.g. some notebook kernels): no handler
      self._previous = None
    return self

  def _handle(self, signum, frame):
    self.requested = True

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)


def evaluate(eval_step, params, eval_batches, put_batch, num_batches: int):
  """Mean per-exit loss, accuracy and agreement with the last exit over the eval split (or
  its first num_batches), and for a MoR model a dict of routing figures (else None): per
  recursion the share of tokens selected and the decision agreement (make_eval_step)."""
  totals = None
  for i, batch in enumerate(eval_batches):
    if num_batches and i >= num_batches:
      break
    out = eval_step(params, put_batch(batch))
    totals = out if totals is None else jax.tree.map(jnp.add, totals, out)
  if totals is None:
    raise ValueError('the eval split yields no full batch; lower config.eval.batch_size or '
                     'config.data.seq_len')
  nll, correct, agree, count, routing = jax.device_get(totals)
  routing_figures = None
  if routing:
    routing_figures = {
        'selected': [round(float(x), 5) for x in routing['selected'] / count],
        'decision_agreement': [round(float(x), 5) for x in
                               routing['agreeing'] / np.maximum(routing['counted'], 1)]}
  return nll / count, correct / count, agree / count, routing_figures


def _check_same_model(config, workdir: str):
  """Refuses to resume a workdir whose checkpoints hold a different model or data."""
  path = os.path.join(workdir, 'config.json')
  if not os.path.exists(path) or not checkpoint_lib.steps_on_disk(
      os.path.join(workdir, 'checkpoints')):
    return
  with open(path) as f:
    saved = json.load(f)
  new = config.to_dict()
  changed = [f'config.{group}.{key}: {saved[group].get(key)!r} -> {value!r}'
             for group in ('model', 'data') for key, value in new[group].items()
             if saved.get(group, {}).get(key) != value]
  if changed:
    raise config_lib.ConfigError(
        f'{workdir} holds checkpoints of a different model or data ({"; ".join(changed)}); '
        'use a new --workdir or the config it was trained with')


def train_model(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Trains (or resumes) the model per `config` in `workdir`; returns the summary it writes.

  Writes WORKDIR/config.json, WORKDIR/checkpoints/, TensorBoard events in WORKDIR and, at the
  end, WORKDIR/summary.json.
  """
  wall_start = time.perf_counter()
  config_lib.validate(config)
  cfg = model_lib.ModelConfig.from_config(config.model)
  splits = batch_splits(config, cfg)
  mesh = sharding.make_mesh(config.mesh)
  batch_split = mesh.shape['data'] * mesh.shape['fsdp']
  if splits > 1 and (config.train.batch_size // splits) % batch_split:
    raise config_lib.ConfigError(
        f'config.train.batch_splits={splits}: each part ({config.train.batch_size // splits} '
        f'rows) must be divisible by the mesh data x fsdp size ({batch_split}); set it to 1')
  for key in ('train', 'eval'):
    if config[key].batch_size % batch_split:
      raise config_lib.ConfigError(
          f'config.{key}.batch_size={config[key].batch_size} must be divisible by the mesh '
          f'data x fsdp size ({batch_split})')
  os.makedirs(workdir, exist_ok=True)
  checkpoint_dir = os.path.join(workdir, 'checkpoints')
  steps = checkpoint_lib.steps_on_disk(checkpoint_dir)
  resuming = bool(steps)
  if resuming and checkpoint_lib.PARAMS in checkpoint_lib.checkpoint_items(checkpoint_dir,
                                                                            steps[-1]):
    # An imported model's workdir: parameters only, nothing to resume. Refused first (its
    # model may differ from this config too) and before anything is written there.
    checkpoint_lib.require_train_state(checkpoint_dir, steps[-1])
  _check_same_model(config, workdir)
  if not resuming and config.train.init_from:
    init_from_lib.check_source(config, cfg)  # a wrong source fails here, before compiling
  elif not resuming and config.train.trainable != 'all':
    raise config_lib.ConfigError(
        f'config.train.trainable={config.train.trainable!r} keeps the trunk as it starts: set '
        'config.train.init_from to the workdir of a trained or imported model')
  metrics_lib.write_json(os.path.join(workdir, 'config.json'), config.to_dict())

  train_data, make_eval_data, _ = pipeline.make_train_and_eval_data(
      config.data, batch_size=config.train.batch_size, eval_batch_size=config.eval.batch_size,
      seed=config.seed, shard_index=jax.process_index(), num_shards=jax.process_count())

  tx = state_lib.make_optimizer(config.train)
  rules = tuple(tuple(r) for r in config.sharding.rules)
  abstract_state, shardings = state_lib.state_shardings(cfg, tx, mesh, rules)
  batch_sharding = sharding.batch_sharding(mesh)
  put_batch = lambda b: jax.make_array_from_process_local_data(batch_sharding, b)
  constrain = sharding.ActivationConstraint(mesh, rules)
  weights = losses.exit_loss_weights(config.train.exit_loss_weights, cfg.exit_depths)

  train_step = jax.jit(make_train_step(cfg, tx, weights, constrain,
                                       exit_loss=config.train.exit_loss,
                                       trainable=config.train.trainable,
                                       loss_chunk_tokens=config.train.loss_chunk_tokens,
                                       splits=splits),
                       in_shardings=(shardings, batch_sharding),
                       out_shardings=(shardings, sharding.replicated(mesh)),
                       donate_argnums=0)
  eval_step = jax.jit(make_eval_step(cfg, constrain),
                      in_shardings=(shardings.params, batch_sharding))

  checkpoints = checkpoint_lib.Checkpoints(os.path.join(workdir, 'checkpoints'),
                                           keep=config.checkpoint.keep,
                                           async_save=config.checkpoint.async_save)
  latest = checkpoints.latest_step()
  if latest is not None:
    state, data_state = checkpoints.restore(
        latest, checkpoint_lib.abstract_with_shardings(abstract_state, shardings))
    train_data.set_state(data_state)
    # Records past the checkpoint belong to work that was lost and will be redone.
    metrics_lib.truncate_json_lines(os.path.join(workdir, 'metrics.jsonl'), max_step=latest)
    print(f'Resuming from step {latest} in {checkpoints.directory}', flush=True)
  elif config.train.init_from:
    state = init_from_lib.initial_state(config, cfg, tx, shardings)
  else:
    state = state_lib.create_state(cfg, tx, jax.random.key(config.seed), shardings)
  start_step = int(jax.device_get(state.step))
  num_params = model_lib.count_params(state.params)
  num_steps = config.train.num_steps
  tokens_per_step = config.train.batch_size * config.data.seq_len
  print(f'Model: {num_params:,} parameters, {cfg.num_layers} steps over {cfg.num_blocks} '
        f'blocks ({cfg.schedule}), exits at depths {list(cfg.exit_depths)}; '
        f'mesh {dict(mesh.shape)} on {jax.device_count()} {jax.devices()[0].platform} device(s)'
        + (f'; each batch as {splits} parts (config.train.batch_splits)' if splits > 1 else ''),
        flush=True)

  writer = metrics_lib.EventWriter(workdir, purge_step=start_step + 1 if latest else None)
  history = metrics_lib.JsonLines(os.path.join(workdir, 'metrics.jsonl'))
  progress = metrics_lib.Progress(total=num_steps, initial=start_step,
                                  tokens_per_step=tokens_per_step,
                                  enabled=config.train.progress_bar)
  run_eval = lambda: evaluate(eval_step, state.params, make_eval_data(), put_batch,
                              config.eval.num_batches)

  def log_eval(step, eval_loss, eval_acc, eval_agree, eval_routing):
    scalars = {f'eval/loss_exit_{d}': l for d, l in zip(cfg.exit_depths, eval_loss)}
    record = {'step': step, 'eval': metrics_lib.per_exit_records(
        cfg.exit_depths, eval_loss, eval_acc, eval_agree)}
    if eval_routing:
      for name, values in eval_routing.items():
        scalars.update({f'eval_routing/{name}_recursion_{r + 1}': v
                        for r, v in enumerate(values)})
      record['eval_routing'] = eval_routing
    writer.scalars(step, scalars)
    history.append(record)

  timed_steps, timed_seconds, timer_start = 0, 0.0, None
  last_routing = None  # MoR: the routing metrics of the last logged step
  preempted = False
  step = start_step
  # On CPU, with host_memory's malloc settings, each step is waited for before the host goes
  # on. Left to run ahead, the host makes the next batch and dispatches the next step while
  # this one runs; its allocations then fragment the heap around the step's temporary buffer
  # (about 0.5 GB for the quickstart), and steps page-fault through fresh memory again:
  # launch/train.py ran at 0.82 of the step alone that way. With host_memory's inline CPU
  # programs the call itself returns done and this wait costs nothing; it still matters
  # under JAX_CPU_ENABLE_ASYNC_DISPATCH=1 or a backend made before the import. Accelerators
  # keep async dispatch: their buffers are not host heap, and the host's work overlaps theirs.
  wait_for_each_step = jax.devices()[0].platform == 'cpu' and host_memory.keeping()
  with _Preemption() as preemption:
    while step < num_steps:
      state, step_metrics = train_step(state, put_batch(next(train_data)))
      if wait_for_each_step:
        jax.block_until_ready(state)
      step += 1
      if timer_start is None:  # the first step includes compilation: time from its end
        jax.block_until_ready(step_metrics)
        timer_start, timed_from = time.perf_counter(), step
      if step % config.train.log_every == 0 or step == num_steps:
        m = jax.device_get(step_metrics)
        scalars = {'train/loss': m['loss'], 'train/grad_norm': m['grad_norm']}
        scalars.update({f'train/loss_exit_{d}': l for d, l in zip(cfg.exit_depths,
                                                                   m['exit_loss'])})
        scalars.update({f'routing/{k}': v for k, v in m['routing'].items()})
        writer.scalars(step, scalars)
        record = {'step': step, 'train_loss': float(m['loss']),
                  'train_exit_loss': [float(x) for x in m['exit_loss']]}
        if m['routing']:
          last_routing = {k: round(float(v), 5) for k, v in m['routing'].items()}
          record['routing'] = last_routing
        history.append(record)
        progress.update(step, loss=float(m['loss']), last_exit=float(m['exit_loss'][-1]))
      if config.eval.every_steps and step % config.eval.every_steps == 0 and step < num_steps:
        eval_loss, eval_acc, eval_agree, eval_routing = run_eval()
        log_eval(step, eval_loss, eval_acc, eval_agree, eval_routing)
        progress.write(f'step {step}: eval loss per exit ' +
                       ' '.join(f'{d}:{l:.3f}' for d, l in zip(cfg.exit_depths, eval_loss)))
      periodic = step % config.checkpoint.every_steps == 0 or step == num_steps
      if periodic:
        checkpoints.save(step, state, train_data.get_state())
      if preemption.requested and step < num_steps:
        if not periodic:
          checkpoints.save(step, state, train_data.get_state(), force=True)
        preempted = True
        break
    jax.block_until_ready(state)
    if timer_start is not None:
      timed_steps = step - timed_from
      timed_seconds = time.perf_counter() - timer_start
  progress.close()
  checkpoints.wait()

  if preempted:
    checkpoints.close()
    writer.close()
    print(f'SIGTERM: saved step {step} in {checkpoints.directory}; run the same command to '
          'resume.', flush=True)
    return {'step': step, 'preempted': True}

  eval_loss, eval_acc, eval_agree, eval_routing = run_eval()
  log_eval(step, eval_loss, eval_acc, eval_agree, eval_routing)
  writer.close()
  checkpoints.close()
  summary = {
      'step': step,
      'wall_seconds': round(time.perf_counter() - wall_start, 2),
      'tokens_per_second': (round(timed_steps * tokens_per_step / timed_seconds, 1)
                            if timed_seconds else None),
      'params': num_params,
      'eval': metrics_lib.per_exit_records(cfg.exit_depths, eval_loss, eval_acc, eval_agree),
  }
  if last_routing is not None:
    summary['train_routing'] = last_routing
  if eval_routing:
    summary['eval_routing'] = eval_routing
  metrics_lib.write_json(os.path.join(workdir, 'summary.json'), summary)
  print('Validation per exit: ' + ', '.join(
      f"depth {r['depth']}: loss {r['loss']:.3f} acc {r['accuracy']:.3f} "
      f"agree {r['agreement']:.3f}" for r in summary['eval']), flush=True)
  print(f'Wrote {os.path.join(workdir, "summary.json")}', flush=True)
  return summary
