"""Mixture-of-Recursions decoding: causal routing, the KV cache per recursion or shared,
batched equal to batch 1, and equal to the masked full-sequence forward."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import adaptive_depth as ad
from adaptive_depth import config_lib
from adaptive_depth import exits
from adaptive_depth import model as model_lib
from adaptive_depth import mor
from adaptive_depth import saved_model
from tests import test_mor
from tests import tiny_models

pytestmark = pytest.mark.usefixtures('cache_read_in_steps_of_16')  # conftest.py

KINDS = [('expert_choice', 'recursion_wise'), ('expert_choice', 'shared'),
         ('token_choice', 'recursion_wise'), ('token_choice', 'shared')]
IDS = [f'{r}-{k}' for r, k in KINDS]

# Jitted: op by op, a tiny MoR forward compiled a hundred or more one-op programs, which
# took longer than compiling it whole. The decode test runs the masked forward on rows of
# the causality test's shape, [1, SEQUENCE_LEN], so when it runs after that test it reuses
# its program per kind and compiles none of its own.
forward_masked = jax.jit(mor.forward_masked, static_argnums=0)
forward_states = jax.jit(mor.forward_states, static_argnums=0)
SEQUENCE_LEN = 16
# New tokens per request in the decode test and at most in the engine test: both decode
# requests alone with ad.generate at this budget (and prompts padded to 16), so the engine
# test's references reuse the decode test's compiled batch-1 programs.
NEW_TOKENS = 10


def run_config(routing, kv):
  config = ad.load_config('configs/mor.py:tiny')
  config.model.mor.routing = routing
  config.model.mor.kv = kv
  return config_lib.validate(config)


def model_and_params(routing, kv, seed=0):
  config = run_config(routing, kv)
  cfg = model_lib.ModelConfig.from_config(config.model)
  return config, cfg, tiny_models.random_params(cfg, seed=seed, scale=0.3)


@pytest.mark.parametrize('kv', ['recursion_wise', 'shared'])
def test_masked_forward_with_the_training_selection_equals_the_gathered_one(kv):
  """The masked forward run with each token's training-time depth computes what the
  gather-run-scatter train forward computes: two implementations of one function."""
  cfg = test_mor.mor_config(kv=kv, alpha=0.5)
  params = tiny_models.random_params(cfg)
  x = test_mor.tokens()
  h_train, routing = forward_states(cfg, params, x)
  depths = routing.selected.sum(axis=0)
  h_masked, ran = forward_masked(cfg, params, x, depths=depths)
  np.testing.assert_array_equal(ran, depths)
  np.testing.assert_allclose(h_masked, h_train, atol=2e-4, rtol=2e-4)


@pytest.mark.parametrize('routing,kv', KINDS, ids=IDS)
def test_changing_a_token_never_changes_earlier_outputs_or_routing(routing, kv):
  _, cfg, params = model_and_params(routing, kv)
  x = np.asarray(test_mor.tokens(batch=1, length=SEQUENCE_LEN, seed=3))
  changed = x.copy()
  changed[0, 9] = (changed[0, 9] + 7) % 258
  h_a, ran_a = forward_masked(cfg, params, jnp.asarray(x))
  h_b, ran_b = forward_masked(cfg, params, jnp.asarray(changed))
  np.testing.assert_array_equal(ran_a[:, :9], ran_b[:, :9])
  np.testing.assert_allclose(h_a[:, :9], h_b[:, :9], atol=1e-5)
  assert np.abs(np.asarray(h_a[:, 9:]) - np.asarray(h_b[:, 9:])).max() > 1e-3
  # The routing really varies between tokens (so the masks are exercised).
  assert len(np.unique(np.asarray(ran_a))) > 1, ran_a


@pytest.mark.parametrize('routing,kv', KINDS, ids=IDS)
def test_decode_equals_the_masked_forward_and_batch_one(routing, kv):
  config, cfg, params = model_and_params(routing, kv)
  prompts = [[5, 17, 99, 3, 250, 41, 8], [77, 2, 64], [12, 12, 200, 7, 9]]
  new = NEW_TOKENS
  out = ad.generate(params, config, prompts, max_new_tokens=new)
  per = cfg.num_blocks - 2
  for row, prompt in enumerate(prompts):
    tokens, depths = out.tokens[row], out.exit_depths[row]
    assert len(tokens) == new
    # Teacher-forced: the masked forward over the prompt + its generated text, routing
    # itself, padded at the end to SEQUENCE_LEN (causal: padding changes no earlier
    # position's state or routing).
    sequence = prompt + tokens[:-1]
    padded = np.zeros((1, SEQUENCE_LEN), np.int32)
    padded[0, :len(sequence)] = sequence
    h, ran = forward_masked(cfg, params, jnp.asarray(padded))
    logits = model_lib.head_logits(cfg, params, h[0])
    start, end = len(prompt) - 1, len(sequence)
    np.testing.assert_array_equal(np.argmax(logits[start:end], -1), tokens)
    # Decode steps (every token but the prefill's first) ran the recursions the masked
    # forward's routing gives those positions.
    np.testing.assert_array_equal(2 + per * np.asarray(ran[0, start + 1:end]), depths[1:])
    # Batched decoding equals decoding this row alone.
    alone = ad.generate(params, config, [prompt], max_new_tokens=new)
    assert alone.tokens[0] == tokens and alone.exit_depths[0] == depths
  all_depths = np.concatenate([d[1:] for d in out.exit_depths])
  assert len(np.unique(all_depths)) > 1, all_depths  # tokens really routed differently
  assert 0 < out.stats['relative_flops'] < 1


def test_bad_decode_settings_for_a_mor_model():
  config, cfg, params = model_and_params('expert_choice', 'recursion_wise')
  with pytest.raises(ValueError, match="measure='max_prob'.*allowed: router, never"):
    ad.generate(params, config, [[1, 2]], exit=exits.ExitPolicy(measure='max_prob'))
  with pytest.raises(ValueError, match="kv='parallel'"):
    ad.generate(params, config, [[1, 2]], kv='parallel')
  with pytest.raises(ValueError, match='speculative'):
    ad.generate(params, config, [[1, 2]], speculative=(1, 2))
  plain = ad.load_config('configs/quickstart.py:tiny')
  plain_params = tiny_models.random_params(model_lib.ModelConfig.from_config(plain.model))
  with pytest.raises(ValueError, match="measure='router' needs a Mixture-of-Recursions"):
    ad.generate(plain_params, plain, [[1, 2]], exit=exits.ExitPolicy(measure='router'))


@pytest.mark.parametrize('routing,kv', [('expert_choice', 'recursion_wise'),
                                        ('token_choice', 'shared')])
def test_engine_stream_equals_each_request_decoded_alone(routing, kv):
  """Through the depth-wise batching engine (4 slots, 2 finishing per tick, 7 requests of
  their own lengths), every request's tokens and depths equal ad.generate's for it alone."""
  config, cfg, params = model_and_params(routing, kv)
  model = saved_model.from_params(params, config)
  rng = np.random.default_rng(1)
  prompts = [rng.integers(1, 258, size=n).tolist() for n in (3, 9, 5, 14, 2, 7, 11)]
  max_new = [6, 9, 4, 8, 10, 5, 7]
  engine = ad.Engine(model, slots=4, cache_len=32, eos_id=-1, finish_slots=2)
  out = ad.serve(model, prompts, max_new_tokens=max_new, engine=engine, chunk_ticks=3)
  for prompt, m, tokens, depths in zip(prompts, max_new, out.tokens, out.exit_depths):
    # Each request alone, at the decode test's budget (its compiled batch-1 program).
    alone = ad.generate(model, [prompt], max_new_tokens=NEW_TOKENS)
    assert tokens == alone.tokens[0][:m]
    assert depths[1:] == alone.exit_depths[0][1:m]
  assert len({d for row in out.exit_depths for d in row[1:]}) > 1
  assert 0 < out.stats['relative_flops'] < 1


def test_engine_benchmark_runs_a_mor_model(tmp_path):
  """launch/benchmark.py's engine mode on a MoR model: (a)/(c) every recursion, (b)/(d)
  routed; the engine and batch-synchronised decoding route every token alike. Every
  recursion is the full-compute baseline: its tokens are the teacher-forced argmax of the
  masked forward with every token at depth N_r (agreement 1.0), at relative FLOPs 1."""
  import json
  from adaptive_depth.serving import stream_benchmark
  workdir = tiny_models.save_workdir(str(tmp_path / 'model'), 'configs/mor.py:tiny',
                                     scale=0.3)
  config = ad.load_config('configs/mor.py:tiny')
  b = config.benchmark
  b.mode, b.slots, b.num_requests, b.repeats = 'engine', '3', 6, 1
  b.prompt_lens, b.output_lens, b.thresholds, b.measure = '2,12', '2,6', '0.5', 'router'
  out = str(tmp_path / 'engine.json')
  rows = stream_benchmark.run_engine_benchmark(config, workdir, out, progress=lambda _: None)
  by_mode = {r['mode']: r for r in rows}
  full, routed = by_mode['engine'], by_mode['engine_exit']
  assert full['mean_recursions'] == by_mode['static']['mean_recursions'] == 3
  assert full['agreement'] == full['sequence_agreement'] == 1.0
  assert by_mode['static']['agreement'] == 1.0
  assert full['per_token_theoretical_speedup'] == pytest.approx(1.0)
  assert routed['mean_recursions'] < 3
  for key in ('mean_recursions', 'agreement', 'sequence_agreement'):
    assert routed[key] == by_mode['per_row_exit'][key], key
  assert routed['theoretical_speedup'] > full['theoretical_speedup']
  assert 0 < routed['realized_over_theoretical'] and 0 < routed['realized_speedup']
  assert routed['per_token_theoretical_speedup'] > 1
  # Routed prefills are not counted in FLOPs nor timed apart.
  assert all(r['prefill_flops'] is None and 'theoretical_speedup_with_prefill' not in r
             and 'realized_decode_speedup' not in r for r in rows)
  assert by_mode['static']['prefill_seconds'] is None
  assert json.loads(open(out).read()) == rows
