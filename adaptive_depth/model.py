"""The model anatomy: embed -> depth loop over stacked blocks -> exit heads -> logits.

Parameters are one explicit pytree:

    {'embed': {'embedding': [V, D]},
     'blocks': <one Block's parameters, every leaf with a leading [num_blocks] axis>,
     'final_norm': {'scale': [D]},
     'lm_head': {'kernel': [D, V]},          # only when embeddings are untied
     'lora': {'attn': {'q': {'a': [S, D, r], 'b': [S, r, H*Dh]}, ...}, 'mlp': {...}},
                                             # only with lora_rank > 0: per-step deltas
     'exit_heads': {'norm': [E-1, D],        # only with exit_norms
                    'adapter': {'a': [E-1, D, R], 'b': [E-1, R, D]}}}
                                             # only with exit_adapter_rank R > 0

Decoding runs on the per-block layout (`per_block_layout`): 'blocks' is then a tuple of
num_blocks such pytrees without the leading axis, and `apply_step` picks one with a
`lax.switch` instead of slicing the stack.

Per-exit heads (exit_heads.py) give each early exit its own norm and adapter before the
shared output projection; the last exit always reads through final_norm alone.

Relaxed recursion adds, per loop step s, a low-rank delta A_s B_s to each projection of the
block that step runs (B_s starts at zero, so a relaxed model starts as its shared one).

A depth schedule (model_config.block_index / block_table, re-exported here) maps loop step
s (0 <= s < num_layers) to the block it runs, so a plain L-layer model (num_blocks = L,
schedule 'unshared') and a recursive one (fewer blocks than steps) are the same code.
Sharing is by construction: a step reads its block by index.

"Depth" d in 1..num_layers counts loop steps done; an exit at depth d reads the hidden
state after step d - 1.
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from adaptive_depth import exit_heads
from adaptive_depth import layers
# The static description lives in model_config.py; the rest of the library reads it through
# this module (config_lib imports model_config directly).
from adaptive_depth.model_config import (  # pylint: disable=unused-import
    DTYPES, SCHEDULES, ModelConfig, block_index, block_table, parse_exit_layers)
from adaptive_depth import routers

# Projections that relaxed recursion adapts, with how many leading axes are their input.
LORA_TARGETS = {('attn', 'q'): 1, ('attn', 'k'): 1, ('attn', 'v'): 1, ('attn', 'o'): 2,
                ('mlp', 'gate'): 1, ('mlp', 'up'): 1, ('mlp', 'down'): 1}


def _init_boxed(cfg: ModelConfig, rng):
  """Parameters still wrapped in their logical-axis metadata."""
  k_embed, k_blocks, k_head = jax.random.split(rng, 3)
  embedding = nn.with_logical_partitioning(
      nn.initializers.normal(stddev=cfg.init_std), ('vocab', 'embed'))(
          k_embed, (cfg.vocab_size, cfg.width), jnp.float32)
  h = jnp.zeros((1, 1, cfg.width), cfg.compute_dtype)
  pos = jnp.zeros((1, 1), jnp.int32)
  mask = jnp.ones((1, 1, 1), bool)
  init_block = lambda k: cfg.block.init(k, h, pos, mask)['params']
  blocks = jax.vmap(init_block)(jax.random.split(k_blocks, cfg.num_blocks))
  # vmap stacked the values; the leading axis needs its own logical name.
  blocks = jax.tree.map(lambda box: box.replace(names=('layers',) + tuple(box.names)),
                        blocks, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
  params = {
      'embed': {'embedding': embedding},
      'blocks': blocks,
      'final_norm': cfg.final_norm.init(k_head, h)['params'],
  }
  if cfg.lora_rank:
    params['lora'] = _init_lora(cfg, blocks, jax.random.fold_in(k_blocks, 1))
  if not cfg.tie_embeddings:
    params['lm_head'] = {'kernel': nn.with_logical_partitioning(
        nn.initializers.normal(stddev=cfg.init_std), ('embed', 'vocab'))(
            k_head, (cfg.width, cfg.vocab_size), jnp.float32)}
  if cfg.routing is not None:
    params['routers'] = routers.init_boxed(cfg.routing, cfg.width, jax.random.fold_in(k_head, 2),
                                           cfg.init_std)
  if cfg.has_exit_heads:  # only then, so that models without them keep their tree
    params['exit_heads'] = exit_heads.init_boxed(cfg, jax.random.fold_in(k_head, 1))
  return params


def _init_lora(cfg: ModelConfig, boxed_blocks, rng) -> dict:
  """Per-step low-rank factors: a ~ N(0, 1/fan_in), b = 0, stacked over loop steps."""
  lora = {}
  for i, ((group, name), in_dims) in enumerate(sorted(LORA_TARGETS.items())):
    shape = boxed_blocks[group][name].value.shape[1:]
    fan_in, fan_out = int(np.prod(shape[:in_dims])), int(np.prod(shape[in_dims:]))
    a = jax.random.normal(jax.random.fold_in(rng, i),
                          (cfg.num_layers, fan_in, cfg.lora_rank)) / np.sqrt(fan_in)
    b = jnp.zeros((cfg.num_layers, cfg.lora_rank, fan_out))
    lora.setdefault(group, {})[name] = {
        'a': nn.LogicallyPartitioned(a, ('layers', 'lora_in', 'lora_rank')),
        'b': nn.LogicallyPartitioned(b, ('layers', 'lora_rank', 'lora_out'))}
  return lora


def init_params(cfg: ModelConfig, rng) -> dict:
  """A fresh float32 parameter pytree (layout in the module docstring)."""
  return nn.unbox(_init_boxed(cfg, rng))


def param_logical_axes(cfg: ModelConfig) -> dict:
  """The parameter pytree's structure with a tuple of logical axis names per leaf."""
  boxed = jax.eval_shape(lambda: _init_boxed(cfg, jax.random.key(0)))
  return jax.tree.map(lambda box: tuple(box.names), boxed,
                      is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))


