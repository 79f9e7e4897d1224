"""The train-mode forward every loss and evaluation reads, for any model.

`forward_outputs` returns a ForwardOutput: every exit's residual state and, for a
Mixture-of-Recursions model, its routing (routers.RoutingOutput: selections, router logits,
the auxiliary router loss and metrics), so the losses receive the router outputs without
anything threaded by hand. A MoR model has one exit, its final output.
"""
from __future__ import annotations

from typing import Optional

import flax.struct
import jax

from adaptive_depth import exit_heads
from adaptive_depth import model as model_lib
from adaptive_depth import mor
from adaptive_depth import routers


@flax.struct.dataclass
class ForwardOutput:
  """exit_states: [E, B, T, D] every exit's residual state before its head; routing: the
  routers' outputs (None for a model without routers)."""
  exit_states: jax.Array
  routing: Optional[routers.RoutingOutput] = None


def forward_outputs(cfg: model_lib.ModelConfig, params, tokens,
                    constrain=lambda x: x) -> ForwardOutput:
  """tokens: [B, T] -> ForwardOutput (constrain: as in model.forward_exit_states)."""
  if cfg.routing is None:
    return ForwardOutput(exit_states=model_lib.forward_exit_states(cfg, params, tokens,
                                                                   constrain))
  h, routing = mor.forward_states(cfg, params, tokens, constrain)
  return ForwardOutput(exit_states=h[None], routing=routing)


def forward_train(cfg: model_lib.ModelConfig, params, tokens, constrain=lambda x: x):
  """Every exit's logits, any model. tokens: [B, T] -> [num_exits, B, T, V] float32."""
  states = forward_outputs(cfg, params, tokens, constrain).exit_states
  return model_lib.head_logits(cfg, params, states, exit_heads.ALL_EXITS)
