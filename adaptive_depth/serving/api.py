"""`serve(model, prompts, ...)`: continuous batching over the depth-wise batching engine.

The host keeps a queue of requests; between chunks of device ticks it collects the
requests that finished and admits waiting ones into the freed slots (prefill, then insert).
Programs are compiled ahead of time and kept per shape: one `generate` and one `insert` per
(slots, cache_len), one `prefill` per padded prompt length; exit policy values, prompts,
refills and chunk lengths are arguments, not constants, so they compile nothing new.
"""
from __future__ import annotations

import dataclasses
import time
from typing import Callable, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np

from adaptive_depth import cli
from adaptive_depth import costs
from adaptive_depth import exits
from adaptive_depth import saved_model
from adaptive_depth.decode import adaptive_decode as decode_lib
from adaptive_depth.decode import api as decode_api
from adaptive_depth.decode import sampling as sampling_lib
from adaptive_depth.decode import generation
from adaptive_depth.serving import engine as engine_lib
from adaptive_depth.serving import mor_engine

PROMPT_MULTIPLE = 16  # prompts are padded to a multiple of this: one prefill per multiple


@dataclasses.dataclass(frozen=True)
class ServeOutput:
  """Per request, in the order given: texts, tokens (the generated ids) and exit_depths
  (the first token comes from the full-depth prefill). stats: tokens_per_second (compiles
  excluded), seconds, compile_seconds, ticks, slot_utilisation (fraction of slot-ticks spent
  on a live token), mean_depth and relative_flops (decode steps, against full depth)."""
  texts: list
  tokens: list
  exit_depths: list
  stats: dict


