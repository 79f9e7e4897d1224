"""End-to-end tests of training: resume, preemption, sharding, outputs.

Runs are on the `tiny` quickstart variant (JAX on CPU). A kill must hit a real process, so
the run killed with SIGKILL and the sharding runs are `launch/train.py` subprocesses. They
share the session's persistent JAX compilation cache with this process, where the
uninterrupted reference run and the resumed run train: only the first run of each distinct
program pays for XLA compilation. SIGTERM's point is the training loop's handler, so those
runs train in the test process and signal it.
"""
from __future__ import annotations

import base64
import json
import math
import os
import pathlib
import re
import signal
import struct
import subprocess
import sys
import threading
import time

import jax
import numpy as np
import pytest

import adaptive_depth as ad
from adaptive_depth import checkpoint as checkpoint_lib
from adaptive_depth import saved_model
from adaptive_depth import sharding
from adaptive_depth.data import pipeline
from adaptive_depth.train import state as state_lib
from tests import subprocess_env

REPO = pathlib.Path(__file__).resolve().parents[1]
LAUNCH = REPO / 'launch' / 'train.py'
TINY = 'configs/quickstart.py:tiny'
RUN_TIMEOUT = 600  # seconds; generous because other jobs may share the machine's 2 cores

# The uninterrupted reference run (tests 1, 4 and 5 read its workdir).
REF_STEPS = 30
REF_CONFIG = {'train.num_steps': REF_STEPS, 'checkpoint.every_steps': 5}
REF_OVERRIDES = tuple(f'--config.{key}={value}' for key, value in REF_CONFIG.items())
# Long runs that a signal interrupts (one program, compiled once for all of them).
LONG_STEPS = 1000


# ----------------------------------------------------------------------------- helpers


def _reference_config():
  """The reference run's config, as this process trains it."""
  return ad.load_config(str(REPO / TINY), {**REF_CONFIG, 'train.progress_bar': False})


def _train_flags(workdir, *overrides) -> list[str]:
  return [f'--config={TINY}', f'--workdir={workdir}', '--config.train.progress_bar=False',
          *overrides]


def _train_cmd(workdir, *overrides) -> list[str]:
  return [sys.executable, str(LAUNCH), *_train_flags(workdir, *overrides)]


class _Run:
  """A training subprocess whose merged stdout/stderr goes to a log file."""

  def __init__(self, cmd, env, log_path: pathlib.Path):
    self.log_path = log_path
    self._log = open(log_path, 'w')
    self.proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=self._log,
                                 stderr=subprocess.STDOUT)

  @property
  def output(self) -> str:
    return self.log_path.read_text()

  def wait(self, timeout=RUN_TIMEOUT) -> int:
    try:
      rc = self.proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
      self.proc.kill()
      self.proc.wait()
      pytest.fail(f'{self.log_path.name}: no exit within {timeout}s; output:\n'
                  f'{self.output[-3000:]}')
    finally:
      self._log.close()
    return rc

  def wait_ok(self, timeout=RUN_TIMEOUT) -> str:
    rc = self.wait(timeout)
    assert rc == 0, f'{self.log_path.name} exited with {rc}; output:\n{self.output[-3000:]}'
    return self.output

  def poll_until(self, condition, what: str, timeout=RUN_TIMEOUT, interval=0.02):
    """Polls `condition()` until true; fails if the process exits or time runs out first."""
    deadline = time.monotonic() + timeout
    while True:
      if condition():
        return
      if self.proc.poll() is not None:
        self._log.close()
        pytest.fail(f'{self.log_path.name} exited (rc={self.proc.returncode}) before {what}; '
                    f'output:\n{self.output[-3000:]}')
      if time.monotonic() > deadline:
        self.kill()
        pytest.fail(f'{self.log_path.name}: timed out waiting for {what}')
      time.sleep(interval)

  def kill(self):
    if self.proc.poll() is None:
      self.proc.kill()
      self.proc.wait()
    self._log.close()


def _checkpoint_steps(workdir: pathlib.Path) -> list[int]:
  """Complete checkpoint steps: integer-named directories (Orbax tmp dirs are not)."""
  return checkpoint_lib.steps_on_disk(str(workdir / 'checkpoints'))


