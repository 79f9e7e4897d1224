"""The PyTorch train step launch/train_benchmark.py --torch times is the same model: with
this library's parameters copied in, its multi-exit loss and gradient equal the library's."""
import functools
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import adaptive_depth as ad
from adaptive_depth import model as model_lib
from adaptive_depth.train import losses
from tests import tiny_models

pytestmark = pytest.mark.pretrained  # .ci/run's second stage runs these with the extras
torch = pytest.importorskip('torch', reason='needs torch: pip install -e ".[parity]"')
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, 'launch'))
import torch_train_reference  # pylint: disable=g-import-not-at-top,wrong-import-position


def test_pytorch_step_is_the_same_model_loss_and_gradient():
  config = ad.load_config(os.path.join(REPO, 'configs/quickstart.py:tiny'))
  cfg = model_lib.ModelConfig.from_config(config.model)
  # Initialised in one program, then copied to the host: the perturbation, the copy into
  # PyTorch and the gradients' slices are numpy, no program per leaf shape.
  params = jax.tree.map(np.asarray, tiny_models.init_params(cfg, jax.random.key(1)))
  # Non-trivial norm scales, so a misplaced norm shows.
  rng = np.random.default_rng(2)
  params = jax.tree_util.tree_map_with_path(
      lambda path, x: x * (1.0 + 0.3 * rng.standard_normal(x.shape, np.float32))
      if 'scale' in jax.tree_util.keystr(path) else x, params)
  batch = np.random.default_rng(0).integers(0, cfg.vocab_size, (3, 17))
  weights = losses.exit_loss_weights('uniform', cfg.exit_depths)

  def loss_fn(p):
    logits = model_lib.forward_train(cfg, p, jnp.asarray(batch[:, :-1]))
    return losses.multi_exit_loss(logits, jnp.asarray(batch[:, 1:]), weights, 'lm')[0]

  ours, grads = jax.jit(jax.value_and_grad(loss_fn))(params)
  grads = jax.tree.map(np.asarray, grads)
  model = torch_train_reference.build_model(config.model, 16, params)
  theirs = model(torch.tensor(batch[:, :-1]), torch.tensor(batch[:, 1:]))
  theirs.backward()
  np.testing.assert_allclose(theirs.item(), float(ours), rtol=1e-5)
  layer = model.layers[2]
  width = cfg.width
  np.testing.assert_allclose(layer.q.weight.grad.numpy(),
                             grads['blocks']['attn']['q'][2].reshape(width, -1).T,
                             rtol=1e-3, atol=1e-6)
  np.testing.assert_allclose(layer.down.weight.grad.numpy(),
                             grads['blocks']['mlp']['down'][2].T,
                             rtol=1e-3, atol=1e-6)
  np.testing.assert_allclose(model.embed.weight.grad.numpy(),
                             grads['embed']['embedding'], rtol=1e-3, atol=1e-6)


def test_train_benchmark_times_pytorch_and_the_whole_loop_beside_the_step(tmp_path):
  """What the benchmark reports, not how fast anything is: the model of the test above, on a
  batch of 2 x 8 tokens (every timed step, in both frameworks, and the whole run's few steps
  then take milliseconds)."""
  from adaptive_depth.train import step_benchmark  # pylint: disable=g-import-not-at-top
  batch_size, seq_len = 2, 8
  config = ad.load_config(os.path.join(REPO, 'configs/quickstart.py:tiny'), {
      'train.batch_size': batch_size, 'data.seq_len': seq_len,
      'eval.batch_size': batch_size, 'eval.num_batches': 1})
  out = tmp_path / 'bench.json'
  lines = []
  rows = step_benchmark.run_step_benchmark(
      config, str(out), implementations=['xla'], rounds=2, progress=lines.append,
      reference_steps={
          'pytorch': lambda batch: torch_train_reference.make_train_step(
              config.model, config.train, batch, threads=2),
          # What launch/train_benchmark.py --torch runs: the step in a process of its own.
          'pytorch_process': functools.partial(
              torch_train_reference.SubprocessStep, config.model, config.train,
              threads=1, host_malloc='system')},
      whole_run_steps=3)
  assert [r['implementation'] for r in rows] == ['xla', 'pytorch', 'pytorch_process',
                                                 'launch/train.py']
  xla, pytorch, in_process, whole = rows
  assert pytorch['step_ms'] > 0 and xla['step_ms'] > 0 and in_process['step_ms'] > 0
  # Page faults are counted in this process, so for the library's step and not for
  # PyTorch's (their effect is tested in test_host_memory.py).
  assert 'page_faults_per_step' in xla and 'page_faults_per_step' not in pytorch
  # One count per timed call, one round before the whole run and one after: the warm-up
  # call each half starts with is left out.
  assert len(xla['page_faults_per_timed_call']) == 2
  assert xla['page_faults_per_step'] == np.median(xla['page_faults_per_timed_call'])
  assert xla['speed_vs_pytorch'] == pytest.approx(pytorch['step_ms'] / xla['step_ms'])
  # Round by round: the median of the two rounds' ratios, inside its interval.
  per_round = xla['speed_vs_pytorch_per_round']
  assert per_round['rounds'] == 2
  assert per_round['low'] <= per_round['median'] <= per_round['high']
  assert whole['fraction_of_step_alone'] == pytest.approx(
      whole['tokens_per_second'] / xla['tokens_per_second'])
  assert any("pytorch's speed; per round:" in line for line in lines)
  # XLA's memory analysis beside the bytes of every exit's logits (exits x B x T x V x 4).
  assert xla['all_exit_logits_bytes'] == 4 * batch_size * seq_len * 258 * 4
  assert xla['temp_bytes'] > 0
  # A step the child cannot build (make_train_step refuses this loss) fails the parent
  # at once instead of hanging it.
  bad = config.copy_and_resolve_references()
  with bad.unlocked():
    bad.train.exit_loss = 'distill'
  with pytest.raises(RuntimeError, match='PyTorch reference process'):
    torch_train_reference.SubprocessStep(bad.model, bad.train, np.zeros((2, 9), np.int32),
                                         threads=1, host_malloc='system')
  with pytest.raises(ad.config_lib.ConfigError, match='whole_run_steps'):
    step_benchmark.run_step_benchmark(config, str(out), implementations=['xla'],
                                      whole_run_steps=-1)
