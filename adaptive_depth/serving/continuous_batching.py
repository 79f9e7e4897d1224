"""`serve(model, prompts, ...)`: continuous batching of a stream of requests over the
depth-wise batching engine (serving/api.Engine).

The host keeps a queue of requests; between chunks of device ticks it collects the
requests that finished and admits waiting ones into the freed slots (prefill, then insert).
Prompts are prefilled on a thread of their own, ahead of the slots that free up, so that
they run beside the chunks of ticks instead of between them.
"""
from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import time
from typing import Callable, Optional, Sequence, Union

import jax
import numpy as np

from adaptive_depth import cli
from adaptive_depth import costs
from adaptive_depth import saved_model
from adaptive_depth import exits
from adaptive_depth.decode import api as decode_api
from adaptive_depth.serving.api import Engine, check_engine_args, padded_length


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
          finish_slots: int = 0, prefill_ahead_count: int = 2) -> ServeOutput:
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
  Engine takes it; 0 = automatic). prefill_ahead_count: waiting prompts prefilled while a
  chunk runs, ready for the slots it frees (0: prefill only when a slot is free; more than
  the engine's slots counts as its slots).
  """
  cfg, tokenizer = model.model_config, model.tokenizer
  token_lists = decode_api._prompt_ids(prompts, tokenizer, cfg.vocab_size)
  max_new = _max_new_list(max_new_tokens, len(token_lists))
  if not isinstance(chunk_ticks, (int, np.integer)) or chunk_ticks < 1:
    raise cli.UserError(f'chunk_ticks={chunk_ticks!r}: must be an int >= 1')
  if (not isinstance(prefill_ahead_count, (int, np.integer))
      or isinstance(prefill_ahead_count, bool) or prefill_ahead_count < 0):
    raise cli.UserError(f'prefill_ahead_count={prefill_ahead_count!r}: must be an int >= 0')
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
  # A chunk of ticks frees at most every slot, and each prefix ahead holds a cache row of its
  # own: more than `slots` ahead would only hold memory.
  prefill_ahead_count = min(prefill_ahead_count, engine.slots)
  for i, (ids, m) in enumerate(zip(token_lists, max_new)):
    engine.check_request(len(ids), m, name=f'prompts[{i}]')
  policy = engine.policy if exit is None else engine._checked_policy(exit)

  compile_before = engine.compile_seconds
  # Every prefill program this stream needs, compiled here before the clock starts: a
  # compile on the prefill thread would overlap the chunks of ticks, and taking its time
  # out of the wall time would then take out more than the stream waited for it.
  for ids in {padded_length(len(ids)): ids for ids in token_lists}.values():
    engine.compile_prefill(ids, exit=policy)
  compile_early = engine.compile_seconds - compile_before
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

  ready = collections.deque()  # (request, future prefix): prompts prefilled ahead of a slot

  def prefill(request):  # on the prefill thread, waited for there
    return jax.block_until_ready(engine.prefill(token_lists[request], exit=policy))

  # Prefills run on a thread of their own, up to prefill_ahead_count of them ahead of the
  # slots that free up: programs called from one thread run one after another on the CPU,
  # from two threads side by side, so the next prompts' prefills use the cores a chunk of
  # ticks leaves idle (docs/engine_benchmark_history.md, Prefills beside the ticks).
  prefiller = concurrent.futures.ThreadPoolExecutor(max_workers=1)
  try:

    def prefill_ahead(count):
      while waiting and len(ready) < count:
        request = waiting.pop(0)
        ready.append((request, prefiller.submit(prefill, request)))

    while waiting or ready or any(r is not None for r in occupant):
      for slot in range(engine.slots):
        if occupant[slot] is None:
          prefill_ahead(1)
          if ready:
            request, prefix = ready.popleft()
            state = engine.insert(prefix.result(), state, slot, request=request,
                                  max_new_tokens=max_new[request], exit=policy)
            occupant[slot] = request
      # Queued before the chunk, so that they run beside it: where CPU programs run inline
      # (host_memory.py), the chunk's call returns only when its ticks are done.
      prefill_ahead(prefill_ahead_count)
      state = engine.generate(state, chunk_ticks, exit=policy)
      collect(state)
  finally:  # on an error, prefills not started yet are dropped, not run
    prefiller.shutdown(wait=True, cancel_futures=True)
  ticks, live_slot_ticks = (int(x) for x in jax.device_get((state.ticks, state.live_slot_ticks)))
  compile_seconds = engine.compile_seconds - compile_before
  seconds = time.perf_counter() - start - (compile_seconds - compile_early)

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
