"""Decode benchmark: full depth vs early exit (each KV policy, several thresholds) vs
self-speculative decoding, at several batch sizes, on one trained model.

Every setting is compiled once (compile time reported separately), run once to warm up, then
timed `repeats` times; tokens/s is the median. Prompts are equal-length passages of the
bundled corpus's validation part; generation runs for exactly max_new_tokens (no EOS), so
every setting produces the same number of tokens.

Figures per row (see `run_benchmark`): tokens_per_second; mean_depth (decode-step tokens);
theoretical_speedup = full-depth FLOPs / FLOPs spent (costs.py, including confidence checks
and the KV policy's work); realized_speedup = tokens/s over full-depth tokens/s at the same
batch; agreement = fraction of decode-step tokens equal to the full model's greedy choice for
the same prefix (one teacher-forced full-depth pass over the generated text);
sequence_agreement = fraction of positions equal to full-depth greedy generation's output.
At batch > 1, mean_max_depth is the mean over positions of the deepest row: the depth loop
runs until every row has exited, so that is the depth the batch pays for, and
theoretical_speedup_synchronised is the FLOP ratio at that depth. For 'parallel' the FLOPs
are the useful ones: its block calls also carry the empty queue slots (masked).
"""
from __future__ import annotations

import functools
import json
import statistics
import time
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from adaptive_depth import cli
from adaptive_depth import config_lib
from adaptive_depth import costs
from adaptive_depth import exits
from adaptive_depth import model as model_lib
from adaptive_depth import mor
from adaptive_depth import mor_config
from adaptive_depth import saved_model
from adaptive_depth.calibrate import calibration_file
from adaptive_depth.data import tiny_shakespeare
from adaptive_depth.decode import generation
from adaptive_depth.decode import sampling as sampling_lib
from adaptive_depth.decode import speculative
from adaptive_depth.train import classifier as classifier_lib

# (prompt [B, P] ids, max_new_tokens, repeats) -> (tokens [B, max_new_tokens], median seconds)
Reference = Callable[[np.ndarray, int, int], tuple[np.ndarray, float]]


def validation_ids(tokenizer) -> np.ndarray:
  """[N] int32: the bundled corpus's validation part, tokenized (where benchmark prompts
  are cut from)."""
  text = '\n\n'.join(tiny_shakespeare.split_train_validation(
      tiny_shakespeare.read_bundled_corpus())['validation'])
  return np.asarray(tokenizer.encode(text), np.int32)


def benchmark_prompts(tokenizer, batch: int, prompt_len: int) -> np.ndarray:
  """[batch, prompt_len] token ids: passages spread over the bundled validation text."""
  ids = validation_ids(tokenizer)
  if len(ids) < batch * prompt_len * 2:
    raise config_lib.ConfigError(f'config.benchmark.prompt_len={prompt_len} is too long for '
                                 f'batch {batch}: the bundled validation text has {len(ids)} '
                                 'tokens')
  starts = np.linspace(0, len(ids) - prompt_len - 1, batch).astype(int)
  return np.stack([ids[s:s + prompt_len] for s in starts])


def _compile(fn, args):
  """(compiled program, compile seconds)."""
  start = time.perf_counter()
  compiled = jax.jit(fn).lower(*args).compile()
  return compiled, time.perf_counter() - start


def _time(compiled, args, repeats: int):
  """(output, median seconds): one warm-up run, then `repeats` timed runs."""
  out = jax.block_until_ready(compiled(*args))
  runs = []
  for _ in range(repeats):
    start = time.perf_counter()
    out = jax.block_until_ready(compiled(*args))
    runs.append(time.perf_counter() - start)
  return out, statistics.median(runs)


def _timed(fn, args, repeats: int):
  """(output, compile seconds, median run seconds)."""
  compiled, compile_seconds = _compile(fn, args)
  out, seconds = _time(compiled, args, repeats)
  return out, compile_seconds, seconds


