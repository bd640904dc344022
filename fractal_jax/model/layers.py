"""The building layers of every level: linear layers, normalisations, activations.

Dimension letters: M rows, D input width, F output width.

`dense` builds a Linear layer initialised as the official code (xavier
uniform, zero bias) with logical axis names for sharding; `layer_norm`
builds the timm/official LayerNorm (eps 1e-6); `RMSNorm` is LlamaGen's.

With CPU kernels (`model_config.ModelSettings.kernels`, the default on CPU)
they build `Dense` and `LayerNorm`, which compute exactly the function of
their `flax.linen` parents with the same parameters and differ only in how
XLA is asked to compute it, which matters on CPU; on TPU and GPU the
standard `nn.Dense` and `nn.LayerNorm` run. `tests/test_kernels.py` checks
that each pair agrees in value and gradient.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Dtype = Any

xavier = nn.initializers.xavier_uniform()


def along_batch(x: jax.Array) -> jax.Array:
  """`x` [N, ...] laid out along the logical "batch" axis: its leading (item) axis.

  Under the training step's logical axis rules ("batch" -> the mesh's batch
  axes) this pins activations to the batch sharding. Without it the SPMD
  partitioner may meet parameters sharded over the same devices (FSDP) by
  gathering the activations instead of the weights: it did for the items
  of every level below the first, which a sharded step then held whole on
  every chip. Without rules (sampling, tests) it changes nothing.
  """
  if x.ndim == 0:
    return x
  return nn.with_logical_constraint(x, ("batch",) + (None,) * (x.ndim - 1))


class Dense(nn.Dense):
  """`nn.Dense` applied to its input flattened to 2-D ([..., D] -> [M, D] -> [..., F]).

  Same parameters and the same function. Flattened so that the kernel
  gradient is a plain matrix product with a transposed operand: on rank-3
  operands XLA's CPU compiler instead transposes the large output gradient
  [M, F] first.
  """

  @nn.compact
  def __call__(self, inputs: jax.Array) -> jax.Array:
    if inputs.ndim <= 2:
      return super().__call__(inputs)
    out = super().__call__(inputs.reshape(-1, inputs.shape[-1]))
    return out.reshape(*inputs.shape[:-1], out.shape[-1])


def dense(
  features: int,
  axes: tuple[str, str],
  dtype: Dtype,
  param_dtype: Dtype,
  use_bias: bool = True,
  name: str | None = None,
  *,
  cpu_kernels: bool = False,
) -> nn.Dense:
  """A Linear layer initialised like the official code (xavier-uniform, zero bias).

  `axes`: logical names of the kernel's (input, output) axes (`fractal_jax.parallel.sharding`).
  `cpu_kernels`: the flattened `Dense` (CPU) instead of `nn.Dense`.
  """
  return (Dense if cpu_kernels else nn.Dense)(
    features,
    use_bias=use_bias,
    dtype=dtype,
    param_dtype=param_dtype,
    kernel_init=nn.with_logical_partitioning(xavier, axes),
    bias_init=nn.with_logical_partitioning(nn.initializers.zeros, axes[1:]),
    name=name,
  )


class Kernel(nn.Module):
  """Only the kernel [D, F] of a bias-free `dense` layer (same name, shape, init and axes), for fused products."""

  features: int
  axes: tuple[str, str]
  param_dtype: Dtype

  @nn.compact
  def __call__(self, in_features: int) -> jax.Array:
    init = nn.with_logical_partitioning(xavier, self.axes)
    return self.param("kernel", init, (in_features, self.features), self.param_dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _layer_norm(x: jax.Array, scale: jax.Array, bias: jax.Array, epsilon: float, dtype: Dtype) -> jax.Array:
  return _layer_norm_forward(x, scale, bias, epsilon, dtype)[0]


def _layer_norm_forward(
  x: jax.Array, scale: jax.Array, bias: jax.Array, epsilon: float, dtype: Dtype
) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
  """`nn.LayerNorm`'s forward op for op (fast variance, float32 statistics); also returns (mean, 1/std) [..., 1]."""
  x32 = x.astype(jnp.promote_types(dtype, jnp.float32))
  mean = x32.mean(-1)
  var = jnp.maximum(0.0, jax.lax.square(x32).mean(-1) - jax.lax.square(mean))
  mean = mean[..., None]
  rstd = jax.lax.rsqrt(var[..., None] + epsilon)
  y = (x - mean) * (rstd * scale) + bias
  return jnp.asarray(y, dtype), (mean, rstd)