def count_params(params) -> int:
  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(params)))


def embed(cfg: ModelConfig, params, tokens):
  """tokens: [B, T] int -> h: [B, T, D] in the compute dtype."""
  return jnp.take(params['embed']['embedding'], tokens, axis=0).astype(cfg.compute_dtype)


def head_logits(cfg: ModelConfig, params, h, exit_number=None):
  """Exit head: the exit's norm (see exit_heads.exit_normed) then the output projection, tied to the
  embedding by default. h: [..., D] -> logits [..., V] in float32; exit_number as in
  exit_normed (None: the last exit).
  """
  x = exit_heads.exit_normed(cfg, params, h, exit_number)
  if cfg.tie_embeddings:
    w = params['embed']['embedding'].astype(cfg.compute_dtype)
    return jnp.einsum('...d,vd->...v', x, w, preferred_element_type=jnp.float32)
  w = params['lm_head']['kernel'].astype(cfg.compute_dtype)
  return jnp.einsum('...d,dv->...v', x, w, preferred_element_type=jnp.float32)


def select_block(block_params, index):
  """The parameters of block `index` (traced or static) out of the stacked pytree."""
  return jax.tree.map(lambda p: jax.lax.dynamic_index_in_dim(p, index, keepdims=False),
                      block_params)


def _add_lora(block, lora, einsum_prefix=''):
  """block + a @ b reshaped onto each adapted kernel; leading axes (if any) broadcast."""
  block = jax.tree.map(lambda x: x, block)  # a copy we may write into
  for (group, name) in LORA_TARGETS:
    w, f = block[group][name], lora[group][name]
    delta = jnp.einsum(f'{einsum_prefix}ir,{einsum_prefix}ro->{einsum_prefix}io', f['a'], f['b'])
    block[group][name] = w + delta.reshape(w.shape)
  return block


def step_block(cfg: ModelConfig, params, step):
  """The block parameters loop step `step` (traced) runs, with its LoRA delta if any, from
  the stacked layout (`apply_step` takes either layout)."""
  if isinstance(params['blocks'], tuple):
    raise TypeError('step_block needs the stacked parameter layout; this is the per-block '
                    'one (per_block_layout): use apply_step')
  block = select_block(params['blocks'], block_index(cfg.schedule, step, cfg.num_layers,
                                                     cfg.num_blocks))
  if 'lora' not in params:
    return block
  return _add_lora(block, select_block(params['lora'], step))