def _records(workdir: pathlib.Path) -> list[dict]:
  path = workdir / 'metrics.jsonl'
  if not path.exists():
    return []
  records = []
  for line in path.read_text().splitlines():
    try:
      records.append(json.loads(line))
    except json.JSONDecodeError:  # a line being written right now
      pass
  return records


def _train_records(workdir) -> dict[int, dict]:
  return {r['step']: r for r in _records(workdir) if 'train_loss' in r}


def _summary(workdir: pathlib.Path) -> dict:
  return json.loads((workdir / 'summary.json').read_text())


def _flat_params(params) -> dict[str, np.ndarray]:
  return {jax.tree_util.keystr(path): np.asarray(jax.device_get(leaf))
          for path, leaf in jax.tree_util.tree_leaves_with_path(params)}


def _read_event_scalars(path: pathlib.Path) -> dict[str, dict[int, float]]:
  """{tag: {step: value}} from a TensorBoard event file (TFRecord framing, parsed here)."""
  from tensorboardX.proto import event_pb2
  data = path.read_bytes()
  scalars, offset = {}, 0
  while offset < len(data):
    (length,) = struct.unpack_from('<Q', data, offset)
    payload = data[offset + 12: offset + 12 + length]  # skip length and its crc
    offset += 12 + length + 4                           # payload and its crc
    event = event_pb2.Event.FromString(payload)
    for value in event.summary.value:
      scalars.setdefault(value.tag, {})[event.step] = value.simple_value
  return scalars


@pytest.fixture(scope='module')
def reference_run(tmp_path_factory) -> pathlib.Path:
  """Workdir of an uninterrupted tiny run of REF_STEPS steps, in this process (what
  launch/train.py runs; the killed run below goes through the script itself)."""
  workdir = tmp_path_factory.mktemp('reference') / 'A'
  ad.train_and_evaluate(_reference_config(), str(workdir))
  return workdir


# ----------------------------------------------------------------------------- tests


def test_resume_after_sigkill_matches_uninterrupted_run(reference_run, tmp_path, capsys):
  workdir = tmp_path / 'B'
  cmd = _train_cmd(workdir, *REF_OVERRIDES)
  env = subprocess_env.subprocess_env()

  run = _Run(cmd, env, tmp_path / 'B-killed.log')
  run.poll_until(lambda: any(s >= 10 for s in _checkpoint_steps(workdir)),
                 'a checkpoint at step >= 10')
  os.kill(run.proc.pid, signal.SIGKILL)
  rc = run.wait()
  # The kill must have interrupted training, not landed after it.
  assert rc == -signal.SIGKILL, (
      f'run ended by itself (rc={rc}) before SIGKILL: raise REF_STEPS\n{run.output[-2000:]}')
  assert not (workdir / 'summary.json').exists(), 'SIGKILL landed after the run completed'
  steps_at_kill = _checkpoint_steps(workdir)
  assert 10 <= steps_at_kill[-1] < REF_STEPS, (
      f'checkpoints at kill: {steps_at_kill}; the kill came too late to test a resume')

  # The resumed run in this process (launch/train.py runs this function; a process of its
  # own only costs start-up here): what it reads is what the killed process left on disk.
  ad.train_and_evaluate(_reference_config(), str(workdir))
  output = capsys.readouterr().out
  resumed = re.findall(r'Resuming from step (\d+)', output)
  assert resumed == [str(steps_at_kill[-1])], output[-2000:]

  a, b = ad.load(str(reference_run)), ad.load(str(workdir))
  assert a.step == b.step == REF_STEPS
  params_a, params_b = _flat_params(a.params), _flat_params(b.params)
  assert params_a.keys() == params_b.keys()
  for name in params_a:
    assert params_a[name].shape == params_b[name].shape, name
    np.testing.assert_allclose(params_b[name], params_a[name], rtol=0, atol=1e-5,
                               err_msg=name)
  # The resumed run also saw the same eval result.
  for ra, rb in zip(_summary(reference_run)['eval'], _summary(workdir)['eval']):
    assert ra['depth'] == rb['depth']
    assert abs(ra['loss'] - rb['loss']) <= 1e-5, (ra, rb)


