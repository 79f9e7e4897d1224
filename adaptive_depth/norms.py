"""RMSNorm, with its gradient written out (one pass for x; on CPU a [D] scale's sum over the
tokens as a product). Linen module used as a pure function, as in layers.py."""
from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

from adaptive_depth import attention as attention_lib


def rms_norm(x, scale, eps: float, dtype):
  """x / rms(x) * scale over the last axis, in float32. x: [..., D]; scale: broadcastable to
  x (e.g. [D], or [..., D] with one scale per exit) -> [..., D] in `dtype`."""
  return _scaled_rms(x.astype(jnp.float32), scale, eps).astype(dtype)


def _inverse_rms(x32, eps: float):
  """x32: [..., D] -> 1 / rms over the last axis, [..., 1]."""
  return jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + eps)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _scaled_rms(x32, scale, eps: float):
  """x32 [..., D] * its inverse rms * scale (broadcastable to x32), with the gradient of
  _scaled_rms_backward."""
  return _scaled_rms_forward(x32, scale, eps)[0]


def _scaled_rms_forward(x32, scale, eps: float):
  """_scaled_rms's output, and what the backward reads: x32, 1 / rms [..., 1], scale."""
  inverse = _inverse_rms(x32, eps)
  return x32 * inverse * scale, (x32, inverse, scale)


def _scaled_rms_backward(eps: float, saved, grad):
  """Autodiff's gradient, in one pass for x; on CPU a [D] scale's gradient (a sum over the
  tokens) as a product with a row of ones, which XLA's CPU dot library runs faster than its
  column reduction (the quickstart train step 1.02x with the one pass; README, Scale).
  saved: _scaled_rms_forward's; grad: [..., D] -> (d x32 [..., D], d scale in scale's
  shape)."""
  del eps
  x32, inverse, scale = saved
  normed = x32 * inverse
  d_normed = grad * scale
  d_x = inverse * (d_normed - normed * jnp.mean(d_normed * normed, axis=-1, keepdims=True))
  if jnp.ndim(scale) == 1 and attention_lib.tuned_for_cpu():
    per_token = (grad * normed).reshape(-1, x32.shape[-1])
    d_scale = (jnp.ones((1, per_token.shape[0]), per_token.dtype) @ per_token)[0]
  else:  # summed over the axes the scale was broadcast along
    d_scale = _sum_to_shape(grad * normed, jnp.shape(scale))
  return d_x, d_scale.astype(scale.dtype)


def _sum_to_shape(x, shape):
  """x summed over the axes that broadcasting an array of `shape` to x.shape added or
  stretched -> `shape`."""
  lead = x.ndim - len(shape)
  stretched = tuple(lead + i for i, n in enumerate(shape) if n == 1 and x.shape[lead + i] != 1)
  return jnp.sum(x, axis=tuple(range(lead)) + stretched, keepdims=True).reshape(shape)


_scaled_rms.defvjp(_scaled_rms_forward, _scaled_rms_backward)


class RMSNorm(nn.Module):
  """x / rms(x) * scale, over the last axis. x: [..., D] -> [..., D]."""
  eps: float = 1e-6
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    scale = self.param('scale', nn.with_logical_partitioning(nn.initializers.ones, ('norm',)),
                       (x.shape[-1],), jnp.float32)
    return rms_norm(x, scale, self.eps, self.dtype)
