"""config.model.mor: the static description of a Mixture-of-Recursions model's routing, and
its checks (config_lib.validate runs them before anything compiles). routers.py holds the
routers themselves, mor.py the forward."""
from __future__ import annotations

import dataclasses
import math
from typing import Optional

from adaptive_depth import cli

ROUTINGS = ('expert_choice', 'token_choice')
ROUTER_KINDS = ('linear', 'mlp')
KV_KINDS = ('recursion_wise', 'shared')
GATES = ('router', 'pass_through')


@dataclasses.dataclass(frozen=True, kw_only=True)
class RoutingConfig:
  """Static description of a MoR model's routing (config.model.mor)."""
  routing: str                      # one of ROUTINGS
  recursions: int                   # N_r
  capacities: tuple[float, ...]     # per recursion, fractions of T in (0, 1], non-increasing
  kv: str = 'recursion_wise'        # one of KV_KINDS
  router: str = 'linear'            # one of ROUTER_KINDS
  router_hidden: int = 64
  gate: str = 'router'              # one of GATES
  alpha: float = 0.1
  capacity_factor: float = 1.0      # token_choice: capacity over a balanced assignment's
  aux_loss: float = 1e-3            # expert_choice: BCE on top-k membership
  balance_loss: float = 0.1         # token_choice: load balancing
  z_loss: float = 1e-5              # token_choice: mean squared logsumexp of router logits

  def capacity_tokens(self, seq_len: int) -> tuple[int, ...]:
    """Tokens per row that run each recursion, at sequence length T (static)."""
    if self.routing == 'token_choice':
      n = self.recursions
      return tuple(min(seq_len, math.ceil(self.capacity_factor * seq_len * (n - r) / n))
                   for r in range(n))
    return tuple(max(1, min(seq_len, math.ceil(seq_len * c - 1e-9))) for c in self.capacities)


def default_capacities(recursions: int) -> tuple[float, ...]:
  """(N_r - r + 1) / N_r for r = 1..N_r: the paper's schedule, e.g. (1, 2/3, 1/3)."""
  return tuple((recursions - r) / recursions for r in range(recursions))


def parse_capacities(spec: str, recursions: int) -> tuple[float, ...]:
  """'' -> default_capacities; '1,0.5,0.25' -> those. Raises ValueError naming the key."""
  if not str(spec).strip():
    return default_capacities(recursions)
  try:
    values = tuple(float(x) for x in str(spec).split(',') if x.strip())
  except ValueError:
    raise ValueError(f'config.model.mor.capacities={spec!r} is not a comma-separated list '
                     'of fractions such as "1,0.67,0.33"') from None
  if len(values) != recursions:
    raise ValueError(f'config.model.mor.capacities={spec!r} has {len(values)} values; '
                     f'allowed: one per recursion ({recursions}, config.model.mor.recursions)')
  if any(not 0 < v <= 1 for v in values):
    raise ValueError(f'config.model.mor.capacities={spec!r}: each value must be in (0, 1]')
  if any(b > a for a, b in zip(values, values[1:])):
    raise ValueError(f'config.model.mor.capacities={spec!r} increases; allowed: a '
                     'non-increasing schedule (a recursion keeps a subset of the previous one)')
  return values




def from_model_config(model_config) -> Optional[RoutingConfig]:
  """config.model.mor as a RoutingConfig, or None when config.model.mor.routing is ''."""
  mor = model_config.get('mor')
  if mor is None or not mor.routing:
    return None
  return RoutingConfig(
      routing=mor.routing, recursions=mor.recursions,
      capacities=parse_capacities(mor.capacities, mor.recursions), kv=mor.kv,
      router=mor.router, router_hidden=mor.router_hidden, gate=mor.gate, alpha=mor.alpha,
      capacity_factor=mor.capacity_factor, aux_loss=mor.aux_loss,
      balance_loss=mor.balance_loss, z_loss=mor.z_loss)