def _train_until_sigterm(workdir: pathlib.Path, after_step: int, capsys, **overrides):
  """Trains in this process (the tiny config, LONG_STEPS steps) and sends this process
  SIGTERM from a helper thread once metrics.jsonl holds a train record after `after_step`:
  the training loop's handler must turn it into a checkpoint and a clean return. A handler
  of the test's own stands behind the loop's, so a signal that came late could not end the
  test process. Returns (saved step, what the run printed)."""
  config = ad.load_config(str(REPO / TINY), {
      'train.num_steps': LONG_STEPS, 'train.progress_bar': False, 'train.log_every': 5,
      **overrides})
  stop = threading.Event()

  def send_when_trained():
    while not stop.is_set():
      if any(s > after_step for s in _train_records(workdir)):
        os.kill(os.getpid(), signal.SIGTERM)
        return
      time.sleep(0.02)

  late_signals = []
  previous = signal.signal(signal.SIGTERM, lambda *_: late_signals.append(1))
  sender = threading.Thread(target=send_when_trained, daemon=True)
  sender.start()
  try:
    summary = ad.train_and_evaluate(config, str(workdir))
  finally:
    stop.set()
    sender.join()
    signal.signal(signal.SIGTERM, previous)
  output = capsys.readouterr().out
  assert not late_signals, 'SIGTERM arrived after training returned'
  assert summary.get('preempted') is True, (summary, output[-2000:])
  saved = re.findall(r'SIGTERM: saved step (\d+)', output)
  assert saved == [str(summary['step'])], output[-2000:]
  return summary['step'], output


def test_sigterm_saves_and_resumes(tmp_path, capsys):
  workdir = tmp_path / 'run'
  first, output = _train_until_sigterm(workdir, 0, capsys, **{'checkpoint.every_steps': 5000})
  assert 5 <= first < LONG_STEPS
  assert 'Resuming from step' not in output
  # every_steps is larger than the run: the only checkpoint is the one SIGTERM forced.
  assert _checkpoint_steps(workdir) == [first]
  assert not (workdir / 'summary.json').exists()
  assert max(_train_records(workdir)) <= first

  second, output = _train_until_sigterm(workdir, first, capsys,
                                        **{'checkpoint.every_steps': 5000})
  assert re.findall(r'Resuming from step (\d+)', output) == [str(first)], output[-2000:]
  assert first < second < LONG_STEPS
  assert _checkpoint_steps(workdir) == [first, second]
  assert not (workdir / 'summary.json').exists()
  assert ad.load(str(workdir)).step == second


def test_sigterm_on_a_checkpoint_step(tmp_path, capsys):
  workdir = tmp_path / 'run'
  # Every step is a periodic checkpoint step, so the SIGTERM lands on one.
  step, _ = _train_until_sigterm(workdir, 0, capsys, **{'checkpoint.every_steps': 1})
  assert _checkpoint_steps(workdir)[-1] == step
  assert not (workdir / 'summary.json').exists()


_SHARDING_PROBE = r"""
import json
import jax
import adaptive_depth as ad
from adaptive_depth import sharding
from adaptive_depth.train import state as state_lib

config = ad.load_config('configs/quickstart.py:tiny',
                        {'mesh.data': 2, 'mesh.fsdp': 2, 'mesh.tensor': 2})
mesh = sharding.make_mesh(config.mesh)
cfg = ad.ModelConfig.from_config(config.model)
tx = state_lib.make_optimizer(config.train)
rules = tuple(tuple(r) for r in config.sharding.rules)
_, shardings = state_lib.state_shardings(cfg, tx, mesh, rules)
entry = lambda a: a if a is None or isinstance(a, str) else list(a)
specs = {jax.tree_util.keystr(p): [entry(a) for a in s.spec]
         for p, s in jax.tree_util.tree_leaves_with_path(shardings.params)}
print('PROBE ' + json.dumps({'device_count': jax.device_count(), 'mesh': dict(mesh.shape),
                             'specs': specs}), flush=True)
"""

