"""Generation: KV-cache decoding against full-sequence references."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from adaptive_depth import depth
from adaptive_depth import exits
from adaptive_depth import model as model_lib
from adaptive_depth.decode import adaptive_decode as generate_lib
from adaptive_depth.decode import generation
from adaptive_depth.decode import kv_cache
from adaptive_depth.decode import sampling as sampling_lib
from tests import tiny_models
from tests.test_model import small_config

PROMPTS = [[3, 7, 1], [5, 2, 9, 11, 4, 8, 1], [6], [12, 13, 14, 15, 16]]
MAX_NEW = 48


pytestmark = pytest.mark.usefixtures('cache_read_in_steps_of_16')  # conftest.py


@functools.lru_cache(maxsize=None)
def _program(cfg, kv, capacity=8, max_new=MAX_NEW):
  """One compiled generation per (model, KV policy, queue capacity, length): policies, EOS
  and pad ids are traced, so the tests below share these programs."""
  return jax.jit(lambda p, pr, ln, pol, eos, pad: generation.generate_tokens(
      cfg, p, pr, ln, max_new_tokens=max_new, policy=pol, sampling=sampling_lib.Greedy(),
      rng=jax.random.key(0), eos_id=eos, pad_id=pad, kv=kv, queue_capacity=capacity,
      return_cache=True))


@pytest.fixture(scope='module')
def setup():
  cfg = small_config(num_layers=4, vocab_size=40)
  params = tiny_models.random_params(cfg, scale=0.4)
  prompt, lengths = generate_lib.pad_prompts(PROMPTS, pad_id=0)
  run = lambda p, pr, ln, pol: _run_with_cache(cfg, p, pr, ln, pol, 'propagate').output
  return cfg, params, prompt, lengths, run


def _run_with_cache(cfg, params, prompt, lengths, policy, kv, capacity=8, max_new=MAX_NEW,
                    eos_id=-1, pad_id=0):
  """The result on the host (numpy): reading rows of device arrays would compile a slicing
  program per shape."""
  return jax.device_get(_program(cfg, kv, capacity, max_new)(
      params, prompt, lengths, policy, jnp.int32(eos_id), jnp.int32(pad_id)))


@functools.lru_cache(maxsize=None)
def _saturation_program(cfg):
  """prompt [B, P] -> the cosine of the states after the first two layers [1, B, P], in
  one program (eagerly, each op would compile on its own)."""
  def scores(params, prompt):
    h = model_lib.run_all_steps(cfg, params, model_lib.embed(cfg, params, prompt),
                                model_lib.default_positions(prompt))
    return exits.saturation(h[1:2], h[:1])
  return jax.jit(scores)


def _exiting_policy(cfg, params, prompt, measure='max_prob'):
  """`measure` at a threshold that lets roughly half the tokens leave early."""
  prompt = jnp.asarray(prompt)
  scores = (_saturation_program(cfg)(params, prompt) if measure == 'saturation'
            else np.asarray(tiny_models.exit_max_probs(cfg, params, prompt))[:2])
  threshold = float(np.quantile(np.asarray(scores), 0.6))
  return exits.ExitPolicy(measure=measure, threshold=threshold)


@pytest.fixture(scope='module')
def full_depth_greedy(setup):
  """tiny_models.greedy_reference of PROMPTS, [B, MAX_NEW], shared by both KV policies."""
  cfg, params, *_ = setup
  return tiny_models.greedy_reference(cfg, params, PROMPTS, MAX_NEW)


@pytest.fixture(scope='module')
def per_block_params(setup):
  """setup's parameters in the per-block layout, sliced in one program (eagerly every
  leaf's slice compiles on its own; the values are the same slices)."""
  return jax.jit(model_lib.per_block_layout)(setup[1])


@pytest.mark.parametrize('kv', generation.KV_POLICIES)
def test_never_exit_generation_equals_full_depth_greedy(setup, full_depth_greedy,
                                                       per_block_params, kv):
  """On the per-block layout `generate` decodes with (the stacked layout's decoding is
  checked against the same kind of reference in the tests below and in
  tests/test_param_layout.py)."""
  cfg, _, prompt, lengths, _ = setup
  out = _run_with_cache(cfg, per_block_params, prompt, lengths,
                        exits.ExitPolicy(measure='never'), kv).output
  assert (np.asarray(out.exit_depth) == cfg.num_layers).all()
  want = full_depth_greedy
  for row in range(len(PROMPTS)):
    assert len(set(want[row])) > 3, 'the reference is degenerate; the test would prove little'
    assert np.asarray(out.tokens[row]).tolist() == want[row].tolist(), row


