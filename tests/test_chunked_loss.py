"""The multi-exit loss in chunks of positions: the same loss and gradient as over all
logits at once, without holding exits x tokens x vocab logits (compiled memory analysis)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from adaptive_depth import exit_heads
from adaptive_depth import model as model_lib
from adaptive_depth.train import losses
from tests import tiny_models


def _loss_fns(cfg, tokens, weights, kind, chunk):
  inputs, targets = tokens[:, :-1], tokens[:, 1:]

  def whole(params):
    logits = model_lib.forward_train(cfg, params, inputs)
    return losses.multi_exit_loss(logits, targets, weights, kind)

  def chunked(params):
    states = model_lib.forward_exit_states(cfg, params, inputs)
    heads = lambda h: model_lib.head_logits(cfg, params, h, exit_heads.ALL_EXITS)
    return losses.chunked_multi_exit_loss(heads, states, targets, weights, kind, chunk)
  return whole, chunked


def test_chunked_loss_and_gradient_equal_the_whole():
  kind = 'lm_distill'  # both terms: cross entropy and the KL to the last exit
  # Per-exit norms and adapters, so every exit's own head is on the chunked path.
  cfg = tiny_models.config(exit_norms=True, exit_adapter_rank=4)
  params = tiny_models.random_params(cfg)
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, cfg.vocab_size, (3, 13)))
  weights = losses.exit_loss_weights('linear', cfg.exit_depths)
  whole, chunked = _loss_fns(cfg, tokens, weights, kind, chunk=5)  # 12 positions: chunks of 4
  assert losses.chunk_length(12, 5) == 4
  loss_w, nll_w, acc_w = jax.jit(whole)(params)
  loss_c, nll_c, acc_c = jax.jit(chunked)(params)
  np.testing.assert_allclose(loss_c, loss_w, rtol=1e-5)
  np.testing.assert_allclose(nll_c, nll_w, rtol=1e-5)
  np.testing.assert_allclose(acc_c, acc_w, rtol=1e-6)
  grad_w = jax.jit(jax.grad(lambda p: whole(p)[0]))(params)
  grad_c = jax.jit(jax.grad(lambda p: chunked(p)[0]))(params)
  for a, b in zip(jax.tree.leaves(grad_c), jax.tree.leaves(grad_w)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)  # float rounding of the sums


def test_chunked_gradient_never_holds_every_exits_logits():
  """vocab 8192, 4 exits, 4 x 256 tokens: the logits of every exit are 4 * 1024 * 8192 * 4
  bytes = 134 MB. The chunked gradient (chunks of 16 positions) needs less than half of
  that in temporary memory (74 MB measured); the whole one needs more than all of it (311
  MB), so the check can fail."""
  cfg = tiny_models.config(vocab_size=8192)
  params = tiny_models.random_params(cfg)
  tokens = jnp.zeros((4, 257), jnp.int32)
  weights = losses.exit_loss_weights('uniform', cfg.exit_depths)
  whole, chunked = _loss_fns(cfg, tokens, weights, 'lm', chunk=16)
  product = len(cfg.exit_depths) * 4 * 256 * cfg.vocab_size * 4
  temp = lambda fn: jax.jit(jax.grad(lambda p: fn(p)[0])).lower(params).compile(
      ).memory_analysis().temp_size_in_bytes
  chunked_bytes, whole_bytes = temp(chunked), temp(whole)
  assert chunked_bytes < product / 1.5, (chunked_bytes, product)
  assert whole_bytes > product, (whole_bytes, product)


def test_chunk_lengths_that_do_not_divide_are_refused():
  import adaptive_depth as ad  # pylint: disable=g-import-not-at-top
  config = ad.load_config('configs/quickstart.py:tiny', {'train.loss_chunk_tokens': 24,
                                                         'data.seq_len': 31})
  with pytest.raises(ad.config_lib.ConfigError, match='config.train.loss_chunk_tokens=24'):
    ad.config_lib.validate(config)
  assert losses.chunk_length(32, 24) == 16


def test_correctness_is_the_argmax_and_a_tie_counts_for_every_tied_target():
  rng = np.random.default_rng(3)
  logits = rng.normal(size=(3, 2, 5, 11)).astype(np.float32)
  targets = rng.integers(0, 11, (2, 5))
  targets[0, :3] = logits[-1, 0, :3].argmax(-1)  # some correct tokens at the last exit
  nll, correct = losses.per_exit_token_losses(jnp.asarray(logits), jnp.asarray(targets))
  np.testing.assert_array_equal(np.asarray(correct), logits.argmax(-1) == targets[None])
  shifted = logits - logits.max(-1, keepdims=True)
  expected_nll = -np.take_along_axis(
      shifted - np.log(np.exp(shifted).sum(-1, keepdims=True)), targets[None, ..., None], -1)
  np.testing.assert_allclose(np.asarray(nll), expected_nll[..., 0], rtol=1e-5)
  tied = np.zeros((1, 1, 1, 4), np.float32)
  tied[..., 1] = tied[..., 3] = 2.0  # argmax is index 1; index 3 ties with it
  _, correct = losses.per_exit_token_losses(jnp.asarray(tied), jnp.asarray([[3]]))
  assert float(correct[0, 0, 0]) == 1.0
