"""Self-speculative decoding against an independent full-depth greedy reference."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from adaptive_depth import costs
from adaptive_depth.decode import adaptive_decode
from adaptive_depth.decode import speculative
from tests import tiny_models

pytestmark = pytest.mark.usefixtures('cache_read_in_steps_of_16')  # conftest.py

MAX_NEW = 48
NUM_LAYERS = tiny_models.NUM_LAYERS
PAD = 0


CFG = tiny_models.config()
# A recursive model: two shared blocks cycled over four steps, with per-step LoRA deltas.
SHARED_CFG = tiny_models.config(num_blocks=2, schedule='cycle', lora_rank=2)


def _prompts():
  rng = np.random.default_rng(0)
  return [rng.integers(0, 256, n).tolist() for n in (3, 9, 1, 6)]  # ragged, batch 4


def _random_params(cfg=CFG):
  return tiny_models.random_params(cfg, scale=0.4)


def _damped_params(from_depth=2, factor=0.2):
  """Random, with the residual outputs of the layers from `from_depth` on scaled down: the
  full model then mostly, but not always, agrees with the exit at `from_depth`, so drafts
  are accepted in long runs and still rejected now and then (a stand-in for a trained
  model, without the cost of training one in a test)."""
  params = _random_params()
  scale = np.where(np.arange(NUM_LAYERS) >= from_depth, factor, 1.0).astype(np.float32)
  blocks = params['blocks']
  blocks['attn']['o'], blocks['mlp']['down'] = _scaled_residual_outputs(
      blocks['attn']['o'], blocks['mlp']['down'], scale)
  return params


@jax.jit  # one program (eagerly each op would compile on its own)
def _scaled_residual_outputs(o, down, scale):
  """Each layer's attention output and MLP down projection times scale [NUM_LAYERS]."""
  return o * scale[:, None, None, None], down * scale[:, None, None]


@functools.lru_cache(maxsize=None)
def _runner(cfg, draft_depth, num_draft):
  """One compile per setting; eos_id is traced so EOS tests reuse it."""
  return jax.jit(lambda params, prompt, lengths, eos_id: speculative.generate_speculative(
      cfg, params, prompt, lengths, max_new_tokens=MAX_NEW, draft_depth=draft_depth,
      num_draft=num_draft, eos_id=eos_id, pad_id=PAD))


@pytest.fixture(scope='module')
def models():
  """name -> (cfg, params, reference tokens [B, MAX_NEW])."""
  out = {}
  for name, cfg, params in (('random', CFG, _random_params()),
                            ('damped', CFG, _damped_params()),
                            ('shared', SHARED_CFG, _random_params(SHARED_CFG))):
    out[name] = (cfg, params, tiny_models.greedy_reference(cfg, params, _prompts(), MAX_NEW))
  return out


def _run(cfg, params, draft_depth, num_draft, eos_id=-1):
  prompt, lengths = adaptive_decode.pad_prompts(_prompts(), pad_id=PAD)
  # On the host: reading rows of device arrays would compile a slicing program per shape.
  return jax.device_get(_runner(cfg, draft_depth, num_draft)(params, prompt, lengths,
                                                             jnp.int32(eos_id)))


@pytest.mark.parametrize('name,draft_depth,num_draft', [
    ('random', 1, 1),                # shallowest draft, one draft per round
    ('shared', NUM_LAYERS - 1, 5),   # deepest draft, many drafts; shared blocks + LoRA
    ('damped', 2, 4),                # long accepted runs
])
def test_speculative_equals_full_depth_greedy(models, name, draft_depth, num_draft):
  cfg, params, want = models[name]
  out = _run(cfg, params, draft_depth, num_draft)
  for row in range(want.shape[0]):
    assert len(set(want[row].tolist())) > 10, 'degenerate reference; the test would prove little'
    np.testing.assert_array_equal(np.asarray(out.tokens[row]), want[row], err_msg=f'row {row}')
  np.testing.assert_array_equal(out.num_generated, MAX_NEW)
  assert (np.asarray(out.exit_depth) == cfg.num_layers).all()
  rounds, accepted = np.asarray(out.rounds), np.asarray(out.accepted_drafts)
  # Both paths ran: some drafts accepted, and some round before the last (which may be cut
  # by max_new_tokens) rejected one. With num_draft = 1 every acceptance is a full one,
  # i.e. the bonus-token path ran.
  assert accepted.sum() > 0, accepted
  assert (accepted < (rounds - 1) * num_draft).any(), (accepted, rounds)
  # The prefill emits one token and each round accepted + 1, except that max_new_tokens may
  # cut the last round short by one.
  assert ((MAX_NEW - 1 <= accepted + rounds) & (accepted + rounds <= MAX_NEW)).all()
  assert int(out.loop_rounds) == rounds.max()
  if name == 'damped':
    assert accepted.mean() > 0.5 * MAX_NEW, accepted
    assert len(set(rounds.tolist())) > 1, 'rows should progress at different rates'