@pytest.mark.parametrize('measure', ['max_prob', 'saturation'])
def test_early_exit_decoding_matches_masked_full_sequence_loop(setup, measure):
  """Decode with exits (KV propagated from frozen states) equals the adaptive forward over
  the whole generated sequence with every token forced out at the depth decode chose.
  ('saturation' reads no head to decide: decode computes the exit's logits only for rows
  that leave.)"""
  cfg, params, prompt, lengths, run = setup
  policy = _exiting_policy(cfg, params, prompt, measure)
  out = run(params, prompt, lengths, policy)
  depths = np.asarray(out.exit_depth)
  assert 1.5 < depths.mean() < cfg.num_layers - 0.2, depths.mean()
  # All rows in one padded batch (rows never interact; padding after a row's end is never
  # attended by its earlier positions).
  fed, _ = tiny_models.padded_prompts([s[:-1] for s in _sequences(PROMPTS, out)])
  forced = np.full(fed.shape, cfg.num_layers, np.int32)
  for row, ids in enumerate(PROMPTS):
    # The first generated token came from the prompt's last position at full depth; token i
    # (i >= 1) was produced while feeding token i - 1, which exited at depths[row, i].
    forced[row, len(ids):len(ids) + MAX_NEW - 1] = depths[row, 1:]
  predicted = np.asarray(_forced_argmax_program(cfg)(params, jnp.asarray(fed),
                                                     jnp.asarray(forced)))
  for row, ids in enumerate(PROMPTS):
    n = len(ids)
    np.testing.assert_array_equal(predicted[row, n - 1:n - 1 + MAX_NEW],
                                  np.asarray(out.tokens[row]), err_msg=str(row))


@functools.lru_cache(maxsize=None)
def _forced_argmax_program(cfg):
  """tokens [B, T], exit_at [B, T] -> [B, T]: the argmax of the adaptive forward with every
  token forced out at its exit_at, in one program."""
  return jax.jit(lambda params, tokens, exit_at: jnp.argmax(depth.forward_adaptive(
      cfg, params, tokens, exits.ExitPolicy(measure='never', exit_at=exit_at)).logits, -1))


@functools.lru_cache(maxsize=None)
def _full_depth_program(cfg):
  """fed [B, T] (ragged rows, lengths [B]) -> (the full-depth prefill's cache by position,
  [L, B, T, KV, Dh] each; every exit's train-mode argmax [exits, B, T]), in one program."""
  def run(params, fed, fed_lengths):
    cache, _ = generate_lib.prefill(cfg, params, fed, fed_lengths, fed.shape[1])
    return cache.by_position(), jnp.argmax(model_lib.forward_train(cfg, params, fed), -1)
  return jax.jit(run)


_by_position = jax.jit(lambda cache: cache.by_position())


def _sequences(prompts, out):
  return [np.asarray(ids + np.asarray(out.tokens[row]).tolist()) for row, ids in
          enumerate(prompts)]


def test_parallel_cache_equals_full_recompute_and_exits_read_exact_states(setup):
  """With 'parallel' every computed state is exact: after generation (queue flushed) the
  cache equals a full-depth pass over prompt + generated tokens, and each token was
  predicted by the train-mode exit head at the depth it left at."""
  cfg, params, prompt, lengths, _ = setup
  policy = _exiting_policy(cfg, params, prompt)
  result = _run_with_cache(cfg, params, prompt, lengths, policy, 'parallel')
  propagated = _run_with_cache(cfg, params, prompt, lengths, policy, 'propagate')
  out, depths = result.output, np.asarray(result.output.exit_depth)
  assert 1.5 < depths.mean() < cfg.num_layers - 0.2, depths.mean()
  exit_index = {d: i for i, d in enumerate(cfg.exit_depths)}

  def full_depth_cache(output):
    """Prefill (full depth) over each row's prompt + generated tokens but the last, which
    is never fed back; all rows in one padded batch. Also each exit's argmax there."""
    sequences = _sequences(PROMPTS, output)
    fed, fed_lengths = tiny_models.padded_prompts([s[:-1] for s in sequences])
    cache, exit_argmax = jax.device_get(_full_depth_program(cfg)(
        params, jnp.asarray(fed), jnp.asarray(fed_lengths)))  # on the host, to slice rows
    return sequences, cache, exit_argmax

  sequences, want, exit_argmax = full_depth_cache(out)  # exit_argmax: [exits, B, T]
  _, want_propagated, _ = full_depth_cache(propagated.output)
  got, got_propagated = jax.device_get((_by_position(result.cache),
                                        _by_position(propagated.cache)))
  for row, sequence in enumerate(sequences):
    length = len(sequence) - 1
    np.testing.assert_allclose(got.k[:, row, :length], want.k[:, row, :length],
                               rtol=1e-4, atol=1e-4, err_msg=f'row {row}')
    np.testing.assert_allclose(got.v[:, row, :length], want.v[:, row, :length],
                               rtol=1e-4, atol=1e-4, err_msg=f'row {row}')
    # The check has teeth: propagated K/V (from frozen states) is far from exact.
    assert np.abs(got_propagated.k[:, row, :length]
                  - want_propagated.k[:, row, :length]).max() > 0.1
    n = len(PROMPTS[row])
    for i in range(1, MAX_NEW):
      assert exit_argmax[exit_index[int(depths[row, i])], row, n + i - 1] == sequence[n + i], (
          row, i)