# The sharded run's process: the probe above, then launch/train.py run as Python runs a
# script (as __main__, its folder first on sys.path), with the arguments after `-c CODE`:
# one 8-device interpreter's start-up for both.
_PROBE_THEN_TRAIN = _SHARDING_PROBE + r"""
import runpy, sys
sys.argv = ['launch/train.py', *sys.argv[1:]]
sys.path.insert(0, 'launch')
runpy.run_path('launch/train.py', run_name='__main__')
"""


def _saved_param_shardings(workdir: pathlib.Path) -> dict[str, dict]:
  """{'params.embed.embedding': sharding record} from the latest checkpoint's Orbax
  `_sharding` metadata: how the training process held each parameter when it saved."""
  step = _checkpoint_steps(workdir)[-1]
  raw = json.loads((workdir / 'checkpoints' / str(step) / 'state' / '_sharding').read_text())
  decoded = {base64.b64decode(k).decode(): json.loads(v) for k, v in raw.items()}
  return {k: v for k, v in decoded.items() if k.startswith('params.')}


def _restore_params_on_local_devices(workdir: pathlib.Path) -> dict[str, np.ndarray]:
  """The latest checkpoint's parameters restored onto this process's default mesh, whatever
  mesh the run used."""
  config = saved_model.load_run_config(str(workdir))
  config.mesh.data, config.mesh.fsdp, config.mesh.tensor = -1, 1, 1
  cfg = ad.ModelConfig.from_config(config.model)
  mesh = sharding.make_mesh(config.mesh)
  rules = tuple(tuple(r) for r in config.sharding.rules)
  abstract, shardings = state_lib.state_shardings(
      cfg, state_lib.make_optimizer(config.train), mesh, rules)
  checkpoints = checkpoint_lib.Checkpoints(str(workdir / 'checkpoints'), async_save=False)
  try:
    state = checkpoints.restore_state_only(
        checkpoints.latest_step(), checkpoint_lib.abstract_with_shardings(abstract, shardings))
  finally:
    checkpoints.close()
  return _flat_params(state.params)


@pytest.fixture(scope='module')
def mesh_runs(tmp_path_factory) -> dict:
  """The same short run on 1 device and on a (data 2, fsdp 2, tensor 2) mesh of 8 devices,
  concurrent; the sharded run's process first probes the shardings the library computes
  for that mesh."""
  tmp = tmp_path_factory.mktemp('mesh_runs')
  common = ('--config.train.num_steps=8', '--config.eval.num_batches=2',
            '--config.train.log_every=1')
  single, sharded = tmp / 'single', tmp / 'sharded'
  mesh_flags = ('--config.mesh.data=2', '--config.mesh.fsdp=2', '--config.mesh.tensor=2')
  one, eight = subprocess_env.subprocess_env(), subprocess_env.subprocess_env(devices=8)
  probe_then_train = [sys.executable, '-c', _PROBE_THEN_TRAIN,
                      *_train_flags(sharded, *common, *mesh_flags)]
  runs = [_Run(_train_cmd(single, *common), one, tmp / 'single.log'),
          _Run(probe_then_train, eight, tmp / 'sharded.log')]
  out_single, out_sharded = [r.wait_ok() for r in runs]
  return {'single': single, 'sharded': sharded, 'out_single': out_single,
          'out_sharded': out_sharded, 'probe': out_sharded}


