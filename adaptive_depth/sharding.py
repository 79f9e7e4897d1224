"""Device mesh and the mapping from logical axis names to mesh axes.

The config names a mesh (`config.mesh`: sizes of the `data`, `fsdp` and `tensor` axes, -1
meaning "all the devices left") and rules (`config.sharding.rules`: logical axis name -> mesh
axis or axes). Parameters and activations carry logical names (model.param_logical_axes,
the `constrain` hooks); this module turns them into `NamedSharding`s.

A dimension that a mesh axis does not divide is replicated along it instead of failing:
small test models on 8 devices then still shard whatever divides.
"""
from __future__ import annotations

import math
from typing import Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ('data', 'fsdp', 'tensor')
# Axes over which the batch is split: data parallelism and FSDP both split the batch.
BATCH_AXES = ('data', 'fsdp')


def mesh_shape(mesh_config, num_devices: int) -> tuple[int, ...]:
  """Resolves -1 in config.mesh to the remaining devices; errors name the key."""
  sizes = [int(mesh_config[a]) for a in MESH_AXES]
  if sum(s == -1 for s in sizes) > 1:
    raise ValueError(f'config.mesh: at most one axis may be -1, got {dict(zip(MESH_AXES, sizes))}')
  for axis, size in zip(MESH_AXES, sizes):
    if size == 0 or size < -1:
      raise ValueError(f'config.mesh.{axis}={size}; allowed: a positive size or -1 (the rest)')
  known = math.prod(s for s in sizes if s != -1)
  if num_devices % known:
    raise ValueError(f'config.mesh={dict(zip(MESH_AXES, sizes))} needs a multiple of {known} '
                     f'devices, found {num_devices}')
  sizes = [num_devices // known if s == -1 else s for s in sizes]
  if math.prod(sizes) != num_devices:
    raise ValueError(f'config.mesh={dict(zip(MESH_AXES, sizes))} uses {math.prod(sizes)} '
                     f'devices, found {num_devices}; set one axis to -1')
  return tuple(sizes)


def make_mesh(mesh_config, devices: Sequence | None = None) -> Mesh:
  """A ('data', 'fsdp', 'tensor') mesh over `devices` (default: all)."""
  devices = list(jax.devices() if devices is None else devices)
  shape = mesh_shape(mesh_config, len(devices))
  # Plain Mesh construction (rather than jax.make_mesh) keeps every axis in Auto mode on all
  # supported jax versions; the train step relies on the compiler propagating shardings.
  return Mesh(np.asarray(devices).reshape(shape), MESH_AXES)


def logical_to_spec(logical_axes: Sequence, shape: Sequence[int], rules, mesh: Mesh) -> PartitionSpec:
  """PartitionSpec for one array: each logical name mapped by the rules, dropping mesh axes
  that do not divide the dimension or that an earlier dimension already uses."""
  rule_map = {name: target for name, target in rules}
  used = set()
  spec = []
  for name, dim in zip(logical_axes, shape):
    target = rule_map.get(name)
    targets = () if target is None else ((target,) if isinstance(target, str) else tuple(target))
    kept = []
    for axis in targets:
      size = mesh.shape[axis]
      if axis in used or size == 1 or dim % (math.prod(mesh.shape[a] for a in kept) * size):
        continue
      kept.append(axis)
    used.update(kept)
    spec.append(None if not kept else (kept[0] if len(kept) == 1 else tuple(kept)))
  return PartitionSpec(*spec)


def tree_shardings(logical_tree, shape_tree, rules, mesh: Mesh):
  """NamedShardings for a pytree, given its logical names and its shapes (arrays or
  ShapeDtypeStructs) with the same structure."""
  is_names = lambda x: isinstance(x, tuple) and all(isinstance(n, (str, type(None))) for n in x)
  return jax.tree.map(
      lambda names, x: NamedSharding(mesh, logical_to_spec(names, x.shape, rules, mesh)),
      logical_tree, shape_tree, is_leaf=is_names)


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


def batch_sharding(mesh: Mesh, ndim: int = 2) -> NamedSharding:
  """Rows over the batch axes, everything else replicated."""
  return NamedSharding(mesh, PartitionSpec(BATCH_AXES, *([None] * (ndim - 1))))


class ActivationConstraint:
  """Callable pinning a [B, T, D] activation to the mesh by the config's rules.

  Passed to model.forward_train as `constrain`; without a mesh the model uses the identity.
  """

  def __init__(self, mesh: Mesh, rules, logical_axes=('batch', 'length', 'embed')):
    self.mesh, self.rules, self.logical_axes = mesh, rules, logical_axes

  def __call__(self, x):
    spec = logical_to_spec(self.logical_axes, x.shape, self.rules, self.mesh)
    return jax.lax.with_sharding_constraint(x, NamedSharding(self.mesh, spec))
