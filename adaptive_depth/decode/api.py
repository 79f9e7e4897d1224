"""`generate(model, prompts, ...)`: text in, text out, with each token's exit depth and stats."""
from __future__ import annotations

import dataclasses
import time
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from adaptive_depth import cli
from adaptive_depth import config_lib
from adaptive_depth import costs
from adaptive_depth import exits
from adaptive_depth import saved_model
from adaptive_depth.calibrate import calibration_file
from adaptive_depth.decode import adaptive_decode as decode_lib
from adaptive_depth.decode import generation
from adaptive_depth.decode import sampling as sampling_lib
from adaptive_depth.decode import speculative as speculative_lib
from adaptive_depth.train import classifier as classifier_lib


@dataclasses.dataclass(frozen=True)
class GenerateOutput:
  """texts: decoded continuations; tokens / exit_depths: per row, the generated ids and the
  depth each left the loop at (the first comes from the full-depth prefill); stats: mean
  depth, tokens/s (compile excluded), compile seconds, FLOPs relative to full depth."""
  texts: list
  tokens: list
  exit_depths: list
  stats: dict


_PROGRAMS: dict = {}  # (static settings, argument structure and shapes) -> compiled program


def _program(static, run, args):
  """The compiled program for these static settings and argument shapes, compiling it on
  first use: thresholds, sampling knobs, seeds and prompts of the same padded length reuse
  it. Returns (program, compile seconds: 0.0 when reused)."""
  spec = lambda x: (tuple(getattr(x, 'shape', ())), str(getattr(x, 'dtype', type(x))))
  key = (static, jax.tree.structure(args), tuple(spec(x) for x in jax.tree.leaves(args)))
  if key in _PROGRAMS:
    return _PROGRAMS[key], 0.0
  start = time.perf_counter()
  _PROGRAMS[key] = jax.jit(run).lower(*args).compile()
  return _PROGRAMS[key], time.perf_counter() - start


def _prompt_ids(prompts, tokenizer, vocab_size: int) -> list[list[int]]:
  """Token ids per prompt. Strings go through the tokenizer (with the BOS it adds, if
  any); token id lists are used as given, as transformers' generate does."""
  form = ('prompts must be a list of strings (a batch), e.g. ["To be"], or a list of token '
          'id lists / 1-D integer arrays, e.g. [[1, 84, 111]]')
  if not isinstance(prompts, (list, tuple)):
    raise TypeError(f'{form}; got {type(prompts).__name__}')
  if not prompts:
    raise ValueError(f'prompts is empty: {form}')
  is_text = [isinstance(p, str) for p in prompts]
  if all(is_text):
    for row, text in enumerate(prompts):
      if not text:
        raise ValueError(f'prompts[{row}] is an empty string: every prompt needs text')
    return [tokenizer.encode(text) for text in prompts]
  if any(is_text):
    raise TypeError(f'prompts mixes strings and token ids: {form}, not both')
  token_lists = []
  for row, ids in enumerate(prompts):
    try:
      array = np.asarray(ids) if isinstance(ids, (list, tuple, np.ndarray)) else None
    except ValueError:  # ragged nesting
      array = None
    if array is not None and array.ndim == 1 and not array.size:
      raise ValueError(f'prompts[{row}] is empty: every prompt needs at least one token id')
    if array is None or array.ndim != 1 or not np.issubdtype(array.dtype, np.integer):
      raise TypeError(f'prompts[{row}]={ids!r}: {form}')
    outside = array[(array < 0) | (array >= vocab_size)]
    if outside.size:
      raise ValueError(f'prompts[{row}] holds token id {int(outside[0])}; allowed: '
                       f'0..{vocab_size - 1} (the model\'s vocab_size - 1)')
    token_lists.append(array.tolist())
  return token_lists


def _speculative_setting(speculative) -> tuple[int, int]:
  """speculative as (draft_depth, num_draft) Python ints (hashable: it keys the compiled
  program), from any 2-sequence of ints."""
  is_int = lambda x: isinstance(x, (int, np.integer)) and not isinstance(x, (bool, np.bool_))
  is_pair = (isinstance(speculative, (list, tuple)) or
             isinstance(speculative, np.ndarray) and speculative.ndim == 1)
  if not (is_pair and len(speculative) == 2 and all(is_int(x) for x in speculative)):
    raise ValueError(f'speculative={speculative!r}: expected two ints (draft_depth E, '
                     'num_draft k), e.g. (2, 3)')
  return int(speculative[0]), int(speculative[1])


