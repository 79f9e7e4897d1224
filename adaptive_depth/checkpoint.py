"""Orbax checkpoints of the train state together with the input pipeline's position.

A checkpoint is two items: `state` (the sharded pytree) and `data` (a small JSON dict from
the pipeline's get_state), so a resumed run sees exactly the batches the uninterrupted run
would have seen. Saves may be asynchronous; an interrupted save leaves only a temporary
directory that Orbax ignores, so the latest complete step is always restorable.
"""
from __future__ import annotations

import os
from typing import Any, Optional

import jax
import orbax.checkpoint as ocp


class Checkpoints:
  """Keep-last-K checkpoints under `directory`, one per saved step."""

  def __init__(self, directory: str, *, keep: int = 3, async_save: bool = True):
    self.directory = os.path.abspath(directory)
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, create=True, enable_async_checkpointing=async_save)
    self._manager = ocp.CheckpointManager(self.directory, options=options,
                                          item_names=('state', 'data'))

  def latest_step(self) -> Optional[int]:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._manager.all_steps())

  def save(self, step: int, state, data_state: dict, *, force: bool = False) -> bool:
    """Starts saving `step` (returns at once when asynchronous)."""
    return self._manager.save(
        step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                      data=ocp.args.JsonSave(data_state)), force=force)

  def restore(self, step: int, abstract_state) -> tuple[Any, dict]:
    """(state, data_state) at `step`. abstract_state: ShapeDtypeStructs carrying the target
    shardings, so the restore lands directly on the current mesh whatever mesh saved it."""
    restored = self._manager.restore(
        step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state),
                                      data=ocp.args.JsonRestore()))
    return restored['state'], restored['data']

  def restore_state_only(self, step: int, abstract_state):
    restored = self._manager.restore(
        step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state)))
    return restored['state']

  def wait(self):
    self._manager.wait_until_finished()

  def close(self):
    self._manager.close()


def abstract_with_shardings(abstract_tree, shardings):
  """ShapeDtypeStructs that carry the given shardings (restore targets)."""
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      abstract_tree, shardings)
