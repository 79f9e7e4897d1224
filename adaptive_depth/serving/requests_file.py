"""`serve_file`: the job `launch/serve.py` runs. Requests from a file, results as JSONL.

A prompts file is either plain text, one prompt per line (blank lines are skipped; every
request gets config.generate.max_new_tokens), or, when its name ends in .jsonl, one JSON
object per line: {"prompt": "...", "max_new_tokens": 32} (max_new_tokens optional).
"""
from __future__ import annotations

import json
import os
from typing import Callable

import tqdm

from adaptive_depth import cli
from adaptive_depth import config_lib
from adaptive_depth import saved_model
from adaptive_depth.decode import api as decode_api
from adaptive_depth.serving import continuous_batching
from adaptive_depth.serving import engine as engine_lib


def read_requests(path: str, default_max_new: int) -> tuple[list[str], list[int]]:
  """(prompts, max_new_tokens per prompt) from a prompts file; a UserError naming the file
  and line for anything that is not a request."""
  if not os.path.isfile(path):
    raise cli.PathError(f'--prompts={path}: no such file')
  try:
    with open(path, encoding='utf-8') as f:
      lines = f.read().splitlines()
  except UnicodeDecodeError as e:
    raise cli.UserError(f'--prompts={path} is not UTF-8 text ({e.reason} at byte '
                        f'{e.start})') from None
  prompts, max_new = [], []
  jsonl = path.endswith('.jsonl')
  for number, line in enumerate(lines, start=1):
    if not line.strip():
      continue
    where = f'--prompts={path} line {number}'
    if not jsonl:
      prompts.append(line)
      max_new.append(default_max_new)
      continue
    try:
      request = json.loads(line)
    except json.JSONDecodeError as e:
      raise cli.UserError(f'{where}: not JSON ({e.msg}); a .jsonl file holds one object per '
                          'line, {"prompt": "...", "max_new_tokens": 32}') from None
    if not isinstance(request, dict) or not isinstance(request.get('prompt'), str):
      raise cli.UserError(f'{where}: expected {{"prompt": "<text>", "max_new_tokens": N}} '
                          '(max_new_tokens optional)')
    unknown = sorted(set(request) - {'prompt', 'max_new_tokens'})
    if unknown:
      raise cli.UserError(f'{where}: unknown key(s) {unknown}; allowed: prompt, '
                          'max_new_tokens')
    if not request['prompt']:
      raise cli.UserError(f'{where}: the prompt is empty: every request needs text')
    n = request.get('max_new_tokens', default_max_new)
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
      raise cli.UserError(f'{where}: max_new_tokens={n!r}: must be an int >= 1')
    prompts.append(request['prompt'])
    max_new.append(n)
  if not prompts:
    raise cli.UserError(f'--prompts={path} holds no prompts')
  return prompts, max_new


def serve_file(config, workdir: str, prompts_path: str, out_path: str,
               progress: Callable[[str], None] = print) -> continuous_batching.ServeOutput:
  """Serves every request of `prompts_path` with the model in `workdir` through the engine
  (config.serve: slots, chunk_ticks, cache_len, finish_slots, prefill_ahead_count;
  config.generate: exit policy, KV policy, sampling, seed) and writes one JSON object per
  request to `out_path`, in file order: request, prompt, text, tokens, exit_depths. Bad
  settings and malformed requests are refused before the model loads; a request too long for
  the cache, once the model is loaded and before anything compiles."""
  config_lib.validate(config)
  g, s = config.generate, config.serve
  if g.speculative:
    raise config_lib.ConfigError(f'config.generate.speculative={g.speculative!r}: the engine '
                                 "does not draft; set --config.generate.speculative=''")
  if g.kv not in engine_lib.KV_POLICIES:
    raise config_lib.ConfigError(f'config.generate.kv={g.kv!r}: the engine runs '
                                 f'{", ".join(engine_lib.KV_POLICIES)}')
  cli.check_output_path('--out', out_path)
  prompts, max_new = read_requests(prompts_path, g.max_new_tokens)
  decode_api.check_calibration(g, workdir)  # a missing calibration.json fails before loading
  model = saved_model.load(workdir)
  policy, sampling = decode_api.policy_and_sampling(g, workdir, model.step)
  classifier = decode_api.saved_classifier(model, workdir) if g.measure == 'classifier' else None
  bar = tqdm.tqdm(total=len(prompts), unit='request', desc='serving')
  last = [0]

  def finished(count):
    bar.update(count - last[0])
    last[0] = count

  try:
    out = continuous_batching.serve(
        model, prompts, slots=s.slots, max_new_tokens=max_new, exit=policy, kv=g.kv,
        cache_len=s.cache_len or None, chunk_ticks=s.chunk_ticks, sampling=sampling,
        seed=g.seed, classifier=classifier, on_finished=finished,
        finish_slots=s.finish_slots, prefill_ahead_count=s.prefill_ahead_count)
  finally:
    bar.close()
  with open(out_path, 'w', encoding='utf-8') as f:
    for i, (prompt, text) in enumerate(zip(prompts, out.texts)):
      f.write(json.dumps({'request': i, 'prompt': prompt, 'text': text,
                          'tokens': out.tokens[i], 'exit_depths': out.exit_depths[i]}) + '\n')
  st = out.stats
  progress(f'{len(prompts)} requests through {st["slots"]} slots: '
           f'{st["tokens_per_second"]:.1f} tokens/s (compile {st["compile_seconds"]:.1f} s '
           f'excluded), {st["ticks"]} ticks, slot utilisation {st["slot_utilisation"]:.3f}, '
           f'mean depth {st["mean_depth"]:.2f}, FLOPs {st["relative_flops"]:.3f} of full '
           f'depth. Wrote {out_path}')
  return out