class Engine:
  """The slot table of one model with its compiled programs: `prefill`, `insert`,
  `generate` (JetStream's engine API shape), for (slots, cache_len) fixed at construction.

  exit: the exit policy (default: never exit); its values (threshold, min_depth, ...) are
  traced, so `generate(state, ticks, exit=other)` with the same measure reuses the program.
  sampling: Greedy() (default) or Sampling(temperature, top_k, top_p), traced too; seed: the
  base of every request's random key (a request's tokens depend only on its id, the seed
  and the model, not on the slot it gets); an attribute, read at every insert and generate
  as a traced key, so setting engine.seed compiles nothing. eos_id: the token that ends a request (default:
  the tokenizer's; -1: none, every request runs to its max_new_tokens). classifier: the
  exit classifier's parameters (train/classifier.require_classifier reads the ones
  configs/exit_classifier.py saved), needed by measure 'classifier' and by no other.
  """

  def __init__(self, model: saved_model.LoadedModel, *, slots: int, cache_len: int,
               exit: Optional[exits.ExitPolicy] = None, kv: str = 'propagate',
               sampling=None, seed: int = 0, eos_id: Optional[int] = None,
               classifier=None, finish_slots: int = 0):
    cfg = model.model_config
    check_engine_args(cfg, slots=slots, cache_len=cache_len, kv=kv)
    if (not isinstance(finish_slots, (int, np.integer)) or finish_slots < 0
        or finish_slots > slots):
      raise cli.UserError(f'finish_slots={finish_slots!r}: allowed 0 (automatic) to '
                          f'slots={slots}')
    self.finish_slots = finish_slots  # Mixture-of-Recursions: see mor_engine
    self.model, self.cfg, self.slots, self.cache_len = model, cfg, slots, cache_len
    self.classifier = classifier
    self.policy = self._checked_policy(exit)
    self.sampling = self._checked_sampling(sampling)
    self.seed = seed  # made into a key at first use: nothing runs on device before a request
    self.eos_id = model.tokenizer.eos_id if eos_id is None else eos_id
    if (not isinstance(self.eos_id, (int, np.integer)) or isinstance(self.eos_id, bool)
        or not -1 <= self.eos_id < cfg.vocab_size):
      raise cli.UserError(f'eos_id={self.eos_id!r}: must be an int in -1..{cfg.vocab_size - 1}'
                          ' (-1: no end-of-sequence token)')
    self.compile_seconds = 0.0
    self.compiles = 0  # programs this engine compiled (tests count them)
    self._programs = {}

  def _checked_policy(self, policy):
    policy = check_policy(self.cfg, policy)
    if policy.measure == 'classifier' and self.classifier is None:
      raise cli.UserError("ExitPolicy.measure='classifier' needs the engine's classifier= "
                          '(the parameters configs/exit_classifier.py trains)')
    return policy

  @property
  def params(self):
    """The decode layout of the model's parameters (made at first use: slicing the blocks
    runs on device, and a request refused up front should run nothing)."""
    return self.model.decode_params

  @property
  def rng(self):
    return jax.random.key(self.seed)

  @staticmethod
  def _checked_sampling(sampling):
    sampling = sampling or sampling_lib.Greedy()
    sampling_lib.check_sampling(sampling)
    return sampling

  def _compiled(self, name, run, args, donate=()):
    """The program for `run` at these argument shapes, compiled on first use. `donate`:
    argument numbers whose buffers the program may reuse (the decode state: updating it in
    place instead of copying the cache at every call)."""
    spec = lambda x: (tuple(getattr(x, 'shape', ())), str(getattr(x, 'dtype', type(x))))
    key = (name, jax.tree.structure(args), tuple(spec(x) for x in jax.tree.leaves(args)))
    if key not in self._programs:
      start = time.perf_counter()
      self._programs[key] = jax.jit(run, donate_argnums=donate).lower(*args).compile()
      self.compile_seconds += time.perf_counter() - start
      self.compiles += 1
    return self._programs[key]

  @property
  def routed(self) -> bool:
    """A Mixture-of-Recursions model: serving/mor_engine.py runs it."""
    return self.cfg.routing is not None

  def _finish_slots(self, policy) -> int:
    return self.finish_slots or mor_engine.default_finish_slots(
        self.cfg, self.slots, policy.measure == 'never')

  def init_decode_state(self) -> engine_lib.DecodeState:
    """Every slot free."""
    if self.routed:
      return mor_engine.empty_state(self.cfg, self.slots, self.cache_len)
    return engine_lib.empty_state(self.cfg, self.slots, self.cache_len)

  def prefill(self, prompt_ids: Sequence[int],
              exit: Optional[exits.ExitPolicy] = None) -> engine_lib.Prefix:
    """One prompt (token ids) at full depth, padded to a multiple of PROMPT_MULTIPLE. A
    Mixture-of-Recursions model routes the prompt as `exit` (default: the engine's policy)
    routes decoding: pass the policy its generate calls use."""
    # Pad tokens sit where the mask hides them until real tokens overwrite them.
    prompt, lengths = decode_lib.pad_prompts([list(prompt_ids)], pad_id=0,
                                             multiple=PROMPT_MULTIPLE)
    if prompt.shape[1] > self.cache_len:
      raise cli.UserError(f'a prompt of {len(prompt_ids)} tokens (padded to {prompt.shape[1]}) '
                       f'does not fit cache_len={self.cache_len}')
    cfg, cache_len = self.cfg, self.cache_len
    if self.routed:  # the prompt routed as decoding routes (or every recursion)
      policy = self.policy if exit is None else self._checked_policy(exit)
      every = policy.measure == 'never'
      run = lambda params, prompt, length, threshold: mor_engine.prefill(
          cfg, params, prompt, length, cache_len, threshold, every)
      args = (self.params, jnp.asarray(prompt[0]), jnp.asarray(lengths[0]),
              policy.threshold)
      return self._compiled(('prefill', every), run, args)(*args)
    run = lambda params, prompt, length: engine_lib.prefill(cfg, params, prompt, length,
                                                            cache_len)
    args = (self.params, jnp.asarray(prompt[0]), jnp.asarray(lengths[0]))
    return self._compiled('prefill', run, args)(*args)

  def check_request(self, num_tokens: int, max_new_tokens: int, name: str = 'prompt'):
    """Raises ValueError unless a prompt of num_tokens ids and max_new_tokens new tokens
    fit this engine: beyond cache_len, writes would be dropped and the output wrong."""
    if not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens < 1:
      raise cli.UserError(f'max_new_tokens={max_new_tokens!r} for {name}: must be an int '
                          '>= 1')
    padded = padded_length(num_tokens)  # what prefill runs
    if max(num_tokens + max_new_tokens, padded) > self.cache_len:
      raise cli.UserError(f'{name} has {num_tokens} tokens (prefilled padded to {padded}) and '
                       f'max_new_tokens={max_new_tokens}: they do not fit '
                       f'cache_len={self.cache_len}')

  def insert(self, prefix: engine_lib.Prefix, state: engine_lib.DecodeState, slot: int, *,
             request: int, max_new_tokens: int,
             exit: Optional[exits.ExitPolicy] = None) -> engine_lib.DecodeState:
    """state (donated: do not use it afterwards) with `prefix` admitted into `slot` as
    request id `request` (a Mixture-of-Recursions model routes the first new token as
    `exit`, default the engine's policy, says)."""
    if not 0 <= slot < self.slots:
      raise cli.UserError(f'slot={slot}; allowed: 0..{self.slots - 1}')
    length = prefix.prefix.length if self.routed else prefix.length
    self.check_request(int(length), max_new_tokens)
    cfg = self.cfg
    if self.routed:
      policy = self.policy if exit is None else self._checked_policy(exit)
      every = policy.measure == 'never'
      run = lambda params, prefix, state, slot, request, max_new, eos, sampling, rng, t: (
          mor_engine.insert(cfg, params, prefix, state, slot, request, max_new, eos, sampling,
                            rng, t, every))
      args = (self.params, prefix, state, np.int32(slot), np.int32(request),
              np.int32(max_new_tokens), np.int32(self.eos_id), self.sampling, self.rng,
              policy.threshold)
      return self._compiled(('insert', every), run, args, donate=(2,))(*args)
    run = lambda params, prefix, state, slot, request, max_new, eos, sampling, rng: (
        engine_lib.insert(cfg, params, prefix, state, slot, request, max_new, eos, sampling,
                          rng))
    args = (self.params, prefix, state, np.int32(slot), np.int32(request),
            np.int32(max_new_tokens), np.int32(self.eos_id), self.sampling, self.rng)
    return self._compiled('insert', run, args, donate=(2,))(*args)

  def generate(self, state: engine_lib.DecodeState, num_ticks: int,
               exit: Optional[exits.ExitPolicy] = None) -> engine_lib.DecodeState:
    """state (donated: do not use it afterwards) advanced by up to num_ticks ticks (fewer
    when no slot is live)."""
    policy = self.policy if exit is None else self._checked_policy(exit)
    cfg = self.cfg
    if self.routed:
      finish = self._finish_slots(policy)
      run = lambda params, state, policy, ticks, eos, sampling, rng: mor_engine.generate(
          cfg, params, state, policy, ticks, eos, sampling, rng, finish)
      args = (self.params, state, policy, np.int32(num_ticks), np.int32(self.eos_id),
              self.sampling, self.rng)
      return self._compiled(('generate', finish), run, args, donate=(1,))(*args)
    run = lambda params, state, policy, ticks, eos, sampling, rng, classifier: (
        engine_lib.generate(cfg, params, state, policy, ticks, eos, sampling, rng, classifier))
    # The classifier goes only to the programs of its measure: the others need not change
    # when it does.
    classifier = self.classifier if policy.measure == 'classifier' else None
    args = (self.params, state, policy, np.int32(num_ticks), np.int32(self.eos_id),
            self.sampling, self.rng, classifier)
    return self._compiled('generate', run, args, donate=(1,))(*args)


