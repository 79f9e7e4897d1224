"""The engine benchmark (config.benchmark.mode='engine'): one seeded stream of requests, served
four ways at each slot count S of config.benchmark.slots.

  For a Mixture-of-Recursions model, "full depth" is every token through every recursion
  and "exit" is routing by the routers (measure 'router', thresholds: expert choice's
  sigmoid thresholds); FLOPs are costs.mor_decode_flops.

  static        (a) full-depth static batching: the requests in arrival order in batches of
                S; each batch decodes until its longest request is done (rows that finished
                keep computing, as a static-shaped batch does).
  per_row_exit  (b) the same batches with per-row early exit ('propagate'): the depth loop
                of a position runs until the deepest row of the batch has exited.
  engine        (c) the depth-wise batching engine at full depth: continuous batching alone.
  engine_exit   (d) the engine with early exit, each slot at its own depth.

The stream: config.benchmark.num_requests prompts, passages of the bundled validation text
starting at uniformly drawn offsets, with lengths uniform in config.benchmark.prompt_lens and
max_new_tokens uniform in config.benchmark.output_lens (numpy default_rng(seed)); no EOS, so
every request decodes exactly its max_new_tokens and every method produces the same tokens
count. Each method is compiled and warmed up first (compile time reported apart), then the
whole stream is timed config.benchmark.repeats times and the median is kept (this 2-core
machine's run-to-run noise reaches +-20%; every repeat decodes the same tokens, checked).

Per row: tokens_per_second (generated tokens over the stream's wall time, prefill included);
agreement (fraction of decode-step tokens equal to the full model's greedy choice for the
same prefix, from one teacher-forced full-depth pass); sequence_agreement (positions equal to
(a)'s tokens); mean_depth (decode steps); slot_utilisation (fraction of slot-steps spent on a
live token: for (a)/(b) row-positions before each row's own end, for the engine slot-ticks);
theoretical_speedup = decode FLOPs (a) spends / decode FLOPs of the row (for the engine:
its tokens' own FLOPs at their depths, what a perfectly packed table would spend; for (b):
every row of a batch at the deepest row's depth); realized_speedup = tokens/s over (a)'s;
realized_over_theoretical = their ratio. The wall time pays for the prompts, which those
FLOPs leave out, so rows also carry prefill_flops (costs.prefill_flops: (a) prefills every
row padded to the stream's longest prompt rounded up to a multiple of 16, the engine each
prompt to a multiple of PROMPT_MULTIPLE), theoretical_speedup_with_prefill (prompts and
decode FLOPs; a FLOP count, not a time prediction: prefill runs at far more FLOP/s than
decode) and realized_over_theoretical_with_prefill. For decode alone, (a) carries
prefill_seconds (the median of passes of its prefills alone) and engine rows
realized_decode_speedup: (a)'s median seconds less that, over the seconds of the engine's one
time_split pass less its prefill calls; and realized_decode_over_theoretical (over
theoretical_speedup). Mixture-of-Recursions models, whose prefill routes the prompt, get
prefill_flops and prefill_seconds None and no *_with_prefill or decode-alone keys.
Engine rows also carry seconds_without_prefill_ahead (the median of timed passes with
prompts prefilled only when a slot is free, interleaved with the timed passes) and
time_split: one more pass of the stream with every engine call waited for and timed
(prefill, insert, generate, the host's own work; ms per tick).
"""
from __future__ import annotations

import collections
import json
import time
from typing import Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from adaptive_depth import benchmark as decode_benchmark
from adaptive_depth import cli
from adaptive_depth import config_lib
from adaptive_depth import costs
from adaptive_depth import exits
from adaptive_depth import saved_model
from adaptive_depth.calibrate import calibration_file
from adaptive_depth.decode import adaptive_decode as decode_lib
from adaptive_depth.decode import api as decode_api
from adaptive_depth.decode import generation
from adaptive_depth.decode import sampling as sampling_lib
from adaptive_depth.serving import api as serving_api
from adaptive_depth.serving import continuous_batching

NO_EOS = -1


def request_stream(tokenizer, count: int, prompt_lens: tuple, output_lens: tuple, seed: int
                   ) -> tuple[list[list[int]], list[int]]:
  """(prompts as token id lists, max_new_tokens per request), drawn as the module says."""
  ids = decode_benchmark.validation_ids(tokenizer)
  rng = np.random.default_rng(seed)
  lengths = rng.integers(prompt_lens[0], prompt_lens[1] + 1, count)
  starts = rng.integers(0, len(ids) - prompt_lens[1], count)
  outputs = rng.integers(output_lens[0], output_lens[1] + 1, count)
  return ([ids[s:s + n].tolist() for s, n in zip(starts, lengths)],
          [int(n) for n in outputs])


