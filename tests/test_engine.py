"""The depth-wise batching engine (adaptive_depth.serving) against batch-1 decoding.

Two tiny shared-block models: one block looped 4 times with an exit after every step, and
two blocks cycled twice with per-step LoRA and exits at depths 2 and 4. Every request the
engine serves through 4 slots must equal the same request decoded alone by ad.generate
(same exit policy, KV policy 'propagate'), token for token and depth for depth.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import adaptive_depth as ad
from adaptive_depth import exits
from adaptive_depth import model as model_lib
from adaptive_depth import saved_model
from adaptive_depth.data import tokenizers
from adaptive_depth.decode import adaptive_decode
from adaptive_depth.serving import Engine, serve
from tests import compile_counter
from tests import tiny_models

pytestmark = pytest.mark.usefixtures('cache_read_in_steps_of_16')  # conftest.py

NUM_REQUESTS = 24
REFERENCE_MAX_NEW = 12  # every reference call decodes this many, then is cut to its request's


def _model(**overrides):
  cfg = tiny_models.config(**overrides)
  params = tiny_models.random_params(cfg, scale=0.4)
  return saved_model.LoadedModel(config=None, model_config=cfg, params=params,
                                 tokenizer=tokenizers.ByteTokenizer(), step=-1)


# Thresholds chosen so that both models exit at a real mix of depths.
MODELS = {
    'one_block': (dict(num_blocks=1, schedule='cycle'),
                  exits.ExitPolicy(measure='max_prob', threshold=0.5)),
    'two_blocks_lora': (dict(num_blocks=2, schedule='cycle', lora_rank=2, exit_depths=(2, 4)),
                        exits.ExitPolicy(measure='max_prob', threshold=0.4)),
}


@pytest.fixture(scope='module')
def classifier():
  """Exit classifier parameters for the one-block model (one program: eagerly each op of
  the initialisation compiles on its own)."""
  cfg = _model(**MODELS['one_block'][0]).model_config
  return jax.jit(exits.init_classifier, static_argnums=1)(
      jax.random.key(3), cfg.width + 3 + len(cfg.exit_depths))


def _shared_case(name, classifier):
  """(model, exit policy, an Engine of 4 slots the tests share: its programs compile once,
  and other exit policies add only their `generate`). The classifier goes only to the
  programs of measure 'classifier'."""
  overrides, policy = MODELS[name]
  model = _model(**overrides)
  return model, policy, Engine(model, slots=4, cache_len=32, exit=policy, classifier=classifier)


@pytest.fixture(scope='module')
def one_block(classifier):
  return _shared_case('one_block', classifier)


@pytest.fixture(scope='module', params=sorted(MODELS))
def case(request):
  if request.param == 'one_block':
    return request.getfixturevalue('one_block')
  return _shared_case(request.param, classifier=None)


def _requests(seed=0, count=NUM_REQUESTS):
  """Ragged prompts (1..15 tokens: one padded length) and ragged max_new_tokens (1..12)."""
  rng = np.random.default_rng(seed)
  prompts = [rng.integers(0, 256, rng.integers(1, 16)).tolist() for _ in range(count)]
  return prompts, rng.integers(1, REFERENCE_MAX_NEW + 1, count).tolist()


def _alone(model, prompt, max_new, policy):
  """The request decoded alone (batch 1) by ad.generate; one compiled program serves every
  call (same padded prompt length and max_new), cut to the request's length (greedy without
  EOS is prefix-consistent)."""
  out = ad.generate(model, [prompt], max_new_tokens=REFERENCE_MAX_NEW, exit=policy,
                    kv='propagate')
  return out.tokens[0][:max_new], out.exit_depths[0][:max_new]


def test_block_rows_apply_each_rows_own_lora_step():
  """One call of a shared block with per-row (unmerged) LoRA factors equals, row by row,
  model.apply_step at that row's step (LoRA merged into the kernel)."""
  cfg = tiny_models.config(num_blocks=2, schedule='cycle', lora_rank=2, exit_depths=(2, 4))
  params = tiny_models.random_params(cfg, scale=0.4)
  h = jnp.asarray(np.random.default_rng(0).standard_normal((3, 1, cfg.width), np.float32))
  positions = jnp.asarray([[0], [5], [2]], jnp.int32)
  steps = (1, 3, 1)  # all run block 1, with different LoRA factors

  @jax.jit  # one program: eager ops would compile one by one
  def both(params, h, positions):
    rows = model_lib.apply_block_rows(cfg, params, 1, jnp.asarray(steps), h, positions,
                                      jnp.ones((3, 1, 1), bool))[0]
    rows_kv = model_lib.apply_block_rows(cfg, params, 1, jnp.asarray(steps), h, positions,
                                         kv_only=True)
    one = lambda x, row: x[row:row + 1]
    alone = [(model_lib.apply_step(cfg, params, step, one(h, row), one(positions, row),
                                   jnp.ones((1, 1, 1), bool))[0],
              model_lib.apply_step(cfg, params, step, one(h, row), one(positions, row),
                                   kv_only=True)) for row, step in enumerate(steps)]
    return rows, rows_kv, alone

  rows, (k, v), alone = both(params, h, positions)
  for row, (want, (want_k, want_v)) in enumerate(alone):
    for got, wanted in ((rows, want), (k, want_k), (v, want_v)):
      np.testing.assert_allclose(got[row:row + 1], wanted, rtol=1e-5, atol=1e-4)
  # The steps' factors really differ: row 1 at step 1 instead of 3 would give another state.
  other_step = jax.jit(lambda p, h, pos: model_lib.apply_step(
      cfg, p, 1, h[1:2], pos[1:2], jnp.ones((1, 1, 1), bool))[0])(params, h, positions)
  assert np.abs(np.asarray(other_step) - np.asarray(rows[1:2])).max() > 1e-2