def test_parallel_full_queue_forces_a_deep_pass(setup):
  cfg, params, prompt, lengths, _ = setup
  policy = exits.ExitPolicy(measure='max_prob', threshold=0.0)  # every token would leave at 1
  # Capacity 8 at MAX_NEW is the program the tests above compiled (capacity is static: each
  # other one compiles its own); 1 is the smallest queue.
  for capacity, max_new in ((1, 24), (8, MAX_NEW)):
    depths = np.asarray(_run_with_cache(cfg, params, prompt, lengths, policy, 'parallel',
                                        capacity, max_new=max_new).output.exit_depth)[:, 1:]
    # Exits at depth 1 in runs of `capacity`, then one token at full depth empties the queue.
    pattern = np.tile([1] * capacity + [cfg.num_layers], max_new)[:depths.shape[1]]
    np.testing.assert_array_equal(depths, np.broadcast_to(pattern, depths.shape))


def test_rows_exit_independently(setup):
  cfg, params, prompt, lengths, run = setup
  policy = exits.ExitPolicy(measure='softmax_diff', threshold=0.2)
  full = run(params, prompt, lengths, policy)
  for row in range(len(PROMPTS)):
    p, l = generate_lib.pad_prompts([PROMPTS[row]], pad_id=0)
    alone = run(params, np.pad(p, [(0, 0), (0, prompt.shape[1] - p.shape[1])]), l, policy)
    np.testing.assert_array_equal(alone.tokens[0], full.tokens[row])
    np.testing.assert_array_equal(alone.exit_depth[0], full.exit_depth[row])


def test_sampling_respects_top_k_and_top_p():
  logits = jnp.asarray(np.log(np.array([[0.5, 0.3, 0.15, 0.05]] * 2000, np.float32)))
  keys = jax.random.split(jax.random.key(0), 1)[0]
  # One program per sampling kind (the knobs are traced); eagerly each op compiles alone.
  next_token = jax.jit(sampling_lib.next_token)
  draw = lambda s: np.asarray(next_token(logits, s, keys))
  assert set(draw(sampling_lib.Sampling(top_k=2))) == {0, 1}
  assert set(draw(sampling_lib.Sampling(top_p=0.7))) == {0, 1}
  counts = np.bincount(draw(sampling_lib.Sampling()), minlength=4) / 2000
  np.testing.assert_allclose(counts, [0.5, 0.3, 0.15, 0.05], atol=0.04)
  assert (draw(sampling_lib.Sampling(temperature=1e-4)) == 0).all()
  assert (np.asarray(next_token(logits, sampling_lib.Greedy(), keys)) == 0).all()


@pytest.mark.parametrize('kv', generation.KV_POLICIES)
def test_eos_stops_each_row_and_pads(setup, kv):
  """With an EOS id, each row stops at its first EOS (pad and depth 0 after it) and the
  tokens up to it are those of the run without EOS; rows never containing it run on."""
  cfg, params, prompt, lengths, _ = setup
  policy = _exiting_policy(cfg, params, prompt)
  free = _run_with_cache(cfg, params, prompt, lengths, policy, kv).output
  tokens = np.asarray(free.tokens)
  eos = int(tokens[0, 5])  # a token row 0 emits at step 5 (maybe earlier too)
  out = _run_with_cache(cfg, params, prompt, lengths, policy, kv, eos_id=eos, pad_id=-7).output
  stopped = 0
  for row in range(len(PROMPTS)):
    hits = np.flatnonzero(tokens[row] == eos)
    n = int(hits[0]) + 1 if hits.size else MAX_NEW
    stopped += bool(hits.size)
    assert int(out.num_generated[row]) == n
    np.testing.assert_array_equal(np.asarray(out.tokens[row, :n]), tokens[row, :n])
    np.testing.assert_array_equal(np.asarray(out.exit_depth[row, :n]),
                                  np.asarray(free.exit_depth[row, :n]))
    assert (np.asarray(out.tokens[row, n:]) == -7).all()
    assert (np.asarray(out.exit_depth[row, n:]) == 0).all()
  assert 1 <= stopped < len(PROMPTS) or stopped == len(PROMPTS)