def config_problems(m) -> list[str]:
  """config.model.mor: a MoR model is a middle_cycle core with N_r recursions."""
  mor = m.mor
  if not mor.routing:
    return []
  if mor.routing not in ROUTINGS:
    return [f'config.model.mor.routing={mor.routing!r}; allowed: \'\' (none), '
            f'{", ".join(ROUTINGS)}']
  p = []
  blocks = m.num_blocks or m.num_layers
  if m.schedule != 'middle_cycle' or blocks < 3:
    p.append(f'config.model.mor.routing={mor.routing!r} routes tokens between recursions of '
             f'shared blocks, but config.model.schedule={m.schedule!r} with '
             f'config.model.num_blocks={m.num_blocks}; allowed: schedule \'middle_cycle\' '
             'with num_blocks >= 3 (unique first and last layers, shared middle)')
  elif (m.num_layers - 2) != mor.recursions * (blocks - 2):
    p.append(f'config.model.mor.recursions={mor.recursions} does not match the schedule: '
             f'config.model.num_layers={m.num_layers} and num_blocks={blocks} give '
             f'(num_layers - 2) / (num_blocks - 2) = {(m.num_layers - 2) / (blocks - 2):g} '
             'recursions of the shared blocks')
  if mor.recursions < 1:
    p.append(f'config.model.mor.recursions={mor.recursions}: must be >= 1')
    return p
  for key, allowed in (('kv', KV_KINDS), ('router', ROUTER_KINDS), ('gate', GATES)):
    if mor[key] not in allowed:
      p.append(f'config.model.mor.{key}={mor[key]!r}; allowed: {", ".join(allowed)}')
  try:
    capacities = parse_capacities(mor.capacities, mor.recursions)
    if mor.kv == 'shared' and capacities[0] < 1 and mor.routing == 'expert_choice':
      p.append(f"config.model.mor.kv='shared' reads recursion 1's K/V of every token: "
               f'config.model.mor.capacities must start at 1, not {capacities[0]:g}')
  except ValueError as e:
    p.append(str(e))
  if mor.routing == 'token_choice' and mor.capacities:
    p.append("config.model.mor.capacities is for expert_choice; token_choice sizes its "
             'recursions with config.model.mor.capacity_factor')
  if not 0 < mor.capacity_factor:
    p.append(f'config.model.mor.capacity_factor={mor.capacity_factor}: must be > 0')
  elif mor.routing == 'token_choice' and mor.kv == 'shared' and mor.capacity_factor < 1:
    p.append(f"config.model.mor.kv='shared' reads recursion 1's K/V of every token, but "
             f'config.model.mor.capacity_factor={mor.capacity_factor} < 1 would drop tokens '
             'from recursion 1; allowed: >= 1 with shared KV')
  if mor.router == 'mlp' and mor.router_hidden < 1:
    p.append(f'config.model.mor.router_hidden={mor.router_hidden}: must be >= 1')
  if not mor.alpha > 0:
    p.append(f'config.model.mor.alpha={mor.alpha}: must be > 0')
  for key in ('aux_loss', 'balance_loss', 'z_loss'):
    if mor[key] < 0:
      p.append(f'config.model.mor.{key}={mor[key]}: must be >= 0')
  if m.remat:
    p.append('config.model.remat=True: the MoR forward unrolls its recursions without '
             'rematerialisation; allowed: False')
  if m.exit_layers != 'last':
    p.append(f'config.model.exit_layers={m.exit_layers!r}: a MoR model is read at its final '
             "output only; set it to 'last'")
  return p


def refuse_routed(config, entry: str, instead: str):
  """A UserError (one line, exit status 2 from the command line) when `config` describes a
  Mixture-of-Recursions model, which entry point `entry` does not run; `instead` says what
  does. Called before anything loads or compiles."""
  if config.model.mor.routing:
    raise cli.UserError(f'{entry} does not run Mixture-of-Recursions models '
                        f'(config.model.mor.routing={config.model.mor.routing!r}): {instead}')
