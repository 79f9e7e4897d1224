"""The decoding groups of the config (generate, serve, benchmark): their checks, and the
parsers of list-valued settings ('1,8', '4x3', '8,64'), so that the code that reads a
setting and `config_lib.validate` agree on its syntax. `config_lib` runs these checks."""
from __future__ import annotations

from adaptive_depth import cli
from adaptive_depth import exits

BENCHMARK_MODES = ('decode', 'engine')


class ConfigError(cli.UserError):
  """A config value that cannot work; the message names the key."""


def parse_list(text: str, kind, key: str) -> list:
  """'1,8' -> [1, 8] for key='config.benchmark.batches'; a ConfigError naming the key."""
  try:
    values = [kind(x) for x in str(text).split(',') if x.strip()]
  except ValueError:
    raise ConfigError(f'{key}={text!r}: expected comma-separated {kind.__name__} values'
                      ) from None
  if not values:
    raise ConfigError(f'{key} is empty')
  return values


def parse_speculative(text: str, key: str = 'config.benchmark.speculative'
                      ) -> list[tuple[int, int]]:
  """'4x4,6x3' -> [(draft_depth 4, num_draft 4), (6, 3)]; '' -> []."""
  settings = []
  for item in (x.strip() for x in str(text).split(',')):
    if not item:
      continue
    try:
      depth, num = item.lower().split('x')
      settings.append((int(depth), int(num)))
    except ValueError:
      raise ConfigError(f"{key}={text!r}: expected entries like '4x3' (draft depth x drafted "
                        'tokens), comma-separated') from None
  return settings


def speculative_head_problems(speculative: str, depths) -> list[str]:
  """With per-exit heads a self-speculative draft must read an exit's own head."""
  try:
    drafts = parse_speculative(speculative)
  except ConfigError:
    return []  # reported with config.benchmark.speculative
  bad = sorted({d for d, _ in drafts if d not in depths})
  if not bad:
    return []
  return [f'config.benchmark.speculative={speculative!r}: draft depth(s) {bad} '
          'are not early exits, whose own heads (config.model.exit_norms / '
          f'exit_adapter_rank) a draft reads; allowed: {list(depths[:-1])}']


def _seed_problems(seed, key: str) -> list[str]:
  try:  # the API's rule, so a seed the config accepts is one generate and serve accept
    cli.check_seed(seed, name=key)
  except cli.UserError as error:
    return [str(error)]
  return []


def generate_problems(g) -> list[str]:
  p = []
  if g.measure not in exits.MEASURES or g.measure == 'oracle':
    allowed = [m for m in exits.MEASURES if m != 'oracle']
    p.append(f'config.generate.measure={g.measure!r}; allowed: {", ".join(allowed)}')
  if g.schedule not in exits.SCHEDULES:
    p.append(f'config.generate.schedule={g.schedule!r}; allowed: {", ".join(exits.SCHEDULES)}')
  p.extend(_seed_problems(g.seed, 'config.generate.seed'))
  threshold = g.threshold
  if not (threshold == 'calibrated' or isinstance(threshold, (int, float)) and
          not isinstance(threshold, bool)):
    p.append(f"config.generate.threshold={threshold!r}: a number, or 'calibrated' (the "
             'threshold launch/calibrate.py wrote to WORKDIR/calibration.json)')
  if g.schedule == 'adaptive':
    if g.kv != 'parallel':
      p.append(f"config.generate.schedule='adaptive' learns from the tokens that catch up "
               f"under config.generate.kv='parallel' (got {g.kv!r})")
    if g.measure not in exits.ADAPTIVE_MEASURES:
      p.append(f"config.generate.measure={g.measure!r} with schedule 'adaptive'; allowed: "
               f'{", ".join(exits.ADAPTIVE_MEASURES)}')
  if not 0 < g.zeta < 1:
    p.append(f'config.generate.zeta={g.zeta}: must be in (0, 1)')
  if g.refit_every < 1:
    p.append(f'config.generate.refit_every={g.refit_every}: must be >= 1')
  if g.kv not in ('propagate', 'parallel'):
    p.append(f"config.generate.kv={g.kv!r}; allowed: propagate, parallel")
  if g.queue_capacity < 1:
    p.append(f'config.generate.queue_capacity={g.queue_capacity}: must be >= 1')
  if g.speculative:
    try:
      if len(parse_speculative(g.speculative, 'config.generate.speculative')) != 1:
        p.append(f"config.generate.speculative={g.speculative!r}: one 'ExK' setting")
    except ConfigError as e:
      p.append(str(e))
    if g.temperature > 0:
      p.append(f'config.generate.speculative={g.speculative!r} decodes greedily: needs '
               f'config.generate.temperature=0 (got {g.temperature})')
  if g.max_new_tokens < 1:
    p.append(f'config.generate.max_new_tokens={g.max_new_tokens}: must be >= 1')
  if g.temperature < 0:
    p.append(f'config.generate.temperature={g.temperature}: must be >= 0 (0 = greedy)')
  if g.top_k < 0:
    p.append(f'config.generate.top_k={g.top_k}: must be >= 0 (0 = no top-k cut)')
  if not 0 < g.top_p <= 1:
    p.append(f'config.generate.top_p={g.top_p}: allowed 0 < top_p <= 1 (1 = no nucleus cut)')
  return p


