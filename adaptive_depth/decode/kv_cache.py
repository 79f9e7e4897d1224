"""The decode KV cache and the one way every decode path calls a block against it.

Cache: k [num_layers, B, KV, Dh, cache_len] and v [num_layers, B, KV, cache_len, Dh], one
layer per loop step (a recursive model caches per recursion step), each row's prompt
left-aligned and its later tokens written at their own positions. A row's layer is already
in the layout attention multiplies with (layers.to_cache_layout says why): a
[B, S, KV, Dh] layer made XLA transpose it, a copy of the layer per step and layer.

`cached_call` is the step every decode path shares: read each row's layer (its own loop
step: one scalar step for the depth loops, a step per row for the depth-wise batching
engine), let the block attend to that layer with this call's K/V written in, then store
only the new K/V into the cache. The KV policies differ only in which rows and positions
take part ('propagate' stores K/V computed from a frozen state, 'parallel' runs a queue of
positions in the same call, the engine runs each slot at its own step).

Why the store is a scatter of the new entries, after attention: the cache is a loop carry,
updated in place, so a step costs its reads (one layer per row) plus the few entries it
writes. Writing a whole merged layer back, or a write XLA may schedule before the layer is
read, makes it copy the cache, which at batch 8 with a long cache cost more than the reads.
"""
from __future__ import annotations

import contextlib
from typing import Callable

import flax.struct
import jax
import jax.numpy as jnp

from adaptive_depth import layers
from adaptive_depth import model as model_lib

# The step between the lengths a decode step reads its cache layer in (attend_reachable).
# A smaller step reads less, but puts a switch into short caches' programs (the tests'),
# which then take longer to compile.
READ_CHUNK = 64


@contextlib.contextmanager
def reading_in_steps(positions: int):
  """Decode programs traced within read their cache layers in steps of `positions` (0: the
  whole layer at every step) instead of READ_CHUNK's: to measure and test what the reads
  save (launch/decode_probe.py --read_chunks). Only tracing reads the setting: a program
  compiled before (ad.generate and the engine keep theirs) keeps the reads it was traced
  with. Not for use from several threads at once."""
  global READ_CHUNK
  saved, READ_CHUNK = READ_CHUNK, positions
  try:
    yield
  finally:
    READ_CHUNK = saved


@flax.struct.dataclass
class Cache:
  k: jax.Array  # [L, B, KV, Dh, S]
  v: jax.Array  # [L, B, KV, S, Dh]

  @property
  def length(self) -> int:
    """Positions per row."""
    return self.v.shape[3]

  def by_position(self) -> 'Cache':
    """The same K/V as [L, B, S, KV, Dh] (position before head), for inspection."""
    return Cache(k=self.k.transpose(0, 1, 4, 2, 3), v=jnp.swapaxes(self.v, 2, 3))


def empty(cfg: model_lib.ModelConfig, batch: int, cache_len: int) -> Cache:
  """Zeros: k [num_layers, batch, KV, Dh, cache_len], v [num_layers, batch, KV,
  cache_len, Dh]."""
  leading = (cfg.num_layers, batch, cfg.num_kv_heads)
  return Cache(k=jnp.zeros(leading + (cfg.head_dim, cache_len), cfg.compute_dtype),
               v=jnp.zeros(leading + (cache_len, cfg.head_dim), cfg.compute_dtype))


def layer_of_rows(cache: Cache, steps, rows=None, positions: int | None = None
                  ) -> tuple[jax.Array, jax.Array]:
  """Each row's cache layer at its loop step: steps scalar (every row) or [B] ->
  (k [B, KV, Dh, P], v [B, KV, P, Dh]), the first P = `positions` (default: all) of each
  row's positions. rows: [B] the cache rows to read (default 0..B-1: every row; the MoR
  engine reads a gathered subset of its slots)."""
  steps = jnp.asarray(steps)
  _, batch, num_kv, head_dim, length = cache.k.shape
  size = length if positions is None else positions
  if rows is None and steps.ndim == 0:
    start = (steps, 0, 0, 0, 0)
    return (jax.lax.dynamic_slice(cache.k, start, (1, batch, num_kv, head_dim, size))[0],
            jax.lax.dynamic_slice(cache.v, start, (1, batch, num_kv, size, head_dim))[0])
  if rows is None:
    rows = jnp.arange(steps.shape[0])
  steps = jnp.broadcast_to(steps, rows.shape)

  def one_row(step, row):
    start = (step, row, 0, 0, 0)
    return (jax.lax.dynamic_slice(cache.k, start, (1, 1, num_kv, head_dim, size))[0, 0],
            jax.lax.dynamic_slice(cache.v, start, (1, 1, num_kv, size, head_dim))[0, 0])
  return jax.vmap(one_row)(steps, rows)


def read_lengths(length: int, read_chunk: int) -> list[int]:
  """The lengths attend_reachable reads a layer of `length` positions in: the multiples of
  read_chunk (0: none) below it and the whole (a multiple less than half a chunk short of the
  whole is left out: reading it would save too little to pay for the switch)."""
  if read_chunk == 0:
    return [length]
  return [n for n in range(read_chunk, length, read_chunk) if length - n >= read_chunk // 2
          ] + [length]


