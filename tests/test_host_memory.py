"""host_memory.keep_freed_memory: a compiled program's temporary buffer stops page-faulting.

Measured in fresh processes (the setting must precede jax's CPU backend): the same jitted
program with tens of MB of temporary buffers, run again and again, with the library's malloc
settings and with glibc's defaults; the minor page faults of each later call are counted.
"""
import os
import platform
import statistics
import subprocess
import sys

import pytest

from adaptive_depth import host_memory

_PROGRAM = r'''
import resource
import adaptive_depth  # sets (or, with ADAPTIVE_DEPTH_HOST_MALLOC=system, leaves) malloc
import jax, jax.numpy as jnp

@jax.jit
def program(x, w):  # [262144, 16] float32 intermediates: 16 MB each, several live at once
  y = jnp.sin(x) @ w
  return (jnp.cos(y) @ w).sum()

# The products keep the intermediates apart, as buffers of their own. Over 16 columns they
# cost a 32nd of the arithmetic of 512 columns, for the same 32 MB temporary buffer per call
# (XLA's memory analysis of the compiled program).
x, w = jnp.ones((262144, 16)), jnp.full((16, 16), 1e-3)
for _ in range(2):
  program(x, w).block_until_ready()
for _ in range(30):
  before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  program(x, w).block_until_ready()
  print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
'''

needs_glibc = pytest.mark.skipif(
    not sys.platform.startswith('linux') or platform.libc_ver()[0] != 'glibc',
    reason='the malloc settings are glibc-only (a no-op elsewhere)')


def _outputs_side_by_side(program: str, environments: list) -> list:
  """The stdout of `program` run in one fresh process per environment, side by side (the
  settings must precede jax's CPU backend, and page faults are counted per process)."""
  processes = [subprocess.Popen([sys.executable, '-c', program], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, env=env)
               for env in environments]
  outputs = []
  try:
    for process in processes:
      out, err = process.communicate(timeout=600)
      assert process.returncode == 0, err[-3000:]
      outputs.append(out)
  finally:
    for process in processes:
      if process.poll() is None:
        process.kill()
        process.wait()
  return outputs


def _medians_of_faults_per_call(*settings) -> list:
  outputs = _outputs_side_by_side(
      _PROGRAM, [dict(os.environ, ADAPTIVE_DEPTH_HOST_MALLOC=setting) for setting in settings])
  return [statistics.median_low(int(n) for n in out.split()) for out in outputs]


@needs_glibc
def test_kept_memory_stops_the_page_faults_of_repeated_calls():
  system, keep = _medians_of_faults_per_call('system', 'keep')
  # glibc's defaults map and unmap the temporary buffers on every call: a fresh page for
  # every 4 KB of them, 16 MB at least. Kept, the heap grows over the first calls (a buffer
  # that lands past the others faults in once) and then a call reuses the last call's memory:
  # seen here under a loaded second core, up to 7 of 30 calls faulting, hence the median.
  assert system >= 4096, system
  assert keep < system / 10, (keep, system)


def test_environment_variable_opts_out_or_is_refused(monkeypatch):
  monkeypatch.setenv(host_memory.ENV_VAR, 'system')
  assert host_memory.keep_freed_memory() is False
  monkeypatch.setenv(host_memory.ENV_VAR, 'sometimes')
  with pytest.raises(ValueError, match="ADAPTIVE_DEPTH_HOST_MALLOC='sometimes'.*keep"):
    host_memory.keep_freed_memory()


_DISPATCH = r'''
import adaptive_depth, jax, jax.numpy as jnp
x = jnp.ones((1024, 1024))
program = jax.jit(lambda x: jax.lax.fori_loop(0, 40, lambda i, y: jnp.tanh(y @ x), x))
program(x).block_until_ready()
# Inline, the call returns with its result done; dispatched, it returns while the program
# (about 0.1 s) still runs.
print(jax.config.values['jax_cpu_enable_async_dispatch'], program(x).is_ready())
'''


@needs_glibc
def test_cpu_programs_run_inline_unless_opted_out():
  """With the malloc settings jax runs CPU programs inline (host_memory.py says why): a
  call returns with its result ready. ADAPTIVE_DEPTH_HOST_MALLOC=system leaves jax's
  default (dispatched: the result is not ready yet), and so does jax's own variable for the
  flag when the user sets it."""
  cases = {'keep': ({}, 'False'), 'system': ({host_memory.ENV_VAR: 'system'}, 'True'),
           'jax variable': ({host_memory.DISPATCH_ENV_VAR: '1'}, 'True')}
  environ = {k: v for k, v in os.environ.items()
             if k not in (host_memory.ENV_VAR, host_memory.DISPATCH_ENV_VAR)}
  outputs = _outputs_side_by_side(
      _DISPATCH, [dict(environ, JAX_PLATFORMS='cpu', **extra) for extra, _ in cases.values()])
  for (name, (_, flag)), out in zip(cases.items(), outputs):
    assert out.split() == [flag, 'True' if flag == 'False' else 'False'], (name, out)
