"""Train state, optimizer, and sharded creation of the state on a mesh."""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import optax

from adaptive_depth import model as model_lib
from adaptive_depth import sharding


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  opt_state: Any


def make_optimizer(train_config) -> optax.GradientTransformation:
  """AdamW with linear warmup then cosine decay to final_lr_fraction, after global-norm
  clipping. Weight decay applies to matrices only (not norms' scales)."""
  t = train_config
  schedule = optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=t.learning_rate, warmup_steps=t.warmup_steps,
      decay_steps=t.num_steps, end_value=t.learning_rate * t.final_lr_fraction)
  parts = [optax.clip_by_global_norm(t.grad_clip_norm)] if t.grad_clip_norm > 0 else []
  parts.append(optax.adamw(schedule, b1=t.b1, b2=t.b2, weight_decay=t.weight_decay,
                           mask=decay_mask))
  tx = optax.chain(*parts)
  if t.get('trainable', 'all') == 'all':
    return tx
  # A frozen trunk gets set_to_zero, which keeps no state: no Adam moments for it, and
  # gradient clipping sees only the parameters that train.
  return optax.multi_transform({'train': tx, 'frozen': optax.set_to_zero()},
                               lambda params: trainable_labels(params, t.trainable))


def trainable_labels(params, trainable: str) -> dict:
  """'train' or 'frozen' per top-level group of `params` for config.train.trainable (a
  prefix of the parameter tree, so that frozen groups' state is one empty node each)."""
  return {k: 'train' if trainable == 'all' or k == 'exit_heads' else 'frozen' for k in params}


def split_trainable(params: dict, trainable: str) -> tuple[dict, dict]:
  """(what trains, what stays frozen): two dicts of top-level groups of `params`."""
  if trainable == 'all':
    return params, {}
  if trainable != 'exit_heads':
    raise ValueError(f"config.train.trainable={trainable!r}; allowed: all, exit_heads")
  trained = {k: v for k, v in params.items() if k == 'exit_heads'}
  return trained, {k: v for k, v in params.items() if k != 'exit_heads'}


def decay_mask(params):
  """True for the parameters weight decay applies to: every matrix, but no norm scale
  (stacked norm scales are 2-D [num_blocks, D], so the rank alone cannot tell)."""
  return jax.tree_util.tree_map_with_path(
      lambda path, p: jnp.ndim(p) >= 2 and 'norm' not in jax.tree_util.keystr(path), params)


def _is_box(x):
  return isinstance(x, nn.LogicallyPartitioned)


def state_shardings(cfg: model_lib.ModelConfig, tx, mesh, rules):
  """(abstract unboxed TrainState, its NamedShardings).

  The optimizer is initialised on parameters still boxed with their logical axis names, so
  its moments inherit them; unboxed leaves (step counters) are replicated.
  """
  def boxed_state(rng):
    params = model_lib._init_boxed(cfg, rng)
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))

  abstract_boxed = jax.eval_shape(boxed_state, jax.random.key(0))

  def leaf_sharding(x):
    if _is_box(x):
      spec = sharding.logical_to_spec(x.names, x.value.shape, rules, mesh)
      return jax.sharding.NamedSharding(mesh, spec)
    return sharding.replicated(mesh)

  shardings = jax.tree.map(leaf_sharding, abstract_boxed, is_leaf=_is_box)
  abstract = nn.unbox(abstract_boxed)
  return abstract, shardings


def create_state(cfg: model_lib.ModelConfig, tx, rng, shardings) -> TrainState:
  """A fresh state, created directly in its shardings (no host copy of the whole model)."""
  def init(rng):
    params = model_lib.init_params(cfg, rng)
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))
  return jax.jit(init, out_shardings=shardings)(rng)