def _layer_norm_fwd(x, scale, bias, epsilon, dtype):  # noqa: ANN001, ANN202
  y, (mean, rstd) = _layer_norm_forward(x, scale, bias, epsilon, dtype)
  return y, (x, scale, mean, rstd)


def _layer_norm_bwd(epsilon, dtype, residuals, dy):  # noqa: ANN001, ANN202
  """The LayerNorm gradient, from x and the row statistics (autodiff would keep [.., D] products instead)."""
  del epsilon
  x, scale, mean, rstd = residuals
  dy = dy.astype(jnp.float32)
  xhat = (x.astype(jnp.float32) - mean) * rstd
  rows = tuple(range(dy.ndim - 1))
  dbias = dy.sum(rows)
  dscale = (dy * xhat).sum(rows)
  g = dy * scale.astype(jnp.float32)
  dx = rstd * (g - g.mean(-1, keepdims=True) - xhat * (g * xhat).mean(-1, keepdims=True))
  return dx.astype(x.dtype), dscale.astype(scale.dtype), dbias.astype(scale.dtype)


_layer_norm.defvjp(_layer_norm_fwd, _layer_norm_bwd)


class LayerNorm(nn.LayerNorm):
  """`nn.LayerNorm` (same parameters and forward) whose gradient is written out.

  Autodiff of `nn.LayerNorm` stores the full-size product 1/std * scale for
  the backward pass and reduces more than it needs to; the written-out
  gradient needs only x and the per-row statistics. Supports the
  configuration `layer_norm` builds (normalisation and parameters over the
  last axis, scale and bias); any other falls back to `nn.LayerNorm`.
  """

  @nn.compact
  def __call__(self, x: jax.Array, *, mask: jax.Array | None = None) -> jax.Array:
    if mask is not None or self.axis_name is not None or self.reduction_axes != -1 or self.feature_axes != -1:
      return super().__call__(x, mask=mask)
    if not (self.use_bias and self.use_scale and self.use_fast_variance and self.force_float32_reductions):
      return super().__call__(x, mask=mask)
    features = (x.shape[-1],)
    scale = self.param("scale", self.scale_init, features, self.param_dtype)
    bias = self.param("bias", self.bias_init, features, self.param_dtype)
    dtype = self.dtype if self.dtype is not None else jnp.result_type(x, scale, bias)
    return _layer_norm(x, scale, bias, self.epsilon, jnp.dtype(dtype))


def layer_norm(dtype: Dtype, param_dtype: Dtype, name: str | None = None, *, cpu_kernels: bool = False) -> nn.LayerNorm:
  """The official LayerNorm (eps 1e-6, scale and bias over the last axis): [..., D] -> [..., D] in `dtype`.

  `cpu_kernels`: `LayerNorm` with its written-out gradient (CPU) instead of `nn.LayerNorm`.
  """
  return (LayerNorm if cpu_kernels else nn.LayerNorm)(
    epsilon=1e-6,
    dtype=dtype,
    param_dtype=param_dtype,
    scale_init=nn.with_logical_partitioning(nn.initializers.ones, ("norm",)),
    bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("norm",)),
    name=name,
  )


class RMSNorm(nn.Module):
  """RMSNorm as LlamaGen: normalise in float32, cast back, then scale. [..., D] -> [..., D] in x's dtype."""

  epsilon: float = 1e-5
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    scale = self.param(
      "scale", nn.with_logical_partitioning(nn.initializers.ones, ("norm",)), (x.shape[-1],), self.param_dtype
    )
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.epsilon)
    return normed.astype(x.dtype) * scale.astype(x.dtype)


def gelu(x: jax.Array, *, cpu_kernels: bool = False) -> jax.Array:
  """Exact (erf) GELU, PyTorch's `nn.GELU`: same shape and dtype.

  `nn.gelu(approximate=False)` computes it as x/2 * erfc(-x / sqrt 2); with
  `cpu_kernels` it is written x/2 * (1 + erf(x / sqrt 2)), the same function,
  because XLA's CPU erfc is several times as costly as its erf.
  """
  if not cpu_kernels:
    return nn.gelu(x, approximate=False)
  return 0.5 * x * (1.0 + jax.lax.erf(x * np.sqrt(0.5).astype(x.dtype)))


def swiglu_hidden(width: int) -> int:
  """LlamaGen's SwiGLU width: int(2 * 4D / 3) rounded up to a multiple of 256."""
  hidden = int(2 * (4 * width) / 3)
  return -(-hidden // 256) * 256
