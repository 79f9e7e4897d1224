"""Counting the programs built in a block of a test: what "refused before compiling" means."""
import contextlib

import jax


@contextlib.contextmanager
def backend_compiles():
  """Yields a list that grows by one entry per call into XLA compilation inside the block
  (jax records the event around each, a persistent-cache hit of the tests' cache in
  conftest.py included). A program this process already holds (jax's in-memory caches,
  ad.generate's own) is not built again and not counted: a test that wants [] to mean
  "refused before compiling" clears the cache its call would find."""
  events = []
  listener = lambda name, *_, **__: (
      events.append(name) if name == '/jax/core/compile/backend_compile_duration' else None)
  jax.monitoring.register_event_duration_secs_listener(listener)
  try:
    yield events
  finally:
    jax.monitoring.unregister_event_duration_listener(listener)