def per_block_layout(params) -> dict:
  """params with 'blocks' as a tuple of per-block pytrees, each leaf its own buffer.

  Call it eagerly (outside jit), once per model, for decoding: with the stacked layout every
  decode step slices its layer's weights out of the stack inside the depth loop, which XLA
  (CPU at least) materialises as a copy, while `apply_step` on this layout runs the layer
  straight from its own buffers through a `lax.switch`. At batch 1 decoding reads every
  weight once per token, so the copy was most of the cost (1.6x on the matrix-vector
  products of a 30-layer model of width 576).
  """
  blocks = params['blocks']
  if isinstance(blocks, tuple):
    return params
  num_blocks = jax.tree.leaves(blocks)[0].shape[0]
  return {**params, 'blocks': tuple(jax.tree.map(lambda p, i=i: p[i], blocks)
                                    for i in range(num_blocks))}


def apply_step(cfg: ModelConfig, params, step, h, positions, mask=None, attend_to=None,
               kv_only=False):
  """Loop step `step` (traced) on either parameter layout, with that step's block and LoRA
  delta: Block(h, positions, mask, attend_to) -> (h, (k, v)), or with kv_only the K/V the
  block computes from h (Block.kv_only)."""
  def call(block, h, positions, mask):
    if kv_only:
      return cfg.block.apply({'params': block}, h, positions, method=layers.Block.kv_only)
    return apply_block(cfg, block, h, positions, mask, attend_to)

  if not isinstance(params['blocks'], tuple):
    return call(step_block(cfg, params, step), h, positions, mask)
  lora = select_block(params['lora'], step) if 'lora' in params else None

  def branch(index):
    def run(blocks, h, positions, mask):
      block = blocks[index] if lora is None else _add_lora(blocks[index], lora)
      return call(block, h, positions, mask)
    return run

  index = block_index(cfg.schedule, step, cfg.num_layers, cfg.num_blocks)
  return jax.lax.switch(index, [branch(i) for i in range(len(params['blocks']))],
                        params['blocks'], h, positions, mask)


def all_step_blocks(cfg: ModelConfig, params):
  """Every step's block parameters stacked [num_layers, ...], by a static gather (whose
  gradient sums over the steps sharing a block: weight sharing) plus LoRA deltas."""
  table = block_table(cfg)
  if isinstance(params['blocks'], tuple):  # the per-block layout: stack it again
    params = {**params, 'blocks': jax.tree.map(lambda *b: jnp.stack(b), *params['blocks'])}
  if cfg.num_blocks == cfg.num_layers and (table == np.arange(cfg.num_layers)).all():
    per_step = params['blocks']  # unshared: the stack already is the per-step order
  else:
    per_step = jax.tree.map(lambda p: p[table], params['blocks'])
  if 'lora' not in params:
    return per_step
  return _add_lora(per_step, params['lora'], einsum_prefix='s')


def apply_block(cfg: ModelConfig, one_block, h, positions, mask, attend_to=None):
  """One loop step. h: [B, T, D] -> (h [B, T, D], (k, v) [B, T, KV, Dh])."""
  return cfg.block.apply({'params': one_block}, h, positions, mask, attend_to)


def default_positions(tokens):
  """[B, T] -> positions 0..T-1 for every row."""
  return jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)