def benchmark_problems(b, num_layers: int) -> list[str]:
  p = []
  if b.zetas:
    try:
      zetas = parse_list(b.zetas, float, 'config.benchmark.zetas')
      if not all(0 < z < 1 for z in zetas):
        p.append(f'config.benchmark.zetas={b.zetas!r}: each must be in (0, 1)')
      if b.measure not in exits.ADAPTIVE_MEASURES:
        p.append(f'config.benchmark.zetas needs config.benchmark.measure in '
                 f'{", ".join(exits.ADAPTIVE_MEASURES)} (got {b.measure!r})')
    except ConfigError as e:
      p.append(str(e))
  for key, kind in (('batches', int), ('thresholds', float), ('kv', str)):
    try:
      values = parse_list(b[key], kind, f'config.benchmark.{key}')
    except ConfigError as e:
      p.append(str(e))
      continue
    if key == 'batches' and min(values) < 1:
      p.append(f'config.benchmark.batches={b.batches!r}: batch sizes must be >= 1')
    bad = [v for v in values if v not in ('propagate', 'parallel')] if key == 'kv' else []
    if bad:
      p.append(f'config.benchmark.kv={b.kv!r}: unknown {bad}; allowed: propagate, parallel')
  try:
    for depth, num in parse_speculative(b.speculative):
      if not 1 <= depth < num_layers or num < 1:
        p.append(f'config.benchmark.speculative={b.speculative!r}: draft depth must be in '
                 f'1..{num_layers - 1} (config.model.num_layers - 1) and drafted tokens >= 1')
  except ConfigError as e:
    p.append(str(e))
  if b.measure not in exits.MEASURES or b.measure in ('oracle', 'never'):
    p.append(f'config.benchmark.measure={b.measure!r}; allowed: softmax_diff, '
             'softmax_diff_approx, max_prob, neg_entropy, saturation, classifier (the exit '
             'classifier trained in the workdir)')
  p.extend(_seed_problems(b.seed, 'config.benchmark.seed'))
  for key in ('prompt_len', 'max_new_tokens', 'repeats', 'queue_capacity', 'num_requests'):
    if b[key] < 1:
      p.append(f'config.benchmark.{key}={b[key]}: must be >= 1')
  if b.mode not in BENCHMARK_MODES:
    p.append(f'config.benchmark.mode={b.mode!r}; allowed: {", ".join(BENCHMARK_MODES)}')
  try:
    if min(parse_list(b.slots, int, 'config.benchmark.slots')) < 1:
      p.append(f'config.benchmark.slots={b.slots!r}: slot counts must be >= 1')
  except ConfigError as e:
    p.append(str(e))
  for key in ('prompt_lens', 'output_lens'):
    try:
      low, _ = parse_range(b[key], f'config.benchmark.{key}')
      if key == 'output_lens' and low < 2:
        p.append(f'config.benchmark.output_lens={b[key]!r}: min must be >= 2 (the first '
                 'token comes from the prefill; the methods differ from the second on)')
    except ConfigError as e:
      p.append(str(e))
  return p


def parse_range(text: str, key: str) -> tuple[int, int]:
  """'8,64' -> (8, 64), the bounds of a uniform draw; a ConfigError naming the key."""
  values = parse_list(text, int, key)
  if len(values) != 2 or not 1 <= values[0] <= values[1]:
    raise ConfigError(f"{key}={text!r}: expected 'min,max' with 1 <= min <= max")
  return values[0], values[1]


def serve_problems(s) -> list[str]:
  p = [f'config.serve.{key}={s[key]}: must be >= 1' for key in ('slots', 'chunk_ticks')
       if s[key] < 1]
  if s.cache_len < 0:
    p.append(f'config.serve.cache_len={s.cache_len}: must be >= 0 (0 = fit the longest '
             'request)')
  if isinstance(s.prefill_ahead_count, bool) or s.prefill_ahead_count < 0:
    p.append(f'config.serve.prefill_ahead_count={s.prefill_ahead_count}: must be >= 0 (0 = '
             'prefill a prompt only when its slot is free)')
  if not 0 <= s.finish_slots <= s.slots:
    p.append(f'config.serve.finish_slots={s.finish_slots}: allowed 0 (automatic) to '
             f'config.serve.slots={s.slots}')
  return p


def calibrate_problems(c) -> list[str]:
  p = [f'config.calibrate.{key}={c[key]}: must be >= 1'
       for key in ('num_examples', 'prompt_len', 'new_tokens', 'batch_size') if c[key] < 1]
  if c.kv not in ('propagate', 'parallel'):
    p.append(f"config.calibrate.kv={c.kv!r}; allowed: propagate, parallel")
  if not 0 < c.calibration_fraction < 1:
    p.append(f'config.calibrate.calibration_fraction={c.calibration_fraction}: must be in '
             '(0, 1)')
  return p