def full_depth_choices(cfg: model_lib.ModelConfig, params, prompt, tokens) -> np.ndarray:
  """The full model's greedy choice at every generated position given the generated
  prefix: [B, N] for tokens [B, N] generated after prompt [B, P]."""
  sequence = jnp.concatenate([prompt, tokens[:, :-1]], axis=1)
  return np.asarray(last_exit_argmax(cfg, params, sequence))[:, prompt.shape[1] - 1:]


@functools.partial(jax.jit, static_argnums=0)
def last_exit_argmax(cfg, params, sequence):
  """The last exit's greedy choice at every position of sequence [B, T] -> [B, T] (a
  Mixture-of-Recursions model: with every token through every recursion)."""
  # params is an argument, not a closed-over constant: one compile per shape, and XLA does
  # not constant-fold the weights.
  if cfg.routing is not None:
    every = jnp.full(sequence.shape, cfg.routing.recursions)
    h, _ = mor.forward_masked(cfg, params, sequence, depths=every)
    return jnp.argmax(model_lib.head_logits(cfg, params, h), -1)
  return jnp.argmax(model_lib.forward_train(cfg, params, sequence)[-1], -1)


def run_benchmark(config, workdir: str, out_path: str,
                  progress: Callable[[str], None] = print,
                  transformers_generate: Optional[Reference] = None) -> list[dict]:
  """Benchmarks the model in `workdir` with the settings of config.benchmark; writes the
  rows to out_path (JSON list) and a plot next to it. Returns the rows.

  transformers_generate: the `transformers` library's greedy generate, timed on the same
  prompt at batch 1 as mode 'transformers' (launch/benchmark.py makes it with
  launch/transformers_reference.py when config.benchmark.transformers_source is set).
  """
  b = config_lib.validate(config).benchmark
  cli.check_output_path('--out', out_path)
  mor_config.refuse_routed(config, "launch/benchmark.py's decode mode",
                           'use --config.benchmark.mode=engine with '
                           '--config.benchmark.measure=router')
  batches = config_lib.parse_list(b.batches, int, 'config.benchmark.batches')
  thresholds = calibration_file.resolve_thresholds(
      config, workdir, b.measure,
      config_lib.parse_list(b.thresholds, float, 'config.benchmark.thresholds'), progress,
      kv_policies=config_lib.parse_list(b.kv, str, 'config.benchmark.kv'))
  kv_policies = config_lib.parse_list(b.kv, str, 'config.benchmark.kv')
  zetas = config_lib.parse_list(b.zetas, float, 'config.benchmark.zetas') if b.zetas else []
  calibration_source = calibration_file.source(config, workdir)
  spec_settings = config_lib.parse_speculative(b.speculative)
  for kv in kv_policies:
    generation.check_kv_policy(kv, b.queue_capacity)
  model = saved_model.load(workdir)
  cfg, params = model.model_config, model.params
  decode_params = model.decode_params  # the layout decoding runs fastest on
  classifier = (classifier_lib.require_classifier(workdir, model_step=model.step)
                if b.measure == 'classifier' else None)
  for depth, num in spec_settings:
    speculative.validate_args(cfg, depth, num)
  max_new, measure = b.max_new_tokens, b.measure
  context = b.prompt_len + max_new / 2.0
  full_flops = costs.full_depth_flops(cfg, context)
  progress(f'Benchmark: {model_lib.count_params(params):,} parameters, {cfg.num_layers} layers,'
           f' {max_new} new tokens after {b.prompt_len}-token prompts, median of {b.repeats}'
           f' runs, on {jax.devices()[0].platform}')
  rows = []
  for batch in batches:
    prompt = jnp.asarray(benchmark_prompts(model.tokenizer, batch, b.prompt_len))
    lengths = jnp.full((batch,), b.prompt_len, jnp.int32)

    def generate(params, policy, kv, classifier=None):
      return generation.generate_tokens(
          cfg, params, prompt, lengths, max_new_tokens=max_new, policy=policy,
          sampling=sampling_lib.Greedy(), rng=jax.random.key(0), eos_id=-1, pad_id=0, kv=kv,
          queue_capacity=b.queue_capacity, classifier=classifier)

    def record(mode, policy_name, threshold, out, compile_s, seconds, flops, extra=None):
      tokens = np.asarray(out.tokens)
      decoded = np.asarray(out.exit_depth)[:, 1:]  # token 0 comes from the prefill
      agree = (tokens[:, 1:] == choices_of(out)[:, 1:]).mean()
      tps = batch * max_new / seconds
      row = {
          'mode': mode, 'policy': policy_name, 'batch': batch, 'threshold': threshold,
          'tokens_per_second': tps, 'mean_depth': float(decoded.mean()),
          'theoretical_speedup': float(full_flops / flops),
          'realized_speedup': tps / full_tps if full_tps else 1.0,
          'agreement': float(agree),
          'sequence_agreement': float((tokens == full_tokens).mean()),
          'mean_max_depth': float(decoded.max(0).mean()),
          # What the batch computes: every row runs until the deepest row has exited.
          'theoretical_speedup_synchronised': float(full_flops / costs.token_flops(
              cfg, np.broadcast_to(decoded.max(0), decoded.shape), measure, context,
              kv=policy_name).mean()) if mode in ('early_exit', 'adaptive')
          else float(full_flops / flops),
          'seconds': seconds, 'compile_seconds': compile_s, 'new_tokens': max_new,
          'prompt_len': b.prompt_len,
          'measure': measure if mode in ('early_exit', 'adaptive') else None,
          'threshold_source': calibration_source if mode == 'early_exit' else None,
          **(extra or {})}
      rows.append(row)
      shown = (f'zeta {extra["zeta"]:<6}' if mode == 'adaptive' else
               f'threshold {"-" if threshold is None else threshold:<5}')
      progress(f'  batch {batch:>2} {mode:<11} {policy_name:<10} {shown} '
               f'{tps:8.1f} tok/s  depth {row["mean_depth"]:5.2f}  '
               f'speedup {row["realized_speedup"]:.2f}x (theory '
               f'{row["theoretical_speedup"]:.2f}x)  agreement {agree:.3f}  '
               f'(compile {compile_s:.1f} s)')
      return row

    choices_of = lambda out: full_depth_choices(cfg, params, prompt, out.tokens)
    full_tps = 0.0
    never = exits.ExitPolicy(measure='never')
    out, compile_s, seconds = _timed(lambda p: generate(p, never, 'propagate'), (decode_params,),
                                     b.repeats)
    full_tokens = np.asarray(out.tokens)
    record('full', 'full', None, out, compile_s, seconds, full_flops)
    full_tps = rows[-1]['tokens_per_second']
    rows[-1]['realized_speedup'] = 1.0

    for kv in kv_policies:
      compiled, compile_s = _compile(lambda p, pol, c, kv=kv: generate(p, pol, kv, c), (
          decode_params, exits.ExitPolicy(measure=measure, threshold=thresholds[0]),
          classifier))
      for threshold in thresholds:  # the threshold is traced: one program serves them all
        policy = exits.ExitPolicy(measure=measure, threshold=threshold)
        out, seconds = _time(compiled, (decode_params, policy, classifier), b.repeats)
        depths = np.asarray(out.exit_depth)[:, 1:]
        flops = costs.token_flops(cfg, depths, measure, context, kv=kv).mean()
        record('early_exit', kv, threshold, out, compile_s, seconds, flops)

    if zetas:  # FREE's adaptive threshold (kv 'parallel'); zeta is traced: one compile
      start = max(thresholds) if thresholds else 0.9
      g = config.generate
      adaptive = lambda z: exits.ExitPolicy(
          measure=measure, threshold=start, zeta=z, schedule='adaptive',
          refit_every=g.refit_every, per_row_statistics=g.per_row_statistics)
      compiled, compile_s = _compile(lambda p, pol, c: generate(p, pol, 'parallel', c), (
          decode_params, adaptive(zetas[0]), classifier))
      for zeta in zetas:
        out, seconds = _time(compiled, (decode_params, adaptive(zeta), classifier), b.repeats)
        depths = np.asarray(out.exit_depth)[:, 1:]
        flops = costs.token_flops(cfg, depths, measure, context, kv='parallel').mean()
        record('adaptive', 'parallel', None, out, compile_s, seconds, flops,
               {'zeta': zeta, 'start_threshold': start})

    for depth, num in spec_settings:
      out, compile_s, seconds = _timed(
          lambda p, depth=depth, num=num: speculative.generate_speculative(
              cfg, p, prompt, lengths, max_new_tokens=max_new, draft_depth=depth,
              num_draft=num, eos_id=-1, pad_id=0), (decode_params,), b.repeats)
      relative = speculative.speculative_flops(cfg, np.asarray(out.rounds), num, depth,
                                               np.asarray(out.num_generated), context)
      drafted = np.asarray(out.rounds).sum() * num
      record('speculative', f'E={depth},k={num}', None, out, compile_s, seconds,
             full_flops * float(np.mean(relative)),
             {'draft_depth': depth, 'num_draft': num,
              'acceptance': float(np.asarray(out.accepted_drafts).sum() / max(drafted, 1))})

    if transformers_generate is not None and batch == 1:
      rows.append(_transformers_row(transformers_generate, b, prompt, full_tokens, full_tps,
                                    progress))

  with open(out_path, 'w') as f:
    json.dump(rows, f, indent=1)
  plot_path = out_path.rsplit('.', 1)[0] + '.png'
  plot_rows(rows, plot_path, f'{cfg.num_layers} layers, width {cfg.width}')
  progress(f'Wrote {out_path} and {plot_path}')
  return rows