def generate_from_config(model, prompts, config, *, workdir: Optional[str] = None
                         ) -> GenerateOutput:
  """`generate` with the settings of `config.generate` (what launch/generate.py runs);
  the config is validated first, so bad settings are refused before anything compiles.

  config.generate.measure='classifier' reads the exit classifier that the
  configs/exit_classifier.py stage trained for this model into WORKDIR/exit_classifier/
  (where evaluation finds it too), and config.generate.threshold='calibrated' reads
  WORKDIR/calibration.json: pass `workdir`.
  """
  config_lib.validate(config)
  g = config.generate
  if g.speculative:
    return generate(model, prompts, max_new_tokens=g.max_new_tokens,
                    speculative=config_lib.parse_speculative(g.speculative)[0])
  step = model.step if isinstance(model, saved_model.LoadedModel) else None
  policy, sampling = policy_and_sampling(g, workdir, step)
  classifier = saved_classifier(model, workdir) if g.measure == 'classifier' else None
  return generate(model, prompts, max_new_tokens=g.max_new_tokens, exit=policy, kv=g.kv,
                  queue_capacity=g.queue_capacity, sampling=sampling, seed=g.seed,
                  classifier=classifier)


def check_calibration(g, workdir: Optional[str]):
  """With config.generate.threshold='calibrated': that WORKDIR/calibration.json exists and
  fits config.generate (a UserError otherwise), so entry points fail before loading."""
  if g.threshold == 'calibrated' and g.measure != 'never':
    calibration_file.calibrated_threshold(workdir, g.measure, progress=lambda _: None,
                                          kv=g.kv)


def policy_and_sampling(g, workdir: Optional[str] = None,
                        model_step: Optional[int] = None) -> tuple[exits.ExitPolicy, Any]:
  """The exit policy and the sampling of a validated config.generate group. Threshold
  'calibrated' reads WORKDIR/calibration.json (launch/calibrate.py), which must have been
  made under the same KV policy (and, given model_step, for that checkpoint); where no
  threshold passed calibration the policy never exits."""
  measure, threshold = g.measure, g.threshold
  if threshold == 'calibrated' and measure != 'never':
    threshold = calibration_file.calibrated_threshold(workdir, measure, kv=g.kv,
                                                      model_step=model_step)
    if threshold is None:
      measure, threshold = 'never', 1.0
  policy = exits.ExitPolicy(measure=measure, schedule=g.schedule,
                            threshold=1.0 if threshold == 'calibrated' else threshold,
                            tau=g.tau, min_depth=g.min_depth, zeta=g.zeta,
                            refit_every=g.refit_every,
                            per_row_statistics=g.per_row_statistics)
  sampling = (sampling_lib.Greedy() if g.temperature == 0 else
              sampling_lib.Sampling(temperature=g.temperature, top_k=g.top_k, top_p=g.top_p))
  return policy, sampling


def saved_classifier(model, workdir: Optional[str]):
  """The exit classifier parameters saved in `workdir` for this model."""
  train_it = ('train it with python launch/train.py --config=configs/exit_classifier.py '
              f'--workdir={workdir or "DIR"}')
  if workdir is None:
    raise cli.UserError("config.generate.measure='classifier' reads the exit classifier "
                        "saved in the model's workdir: pass generate_from_config(..., "
                        f'workdir=DIR) ({train_it})')
  # A model made from a parameter pytree has no checkpoint step to match the classifier to.
  step = model.step if isinstance(model, saved_model.LoadedModel) and model.step >= 0 else None
  return classifier_lib.require_classifier(workdir, model_step=step)