def test_sharded_training_matches_single_device(mesh_runs):
  single, sharded = mesh_runs['single'], mesh_runs['sharded']
  assert "mesh {'data': 1, 'fsdp': 1, 'tensor': 1} on 1 cpu device(s)" in mesh_runs['out_single']
  assert ("mesh {'data': 2, 'fsdp': 2, 'tensor': 2} on 8 cpu device(s)"
          in mesh_runs['out_sharded'])

  train_single, train_sharded = _train_records(single), _train_records(sharded)
  assert sorted(train_single) == sorted(train_sharded) == list(range(1, 9))
  for step in range(1, 9):
    assert abs(train_single[step]['train_loss'] - train_sharded[step]['train_loss']) <= 1e-4
    np.testing.assert_allclose(train_sharded[step]['train_exit_loss'],
                               train_single[step]['train_exit_loss'], rtol=0, atol=1e-4)
  eval_single, eval_sharded = _summary(single)['eval'], _summary(sharded)['eval']
  assert [r['depth'] for r in eval_single] == [r['depth'] for r in eval_sharded] == [1, 2, 3, 4]
  for rs, rm in zip(eval_single, eval_sharded):
    assert abs(rs['loss'] - rm['loss']) <= 1e-4, (rs, rm)

  # The sharding the library computes for this mesh splits parameters over fsdp and tensor.
  probe_lines = [l for l in mesh_runs['probe'].splitlines() if l.startswith('PROBE ')]
  assert len(probe_lines) == 1, mesh_runs['probe'][-3000:]
  info = json.loads(probe_lines[0][len('PROBE '):])
  assert info['device_count'] == 8
  assert info['mesh'] == {'data': 2, 'fsdp': 2, 'tensor': 2}
  used_axes = {axis for spec in info['specs'].values() for entry in spec if entry
               for axis in ([entry] if isinstance(entry, str) else entry)}
  assert {'fsdp', 'tensor'} <= used_axes, info['specs']
  assert info['specs']["['embed']['embedding']"] == ['tensor', 'fsdp'], info['specs']

  # The training process really held its parameters that way when it saved them.
  saved = _saved_param_shardings(sharded)
  assert saved, 'no parameter sharding metadata in the sharded checkpoint'
  assert {tuple(r['shape']) for r in saved.values()} == {(2, 2, 2)}
  assert saved['params.embed.embedding']['partition_spec'] == ['tensor', 'fsdp']
  saved_axes = {axis for r in saved.values() for entry in r['partition_spec'] if entry
                for axis in ([entry] if isinstance(entry, str) else entry)}
  assert {'fsdp', 'tensor'} <= saved_axes, saved

  # Final parameters agree too (the sharded checkpoint restored onto this 1-device mesh).
  params_single = _restore_params_on_local_devices(single)
  params_sharded = _restore_params_on_local_devices(sharded)
  assert params_single.keys() == params_sharded.keys()
  for name in params_single:
    np.testing.assert_allclose(params_sharded[name], params_single[name], rtol=0, atol=1e-4,
                               err_msg=name)


def test_load_run_trained_on_another_mesh(mesh_runs):
  if jax.device_count() % 8 == 0:
    pytest.skip('this process has devices for the 2x2x2 mesh; the case needs a mismatch')
  loaded = ad.load(str(mesh_runs['sharded']))
  expected = _restore_params_on_local_devices(mesh_runs['sharded'])
  actual = _flat_params(loaded.params)
  assert actual.keys() == expected.keys()
  for name in expected:
    np.testing.assert_array_equal(actual[name], expected[name], err_msg=name)


def test_run_outputs(reference_run):
  summary = _summary(reference_run)
  assert {'step', 'wall_seconds', 'tokens_per_second', 'params', 'eval'} <= summary.keys()
  assert summary['step'] == REF_STEPS
  assert summary['wall_seconds'] > 0
  assert summary['tokens_per_second'] is not None and summary['tokens_per_second'] > 0
  assert math.isfinite(summary['tokens_per_second'])

  loaded = ad.load(str(reference_run))
  assert summary['params'] == sum(int(np.size(x)) for x in jax.tree.leaves(loaded.params))

  assert [r['depth'] for r in summary['eval']] == [1, 2, 3, 4]
  for record in summary['eval']:
    assert math.isfinite(record['loss']) and record['loss'] > 0, record
    assert 0 <= record['accuracy'] <= 1, record
    assert record['perplexity'] == pytest.approx(math.exp(record['loss']), rel=1e-5)

  config = json.loads((reference_run / 'config.json').read_text())
  assert config['train']['num_steps'] == REF_STEPS
  assert config['model']['width'] == 64 and config['model']['num_layers'] == 4

  events = sorted(reference_run.glob('events.out.tfevents.*'))
  assert events, sorted(p.name for p in reference_run.iterdir())
  scalars = {}
  for path in events:
    for tag, values in _read_event_scalars(path).items():
      scalars.setdefault(tag, {}).update(values)
  logged = _train_records(reference_run)
  assert sorted(logged) == list(range(5, REF_STEPS + 1, 5))
  assert scalars['train/loss'] == pytest.approx({s: r['train_loss'] for s, r in logged.items()},
                                                rel=1e-6)
  for record in summary['eval']:
    assert scalars[f"eval/loss_exit_{record['depth']}"][REF_STEPS] == pytest.approx(
        record['loss'], rel=1e-6)


