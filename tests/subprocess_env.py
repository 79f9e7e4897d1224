"""The environment of a subprocess a test starts (a launch script, a notebook kernel).

It keeps the session's settings (conftest.py: the compilation cache, XLA's optimisations
off, the emitter flag in XLA_FLAGS, the TFDS data dir): with the flag, the tiny programs
compile in about half the time. Only the number of CPU devices is the test's own, as a
parent's device count would otherwise carry over.
"""
import os

_DEVICE_COUNT = '--xla_force_host_platform_device_count'


def subprocess_env(devices: int = 1) -> dict:
  """os.environ on the CPU with `devices` host devices."""
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  flags = [f for f in env.get('XLA_FLAGS', '').split() if not f.startswith(_DEVICE_COUNT)]
  if devices != 1:
    flags.append(f'{_DEVICE_COUNT}={devices}')
  env['XLA_FLAGS'] = ' '.join(flags)
  return env
