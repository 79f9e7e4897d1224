"""Gradients the library writes by hand equal autodiff's through the plain formula (RMSNorm,
the cross entropy), and the attention's q/k/v projections (one product over several tokens)
equal numpy's."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from adaptive_depth import layers
from adaptive_depth import norms
from adaptive_depth.train import losses
from tests import numpy_reference

EPS = 1e-6


def _draw(shape, seed, dtype=np.float32):
  return jnp.asarray(np.random.default_rng(seed).standard_normal(shape, np.float32), dtype)


def _plain_rms_norm(x, scale, eps, dtype):
  """The formula, differentiated by autodiff."""
  x32 = x.astype(jnp.float32)
  return (x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
          * scale).astype(dtype)


@pytest.mark.parametrize('scale_shape', ['shared', 'per_exit', 'per_token', 'bfloat16_input'])
def test_rms_norm_gradient_equals_autodiffs(scale_shape):
  """x [E, B, T, D] with one scale [D], one per exit [E, 1, 1, D], one per token
  [E, B, T, D] (a gathered scale), and a bfloat16 input (each gradient in its input's dtype,
  near autodiff's at bfloat16 precision)."""
  x_shape = (3, 2, 5, 16)
  dtype = jnp.bfloat16 if scale_shape == 'bfloat16_input' else jnp.float32
  shape = {'per_exit': (3, 1, 1, 16), 'per_token': x_shape}.get(scale_shape, (16,))
  x, scale = _draw(x_shape, 0, dtype), 1 + 0.3 * _draw(shape, 1)
  weights = _draw(x_shape, 2)

  @jax.jit
  def grads(x, scale):
    loss = lambda fn: lambda x, s: jnp.sum(fn(x, s, EPS, dtype).astype(jnp.float32) * weights)
    return [jax.value_and_grad(loss(fn), argnums=(0, 1))(x, scale)
            for fn in (norms.rms_norm, _plain_rms_norm)]

  (value, got), (want_value, want) = grads(x, scale)
  tolerance = 2e-2 if dtype == jnp.bfloat16 else 1e-5
  np.testing.assert_allclose(value, want_value, rtol=tolerance)
  for g, w, primal in zip(got, want, (x, scale)):
    assert g.shape == primal.shape and g.dtype == primal.dtype
    w = np.asarray(w, np.float32)
    assert np.abs(w).max() > 1e-2  # a gradient that is there to compare
    np.testing.assert_allclose(np.asarray(g, np.float32), w, rtol=tolerance,
                               atol=tolerance * np.abs(w).max())


def test_cross_entropy_equals_log_softmax_in_every_mode():
  """losses.cross_entropy against -log_softmax at the target: value, reverse-mode gradient,
  forward mode (its derivative is given as a JVP) and reverse over reverse."""
  logits, targets = 3 * _draw((2, 4, 7, 11), 0), jnp.asarray(
      np.random.default_rng(1).integers(0, 11, (2, 4, 7)))
  plain = lambda l: -jnp.take_along_axis(jax.nn.log_softmax(l, -1), targets[..., None], -1)[..., 0]
  weights = _draw(targets.shape, 2)
  loss = lambda fn: lambda l: jnp.sum(fn(l) * weights)
  ours = lambda l: losses.cross_entropy(l, targets)
  np.testing.assert_allclose(ours(logits), plain(logits), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(jax.grad(loss(ours))(logits), jax.grad(loss(plain))(logits),
                             rtol=1e-5, atol=1e-6)
  tangent = _draw(logits.shape, 3)
  np.testing.assert_allclose(jax.jvp(ours, (logits,), (tangent,))[1],
                             jax.jvp(plain, (logits,), (tangent,))[1], rtol=1e-5, atol=1e-5)
  hessian_vector = lambda fn: jax.grad(lambda l: jnp.vdot(jax.grad(loss(fn))(l), tangent))(
      logits)
  np.testing.assert_allclose(hessian_vector(ours), hessian_vector(plain), rtol=1e-4,
                             atol=1e-5)


@pytest.mark.parametrize('length', [1, 6])
def test_q_k_v_projections_equal_numpy(length):
  """Attention's q/k/v projections against numpy: x @ W + b + (x @ a) @ b per row, then
  the rotary embedding on q and k. Over several tokens on CPU they are one product against
  the kernels side by side; one token (a decode step) keeps three products."""
  cfg = layers.BlockConfig(width=16, num_heads=4, num_kv_heads=2, head_dim=8, mlp_dim=32,
                           qkv_bias=True)
  module = layers.Attention(cfg)
  batch = 2
  x = _draw((batch, length, 16), 0)
  positions = jnp.broadcast_to(jnp.arange(length) + 3, (batch, length))
  params = module.init(jax.random.key(0), x, positions, layers.causal_mask(positions,
                                                                           positions))
  params = jax.tree.map(lambda p: p + 0.1 * _draw(p.shape, 5), nn.meta.unbox(params))
  heads = {'q': 4, 'k': 2, 'v': 2}
  row_lora = {name: {'a': 0.1 * _draw((batch, 16, 3), i), 'b': 0.1 * _draw((batch, 3, n * 8),
                                                                              i + 9)}
              for i, (name, n) in enumerate(heads.items())}
  q, (k, v) = module.apply(params, x, positions,
                           method=lambda m, x, p: m._project_qkv(x, p, row_lora))

  p, xn = params['params'], np.asarray(x, np.float64)
  def projected(name):
    kernel = np.asarray(p[name], np.float64).reshape(16, -1)
    lora = row_lora[name]
    low = np.einsum('btd,bdr->btr', xn, np.asarray(lora['a'], np.float64))
    out = (xn @ kernel + np.einsum('btr,bro->bto', low, np.asarray(lora['b'], np.float64))
           + np.asarray(p[f'{name}_bias'], np.float64).reshape(-1))
    return out.reshape(batch, length, heads[name], 8)
  rope = lambda t: np.stack([numpy_reference.rope(row, np.asarray(p), cfg.rope_base)
                             for row, p in zip(t, positions)])
  for got, want in ((q, rope(projected('q'))), (k, rope(projected('k'))),
                    (v, projected('v'))):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