def attend_reachable(cache: Cache, steps, rows, q, mask):
  """The attention of q [B, T, H, Dh] to each row's cache layer at its step (as
  layer_of_rows), under mask [B, T, S], reading only the positions some query can see.

  A decode step needs the keys up to the furthest position any of its queries may see,
  which is far less than the cache while a long generation is young. The layer is read in
  one of a few fixed lengths (read_lengths: multiples of READ_CHUNK, and the whole cache),
  the shortest that covers every visible key, chosen on device by a lax.switch: static
  shapes, and per step a read and attention proportional to the text so far instead of to
  the cache. The keys left out are masked for every query, so every query that sees any
  key gets the same result (a query that sees none, whose output its caller discards,
  averages the values read). What this saves on the 2-core CPU is in the README (Decode
  scaling).
  """
  sizes = read_lengths(cache.length, READ_CHUNK)

  def attend(size):
    return lambda cache, q, mask: layers.attend(
        q, *layer_of_rows(cache, steps, rows, size), mask[..., :size], cache_layout=True)

  if len(sizes) == 1:
    return attend(sizes[0])(cache, q, mask)
  visible = mask.any(axis=(0, 1))  # [S]
  # The last visible position + 1 (the whole cache when none is visible: argmax is 0).
  reach = cache.length - jnp.argmax(visible[::-1])
  branch = jnp.searchsorted(jnp.asarray(sizes), reach)  # the first size >= reach
  return jax.lax.switch(branch, [attend(size) for size in sizes], cache, q, mask)


def store(cache: Cache, steps, k, v, positions, keep=None, rows=None) -> Cache:
  """cache with K/V [B, T, KV, Dh] written at positions [B, T] of their loop steps (scalar,
  [B] per row, or [B, T] per entry); nothing else is touched. keep: optional [B, T] bool,
  the entries to write (the others are dropped: one scatter serves a ragged set). rows: [B]
  the cache rows written (default 0..B-1)."""
  batch, length = positions.shape
  steps = jnp.asarray(steps)
  steps = jnp.broadcast_to(steps[:, None] if steps.ndim == 1 else steps, (batch, length))
  rows = jnp.arange(batch) if rows is None else rows
  rows = jnp.broadcast_to(rows[:, None], (batch, length))
  mode = None
  if keep is not None:  # an out-of-range position: the scatter drops the entry
    positions, mode = jnp.where(keep, positions, cache.length), 'drop'
  # Either indexed update is [B, T, KV, Dh]: the index arrays' dimensions come first.
  return Cache(
      k=cache.k.at[steps, rows, :, :, positions].set(k.astype(cache.k.dtype), mode=mode),
      v=cache.v.at[steps, rows, :, positions].set(v.astype(cache.v.dtype), mode=mode))


def cached_call(cache: Cache, steps, positions, call: Callable, kv_of_call: Callable, *,
                keep=None, read_steps=None, rows=None):
  """The block call of a decode step against the cache.

  kv_of_call() -> (k, v) [B, T, KV, Dh]: the K/V this call's tokens write (the block's own
  projections, Block.kv_only). They are stored first, at positions [B, T] of each row's
  step (only where keep [B, T], if given); then call(attend_to) -> (out, _) runs the block,
  whose attention (layers.Attention's attend_to) reads each row's layer of the updated
  cache at read_steps (default: steps; Mixture-of-Recursions' shared KV reads recursion
  0's), as far as its mask reaches (attend_reachable). rows: [B] the cache rows of this
  call's rows (default all, in order). Returns (out, cache).

  Store, then read: the layer read happens after the write, so the write is in place. The
  other order (read the layer, write K/V into a copy of it, store later) leaves XLA free to
  store before the read, and it then copies the whole cache to keep the read right: at
  batch 8 with 289 positions that made a step three times slower. The price: where the
  block sits behind a lax.switch (apply_step on a multi-block per-block layout) XLA cannot
  share the two K/V projections, one norm and two [D, KV * Dh] products more per step
  (about 6% of a block at width 512 with 2 KV heads); elsewhere it merges them.
  """
  k, v = kv_of_call()
  cache = store(cache, steps, k, v, positions, keep, rows)
  read_steps = steps if read_steps is None else read_steps
  out, _ = call(lambda q, own_k, own_v, mask: attend_reachable(cache, read_steps, rows, q,
                                                                mask))
  return out, cache


def cached_step(cfg: model_lib.ModelConfig, params, cache: Cache, step, h, positions, mask):
  """Loop step `step` (traced scalar) on h [B, T, D] at positions [B, T] against the cache.
  Returns (h [B, T, D], cache)."""
  return cached_call(
      cache, step, positions,
      lambda attend_to: model_lib.apply_step(cfg, params, step, h, positions, mask, attend_to),
      lambda: model_lib.apply_step(cfg, params, step, h, positions, kv_only=True))


def store_kv_only(cfg: model_lib.ModelConfig, params, cache: Cache, step, h, positions
                  ) -> Cache:
  """cache with the K/V that loop step `step` computes from h [B, T, D] (a frozen state:
  'propagate') stored at positions [B, T]."""
  k, v = model_lib.apply_step(cfg, params, step, h, positions, kv_only=True)
  return store(cache, step, k, v, positions)