def _numpy_eval(forward, params, batches) -> tuple[np.ndarray, np.ndarray]:
  """Per-exit mean token cross entropy and argmax accuracy, computed in float64 numpy from
  the logits of forward(params, inputs)."""
  nll_sum, correct_sum, count = 0.0, 0.0, 0
  for batch in batches:
    inputs, targets = batch[:, :-1], batch[:, 1:]
    logits = np.asarray(forward(params, inputs), dtype=np.float64)  # [E, B, T, V]
    shifted = logits - logits.max(axis=-1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))
    picked = np.take_along_axis(log_probs, targets[None, ..., None], axis=-1)[..., 0]
    nll_sum = nll_sum - picked.sum(axis=(1, 2))
    correct_sum = correct_sum + (logits.argmax(axis=-1) == targets[None]).sum(axis=(1, 2))
    count += targets.size
  return nll_sum / count, correct_sum / count


def test_training_learns(reference_run):
  loaded = ad.load(str(reference_run))
  config, cfg = loaded.config, loaded.model_config
  _, make_eval, _ = pipeline.make_train_and_eval_data(
      config.data, batch_size=config.train.batch_size,
      eval_batch_size=config.eval.batch_size, seed=config.seed)
  batches = [b for b, _ in zip(make_eval(), range(config.eval.num_batches))]
  assert len(batches) == config.eval.num_batches == 4

  # A fresh model drawn here with numpy (not the library's init): norm scales 1, every
  # other weight N(0, init_std), in the trained parameters' tree structure.
  rng = np.random.default_rng(0)
  fresh = jax.tree_util.tree_map_with_path(
      lambda path, x: (np.ones(x.shape, np.float32) if jax.tree_util.keystr(path).endswith(
          "['scale']") else rng.normal(0, cfg.init_std, x.shape).astype(np.float32)),
      loaded.params)
  # One program for both evaluations: parameters given as numpy arrays either way (the loaded
  # ones as device arrays of another sharding would compile a second program).
  forward = jax.jit(lambda p, x: ad.forward_train(cfg, p, x))
  initial_loss, _ = _numpy_eval(forward, fresh, batches)
  # A freshly initialised model is close to uniform over the 258 byte-level tokens.
  assert np.all(np.abs(initial_loss - math.log(258)) < 0.1), initial_loss

  summary_eval = _summary(reference_run)['eval']
  final_loss = np.array([r['loss'] for r in summary_eval])
  assert final_loss[-1] < initial_loss[-1] - 1.0, (final_loss, initial_loss)
  assert np.all(final_loss < initial_loss - 1.0), (final_loss, initial_loss)

  # The reported eval matches an independent evaluation of the saved parameters.
  trained_loss, trained_acc = _numpy_eval(forward, jax.device_get(loaded.params), batches)
  np.testing.assert_allclose(final_loss, trained_loss, rtol=0, atol=1e-4)
  np.testing.assert_allclose([r['accuracy'] for r in summary_eval], trained_acc, rtol=0,
                             atol=2 / (len(batches) * batches[0][:, 1:].size))


def test_weight_decay_skips_norm_scales():
  """Stacked norm scales are 2-D, yet must not decay; every matrix must."""
  import jax
  from adaptive_depth import model as model_lib
  config = ad.load_config(f'{REPO / TINY}')
  cfg = model_lib.ModelConfig.from_config(config.model)
  params = jax.eval_shape(lambda: model_lib.init_params(cfg, jax.random.key(0)))
  mask = state_lib.decay_mask(params)
  flat = {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_leaves_with_path(mask)}
  assert flat["['blocks']['attn_norm']['scale']"] is False
  assert flat["['final_norm']['scale']"] is False
  assert flat["['blocks']['mlp']['down']"] is True
  assert flat["['embed']['embedding']"] is True