def _transformers_row(transformers_generate, b, prompt, full_tokens, full_tps,
                      progress) -> dict:
  """The `transformers` library's own greedy generate on the same checkpoint and prompt."""
  tokens, seconds = transformers_generate(np.asarray(prompt), b.max_new_tokens, b.repeats)
  batch = tokens.shape[0]
  tps = batch * b.max_new_tokens / seconds
  row = {'mode': 'transformers', 'policy': 'transformers.generate (torch float32)',
         'batch': batch, 'threshold': None, 'tokens_per_second': tps, 'mean_depth': None,
         'theoretical_speedup': None, 'realized_speedup': tps / full_tps,
         'agreement': None, 'sequence_agreement': float((tokens == full_tokens).mean()),
         'seconds': seconds, 'new_tokens': b.max_new_tokens}
  progress(f'  batch {batch:>2} transformers.generate {tps:8.1f} tok/s  ({tps / full_tps:.2f}x '
           f'this library\'s full-depth decode); same tokens at '
           f'{row["sequence_agreement"]:.3f} of positions')
  return row


def plot_rows(rows: list[dict], path: str, title: str, baseline: str = 'full depth'):
  """Realized speedup (over `baseline`) against agreement, one panel per batch size, one
  series per method."""
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  batches = sorted({r['batch'] for r in rows})
  fig, axes = plt.subplots(1, len(batches), figsize=(5.5 * len(batches), 4.2), squeeze=False)
  for ax, batch in zip(axes[0], batches):
    mine = [r for r in rows if r['batch'] == batch and r['agreement'] is not None]
    for name in dict.fromkeys(f'{r["mode"]}:{r["policy"]}' for r in mine):
      series = [r for r in mine if f'{r["mode"]}:{r["policy"]}' == name]
      marker = {'full': 's', 'static': 's', 'engine': 'D', 'speculative': '^'}.get(
          series[0]['mode'], 'o')
      ax.plot([r['agreement'] for r in series], [r['realized_speedup'] for r in series],
              marker=marker, label=name)
      for r in series:
        if r['threshold'] is not None:
          ax.annotate(f'{r["threshold"]:g}', (r['agreement'], r['realized_speedup']),
                      fontsize=7, xytext=(3, 3), textcoords='offset points')
    ax.axhline(1.0, color='grey', lw=0.6)
    ax.set_xlabel('agreement with full-depth greedy (same prefix)')
    ax.set_ylabel(f'realized speedup (tokens/s vs {baseline})')
    ax.set_title(f'{title}, {"slots" if "slots" in mine[0] else "batch"} {batch}')
    ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