def check_engine_args(cfg, *, slots, cache_len, kv):
  """Raises ValueError naming the argument (before anything compiles)."""
  if kv not in engine_lib.KV_POLICIES:
    raise cli.UserError(f'kv={kv!r}; allowed: {", ".join(engine_lib.KV_POLICIES)}')
  if not isinstance(slots, (int, np.integer)) or slots < 1:
    raise cli.UserError(f'slots={slots!r}: must be an int >= 1')
  if not isinstance(cache_len, (int, np.integer)) or cache_len < 2:
    raise cli.UserError(f'cache_len={cache_len!r}: must be an int >= 2')
  if cfg.routing is not None:  # Mixture-of-Recursions: serving/mor_engine.py
    return
  message = engine_lib.schedule_error(cfg)
  if message:
    raise cli.UserError(message)


def padded_length(num_tokens: int) -> int:
  """num_tokens rounded up to a multiple of PROMPT_MULTIPLE (the prefill's padding)."""
  return -(-num_tokens // PROMPT_MULTIPLE) * PROMPT_MULTIPLE


def check_policy(cfg, policy: Optional[exits.ExitPolicy]) -> exits.ExitPolicy:
  """The exit policy the engine runs (None: never exit; a Mixture-of-Recursions model:
  its routers at sigmoid 0.5); a UserError for one it cannot."""
  if cfg.routing is not None:
    policy = (policy or generation.default_policy(cfg)).validated()
    try:
      generation.check_routing(cfg, policy)
    except ValueError as e:
      raise cli.UserError(str(e)) from None
    return policy
  policy = (policy or exits.ExitPolicy(measure='never')).validated(cfg.exit_depths)
  if policy.measure not in engine_lib.MEASURES:
    raise cli.UserError(f'ExitPolicy.measure={policy.measure!r} is not supported by the '
                        f'engine; allowed: {", ".join(engine_lib.MEASURES)}')
  if policy.schedule == 'adaptive':
    raise cli.UserError("ExitPolicy.schedule='adaptive' learns from the tokens that catch up "
                        "under kv='parallel', which the engine does not run; allowed "
                        'schedules here: constant, decaying')
  return policy


def _max_new_list(max_new_tokens, count: int) -> list[int]:
  values = (list(max_new_tokens) if isinstance(max_new_tokens, (list, tuple, np.ndarray))
            else [max_new_tokens] * count)
  if len(values) != count:
    raise cli.UserError(f'max_new_tokens has {len(values)} entries for {count} prompts: give '
                     'one int, or one per prompt')
  for i, value in enumerate(values):
    if not isinstance(value, (int, np.integer)) or value < 1:
      raise cli.UserError(f'max_new_tokens={value!r} (request {i}): must be an int >= 1')
  return [int(v) for v in values]


def serve(model: saved_model.LoadedModel, prompts, *, slots: int = 4,
          max_new_tokens: Union[int, Sequence[int]] = 64,
          exit: Optional[exits.ExitPolicy] = None, kv: str = 'propagate',
          cache_len: Optional[int] = None, chunk_ticks: int = 16,
          sampling=None, seed: int = 0, eos_id: Optional[int] = None,
          classifier=None, engine: Optional[Engine] = None,
          on_finished: Optional[Callable[[int], None]] = None,
          finish_slots: int = 0) -> ServeOutput:
  """Generation for a stream of requests through `slots` slots of the depth-wise batching
  engine. prompts: strings or token id lists (as ad.generate takes them);
  max_new_tokens: one int or one per prompt; exit: the exit policy (default: the engine's,
  which is never exit when serve makes the engine); sampling, seed, eos_id: as Engine
  takes them (default greedy; a given engine keeps its own); classifier: the exit
  classifier's parameters, for measure 'classifier' (as Engine takes them);
  cache_len: positions per slot (default: the longest prompt plus its max_new_tokens, rounded
  up to a multiple of 16); chunk_ticks: ticks per device loop between host refills.
  engine: an Engine to reuse (its slots and cache_len then rule). on_finished: called with
  the number of finished requests whenever some finish (a progress bar's hook).
  finish_slots: Mixture-of-Recursions models, slots that may finish a token per tick (as
  Engine takes it; 0 = automatic).
  """
  cfg, tokenizer = model.model_config, model.tokenizer
  token_lists = decode_api._prompt_ids(prompts, tokenizer, cfg.vocab_size)
  max_new = _max_new_list(max_new_tokens, len(token_lists))
  if not isinstance(chunk_ticks, (int, np.integer)) or chunk_ticks < 1:
    raise cli.UserError(f'chunk_ticks={chunk_ticks!r}: must be an int >= 1')
  needed = max(len(t) + m for t, m in zip(token_lists, max_new))
  if cache_len is None and engine is None:
    cache_len = padded_length(needed)
  if engine is None:
    engine = Engine(model, slots=slots, cache_len=cache_len, exit=exit, kv=kv,
                    sampling=sampling, seed=seed, eos_id=eos_id, classifier=classifier,
                    finish_slots=finish_slots)
  else:
    check_engine_args(cfg, slots=engine.slots, cache_len=engine.cache_len, kv=kv)
    if sampling is not None or eos_id is not None or classifier is not None:
      raise cli.UserError('sampling=, eos_id= and classifier= belong to the engine when '
                          'engine= is given: pass them to Engine(...)')
  for i, (ids, m) in enumerate(zip(token_lists, max_new)):
    engine.check_request(len(ids), m, name=f'prompts[{i}]')
  policy = engine.policy if exit is None else engine._checked_policy(exit)

  compile_before = engine.compile_seconds
  start = time.perf_counter()
  state = engine.init_decode_state()
  waiting = list(range(len(token_lists)))
  occupant = [None] * engine.slots  # request id per slot, None when free
  results = {}

  def collect(state):
    host = jax.device_get({'done': state.done, 'request': state.request, 'count': state.count,
                           'tokens': state.tokens, 'depths': state.exit_depth})
    finished_before = len(results)
    for slot, request in enumerate(occupant):
      if request is not None and host['done'][slot] and host['request'][slot] == request:
        n = int(host['count'][slot])
        results[request] = (host['tokens'][slot, :n].tolist(),
                            host['depths'][slot, :n].tolist())
        occupant[slot] = None
    if on_finished is not None and len(results) > finished_before:
      on_finished(len(results))

  while waiting or any(r is not None for r in occupant):
    for slot in range(engine.slots):
      if occupant[slot] is None and waiting:
        request = waiting.pop(0)
        prefix = engine.prefill(token_lists[request], exit=policy)
        state = engine.insert(prefix, state, slot, request=request,
                              max_new_tokens=max_new[request], exit=policy)
        occupant[slot] = request
    state = engine.generate(state, chunk_ticks, exit=policy)
    collect(state)
  ticks, live_slot_ticks = (int(x) for x in jax.device_get((state.ticks, state.live_slot_ticks)))
  compile_seconds = engine.compile_seconds - compile_before
  seconds = time.perf_counter() - start - compile_seconds

  tokens = [results[i][0] for i in range(len(token_lists))]
  depths = [results[i][1] for i in range(len(token_lists))]
  stats = _stats(cfg, policy, token_lists, max_new, depths)
  stats.update(tokens_per_second=sum(map(len, tokens)) / max(seconds, 1e-9), seconds=seconds,
               compile_seconds=compile_seconds, ticks=ticks, slots=engine.slots,
               slot_utilisation=live_slot_ticks / max(ticks * engine.slots, 1))
  return ServeOutput(texts=[tokenizer.decode(t) for t in tokens], tokens=tokens,
                     exit_depths=depths, stats=stats)


def kv_cost(cfg) -> str:
  """What the engine's 'propagate' costs (costs.KV_COSTS): shared blocks without LoRA give
  one K/V per block from the frozen state, computed once (engine._propagate)."""
  return 'propagate' if cfg.lora_rank else 'propagate_once'


def _stats(cfg, policy, token_lists, max_new, depths) -> dict:
  """Mean depth and FLOPs against full depth over the decode steps (the first token of a
  request comes from the full-depth prefill), counted as ad.generate counts them."""
  decoded = np.concatenate([np.asarray(d[1:], int) for d in depths] + [np.zeros(0, int)])
  context = float(np.mean([len(t) for t in token_lists]) + np.mean(max_new) / 2.0)
  full = costs.full_depth_flops(cfg, context)
  if not decoded.size:
    return {'mean_depth': float(cfg.num_layers), 'relative_depth': 1.0, 'relative_flops': 1.0}
  if cfg.routing is not None:  # against every token running every recursion
    full = costs.mor_every_recursion_flops(cfg, context)
    spent = costs.mor_decode_flops(cfg, decoded, context)
  else:
    spent = costs.policy_token_flops(cfg, decoded, policy, context, kv=kv_cost(cfg))
  return {'mean_depth': float(decoded.mean()),
          'relative_depth': float(decoded.mean() / cfg.num_layers),
          'relative_flops': float(spent.mean() / full)}
