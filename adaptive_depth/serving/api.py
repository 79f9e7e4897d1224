"""`Engine`: the depth-wise batching engine's programs for one model, with the shape of
JetStream's engine API (`prefill`, `insert`, `generate`); serving/continuous_batching.py's
`serve` runs a stream of requests through it.

Programs are compiled ahead of time and kept per shape: one `generate` and one `insert` per
(slots, cache_len), one `prefill` per padded prompt length; exit policy values, prompts,
refills and chunk lengths are arguments, not constants, so they compile nothing new.
"""
from __future__ import annotations

import threading
import time
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from adaptive_depth import cli
from adaptive_depth import exits
from adaptive_depth import saved_model
from adaptive_depth.decode import adaptive_decode as decode_lib
from adaptive_depth.decode import sampling as sampling_lib
from adaptive_depth.decode import generation
from adaptive_depth.serving import engine as engine_lib
from adaptive_depth.serving import mor_engine

PROMPT_MULTIPLE = 16  # prompts are padded to a multiple of this: one prefill per multiple


class Engine:
  """The slot table of one model with its compiled programs: `prefill`, `insert`,
  `generate` (JetStream's engine API shape), for (slots, cache_len) fixed at construction.

  exit: the exit policy (default: never exit); its values (threshold, min_depth, ...) are
  traced, so `generate(state, ticks, exit=other)` with the same measure reuses the program.
  sampling: Greedy() (default) or Sampling(temperature, top_k, top_p), traced too; seed: the
  base of every request's random key (a request's tokens depend only on its id, the seed
  and the model, not on the slot it gets); an attribute, read at every insert and generate
  as a traced key, so setting engine.seed compiles nothing. eos_id: the token that ends a
  request (default: the tokenizer's; -1: none, every request runs to its max_new_tokens).
  classifier: the exit classifier's parameters (train/classifier.require_classifier reads
  the ones configs/exit_classifier.py saved), needed by measure 'classifier' and by no other.
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
    self._rng_of_seed = None  # (seed, its key)
    self.seed = seed  # made into a key at first use: nothing runs on device before a request
    self.eos_id = model.tokenizer.eos_id if eos_id is None else eos_id
    if (not isinstance(self.eos_id, (int, np.integer)) or isinstance(self.eos_id, bool)
        or not -1 <= self.eos_id < cfg.vocab_size):
      raise cli.UserError(f'eos_id={self.eos_id!r}: must be an int in -1..{cfg.vocab_size - 1}'
                          ' (-1: no end-of-sequence token)')
    self.compile_seconds = 0.0
    self.compiles = 0  # programs this engine compiled (tests count them)
    # A collections.Counter to wait for every call and add up its seconds by kind
    # ('prefill', 'insert', 'generate'): the stream benchmark's time split, whose pass makes
    # no two calls at once. None: calls are not waited for here (on CPU they run inline
    # by default, host_memory.py; elsewhere they are dispatched and return at once).
    self.call_seconds = None
    self._programs = {}
    self._compiling = threading.Lock()

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
  def seed(self) -> int:
    return self._seed

  @seed.setter
  def seed(self, seed):  # checked when set, so a bad value is refused before any call
    cli.check_seed(seed)
    self._seed = seed

  @property
  def rng(self):
    # Made once per seed value: a key is a small program run on device, a cost at every
    # insert and generate call otherwise.
    if self._rng_of_seed is None or self._rng_of_seed[0] != self.seed:
      self._rng_of_seed = (self.seed, jax.random.key(self.seed))
    return self._rng_of_seed[1]

  @staticmethod
  def _checked_sampling(sampling):
    sampling = sampling or sampling_lib.Greedy()
    sampling_lib.check_sampling(sampling)
    return sampling

  def _compiled(self, name, run, args, donate=()):
    """The program for `run` at these argument shapes, compiled on first use. `donate`:
    argument numbers whose buffers the program may reuse (the decode state: updating it in
    place instead of copying the cache at every call)."""
    # Dtype objects, not their names: naming every leaf's dtype took a quarter of a generate
    # call's host time.
    spec = lambda x: (tuple(getattr(x, 'shape', ())), getattr(x, 'dtype', type(x)))
    key = (name, jax.tree.structure(args), tuple(spec(x) for x in jax.tree.leaves(args)))
    # serve's prefill thread may ask for a program too; a call from the other thread waits
    # here while one compiles.
    with self._compiling:
      if key not in self._programs:
        start = time.perf_counter()
        self._programs[key] = jax.jit(run, donate_argnums=donate).lower(*args).compile()
        self.compile_seconds += time.perf_counter() - start
        self.compiles += 1
    program = self._programs[key]
    if self.call_seconds is None:
      return program
    kind = name if isinstance(name, str) else name[0]

    def waited_for(*call_args):  # each call timed to its end: the split of a stream's time
      start = time.perf_counter()
      out = jax.block_until_ready(program(*call_args))
      self.call_seconds[kind] += time.perf_counter() - start
      return out
    return waited_for

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
    program, args = self._prefill_program(prompt_ids, exit)
    return program(*args)

  def compile_prefill(self, prompt_ids: Sequence[int],
                      exit: Optional[exits.ExitPolicy] = None):
    """Compiles (runs nothing) the prefill program of this prompt's padded length, if it is
    not compiled yet."""
    self._prefill_program(prompt_ids, exit)

  def _prefill_program(self, prompt_ids, exit):
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
      return self._compiled(('prefill', every), run, args), args
    run = lambda params, prompt, length: engine_lib.prefill(cfg, params, prompt, length,
                                                            cache_len)
    args = (self.params, jnp.asarray(prompt[0]), jnp.asarray(lengths[0]))
    return self._compiled('prefill', run, args), args

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
