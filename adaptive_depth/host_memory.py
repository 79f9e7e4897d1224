"""Host memory: keep freed memory mapped, so a compiled step does not page-fault every call.

XLA on CPU allocates each execution's temporary buffer afresh (the quickstart's train step:
one block of about 0.5 GB) and frees it at the end. glibc serves a block that large from its
own `mmap` and returns it with `munmap`, so every step touches fresh pages: when measured,
about 140,000 minor page faults and a third of a CPU-second of kernel time per step on a
2-core CPU, where the whole step took 0.6-0.8 s. Big blocks made by XLA's worker threads go
to `mmap` even when glibc's mmap threshold is raised, because those threads allocate from
arenas of their own.

`keep_freed_memory()` sets three glibc malloc options: one arena (every thread allocates from
the main heap), no `mmap` for big blocks, and no trimming of the heap's free top. The block
of one step is then the same memory the next step gets back: no page faults after the first
step. It must run before XLA's threads first allocate (before jax creates its CPU backend),
which is why `import adaptive_depth` calls it (first thing, before its own imports). Threads
that already allocated keep the arena they have: import adaptive_depth before other packages
start threads (torch, a data loader) for the settings to reach XLA's threads. The cost: the
process keeps its peak heap mapped, fragmentation can hold somewhat more, and threads share
one arena (more lock contention in host code that mallocs from many threads at once).

It also has jax run single-device CPU programs inline (`jax_cpu_enable_async_dispatch`
False) instead of dispatching them to run in the background. XLA frees a program's temporary
buffer a few milliseconds after its outputs are ready; dispatched in the background, the next
call could allocate its own buffer in that gap, and a second block of the same size then went
to fresh pages. In a malloc trace of the quickstart's training loop (glibc calls of 100 MB or
more), that is what its occasional slow steps were: the next step's 0.47 GB buffer allocated
6 ms before the last one was freed, the heap grown by 0.47 GB, and the step after grown again;
each such step took about 1 s instead of 0.29 s (about 120,000 page faults), one or two in
three of six 60-step runs. Run inline, seven 60-step runs had no such step. The price: the
step alone ran about 2% slower (README, Scale), and a host that overlapped its own work with
a running program must now queue that work first (serving/continuous_batching.py does). An
environment variable JAX_CPU_ENABLE_ASYNC_DISPATCH, if set, is left to rule.

Setting the environment variable ADAPTIVE_DEPTH_HOST_MALLOC=system before the import leaves
glibc's defaults and jax's dispatch as they are. It does nothing off Linux glibc, and
nothing where jax will run on a TPU or GPU (a plugin for one is installed, or JAX_PLATFORMS
names no cpu).
"""
from __future__ import annotations

import ctypes
import importlib.util
import os
import platform
import sys

ENV_VAR = 'ADAPTIVE_DEPTH_HOST_MALLOC'
_ENV_VALUES = ('keep', 'system')

# mallopt parameter numbers from glibc's malloc.h.
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8
# mallopt takes an int: the largest trim threshold it can express (2 GiB of free heap top).
_LARGEST_TRIM_THRESHOLD = 2**31 - 1
# jax's own variable for its flag: a user who sets it keeps their choice.
DISPATCH_ENV_VAR = 'JAX_CPU_ENABLE_ASYNC_DISPATCH'


_ACCELERATOR_PLUGINS = ('libtpu', 'jax_cuda12_plugin', 'jax_cuda13_plugin', 'jax_rocm60_plugin',
                        'jax_rocm7_plugin')
_keeping = False


def keeping() -> bool:
  """Whether keep_freed_memory() set the options in this process."""
  return _keeping


def _accelerator_expected() -> bool:
  """Whether jax will run on an accelerator here: JAX_PLATFORMS names no cpu, or a TPU or
  GPU plugin is installed. There the step's buffers live on the device, not in the host heap,
  and the settings would only hold host memory."""
  platforms = os.environ.get('JAX_PLATFORMS', '')
  if platforms and 'cpu' not in platforms.split(','):
    return True
  if platforms == 'cpu':
    return False
  return any(importlib.util.find_spec(name) is not None for name in _ACCELERATOR_PLUGINS)


def keep_freed_memory() -> bool:
  """Sets glibc's malloc to reuse freed blocks instead of unmapping them (see the module
  docstring), and with them jax to run CPU programs inline unless JAX_CPU_ENABLE_ASYNC_DISPATCH
  is set. Returns whether the options were set: False off Linux glibc, where jax will
  run on an accelerator, or when ADAPTIVE_DEPTH_HOST_MALLOC=system. Raises ValueError for
  another value of that variable."""
  global _keeping
  choice = os.environ.get(ENV_VAR, 'keep')
  if choice not in _ENV_VALUES:
    raise ValueError(f'{ENV_VAR}={choice!r}: allowed values {list(_ENV_VALUES)}')
  if choice == 'system' or not sys.platform.startswith('linux'):
    return False
  if platform.libc_ver()[0] != 'glibc' or _accelerator_expected():
    return False
  libc = ctypes.CDLL(None)  # the process's C library, already loaded
  if not hasattr(libc, 'mallopt'):
    return False
  results = [libc.mallopt(option, value) == 1 for option, value in (
      (_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, _LARGEST_TRIM_THRESHOLD))]
  _keeping = all(results)
  if _keeping and DISPATCH_ENV_VAR not in os.environ:
    import jax  # pylint: disable=g-import-not-at-top  (after mallopt: see the docstring)
    # Read when jax creates its CPU backend: in effect only if that has not happened yet.
    # (A jax without the flag keeps its default.)
    if 'jax_cpu_enable_async_dispatch' in jax.config.values:
      jax.config.update('jax_cpu_enable_async_dispatch', False)
  return _keeping
