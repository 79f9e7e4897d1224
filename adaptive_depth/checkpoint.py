"""Orbax checkpoints of the train state together with the input pipeline's position.

A training run's checkpoint is two items: `state` (the sharded TrainState: step, params,
optimizer state) and `data` (a small JSON dict from the pipeline's get_state), so a resumed
run sees exactly the batches the uninterrupted run would have seen. A model imported by
launch/convert.py has no optimizer state to keep: its checkpoint is a `params` item (the
parameter pytree alone) and a `data` item saying where it came from.

Saves may be asynchronous; an interrupted save leaves only a temporary directory that Orbax
ignores, so the latest complete step is always restorable.

`restore_params` reads the parameters of either kind and nothing else: from a training
checkpoint it restores the `params` subtree of `state` alone (a partial restore), so that
loading a model for inference never holds its Adam moments (twice the parameters) in memory.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Optional

import jax
import orbax.checkpoint as ocp

from adaptive_depth import cli

STATE, PARAMS, DATA = 'state', 'params', 'data'


class Checkpoints:
  """Keep-last-K checkpoints under `directory`, one per saved step."""

  def __init__(self, directory: str, *, keep: int = 3, async_save: bool = True):
    self.directory = os.path.abspath(directory)
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, create=True, enable_async_checkpointing=async_save)
    self._manager = ocp.CheckpointManager(self.directory, options=options,
                                          item_names=(STATE, PARAMS, DATA))

  def latest_step(self) -> Optional[int]:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._manager.all_steps())

  def items(self, step: int) -> set[str]:
    """The items checkpoint `step` holds ('state' for a training run, 'params' for an
    imported model; 'data' in both)."""
    return checkpoint_items(self.directory, step)

  def save(self, step: int, state, data_state: dict, *, force: bool = False) -> bool:
    """Starts saving `step` (returns at once when asynchronous)."""
    return self._manager.save(
        step, args=ocp.args.Composite(**{STATE: ocp.args.StandardSave(state),
                                         DATA: ocp.args.JsonSave(data_state)}), force=force)

  def save_params(self, step: int, params, info: dict) -> bool:
    """Saves parameters alone (no optimizer state, no step counter) with a JSON `info`."""
    return self._manager.save(
        step, args=ocp.args.Composite(**{PARAMS: ocp.args.StandardSave(params),
                                         DATA: ocp.args.JsonSave(info)}), force=True)

  def restore(self, step: int, abstract_state) -> tuple[Any, dict]:
    """(state, data_state) at `step`. abstract_state: ShapeDtypeStructs carrying the target
    shardings, so the restore lands directly on the current mesh whatever mesh saved it."""
    self._require_state(step)
    restored = self._manager.restore(
        step, args=ocp.args.Composite(**{STATE: ocp.args.StandardRestore(abstract_state),
                                         DATA: ocp.args.JsonRestore()}))
    return restored[STATE], restored[DATA]

  def restore_state_only(self, step: int, abstract_state):
    """The whole TrainState at `step` (no data position)."""
    self._require_state(step)
    restored = self._manager.restore(
        step, args=ocp.args.Composite(**{STATE: ocp.args.StandardRestore(abstract_state)}))
    return restored[STATE]

  def restore_params(self, step: int, abstract_params):
    """The parameters at `step`, and only they are read from disk.

    abstract_params: ShapeDtypeStructs with target shardings, the tree of TrainState.params.
    """
    if PARAMS in self.items(step):  # an imported model: the item is the parameters
      restored = self._manager.restore(
          step, args=ocp.args.Composite(**{PARAMS: ocp.args.StandardRestore(abstract_params)}))
      return restored[PARAMS]
    self._require_state(step)
    target = {'params': abstract_params}  # TrainState is stored as a dict of its fields
    restore_args = jax.tree.map(
        lambda x: ocp.ArrayRestoreArgs(sharding=x.sharding, global_shape=x.shape,
                                       dtype=x.dtype), target)
    # A checkpointer of its own: the manager fixes one handler per item (the state's is the
    # StandardCheckpointHandler that saves and resumes it), and partial restore is PyTree's.
    checkpointer = ocp.Checkpointer(ocp.PyTreeCheckpointHandler())
    try:
      restored = checkpointer.restore(
          os.path.join(self.directory, str(step), STATE),
          args=ocp.args.PyTreeRestore(item=target, restore_args=restore_args,
                                      **partial_restore_kwargs()))
    finally:
      checkpointer.close()
    return restored['params']

  def _require_state(self, step: int):
    require_train_state(self.directory, step)

  def wait(self):
    self._manager.wait_until_finished()

  def close(self):
    self._manager.close()


def steps_on_disk(directory: str) -> list[int]:
  """The numbered checkpoint folders under `directory`, ascending (none if it is absent)."""
  if not os.path.isdir(directory):
    return []
  return sorted(int(name) for name in os.listdir(directory) if name.isdigit())


def checkpoint_items(directory: str, step: int) -> set[str]:
  """The items checkpoint `step` under `directory` holds, read from the file system."""
  folder = os.path.join(directory, str(step))
  return {name for name in (STATE, PARAMS, DATA) if os.path.isdir(os.path.join(folder, name))}


def require_train_state(directory: str, step: int):
  """A user error unless checkpoint `step` under `directory` holds a train state to resume
  (a model written by launch/convert.py holds parameters only)."""
  items = checkpoint_items(directory, step)
  if STATE not in items:
    what = ('parameters only (a model written by launch/convert.py)' if PARAMS in items
            else f'no train state (items: {sorted(items) or "none"})')
    raise cli.UserError(
        f'checkpoint {step} in {os.path.abspath(directory)} holds {what}, not a train state '
        'to resume; start a run from it with config.train.init_from set to its workdir and a '
        'new workdir')


def partial_restore_kwargs() -> dict:
  """PyTreeRestore arguments that restore only the leaves the target names.

  orbax-checkpoint 0.12 says so with `partial_restore=True`; 0.11 has no such field and
  does the same for an empty `transforms` tree (leaves of the checkpoint that the target
  lacks are skipped, not read), which 0.12 still honours as its legacy path.
  """
  fields = {f.name for f in dataclasses.fields(ocp.args.PyTreeRestore)}
  return {'partial_restore': True} if 'partial_restore' in fields else {'transforms': {}}


def abstract_with_shardings(abstract_tree, shardings):
  """ShapeDtypeStructs that carry the given shardings (restore targets)."""
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      abstract_tree, shardings)
