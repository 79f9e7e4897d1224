"""Counting the programs built in a block of a test: what "refused before compiling" means."""
import contextlib

import jax


@contextlib.contextmanager
def backend_compiles():
  """Yields a list that grows by one entry per program built inside the block: jax records
  this event around each XLA compilation, persistent-cache hits (the tests' cache,
  conftest.py) included."""
  events = []
  listener = lambda name, *_, **__: (
      events.append(name) if name == '/jax/core/compile/backend_compile_duration' else None)
  jax.monitoring.register_event_duration_secs_listener(listener)
  try:
    yield events
  finally:
    jax.monitoring.unregister_event_duration_listener(listener)
