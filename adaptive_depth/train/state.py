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
  clipping. Weight decay applies to weights only (not norm scales or biases; decay_mask)."""
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


# What a parameter is, by its name in the tree (layers.py, model.py, exit_heads.py): norm
# scales ('scale' under a norm, or the exits' stacked 'norm' scales) and biases ('q_bias',
# ...) set offsets and gains, which decay would pull towards 0 rather than regularise.
# Everything else (projection kernels, embeddings, LoRA and adapter factors) is a weight and
# decays. The rank cannot tell them apart: stacking over blocks makes scales 2-D and q/k/v
# biases 3-D ([num_blocks, heads, head_dim]).
def _decays(path) -> bool:
  # Dict keys only: a parameter still boxed with its logical axes adds a `.value` step.
  names = [str(k.key) for k in path if isinstance(k, jax.tree_util.DictKey)]
  leaf = names[-1] if names else ''
  is_bias = leaf == 'bias' or leaf.endswith('_bias')
  is_norm = leaf == 'scale' or any('norm' in name for name in names)
  return not (is_bias or is_norm)


def decay_mask(params):
  """True for the parameters weight decay applies to, decided by name (see `_decays`):
  kernels, embeddings and low-rank factors decay; norm scales and biases do not."""
  return jax.tree_util.tree_map_with_path(lambda path, _: _decays(path), params)


def _is_box(x):
  return isinstance(x, nn.LogicallyPartitioned)


def _abstract_and_shardings(boxed_fn, mesh, rules):
  """(abstract unboxed tree, NamedShardings) of what boxed_fn(rng) returns."""
  abstract_boxed = jax.eval_shape(boxed_fn, jax.random.key(0))

  def leaf_sharding(x):
    if _is_box(x):
      spec = sharding.logical_to_spec(x.names, x.value.shape, rules, mesh)
      return jax.sharding.NamedSharding(mesh, spec)
    return sharding.replicated(mesh)

  shardings = jax.tree.map(leaf_sharding, abstract_boxed, is_leaf=_is_box)
  return nn.unbox(abstract_boxed), shardings


def state_shardings(cfg: model_lib.ModelConfig, tx, mesh, rules):
  """(abstract unboxed TrainState, its NamedShardings).

  The optimizer is initialised on parameters still boxed with their logical axis names, so
  its moments inherit them; unboxed leaves (step counters) are replicated.
  """
  def boxed_state(rng):
    params = model_lib._init_boxed(cfg, rng)
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))

  return _abstract_and_shardings(boxed_state, mesh, rules)


def param_shardings(cfg: model_lib.ModelConfig, mesh, rules):
  """(abstract unboxed parameters, their NamedShardings): what state_shardings gives for
  `.params`, without building an optimizer (loading a model for inference needs no more)."""
  return _abstract_and_shardings(lambda rng: model_lib._init_boxed(cfg, rng), mesh, rules)


def create_state(cfg: model_lib.ModelConfig, tx, rng, shardings) -> TrainState:
  """A fresh state, created directly in its shardings (no host copy of the whole model)."""
  def init(rng):
    params = model_lib.init_params(cfg, rng)
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))
  return jax.jit(init, out_shardings=shardings)(rng)