def test_every_draft_accepted_when_upper_layers_are_identities():
  """With the residual outputs of layers >= E zeroed, depth E and full depth give the same
  logits exactly, so every round must accept all k drafts plus the bonus token: this catches
  drafting bugs that the verifier would otherwise silently correct."""
  draft_depth, num_draft = 2, 4  # the 'damped' setting: its compiled program is reused
  params = _damped_params(from_depth=draft_depth, factor=0.0)
  out = _run(CFG, params, draft_depth, num_draft)
  want = tiny_models.greedy_reference(CFG, params, _prompts(), MAX_NEW)
  np.testing.assert_array_equal(out.tokens, want)
  full_rounds, rest = divmod(MAX_NEW - 1, num_draft + 1)  # the last round is cut short
  np.testing.assert_array_equal(out.rounds, full_rounds + (rest > 0))
  np.testing.assert_array_equal(out.accepted_drafts, full_rounds * num_draft + rest)


def test_eos_stops_each_row_at_its_first_eos(models):
  cfg, params, want = models['damped']
  # One EOS that rows meet mid-way (or never), and one that is some row's very first token.
  for eos in (int(want[0, 20]), int(want[1, 0])):
    out = _run(cfg, params, 2, 4, eos_id=eos)
    tokens, depths = np.asarray(out.tokens), np.asarray(out.exit_depth)
    stops = 0
    for row in range(want.shape[0]):
      hits = np.flatnonzero(want[row] == eos)
      n = hits[0] + 1 if hits.size else MAX_NEW
      stops += bool(hits.size)
      assert int(out.num_generated[row]) == n, row
      np.testing.assert_array_equal(tokens[row, :n], want[row, :n], err_msg=f'row {row}')
      assert (tokens[row, n:] == PAD).all() and (depths[row, n:] == 0).all(), row
      assert (depths[row, :n] == cfg.num_layers).all(), row
    assert stops >= 1


def test_bad_arguments_fail_before_compiling():
  prompt, lengths = adaptive_decode.pad_prompts(_prompts(), pad_id=PAD)
  params = None  # never reached: the arguments are checked first
  call = functools.partial(speculative.generate_speculative, CFG, params, prompt, lengths,
                           max_new_tokens=8, eos_id=-1, pad_id=PAD)
  for depth in (0, NUM_LAYERS, -1, 1.5):
    with pytest.raises(ValueError, match=rf'draft_depth=.*1\.\.{NUM_LAYERS - 1}'):
      call(draft_depth=depth, num_draft=2)
  for num_draft in (0, -3):
    with pytest.raises(ValueError, match=r'num_draft=.*>= 1'):
      call(draft_depth=1, num_draft=num_draft)
  with pytest.raises(ValueError, match='max_new_tokens'):
    speculative.generate_speculative(CFG, params, prompt, lengths, max_new_tokens=0,
                                     draft_depth=1, num_draft=1, eos_id=-1, pad_id=PAD)


def test_speculative_flops():
  context, k, depth = 40.0, 3, 1
  full = costs.full_depth_flops(CFG, context)
  block, head = costs.block_flops(CFG, context), costs.head_flops(CFG)
  # A round: k+1 positions through every layer (split at the draft depth), k draft heads and
  # k+1 verifier heads.
  per_round = (k + 1) * NUM_LAYERS * block + (2 * k + 1) * head
  # Every draft accepted: each round emits k+1 tokens.
  rounds = 10
  tokens = 1 + rounds * (k + 1)
  want = (full + rounds * per_round) / (tokens * full)
  got = speculative.speculative_flops(CFG, rounds, k, depth, tokens, context)
  assert got == pytest.approx(want)
  # Every position still runs every layer once, so FLOPs never drop below full depth; the
  # k extra draft heads per k+1 tokens are the overhead (the gain is fewer sequential
  # passes over the weights, not fewer FLOPs).
  assert 1.0 < got < 1.0 + head / full
  # Nothing accepted: one token per round, at well over the full-depth cost.
  assert speculative.speculative_flops(CFG, rounds, k, depth, 1 + rounds, context) > k
  per_row = speculative.speculative_flops(CFG, np.array([10, 20]), k, depth,
                                          np.array([41, 41]), context)
  assert per_row.shape == (2,) and per_row[0] < per_row[1]
  with pytest.raises(ValueError, match='draft_depth'):
    speculative.speculative_flops(CFG, rounds, k, NUM_LAYERS, tokens, context)