def test_cache_store_and_layer_read_match_a_numpy_cache():
  """kv_cache against a numpy cache [L, B, S, KV, Dh] by position: a write at a traced step
  (some entries dropped by `keep`) lands only there, and the layer read at that step (the
  keys stored [Dh, S], the values [S, Dh]) holds what numpy holds."""
  cfg = small_config(num_layers=4, vocab_size=40)
  batch, length, new, step = 3, 10, 2, 2
  rng = np.random.default_rng(0)
  want = rng.normal(size=(2, cfg.num_layers, batch, length, cfg.num_kv_heads,
                          cfg.head_dim)).astype(np.float32)  # k, v by position
  cache = kv_cache.Cache(k=jnp.asarray(want[0].transpose(0, 1, 3, 4, 2)),
                         v=jnp.asarray(want[1].transpose(0, 1, 3, 2, 4)))
  k_new, v_new = rng.normal(size=(2, batch, new, cfg.num_kv_heads,
                                  cfg.head_dim)).astype(np.float32)
  positions = np.array([[4, 5], [0, 1], [8, 9]], np.int32)
  keep = np.array([[True, False], [True, True], [False, True]])
  for row in range(batch):
    for t in range(new):
      if keep[row, t]:
        want[0, step, row, positions[row, t]] = k_new[row, t]
        want[1, step, row, positions[row, t]] = v_new[row, t]

  @jax.jit
  def write_then_read(cache, step):
    cache = kv_cache.store(cache, step, k_new, v_new, positions, keep)
    return cache.by_position(), kv_cache.layer_of_rows(cache, step)

  written, (k_layer, v_layer) = write_then_read(cache, jnp.int32(step))
  np.testing.assert_array_equal(written.k, want[0])
  np.testing.assert_array_equal(written.v, want[1])
  np.testing.assert_array_equal(np.asarray(k_layer).transpose(0, 3, 1, 2), want[0, step])
  np.testing.assert_array_equal(np.asarray(v_layer).transpose(0, 2, 1, 3), want[1, step])


@pytest.mark.parametrize('per_row', [False, True], ids=['one_step', 'step_per_row'])
def test_cache_attention_reads_only_as_far_as_the_mask_reaches(per_row):
  """attend_reachable equals a numpy attention over the whole layer, while positions past
  the read it should choose hold NaN (a read of them would make the output NaN)."""
  rng = np.random.default_rng(0)
  layers_, batch, num_kv, head_dim, length, heads, queries = 3, 4, 2, 8, 29, 4, 2
  chunk = kv_cache.READ_CHUNK  # 16 here: reads of 16 or 29 positions
  assert kv_cache.read_lengths(length, chunk) == [16, 29]
  k = rng.normal(size=(layers_, batch, length, num_kv, head_dim)).astype(np.float32)
  v = rng.normal(size=k.shape).astype(np.float32)
  q = rng.normal(size=(batch, queries, heads, head_dim)).astype(np.float32)
  steps = np.array([2, 0, 1, 2]) if per_row else np.full(batch, 1)
  rows = np.array([3, 1, 0, 2]) if per_row else np.arange(batch)
  attend = jax.jit(lambda cache, q, mask: kv_cache.attend_reachable(
      cache, jnp.asarray(steps) if per_row else jnp.int32(1),
      jnp.asarray(rows) if per_row else None, q, mask))
  for reach in (1, 9, 16, 17, 29):
    positions = rng.integers(0, reach, size=(batch, queries))
    positions[1, 0] = reach - 1
    mask = np.arange(length)[None, None, :] <= positions[:, :, None]  # [B, T, S]
    read = 16 if reach <= 16 else length
    poisoned_k, poisoned_v = k.copy(), v.copy()
    poisoned_k[:, :, read:] = poisoned_v[:, :, read:] = np.nan
    cache = kv_cache.Cache(k=jnp.asarray(poisoned_k.transpose(0, 1, 3, 4, 2)),
                           v=jnp.asarray(poisoned_v.transpose(0, 1, 3, 2, 4)))
    got = np.asarray(attend(cache, jnp.asarray(q), jnp.asarray(mask)))
    want = np.zeros_like(got)
    for b in range(batch):
      for h in range(heads):
        kv = h // (heads // num_kv)
        keys, values = k[steps[b], rows[b], :, kv], v[steps[b], rows[b], :, kv]  # [S, Dh]
        scores = q[b, :, h] @ keys.T / np.sqrt(head_dim)  # [T, S]
        scores = np.where(mask[b], scores, -np.inf)
        probs = np.exp(scores - scores.max(-1, keepdims=True))
        want[b, :, h] = (probs / probs.sum(-1, keepdims=True)) @ values
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5, err_msg=f'reach {reach}')
