"""The per-block parameter layout (what decoding runs on) computes what the stacked one does.

The stacked layout is itself checked against independent references (tests/test_decode.py,
tests/test_speculative.py, tests/test_depth.py); here every decode path runs on both layouts
of the same parameters: a shared-block model with per-step LoRA, whose switch has fewer
branches than the loop has steps (the unshared layout runs in tests/test_pretrained.py, where
SmolLM2's greedy generation matches transformers').
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from adaptive_depth import depth
from adaptive_depth import exits
from adaptive_depth import model as model_lib
from adaptive_depth.decode import adaptive_decode
from adaptive_depth.decode import generation
from adaptive_depth.decode import sampling as sampling_lib
from adaptive_depth.decode import speculative
from tests import tiny_models

PROMPTS = [[3, 7, 1], [5, 2, 9, 11, 4, 8, 1], [6], [12, 13, 14, 15, 16]]
MAX_NEW = 24
MODELS = {
    # 3 blocks over 4 steps (block 1 runs twice), each step with its own LoRA delta.
    'shared': tiny_models.config(num_blocks=3, schedule='middle_cycle', lora_rank=2),
}


@pytest.fixture(scope='module', params=sorted(MODELS))
def model(request):
  """(cfg, params in the stacked layout, prompt, lengths, exit policy, the same params in
  the per-block layout)."""
  cfg = MODELS[request.param]
  params = tiny_models.random_params(cfg, scale=0.4)
  prompt, lengths = adaptive_decode.pad_prompts(PROMPTS, pad_id=0)
  # max_prob at a threshold that lets roughly half of the tokens leave early.
  scores = np.asarray(tiny_models.exit_max_probs(cfg, params, jnp.asarray(prompt)))[:-1]
  threshold = float(np.quantile(np.asarray(scores), 0.5))
  return (cfg, params, prompt, lengths,
          exits.ExitPolicy(measure='max_prob', threshold=threshold),
          model_lib.per_block_layout(params))  # as decoding makes it: eagerly, once


def test_per_block_layout_holds_each_block():
  cfg = MODELS['shared']
  params = tiny_models.random_params(cfg, scale=0.4)
  per_block = model_lib.per_block_layout(params)
  assert isinstance(per_block['blocks'], tuple) and len(per_block['blocks']) == cfg.num_blocks
  for index, block in enumerate(per_block['blocks']):
    jax.tree.map(lambda whole, one: np.testing.assert_array_equal(whole[index], one),
                 params['blocks'], block)
  assert model_lib.per_block_layout(per_block) is per_block
  assert per_block['lora'] is params['lora'] and params['blocks'] is not per_block['blocks']
  tokens = jnp.asarray([[3, 1, 4, 1, 5, 9]])
  # Both through one jitted forward (a program per layout; eagerly each op compiles alone).
  forward = jax.jit(lambda p: model_lib.forward_train(cfg, p, tokens))
  np.testing.assert_array_equal(forward(per_block), forward(params))


@pytest.mark.parametrize('kv', generation.KV_POLICIES)
def test_generation_is_the_same_on_both_layouts(model, kv):
  cfg, params, prompt, lengths, policy, per_block_params = model
  run = jax.jit(lambda p: generation.generate_tokens(
      cfg, p, prompt, lengths, max_new_tokens=MAX_NEW, policy=policy,
      sampling=sampling_lib.Greedy(), rng=jax.random.key(0), eos_id=-1, pad_id=0, kv=kv,
      return_cache=True))
  stacked, per_block = run(params), run(per_block_params)
  depths = np.asarray(stacked.output.exit_depth)[:, 1:]
  assert depths.min() < cfg.num_layers and depths.max() == cfg.num_layers, 'exits untested'
  np.testing.assert_array_equal(per_block.output.tokens, stacked.output.tokens)
  np.testing.assert_array_equal(per_block.output.exit_depth, stacked.output.exit_depth)
  np.testing.assert_allclose(per_block.cache.k, stacked.cache.k, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(per_block.cache.v, stacked.cache.v, rtol=1e-5, atol=1e-5)


def test_speculative_is_the_same_on_both_layouts(model):
  cfg, params, prompt, lengths, _, per_block_params = model
  run = jax.jit(lambda p: speculative.generate_speculative(
      cfg, p, prompt, lengths, max_new_tokens=MAX_NEW, draft_depth=2, num_draft=3, eos_id=-1,
      pad_id=0))
  stacked, per_block = run(params), run(per_block_params)
  np.testing.assert_array_equal(per_block.tokens, stacked.tokens)
  np.testing.assert_array_equal(per_block.rounds, stacked.rounds)


def test_adaptive_forward_is_the_same_on_both_layouts(model):
  cfg, params, prompt, _, policy, per_block_params = model
  run = jax.jit(lambda p: depth.forward_adaptive(cfg, p, jnp.asarray(prompt), policy))
  stacked, per_block = run(params), run(per_block_params)
  assert 0 < np.asarray(stacked.exit_depth).min() < cfg.num_layers
  np.testing.assert_array_equal(per_block.exit_depth, stacked.exit_depth)
  np.testing.assert_allclose(per_block.logits, stacked.logits, rtol=1e-5, atol=1e-5)
