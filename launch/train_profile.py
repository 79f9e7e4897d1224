r"""Train step profile: python launch/train_profile.py --config=configs/quickstart.py --out=DIR

Traces the jitted train step with jax.profiler (DIR/trace, readable in TensorBoard's or
Perfetto's trace viewer) and writes DIR/profile.json: the step's operations joined to where
in the model they come from, their time per step by pass (forward, backward, update), by part
of the model and by kind of operation, and the slowest of them
(adaptive_depth/train/step_profile.py). Random parameters and batch: no workdir needed.
"""
from absl import flags
from ml_collections import config_flags

from adaptive_depth import cli
from adaptive_depth.train import step_profile

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Experiment config file.',
                                          lock_config=True)
_OUT = flags.DEFINE_string('out', None, 'Directory for the trace and profile.json (made if '
                           'missing; its parent must exist).')
_STEPS = flags.DEFINE_integer('steps', 3, 'Steps traced (figures are per step).')
_TOP = flags.DEFINE_integer('top', 20, 'Slowest operations listed.')
flags.mark_flags_as_required(['config', 'out'])


def main(argv):
  del argv  # cli.run refuses positional arguments
  step_profile.profile_step(_CONFIG.value, _OUT.value, steps=_STEPS.value, top=_TOP.value)


if __name__ == '__main__':
  cli.run(main)