def generate(model, prompts, *args, max_new_tokens: int = 64,
             exit: Optional[exits.ExitPolicy] = None, kv: str = 'propagate',
             queue_capacity: int = 8, sampling: Any = None, seed: int = 0,
             classifier=None, speculative: Optional[Sequence[int]] = None) -> GenerateOutput:
  """Generates a continuation of each prompt (a batch, ragged lengths allowed).

  Called as generate(model, prompts, ...) with model = ad.load(workdir), or as
  generate(params, config, prompts, ...) with a parameter pytree and its run config (which
  copies the blocks into the decode layout on every call; for repeated calls keep
  model = saved_model.from_params(params, config), which makes it once).
  prompts: a list of strings (tokenized, with the BOS the tokenizer adds, if any), or a
  list of token id lists / 1-D integer arrays, used as given (nothing added).
  exit: the early-exit policy (default: never exit).
  kv: KV policy for the layers a token skipped, one of generation.KV_POLICIES: 'propagate'
  (CALM state propagation) or 'parallel' (queued tokens catch up in the next deep pass; at
  most queue_capacity per row). sampling: Greedy() (default) or
  Sampling(temperature, top_k, top_p). classifier: exit classifier parameters, for
  exit.measure == 'classifier'. speculative=(E, k): greedy self-speculative decoding
  instead (draft k tokens with the first E layers, verify at full depth; exact).
  """
  if not isinstance(model, saved_model.LoadedModel):
    if len(args) != 1:
      raise TypeError('generate(params, config, prompts, ...) or generate(model, prompts, ...)'
                      ' with model = adaptive_depth.load(workdir)')
    model, prompts = saved_model.from_params(model, prompts), args[0]
  elif args:
    raise TypeError(f'generate(model, prompts, ...): unexpected positional arguments {args}')
  cfg, tokenizer = model.model_config, model.tokenizer
  token_lists = _prompt_ids(prompts, tokenizer, cfg.vocab_size)
  generation.check_kv_policy(kv, queue_capacity, exit)
  if max_new_tokens < 1:
    raise ValueError(f'max_new_tokens={max_new_tokens}: must be >= 1')
  policy = (exit or generation.default_policy(cfg)).validated(cfg.exit_depths)
  generation.check_routing(cfg, policy, kv)
  if policy.schedule == 'decaying':
    policy = policy.replace(max_len=max_new_tokens)
  if policy.measure == 'classifier' and classifier is None:
    raise ValueError("ExitPolicy.measure='classifier' needs classifier= (the parameters "
                     'configs/exit_classifier.py trains)')
  sampling = sampling or sampling_lib.Greedy()
  sampling_lib.check_sampling(sampling)
  cli.check_seed(seed)
  prompt, lengths = decode_lib.pad_prompts(token_lists, pad_id=tokenizer.eos_id)

  if speculative is not None and cfg.routing is not None:
    raise ValueError('speculative=(E, k) drafts with the first E layers of an early-exit model; '
                     'a Mixture-of-Recursions model has no early exits to draft with')
  if speculative is not None:
    speculative = _speculative_setting(speculative)
    draft_depth, num_draft = speculative
    speculative_lib.validate_args(cfg, draft_depth, num_draft)
    if exit is not None or not isinstance(sampling, sampling_lib.Greedy) or kv != 'propagate':
      raise ValueError('speculative=(E, k) decodes greedily at full-depth quality: leave exit=,'
                       ' kv= and sampling= unset')

  def run(params, prompt, lengths, policy, sampling, rng, classifier):
    if speculative is not None:
      return speculative_lib.generate_speculative(
          cfg, params, prompt, lengths, max_new_tokens=max_new_tokens,
          draft_depth=draft_depth, num_draft=num_draft, eos_id=tokenizer.eos_id,
          pad_id=tokenizer.eos_id)
    return generation.generate_tokens(
        cfg, params, prompt, lengths, max_new_tokens=max_new_tokens, policy=policy,
        sampling=sampling, rng=rng, eos_id=tokenizer.eos_id, pad_id=tokenizer.eos_id,
        classifier=classifier, kv=kv, queue_capacity=queue_capacity)

  args = (model.decode_params, jnp.asarray(prompt), jnp.asarray(lengths), policy, sampling,
          jax.random.key(seed), classifier)
  static = (cfg, max_new_tokens, kv, queue_capacity, speculative, tokenizer.eos_id)
  compiled, compile_seconds = _program(static, run, args)
  start = time.perf_counter()
  out = jax.block_until_ready(compiled(*args))
  seconds = time.perf_counter() - start

  counts = np.asarray(out.num_generated)
  batch = len(token_lists)
  tokens = [np.asarray(out.tokens[b, :counts[b]]).tolist() for b in range(batch)]
  depths = [np.asarray(out.exit_depth[b, :counts[b]]).tolist() for b in range(batch)]
  # The first token of each row comes from the full-depth prefill, not from the depth loop:
  # depth statistics and FLOPs cover the decode steps (the full-depth cost when there are
  # none).
  decoded = np.concatenate([np.asarray(d[1:]) for d in depths] + [np.zeros(0, int)])
  context = float(np.mean(lengths)) + max_new_tokens / 2.0
  full = costs.full_depth_flops(cfg, context)
  if cfg.routing is not None:  # against every token running every recursion
    full = costs.mor_every_recursion_flops(cfg, context)
  if cfg.routing is not None and decoded.size:
    spent = costs.mor_decode_flops(cfg, decoded, context).mean()
  elif speculative is not None:
    spent = full * float(np.mean(speculative_lib.speculative_flops(
        cfg, np.asarray(out.rounds), num_draft, draft_depth, counts, context)))
  elif decoded.size:
    spent = costs.policy_token_flops(cfg, decoded, policy, context, kv=kv).mean()
  else:
    spent, decoded = full, np.full(1, cfg.num_layers)
  stats = {
      'mean_depth': float(decoded.mean()),
      'relative_depth': float(decoded.mean() / cfg.num_layers),
      'relative_flops': float(spent / full),
      'tokens_per_second': float(counts.sum() / seconds),
      'seconds': seconds,
      'compile_seconds': compile_seconds,
      'batch': batch,
  }
  return GenerateOutput(texts=[tokenizer.decode(t) for t in tokens], tokens=tokens,
                        exit_depths=depths, stats=stats)