def run_all_steps(cfg: ModelConfig, params, h, positions, constrain=lambda x: x):
  """Train mode depth loop: `lax.scan` over every step (reverse-differentiable).

  h: [B, T, D]. Returns hidden states after each step, [num_layers, B, T, D].
  """
  mask = layers.causal_mask(positions, positions)
  per_step = all_step_blocks(cfg, params)

  def step(h, one_block):
    h, _ = apply_block(cfg, one_block, h, positions, mask)
    h = constrain(h)
    return h, h

  if cfg.remat:
    # prevent_cse=False is only safe inside a loop; unrolled steps need CSE prevented, or XLA
    # may merge the recomputation back into the forward and keep the activations after all.
    step = jax.checkpoint(step, prevent_cse=cfg.scan_unroll > 1)
  # Unrolled, XLA sees every step's weights as plain slices (no dynamic slice of the stack
  # and no dynamic-update-slice of its gradient per iteration): 1.14x faster train step for
  # the 4-layer quickstart on CPU, at the cost of compile time growing with the unroll.
  _, hiddens = jax.lax.scan(step, h, per_step, unroll=cfg.scan_unroll)
  return hiddens


def forward_exit_states(cfg: ModelConfig, params, tokens, constrain=lambda x: x):
  """Every exit's residual state, before its head. tokens: [B, T] -> [num_exits, B, T, D].

  `constrain` is applied to [B, T, D] activations (sharding.Activations supplies one that
  pins them to the mesh); the default does nothing.
  """
  if cfg.routing is not None:
    raise ValueError(f'this model routes tokens between recursions '
                     f'(config.model.mor.routing={cfg.routing.routing!r}): its forward is '
                     'adaptive_depth.forward_outputs (or forward_train)')
  positions = default_positions(tokens)
  h = constrain(embed(cfg, params, tokens))
  return at_exit_depths(cfg, run_all_steps(cfg, params, h, positions, constrain))


def at_exit_depths(cfg: ModelConfig, hiddens):
  """The states after each exit's step. hiddens: [num_layers, ...] -> [num_exits, ...].

  Static slices, not an index array: XLA turns the latter into a gather in the forward
  and a scatter-add in the backward of every train step, and with an exit after every
  step it is the whole stack anyway.
  """
  steps = [depth - 1 for depth in cfg.exit_depths]
  if steps == list(range(hiddens.shape[0])):
    return hiddens
  return jnp.stack([hiddens[step] for step in steps])


def forward_train(cfg: ModelConfig, params, tokens, constrain=lambda x: x):
  """Every exit's logits. tokens: [B, T] -> [num_exits, B, T, V] float32 (constrain: as in
  forward_exit_states)."""
  return head_logits(cfg, params, forward_exit_states(cfg, params, tokens, constrain),
                     exit_heads.ALL_EXITS)


def reference_forward(cfg: ModelConfig, params, tokens) -> list:
  """Exit logits by a plain Python loop over steps (no scan, no gather); for tests."""
  positions = default_positions(tokens)
  mask = layers.causal_mask(positions, positions)
  h = embed(cfg, params, tokens)
  outputs = []
  for step in range(cfg.num_layers):
    one_block = step_block(cfg, params, step)
    h, _ = apply_block(cfg, one_block, h, positions, mask)
    if step + 1 in cfg.exit_depths:
      outputs.append(head_logits(cfg, params, h, len(outputs)))
  return outputs


def apply_block_rows(cfg: ModelConfig, params, block_number: int, steps, h, positions,
                     mask=None, attend_to=None, kv_only=False):
  """Block `block_number` (static) on every row, each row with the LoRA delta of its own
  loop step, applied unmerged (x @ W + (x @ A[s]) @ B[s]): rows at different steps of the
  same block share one call of its weights (the depth-wise batching engine's tick).

  steps: [B] int, the loop step each row runs (only its LoRA factors depend on it; the
  caller makes sure every row's step runs `block_number`). h: [B, T, D]. Returns
  Block(h, positions, mask, attend_to) -> (h [B, T, D], (k, v) [B, T, KV, Dh]), or with
  kv_only the K/V the block computes from h. Either parameter layout.
  """
  blocks = params['blocks']
  block = (blocks[block_number] if isinstance(blocks, tuple)
           else select_block(blocks, block_number))
  row_lora = None
  if 'lora' in params:
    row_lora = jax.tree.map(lambda f: jnp.take(f, steps, axis=0), params['lora'])
  if kv_only:
    return cfg.block.apply({'params': block}, h, positions, row_lora,
                           method=layers.Block.kv_only)
  return cfg.block.apply({'params': block}, h, positions, mask, attend_to, row_lora)