def test_stream_equals_each_request_decoded_alone(case):
  model, policy, engine = case
  prompts, max_new = _requests()
  out = serve(model, prompts, max_new_tokens=max_new, exit=policy, chunk_ticks=5,
              engine=engine)
  for i, (prompt, m) in enumerate(zip(prompts, max_new)):
    tokens, depths = _alone(model, prompt, m, policy)
    assert out.tokens[i] == tokens, i
    assert out.exit_depths[i] == depths, i
    assert out.texts[i] == model.tokenizer.decode(tokens)
  decoded_depths = {d for depths in out.exit_depths for d in depths[1:]}
  assert len(decoded_depths) >= 2 and min(decoded_depths) < model.model_config.num_layers, (
      'the policy must make a real mix of depths', decoded_depths)
  stats = out.stats
  assert stats['mean_depth'] < model.model_config.num_layers
  assert 0 < stats['slot_utilisation'] <= 1 and stats['ticks'] > 0
  # Depth-wise batching: fewer ticks than decoding the requests one after another would take
  # (every request needs its loop steps, in ticks, one request at a time).
  steps_per_tick = model.model_config.num_blocks
  serial_ticks = sum(sum(d // steps_per_tick for d in depths[1:]) for depths in out.exit_depths)
  assert stats['ticks'] < serial_ticks


def test_never_exit_equals_full_depth_greedy(case):
  model, _, engine = case
  cfg = model.model_config
  prompts, max_new = _requests(seed=1, count=8)
  # Prompts prefilled only when a slot is free (the other tests prefill two ahead).
  out = serve(model, prompts, max_new_tokens=max_new, exit=exits.ExitPolicy(measure='never'),
              engine=engine, prefill_ahead_count=0)
  want = tiny_models.greedy_reference(cfg, model.params, prompts, max(max_new))
  for i, m in enumerate(max_new):
    assert out.tokens[i] == want[i, :m].tolist(), i
    assert out.exit_depths[i] == [cfg.num_layers] * m, i
  assert out.stats['relative_flops'] == pytest.approx(1.0)


def test_one_slot_with_more_prefills_ahead_than_slots(case):
  """prefill_ahead_count above the slots (the default 2 at one slot, and 50) counts as the
  slots: the stream still decodes as full-depth greedy does."""
  model, _, _ = case
  cfg = model.model_config
  prompts, max_new = _requests(seed=3, count=3)
  want = tiny_models.greedy_reference(cfg, model.params, prompts, max(max_new))
  for ahead in ({}, {'prefill_ahead_count': 50}):
    out = serve(model, prompts, max_new_tokens=max_new, slots=1, **ahead)
    assert out.tokens == [want[i, :m].tolist() for i, m in enumerate(max_new)], ahead


def test_requests_are_isolated(case):
  """Changing one request changes no other request's tokens or depths; a request admitted
  into a slot whose cache row holds large garbage (a previous occupant's, or ours) decodes as
  if alone."""
  model, policy, engine = case
  prompts, max_new = _requests(seed=2, count=10)
  first = serve(model, prompts, max_new_tokens=max_new, exit=policy, chunk_ticks=3,
                engine=engine)
  changed = list(prompts)
  changed[3] = [(t + 1) % 256 for t in prompts[3]] + [7]
  second = serve(model, changed, max_new_tokens=max_new, exit=policy, chunk_ticks=3,
                 engine=engine)
  assert second.tokens[3] != first.tokens[3] or second.exit_depths[3] != first.exit_depths[3]
  for i in range(len(prompts)):
    if i != 3:
      assert second.tokens[i] == first.tokens[i], i
      assert second.exit_depths[i] == first.exit_depths[i], i

  state = engine.init_decode_state()
  garbage = lambda x: x + 1e3 * np.random.default_rng(0).standard_normal(x.shape, np.float32)
  state = state.replace(cache=adaptive_decode.Cache(k=garbage(state.cache.k),
                                                    v=garbage(state.cache.v)),
                        h=garbage(state.h))
  admitted = (0, 5, 6, 9)
  for slot, request in enumerate(admitted):
    state = engine.insert(engine.prefill(prompts[request]), state, slot, request=request,
                          max_new_tokens=REFERENCE_MAX_NEW)
  state = jax.device_get(engine.generate(state, 10 * REFERENCE_MAX_NEW))  # on the host
  assert np.asarray(state.done).all()
  for slot, request in enumerate(admitted):
    tokens, depths = _alone(model, prompts[request], REFERENCE_MAX_NEW, policy)
    count = int(state.count[slot])
    assert np.asarray(state.tokens[slot, :count]).tolist() == tokens, request
    assert np.asarray(state.exit_depth[slot, :count]).tolist() == depths, request


def test_one_compile_per_shape_thresholds_and_refills_compile_nothing():
  model, policy = _model(**MODELS['one_block'][0]), MODELS['one_block'][1]
  prompts, max_new = _requests(seed=3, count=6)
  engine = Engine(model, slots=2, cache_len=32, exit=policy)
  serve(model, prompts, max_new_tokens=max_new, exit=policy, engine=engine)
  assert engine.compiles == 3  # prefill (one padded length), insert, generate
  other_prompts, other_max_new = _requests(seed=4, count=7)
  with compile_counter.backend_compiles() as compiles:
    for threshold, min_depth in ((0.3, 1), (0.8, 2)):
      swept = policy.replace(threshold=threshold, min_depth=min_depth)
      out = serve(model, other_prompts, max_new_tokens=other_max_new, exit=swept,
                  engine=engine, chunk_ticks=2)
      eos = model.tokenizer.eos_id
      for tokens, m in zip(out.tokens, other_max_new):  # max_new tokens, or fewer ending in EOS
        assert len(tokens) == m or (len(tokens) < m and tokens[-1] == eos), (tokens, m)
  assert compiles == [] and engine.compiles == 3


BAD_INPUTS = [
    (dict(prompts=[]), 'prompts is empty'),
    (dict(prompts=[[1, 2], []]), r'prompts\[1\] is empty'),
    (dict(prompts=['ab', '']), r'prompts\[1\] is an empty string'),
    (dict(slots=0), 'slots=0'),
    (dict(max_new_tokens=0), 'max_new_tokens=0'),
    (dict(max_new_tokens=[3, 0]), 'max_new_tokens=0'),
    (dict(max_new_tokens=[3]), 'max_new_tokens has 1 entries for 2 prompts'),
    (dict(kv='parallel'), "kv='parallel'; allowed: propagate"),
    (dict(cache_len=16, max_new_tokens=10),
     r'prompts\[1\] has 7 tokens .*max_new_tokens=10.*cache_len=16'),
    # 17 + 3 positions fit 20, but the prompt is prefilled padded to 32
    (dict(prompts=[list(range(1, 18))], cache_len=20, max_new_tokens=3),
     r'prompts\[0\] has 17 tokens \(prefilled padded to 32\).*cache_len=20'),
    (dict(exit=exits.ExitPolicy(measure='oracle')), "measure='oracle'.*allowed"),
    (dict(chunk_ticks=0), 'chunk_ticks=0'),
    (dict(prefill_ahead_count=-1), 'prefill_ahead_count=-1'),
    (dict(prefill_ahead_count=True), 'prefill_ahead_count=True'),
    (dict(seed=-1), r'seed=-1: must be an int'),
    (dict(seed=0.5), r'seed=0\.5: must be an int'),
]


@pytest.mark.parametrize('kwargs, message', BAD_INPUTS)
def test_bad_input_is_refused_before_compiling(kwargs, message):
  model = _model(num_blocks=1, schedule='cycle')
  args = dict(prompts=[[1, 2, 3], [4, 5, 6, 7, 8, 9, 10]], max_new_tokens=4)
  args.update(kwargs)
  with compile_counter.backend_compiles() as compiles, pytest.raises(ValueError, match=message):
    serve(model, args.pop('prompts'), **args)
  assert compiles == []


@pytest.mark.parametrize('overrides, message', [
    (dict(), r"config.model.schedule='unshared' with num_blocks=4.*allowed: schedule 'cycle'"),
    (dict(num_blocks=2, schedule='sequence'), r"config.model.schedule='sequence'"),
    (dict(num_blocks=2, schedule='cycle'), r'exit depths \[1, 3\] that are not loop boundaries'),
])
def test_models_the_engine_cannot_run_are_refused(overrides, message):
  model = _model(**overrides)
  with compile_counter.backend_compiles() as compiles, pytest.raises(ValueError, match=message):
    serve(model, [[1, 2, 3]], max_new_tokens=4)
  assert compiles == []


def test_engine_insert_refuses_requests_that_do_not_fit(one_block):
  """The engine API checks what `serve` checks: past cache_len writes would be dropped."""
  _, _, engine = one_block  # 4 slots of 32 positions
  prefix = engine.prefill([1, 2, 3, 4, 5])
  state = engine.init_decode_state()
  with pytest.raises(ValueError, match='5 tokens .*max_new_tokens=28.*cache_len=32'):
    engine.insert(prefix, state, 0, request=0, max_new_tokens=28)
  with pytest.raises(ValueError, match='max_new_tokens=0'):
    engine.insert(prefix, state, 0, request=0, max_new_tokens=0)
  with pytest.raises(ValueError, match='slot=4; allowed: 0..3'):
    engine.insert(prefix, state, 4, request=0, max_new_tokens=3)


def _eight_requests_decoded_as_alone(model, policy, seed, **serve_options) -> list[int]:
  """Serves 8 requests of REFERENCE_MAX_NEW tokens, checks each against the request decoded
  alone (tokens and depths); returns the decode steps' depths."""
  prompts, _ = _requests(seed=seed, count=8)
  out = serve(model, prompts, max_new_tokens=REFERENCE_MAX_NEW, exit=policy, **serve_options)
  for i, prompt in enumerate(prompts):
    tokens, depths = _alone(model, prompt, REFERENCE_MAX_NEW, policy)
    assert out.tokens[i] == tokens and out.exit_depths[i] == depths, i
  return [d for depths in out.exit_depths for d in depths[1:]]


def _assert_early_and_last(model, decoded):
  """Some tokens left early and some went all the way (their logits from the check's head
  call at the last depth)."""
  last = model.model_config.num_layers
  assert min(decoded) < last and last in decoded, sorted(set(decoded))


@pytest.mark.parametrize('policy', [
    exits.ExitPolicy(measure='saturation', threshold=0.9, min_depth=2),
    exits.ExitPolicy(measure='softmax_diff', schedule='decaying', threshold=0.3, tau=2.0),
    exits.ExitPolicy(measure='never', exit_at=2),
], ids=['saturation', 'decaying', 'exit_at'])
def test_other_exit_policies_equal_each_request_decoded_alone(one_block, policy):
  """The engine decides with the library's exit rules: a hidden-state measure with a minimum
  depth, CALM's decaying threshold (its N is each request's max_new_tokens, equal here to
  the reference's), and a forced exit."""
  model, _, engine = one_block  # 8 requests through its 4 slots
  decoded = _eight_requests_decoded_as_alone(model, policy, seed=1, engine=engine)
  if policy.measure == 'never':
    assert set(decoded) == {2}
  else:
    _assert_early_and_last(model, decoded)


def test_per_exit_heads_equal_each_request_decoded_alone():
  """Each exit with its own norm and adapter: a slot that stops early takes its exit's head,
  and a slot at the last depth the last exit's (from the same head call in the tick), as
  batch-1 decoding does. A wrong exit number for either would change tokens."""
  model = _model(num_blocks=1, schedule='cycle', exit_norms=True, exit_adapter_rank=2)
  policy = exits.ExitPolicy(measure='max_prob', threshold=0.5)
  decoded = _eight_requests_decoded_as_alone(model, policy, seed=4, slots=4, cache_len=32)
  _assert_early_and_last(model, decoded)


def test_classifier_exits_equal_each_request_decoded_alone(one_block, classifier):
  """Measure 'classifier' (CALM's learned exit) with one exit per slot: the classifier sees
  each slot's own exit one-hot, so slots at different depths in one tick decide as batch-1
  decoding does. Without its parameters the engine refuses the measure."""
  model, _, engine = one_block  # made with the classifier; 8 requests through its 4 slots
  policy = exits.ExitPolicy(measure='classifier', threshold=0.5)
  prompts, _ = _requests(seed=2, count=8)
  out = serve(model, prompts, max_new_tokens=REFERENCE_MAX_NEW, exit=policy, engine=engine)
  for i, prompt in enumerate(prompts):
    alone = ad.generate(model, [prompt], max_new_tokens=REFERENCE_MAX_NEW, exit=policy,
                        kv='propagate', classifier=classifier)
    assert out.tokens[i] == alone.tokens[0] and out.exit_depths[i] == alone.exit_depths[0], i
  decoded = {d for depths in out.exit_depths for d in depths[1:]}
  assert len(decoded) >= 2, ('the classifier must make a real mix of depths', decoded)
  with pytest.raises(ad.UserError, match="classifier="):
    Engine(model, slots=2, cache_len=32, exit=policy)


def test_sampling_depends_on_the_request_not_on_its_slot():
  """A sampled request draws from its own key (seed, request id, token index): through 2 or
  5 slots it gets the same tokens and depths; another seed changes them; top_k=1 sampling
  is greedy decoding (against ad.generate alone)."""
  model = _model(num_blocks=1, schedule='cycle')
  policy = MODELS['one_block'][1]
  prompts, max_new = _requests(seed=4, count=10)
  hot = ad.Sampling(temperature=1.5)
  engine = Engine(model, slots=2, cache_len=32, exit=policy, sampling=hot, seed=3, eos_id=-1)
  two = serve(model, prompts, max_new_tokens=max_new, exit=policy, engine=engine)
  five = serve(model, prompts, max_new_tokens=max_new, exit=policy, slots=5, cache_len=32,
               sampling=hot, seed=3, eos_id=-1, chunk_ticks=7)
  engine.seed = 4  # a traced key: the same programs serve another seed
  with pytest.raises(ad.UserError, match=r'seed=5\.0: must be an int'):
    engine.seed = 5.0  # refused when set, not at the next call
  assert engine.seed == 4
  other_seed = serve(model, prompts, max_new_tokens=max_new, exit=policy, engine=engine)
  assert two.tokens == five.tokens and two.exit_depths == five.exit_depths
  assert [len(t) for t in two.tokens] == max_new  # eos_id=-1: every request runs its budget
  assert two.tokens != other_seed.tokens
  greedy = serve(model, prompts, max_new_tokens=max_new, exit=policy, slots=2, cache_len=32,
                 sampling=ad.Sampling(top_k=1), seed=9)
  for i, prompt in enumerate(prompts):
    tokens, depths = _alone(model, prompt, max_new[i], policy)
    assert greedy.tokens[i] == tokens and greedy.exit_depths[i] == depths, i