class StaticRun(NamedTuple):
  """static_batches' result: compile seconds; median stream seconds over the repeats; tokens
  and depths per request; per batch the deepest exit depth of each decode step [steps - 1]
  (what every row of that batch computes); the padded prompt length of every row prefilled
  (the last batch's dummies included); and, when asked for, the median seconds of the
  prefills alone (the same batches' prompts, in a pass of their own after the timed ones)."""
  compile_seconds: float
  seconds: float
  tokens: list
  depths: list
  deepest: list
  prefill_lengths: list
  prefill_seconds: Optional[float]


def static_batches(cfg, params, prompts, max_new, slots: int, policy, classifier=None,
                   repeats: int = 1, time_prefill: bool = False) -> StaticRun:
  """Decodes the stream in arrival-order batches of `slots` (the last one filled with
  one-token dummies) with generation.generate_tokens."""
  prompt, lengths = decode_lib.pad_prompts(prompts, pad_id=0)
  longest = max(max_new)
  count = len(prompts)
  padded = -(-count // slots) * slots
  prompt = np.concatenate([prompt, np.repeat(prompt[:1], padded - count, 0)])
  lengths = np.concatenate([lengths, np.repeat(lengths[:1], padded - count)])
  budgets = np.asarray(max_new + [1] * (padded - count), np.int32)

  def run(params, prompt, lengths, budgets, policy, classifier):
    return generation.generate_tokens(
        cfg, params, prompt, lengths, max_new_tokens=longest, policy=policy,
        sampling=sampling_lib.Greedy(), rng=jax.random.key(0), eos_id=NO_EOS, pad_id=0,
        kv='propagate', row_max_new=budgets, classifier=classifier)

  batch = lambda i: (params, jnp.asarray(prompt[i:i + slots]),
                     jnp.asarray(lengths[i:i + slots]), jnp.asarray(budgets[i:i + slots]),
                     policy, classifier)
  start = time.perf_counter()
  compiled = jax.jit(run).lower(*batch(0)).compile()
  compile_seconds = time.perf_counter() - start
  jax.block_until_ready(compiled(*batch(0)))  # warm-up

  def timed(program, inputs):  # median seconds of `repeats` passes over the batches
    runs = []
    for _ in range(repeats):
      start = time.perf_counter()
      outs = [jax.block_until_ready(program(*inputs(i))) for i in range(0, padded, slots)]
      runs.append(time.perf_counter() - start)
    return float(np.median(runs)), outs

  seconds, outs = timed(compiled, batch)
  prefill_seconds = None
  if time_prefill:  # the prefill generate_tokens starts with, at its cache length
    cache_len = prompt.shape[1] + longest + 1
    prefill = jax.jit(lambda params, prompt, lengths: decode_lib.prefill(
        cfg, params, prompt, lengths, cache_len))
    prefill_inputs = lambda i: batch(i)[:3]
    jax.block_until_ready(prefill(*prefill_inputs(0)))  # compile and warm up
    prefill_seconds, _ = timed(prefill, prefill_inputs)
  tokens, depths, deepest = [], [], []
  for out, i in zip(outs, range(0, padded, slots)):
    rows = min(slots, count - i)
    t, d = np.asarray(out.tokens), np.asarray(out.exit_depth)
    for r in range(rows):
      tokens.append(t[r, :max_new[i + r]].tolist())
      depths.append(d[r, :max_new[i + r]].tolist())
    steps = max(max_new[i:i + rows])
    deepest.append(d[:, 1:steps].max(0))  # the batch computes every row to this depth
  return StaticRun(compile_seconds, seconds, tokens, depths, deepest,
                   [prompt.shape[1]] * padded, prefill_seconds)


def _time_split(model, prompts, max_new, policy, engine, chunk_ticks, tokens) -> dict:
  """Where the engine's time goes: one more pass of the stream in which every engine call is
  waited for and timed, and each prompt is prefilled only when its slot is free (timed
  calls cannot overlap). Seconds in prefill, insert, generate (the device loops) and the
  host's own work, ticks, and ms per tick of the device loops. tokens: what the timed passes
  decoded (this pass must decode the same)."""
  engine.call_seconds = collections.Counter()
  try:
    out = continuous_batching.serve(model, prompts, max_new_tokens=max_new, exit=policy,
                                    engine=engine, chunk_ticks=chunk_ticks,
                                    prefill_ahead_count=0)
    split = {f'{kind}_seconds': engine.call_seconds[kind]
             for kind in ('prefill', 'insert', 'generate')}
  finally:
    engine.call_seconds = None
  assert out.tokens == tokens, 'the time-split pass decoded other tokens'
  split.update(seconds=out.stats['seconds'],
               host_seconds=out.stats['seconds'] - sum(split.values()),
               ticks=out.stats['ticks'],
               ms_per_tick=1e3 * split['generate_seconds'] / max(out.stats['ticks'], 1))
  return split


def teacher_forced_choices(cfg, params, prompts, tokens, rows_per_call: int = 16):
  """Per request, the full model's greedy choice at each generated position given the
  generated prefix (right-padded batches: causal attention ignores the padding)."""
  width = max(len(p) + len(t) for p, t in zip(prompts, tokens))
  width = serving_api.padded_length(width)
  choices = []
  for i in range(0, len(prompts), rows_per_call):
    group = list(zip(prompts[i:i + rows_per_call], tokens[i:i + rows_per_call]))
    sequence = np.zeros((rows_per_call, width), np.int32)
    for r, (p, t) in enumerate(group):
      sequence[r, :len(p) + len(t)] = p + t
    argmax = np.asarray(decode_benchmark.last_exit_argmax(cfg, params,
                                                           jnp.asarray(sequence)))
    choices += [argmax[r, len(p) - 1:len(p) - 1 + len(t)].tolist()
                for r, (p, t) in enumerate(group)]
  return choices


def run_engine_benchmark(config, workdir: str, out_path: str,
                         progress: Callable[[str], None] = print) -> list[dict]:
  """Runs the four methods at every slot count and threshold; writes the rows to out_path
  (JSON) and a plot beside it. Returns the rows."""
  b = config_lib.validate(config).benchmark
  cli.check_output_path('--out', out_path)
  slot_counts = config_lib.parse_list(b.slots, int, 'config.benchmark.slots')
  calibration_source = calibration_file.source(config, workdir)
  thresholds = calibration_file.resolve_thresholds(
      config, workdir, b.measure,
      config_lib.parse_list(b.thresholds, float, 'config.benchmark.thresholds'), progress,
      kv_policies=['propagate'])  # the engine's
  prompt_lens = config_lib.parse_range(b.prompt_lens, 'config.benchmark.prompt_lens')
  output_lens = config_lib.parse_range(b.output_lens, 'config.benchmark.output_lens')
  model = saved_model.load(workdir)
  cfg = model.model_config
  if cfg.routing is not None and b.measure != 'router':
    raise cli.UserError(f'config.benchmark.measure={b.measure!r}: a Mixture-of-Recursions model '
                        "decodes with its routers; set it to 'router' (thresholds: expert "
                        "choice's sigmoid thresholds)")
  classifier = (decode_api.saved_classifier(model, workdir) if b.measure == 'classifier'
                else None)
  serving_api.check_engine_args(cfg, slots=max(slot_counts), cache_len=2, kv='propagate')
  prompts, max_new = request_stream(model.tokenizer, b.num_requests, prompt_lens, output_lens,
                                    b.seed)
  policies = [(None, exits.ExitPolicy(measure='never'))] + [
      (t, exits.ExitPolicy(measure=b.measure, threshold=t)) for t in thresholds]
  if cfg.routing is not None:  # Mixture-of-Recursions: (a) and (c) run every recursion
    policies = [(None, exits.ExitPolicy(measure='never'))] + [
        (t, exits.ExitPolicy(measure='router', threshold=t)) for t in thresholds]
  for _, policy in policies:
    serving_api.check_policy(cfg, policy)
  generated = sum(max_new)
  context = float(np.mean([len(p) for p in prompts]) + np.mean(max_new) / 2.0)
  full = costs.full_depth_flops(cfg, context)

  def token_flops(depths, policy, kv):
    """FLOPs of tokens decoded at these loop depths under `policy`."""
    if cfg.routing is not None:
      return costs.mor_decode_flops(cfg, depths, context)
    return costs.policy_token_flops(cfg, depths, policy, context, kv=kv)

  if cfg.routing is not None:
    full = costs.mor_every_recursion_flops(cfg, context)
  cache_len = serving_api.padded_length(max(max(len(p) + n for p, n in zip(prompts, max_new)),
                                             prompt_lens[1]))
  progress(f'Engine benchmark: {b.num_requests} requests, prompts {prompt_lens[0]}-'
           f'{prompt_lens[1]} tokens, outputs {output_lens[0]}-{output_lens[1]} tokens '
           f'(seed {b.seed}; {generated} tokens in all), {cfg.num_layers} steps over '
           f'{cfg.num_blocks} block(s), measure {b.measure}, on {jax.devices()[0].platform}')
  rows, static_choices = [], {}

  def static_row_of(slots):  # (a)'s row at this slot count, once recorded
    return next((r for r in rows if r['slots'] == slots and r['mode'] == 'static'), None)

  def record(mode, slots, threshold, tokens, depths, seconds, compile_s, flops, utilisation,
             reference, prefill_lengths):
    decoded = np.concatenate([np.asarray(d[1:], int) for d in depths])
    if tokens == reference and slots in static_choices:  # full depth: (a)'s tokens again
      mine = static_choices[slots]
    else:
      mine = teacher_forced_choices(cfg, model.params, prompts, tokens)
    if mode == 'static':
      static_choices[slots] = mine
    agree = np.concatenate([np.asarray(t[1:]) == np.asarray(c[1:])
                            for t, c in zip(tokens, mine)]).mean()
    same = np.concatenate([np.asarray(t) == np.asarray(r)
                           for t, r in zip(tokens, reference or tokens)]).mean()
    tps = generated / seconds
    static_row = static_row_of(slots)
    if cfg.routing is not None:  # recursions run per decode step
      recursions = (decoded - 2) / (cfg.num_blocks - 2)
    row = {'mode': mode, 'policy': mode, 'slots': slots, 'batch': slots,
           'threshold': threshold, 'measure': None if threshold is None else b.measure,
           'threshold_source': None if threshold is None else calibration_source,
           'tokens_per_second': tps, 'seconds': seconds, 'compile_seconds': compile_s,
           'agreement': float(agree), 'sequence_agreement': float(same),
           'mean_depth': float(decoded.mean()), 'slot_utilisation': float(utilisation),
           'flops': float(flops),
           'theoretical_speedup': static_row['flops'] / flops if static_row else 1.0,
           'realized_speedup': tps / static_row['tokens_per_second'] if static_row else 1.0,
           'requests': b.num_requests, 'tokens': generated}
    row['realized_over_theoretical'] = row['realized_speedup'] / row['theoretical_speedup']
    # The prompts' FLOPs too, which the stream's wall time (prefill included) pays for; not
    # for Mixture-of-Recursions models, whose prefill routes the prompt.
    row['prefill_flops'] = (None if cfg.routing is not None
                            else costs.prefill_flops(cfg, prefill_lengths))
    if row['prefill_flops'] is not None:
      base = static_row or row  # (a) itself: a ratio of 1
      row['theoretical_speedup_with_prefill'] = (
          (base['flops'] + base['prefill_flops']) / (flops + row['prefill_flops']))
      row['realized_over_theoretical_with_prefill'] = (
          row['realized_speedup'] / row['theoretical_speedup_with_prefill'])
    if cfg.routing is not None:
      # Per token: every recursion's decode FLOPs over those this row's tokens spent (no
      # static-batching padding counted), and the realized speedup over it.
      per_token = full / float(costs.mor_decode_flops(cfg, decoded, context).mean())
      row.update(mean_recursions=float(recursions.mean()),
                 per_token_theoretical_speedup=per_token,
                 realized_over_per_token_theoretical=row['realized_speedup'] / per_token)
    rows.append(row)
    shown = '-' if threshold is None else threshold
    progress(f'  {slots:>2} slots  {mode:<12} threshold {shown:<5} '
             f'{tps:8.1f} tok/s  depth {row["mean_depth"]:5.2f}  utilisation '
             f'{utilisation:.3f}  speedup over static {row["realized_speedup"]:.2f}x (theory '
             f'{row["theoretical_speedup"]:.2f}x)  agreement {agree:.3f}  (compile '
             f'{compile_s:.1f} s)')

  for slots in slot_counts:
    static_tokens = None
    for threshold, policy in policies:
      # (a)'s prefills timed apart, for decode alone (not for Mixture-of-Recursions models,
      # whose static batches prefill with routing: prefill_flops is None for them too).
      static = static_batches(cfg, model.decode_params, prompts, max_new, slots, policy,
                              classifier, b.repeats,
                              time_prefill=threshold is None and cfg.routing is None)
      compile_s, seconds = static.compile_seconds, static.seconds
      tokens, depths, deepest = static.tokens, static.depths, static.deepest
      positions = sum(slots * (len(d) + 1) for d in deepest)
      utilisation = generated / positions
      if threshold is None:
        static_tokens = tokens
        flops = sum(slots * len(d) for d in deepest) * full
        record('static', slots, None, tokens, depths, seconds, compile_s, flops, utilisation,
               tokens, static.prefill_lengths)
        rows[-1]['prefill_seconds'] = static.prefill_seconds
      else:
        flops = sum(slots * token_flops(d, policy, 'propagate').sum() for d in deepest)
        record('per_row_exit', slots, threshold, tokens, depths, seconds, compile_s, flops,
               utilisation, static_tokens, static.prefill_lengths)
    engine = serving_api.Engine(model, slots=slots, cache_len=cache_len, eos_id=NO_EOS,
                                finish_slots=min(config.serve.finish_slots, slots),
                                classifier=classifier)
    kv_cost = continuous_batching.kv_cost(cfg)
    for threshold, policy in policies:
      compile_before = engine.compile_seconds
      # Warm-up: insert, generate and the prefills of the first prompts (serve compiles the
      # other prefill lengths it needs before its clock starts).
      continuous_batching.serve(model, prompts[:slots * 2], max_new_tokens=max_new[:slots * 2],
                                exit=policy, engine=engine)

      def stream(**options):
        return continuous_batching.serve(model, prompts, max_new_tokens=max_new, exit=policy,
                                         engine=engine, chunk_ticks=config.serve.chunk_ticks,
                                         **options)

      # Interleaved: as config.serve says (by default prompts prefilled ahead on their own
      # thread) and with prefills only when a slot is free, for the ratio of the two (the
      # same passes when config.serve says 0).
      ahead = config.serve.prefill_ahead_count
      pairs = [(run, run if ahead == 0 else stream(prefill_ahead_count=0))
               for run in (stream(prefill_ahead_count=ahead) for _ in range(b.repeats))]
      runs = [default for default, _ in pairs]
      out = runs[-1]
      assert all(r.tokens == out.tokens for pair in pairs for r in pair), (
          'a repeat decoded other tokens')
      decoded = np.concatenate([np.asarray(d[1:], int) for d in out.exit_depths])
      flops = token_flops(decoded, policy, kv_cost).sum()
      record('engine' if threshold is None else 'engine_exit', slots, threshold, out.tokens,
             out.exit_depths, float(np.median([r.stats['seconds'] for r in runs])),
             engine.compile_seconds - compile_before,
             flops,
             out.stats['slot_utilisation'], static_tokens,
             [serving_api.padded_length(len(p)) for p in prompts])
      rows[-1]['prefill_ahead_count'] = ahead
      rows[-1]['seconds_without_prefill_ahead'] = float(
          np.median([without.stats['seconds'] for _, without in pairs]))
      split = rows[-1]['time_split'] = _time_split(model, prompts, max_new, policy, engine,
                                                   config.serve.chunk_ticks, out.tokens)
      # Decode alone: each method's seconds without its prefills (for (a) its prefill pass
      # apart, for the engine the waited pass less its prefill calls), against the decode
      # FLOPs' theoretical speedup.
      static_row = static_row_of(slots)
      if static_row['prefill_seconds'] is not None:
        decode_seconds = split['seconds'] - split['prefill_seconds']
        rows[-1]['realized_decode_speedup'] = (
            (static_row['seconds'] - static_row['prefill_seconds']) / decode_seconds)
        rows[-1]['realized_decode_over_theoretical'] = (
            rows[-1]['realized_decode_speedup'] / rows[-1]['theoretical_speedup'])
      progress(f'      {rows[-1]["seconds"]:.2f} s, without prefills ahead '
               f'{rows[-1]["seconds_without_prefill_ahead"]:.2f} s; each call waited for: '
               f'{split["seconds"]:.2f} s = prefill '
               f'{split["prefill_seconds"]:.2f} + insert {split["insert_seconds"]:.2f} + '
               f'generate {split["generate_seconds"]:.2f} ({split["ms_per_tick"]:.3f} ms a '
               f'tick) + host {split["host_seconds"]:.2f}')
      if 'realized_decode_speedup' in rows[-1]:
        progress(f'      decode alone {rows[-1]["realized_decode_speedup"]:.2f}x over static '
                 f'batching\'s (theory {rows[-1]["theoretical_speedup"]:.2f}x)')
  with open(out_path, 'w') as f:
    json.dump(rows, f, indent=1)
  plot_path = out_path.rsplit('.', 1)[0] + '.png'
  decode_benchmark.plot_rows(rows, plot_path, f'{cfg.num_layers} steps, {cfg.num_blocks} '
                             f'block(s), width {cfg.width}', baseline='static batching (a)')
  progress(f'Wrote {out_path} and {plot_path}')
  return rows
