"""Transformer blocks and the scanned block stack.

Dimension letters: B batch, L sequence, D width, N heads, H head width.

Two block families, named as in the official code so that weights map
one-to-one:
  * `LlamaBlock` (AR levels, LlamaGen-style): RMSNorm, fused `wqkv` and `wo`
    without bias, 2-D rotary, SwiGLU MLP without bias; residual and MLP
    dropout fixed at 0.1 as in the official AR (it ignores the dropout flags).
  * `TimmBlock` (MAR levels and pixel heads, timm ViT-style): LayerNorm,
    `qkv` and `proj` with bias, GELU (erf) MLP x4; dropout on the attention
    probabilities, after `proj`, after the GELU and after `fc2`.

`BlockStack` stacks `depth` blocks with `nn.scan` (parameters get a leading
`[depth]` axis), optionally under `nn.remat` with a policy chosen by name;
stacks up to `LOOP_MAX_DEPTH` deep apply those stacked parameters in a Python
loop instead (faster, same function).
With `scan=False` it applies blocks `blocks_0 .. blocks_{depth-1}` in a Python
loop; `stack_block_params` / `unstack_block_params` move parameters between
the two layouts, and the two paths compute the same function.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from fractal_jax.model import attention, rotary
from fractal_jax.model.dropout import Dropout

Dtype = Any

xavier = nn.initializers.xavier_uniform()


class KVCache(NamedTuple):
  """Keys and values of the positions decoded so far: [B, S, N, H] each ([depth, ...] stacked)."""

  k: jax.Array
  v: jax.Array


class DecodeInputs(NamedTuple):
  """What every AR block needs for one cached decoding step."""

  table: jax.Array  # [1, H/2, 2] rotary row of the token
  position: jax.Array  # int32 scalar


class Dense(nn.Dense):
  """`nn.Dense` applied to its input flattened to 2-D ([..., D] -> [M, D] -> [..., F]).

  Same parameters and the same function. The flattening is for speed: the
  gradient of a rank-3 `dot_general` makes XLA's CPU compiler transpose the
  large output gradient [M, F] (with the elementwise backward of what follows
  fused into that cache-hostile transpose) to form the kernel gradient; on
  rank-2 operands it calls the matrix product with a transposed operand
  instead (SwiGLU of SMALL AR level 1: 2.6x faster forward + backward).
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
) -> nn.Dense:
  """A Linear layer initialised like the official code (xavier-uniform, zero bias).

  `axes`: logical names of the kernel's (input, output) axes (`fractal_jax.parallel.sharding`).
  """
  return Dense(
    features,
    use_bias=use_bias,
    dtype=dtype,
    param_dtype=param_dtype,
    kernel_init=nn.with_logical_partitioning(xavier, axes),
    bias_init=nn.with_logical_partitioning(nn.initializers.zeros, axes[1:]),
    name=name,
  )


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _layer_norm(x: jax.Array, scale: jax.Array, bias: jax.Array, epsilon: float, dtype: Dtype) -> jax.Array:
  return _layer_norm_forward(x, scale, bias, epsilon, dtype)[0]


def _layer_norm_forward(
  x: jax.Array, scale: jax.Array, bias: jax.Array, epsilon: float, dtype: Dtype
) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
  """`nn.LayerNorm`'s forward op for op (fast variance, float32 statistics); also returns (mean, 1/std)."""
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
  the backward pass and reduces more than it needs to; on CPU the written-out
  gradient is ~1.5x faster. Supports the configuration `layer_norm` builds:
  normalisation and parameters over the last axis, scale and bias.
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


def layer_norm(dtype: Dtype, param_dtype: Dtype, name: str | None = None) -> nn.LayerNorm:
  return LayerNorm(
    epsilon=1e-6,
    dtype=dtype,
    param_dtype=param_dtype,
    scale_init=nn.with_logical_partitioning(nn.initializers.ones, ("norm",)),
    bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("norm",)),
    name=name,
  )


class RMSNorm(nn.Module):
  """RMSNorm as LlamaGen: normalise in float32, cast back, then scale."""

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


def swiglu_hidden(width: int) -> int:
  """LlamaGen's SwiGLU width: int(2 * 4D / 3) rounded up to a multiple of 256."""
  hidden = int(2 * (4 * width) / 3)
  return -(-hidden // 256) * 256


def split_qkv(qkv: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
  """[B, L, 3, N, H] -> q, k, v [B, L, N, H] each.

  With `jnp.split` (whose gradient is a concatenation) rather than indexing
  (whose gradients XLA pads and sums, in one large fusion): the pixel head's
  attention backward is ~1.5x faster on CPU.
  """
  q, k, v = jnp.split(qkv, 3, axis=2)
  return q[:, :, 0], k[:, :, 0], v[:, :, 0]


def attend_with_cache(
  q: jax.Array, k: jax.Array, v: jax.Array, cache: KVCache, position: jax.Array
) -> tuple[jax.Array, KVCache]:
  """One decoding step: writes k, v [B, 1, N, H] at `position`, attends to positions 0..position."""
  start = (0, position, 0, 0)
  keys = jax.lax.dynamic_update_slice(cache.k, k.astype(cache.k.dtype), start)
  values = jax.lax.dynamic_update_slice(cache.v, v.astype(cache.v.dtype), start)
  valid = jnp.full((q.shape[0],), position + 1, jnp.int32)
  out = jax.nn.dot_product_attention(q, keys.astype(q.dtype), values.astype(q.dtype), key_value_seq_lengths=valid)
  return out, KVCache(keys, values)


class LlamaAttention(nn.Module):
  width: int
  heads: int
  dtype: Dtype
  param_dtype: Dtype

  @nn.compact
  def __call__(
    self, x: jax.Array, table: jax.Array, cache: KVCache | None = None, position: jax.Array | None = None
  ) -> tuple[jax.Array, KVCache | None]:
    """Causal attention, teacher-forced or one decoding step.

    Args:
      x: [B, T, D] tokens (T = 1 when decoding).
      table: [T, H/2, 2] rotary rows of these tokens.
      cache: None, or keys and values [B, S, N, H] of earlier positions.
      position: int32 scalar, the position of x's token when decoding.

    Returns:
      ([B, T, D], the cache with this token's key and value written at `position`).
    """
    batch, length, _ = x.shape
    head_dim = self.width // self.heads
    qkv = dense(3 * self.width, ("embed", "qkv"), self.dtype, self.param_dtype, use_bias=False, name="wqkv")(x)
    qkv = qkv.reshape(batch, length, 3, self.heads, head_dim)
    q, k, v = split_qkv(qkv)
    q = rotary.apply_rotary(q, table)
    k = rotary.apply_rotary(k, table)
    if cache is None:
      out = attention.dot_product_attention(q, k, v, causal=True)
    else:
      out, cache = attend_with_cache(q, k, v, cache, position)
    out = out.reshape(batch, length, self.width)
    return dense(self.width, ("heads", "embed"), self.dtype, self.param_dtype, use_bias=False, name="wo")(out), cache


class Kernel(nn.Module):
  """Only the kernel [D, F] of a bias-free `dense` layer (same name, shape, init and axes), for fused products."""

  features: int
  axes: tuple[str, str]
  param_dtype: Dtype

  @nn.compact
  def __call__(self, in_features: int) -> jax.Array:
    init = nn.with_logical_partitioning(xavier, self.axes)
    return self.param("kernel", init, (in_features, self.features), self.param_dtype)


class SwiGLU(nn.Module):
  width: int
  dtype: Dtype
  param_dtype: Dtype

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    hidden = swiglu_hidden(self.width)
    # w1 and w3 as one [D, 2F] product: one larger matrix product (and one for the input gradient) is
    # faster on CPU than two that XLA runs side by side.
    w1 = Kernel(hidden, ("embed", "mlp"), self.param_dtype, name="w1")(x.shape[-1])
    w3 = Kernel(hidden, ("embed", "mlp"), self.param_dtype, name="w3")(x.shape[-1])
    kernel = jnp.concatenate([w1, w3], axis=1).astype(self.dtype)
    both = jnp.dot(x.reshape(-1, x.shape[-1]).astype(self.dtype), kernel)  # [M, 2F], flattened as `Dense`
    gate, up = jnp.split(both.reshape(*x.shape[:-1], 2 * hidden), 2, axis=-1)
    return dense(self.width, ("mlp", "embed"), self.dtype, self.param_dtype, use_bias=False, name="w2")(
      nn.silu(gate) * up
    )


class LlamaBlock(nn.Module):
  """Pre-norm causal block of the AR levels. Call: (x [B, L, D], table) -> (x, None)."""

  width: int
  heads: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  deterministic: bool = True
  resid_dropout: float = 0.1  # official AR: fixed, whatever the flags say
  ffn_dropout: float = 0.1

  @nn.compact
  def __call__(
    self, x: jax.Array, extra: jax.Array | DecodeInputs, cache: KVCache | None = None
  ) -> tuple[jax.Array, KVCache | None]:
    """extra: the rotary table [L, H/2, 2], or `DecodeInputs` with this layer's `cache`."""
    attn = LlamaAttention(self.width, self.heads, self.dtype, self.param_dtype, name="attention")
    h = RMSNorm(param_dtype=self.param_dtype, name="attention_norm")(x)
    if cache is None:
      h, _ = attn(h, extra)
    else:
      h, cache = attn(h, extra.table, cache, extra.position)
    x = x + Dropout(self.resid_dropout)(h, deterministic=self.deterministic)
    h = RMSNorm(param_dtype=self.param_dtype, name="ffn_norm")(x)
    h = SwiGLU(self.width, self.dtype, self.param_dtype, name="feed_forward")(h)
    x = x + Dropout(self.ffn_dropout)(h, deterministic=self.deterministic)
    return x, cache


class TimmAttention(nn.Module):
  width: int
  heads: int
  causal: bool
  attn_dropout: float
  proj_dropout: float
  deterministic: bool
  dtype: Dtype
  param_dtype: Dtype

  @nn.compact
  def __call__(
    self,
    x: jax.Array,
    cache: KVCache | None = None,
    position: jax.Array | None = None,
    queries: jax.Array | None = None,
  ) -> tuple[jax.Array, KVCache | None]:
    """x [B, T, D] -> ([B, T, D], cache); with a cache (causal decoding) T = 1 at `position`.

    queries: int [B, Q] (bidirectional only): attend from these positions only -> [B, Q, D].
    """
    batch, length, _ = x.shape
    head_dim = self.width // self.heads
    qkv = dense(3 * self.width, ("embed", "qkv"), self.dtype, self.param_dtype, name="qkv")(x)
    qkv = qkv.reshape(batch, length, 3, self.heads, head_dim)
    q, k, v = split_qkv(qkv)
    if queries is not None:
      if self.causal or cache is not None:
        raise ValueError("query selection is for bidirectional attention without a cache")
      q = jnp.take_along_axis(q, queries[:, :, None, None], axis=1)
      length = queries.shape[1]
    if cache is not None:
      out, cache = attend_with_cache(q, k, v, cache, position)
    else:
      keep = None
      if self.attn_dropout > 0 and not self.deterministic:
        keep = Dropout(self.attn_dropout).keep_mask((batch, self.heads, length, k.shape[1]))
      out = attention.dot_product_attention(
        q, k, v, causal=self.causal, dropout_keep=keep, keep_prob=1.0 - self.attn_dropout
      )
    out = dense(self.width, ("heads", "embed"), self.dtype, self.param_dtype, name="proj")(
      out.reshape(batch, length, self.width)
    )
    return Dropout(self.proj_dropout)(out, deterministic=self.deterministic), cache


def gelu(x: jax.Array) -> jax.Array:
  """Exact (erf) GELU, written as PyTorch's `nn.GELU`: x/2 * (1 + erf(x / sqrt 2)).

  `nn.gelu(approximate=False)` computes the same function as x/2 * erfc(-x / sqrt 2); XLA's CPU
  erfc is several times as costly as its erf (pixel heads: 12.6M GELUs per SMALL AR step).
  """
  return 0.5 * x * (1.0 + jax.lax.erf(x * np.sqrt(0.5).astype(x.dtype)))


class TimmMlp(nn.Module):
  width: int
  dropout: float
  deterministic: bool
  dtype: Dtype
  param_dtype: Dtype

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    h = dense(4 * self.width, ("embed", "mlp"), self.dtype, self.param_dtype, name="fc1")(x)
    h = Dropout(self.dropout)(gelu(h), deterministic=self.deterministic)
    h = dense(self.width, ("mlp", "embed"), self.dtype, self.param_dtype, name="fc2")(h)
    return Dropout(self.dropout)(h, deterministic=self.deterministic)


class TimmBlock(nn.Module):
  """Pre-norm ViT block of MAR levels and pixel heads. Call: (x [B, L, D], position, cache) -> (x, cache)."""

  width: int
  heads: int
  causal: bool = False
  attn_dropout: float = 0.0
  proj_dropout: float = 0.0
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  deterministic: bool = True

  @nn.compact
  def __call__(
    self,
    x: jax.Array,
    position: jax.Array | None = None,
    cache: KVCache | None = None,
    queries: jax.Array | None = None,
  ) -> tuple[jax.Array, KVCache | None]:
    """Full sequence (cache None), or one causal decoding step at `position` with this layer's cache.

    queries: int [B, Q]: the block's outputs at these positions only, [B, Q, D]
    (keys and values still come from every position; the rest of the block
    runs on Q tokens instead of L).
    """
    h = layer_norm(self.dtype, self.param_dtype, name="norm1")(x)
    h, cache = TimmAttention(
      self.width,
      self.heads,
      self.causal,
      self.attn_dropout,
      self.proj_dropout,
      self.deterministic,
      self.dtype,
      self.param_dtype,
      name="attn",
    )(h, cache, position, queries)
    if queries is not None:
      x = jnp.take_along_axis(x, queries[:, :, None], axis=1)
    x = x + h
    h = layer_norm(self.dtype, self.param_dtype, name="norm2")(x)
    mlp = TimmMlp(self.width, self.proj_dropout, self.deterministic, self.dtype, self.param_dtype, name="mlp")
    return x + mlp(h), cache


def remat_policy(name: str) -> Any:
  """Maps a config name to a `jax.checkpoint_policies` policy ("full" saves nothing)."""
  if name == "full":
    return jax.checkpoint_policies.nothing_saveable
  return getattr(jax.checkpoint_policies, name)


# Scanned stacks up to this depth run as a Python loop over their (still stacked) parameters: the
# gradient of a scan keeps every layer's activations in [depth, ...] buffers, filled by zero
# broadcasts and dynamic-update-slices that a loop does not need (SMALL AR training step on CPU:
# about 1.2x faster). Deeper stacks keep the scan for compile time.
LOOP_MAX_DEPTH = 8


class BlockStack(nn.Module):
  """`depth` blocks of `block_cls(**block_kwargs)`, scanned or looped.

  Call: (x [B, L, D], extra, deterministic) -> x [B, L, D]; `extra` (a
  rotary table or None) is passed unchanged to every block; `deterministic`
  switches dropout off (it becomes each block's attribute).
  """

  block_cls: type[nn.Module]
  block_kwargs: Mapping[str, Any]
  depth: int
  scan: bool = True
  remat: str = "none"

  @nn.compact
  def __call__(
    self,
    x: jax.Array,
    extra: Any = None,
    deterministic: bool = True,
    per_layer: Any = None,
    queries: jax.Array | None = None,
  ) -> Any:
    """Returns x [B, L, D], or (x, per_layer outputs stacked [depth, ...]) when `per_layer` is given.

    `per_layer` (e.g. a KV cache `[depth, B, S, N, H]`) is sliced along its
    leading axis: block i gets slice i and returns its update.
    `queries` (int [B, Q], `TimmBlock` stacks): only the outputs at these
    positions, [B, Q, D]; the last block computes just those (deep scanned
    stacks compute all and gather).
    """
    block_cls = self.block_cls
    kwargs = dict(self.block_kwargs, deterministic=deterministic)
    # Parameters are created by nn.scan (stacked layout) but, up to LOOP_MAX_DEPTH, applied in a loop.
    loop_scanned = self.scan and self.depth <= LOOP_MAX_DEPTH and not self.is_initializing()
    if self.remat != "none":
      # prevent_cse is only needed outside scan (scan already prevents CSE across steps).
      uses_scan = self.scan and not loop_scanned
      block_cls = nn.remat(block_cls, policy=remat_policy(self.remat), prevent_cse=not uses_scan)
    if loop_scanned:
      # The scanned parameters, sliced per layer and applied by a Python loop (see `LOOP_MAX_DEPTH`).
      looped = nn.map_variables(_BlockLoop, "params", trans_in_fn=functools.partial(_slice_layers, depth=self.depth))
      x, outputs = looped(block_cls, kwargs, self.depth, name="blocks")(x, extra, per_layer, queries)
    elif self.scan:
      stack = nn.scan(
        block_cls,
        variable_axes={"params": 0},
        split_rngs={"params": True, "dropout": True},
        in_axes=(nn.broadcast, 0),
        length=self.depth,
        metadata_params={nn.PARTITION_NAME: "layers"},
      )
      x, outputs = stack(**kwargs, name="blocks")(x, extra, per_layer)
      if queries is not None:  # every layer scanned over all positions: gather at the end
        x = jnp.take_along_axis(x, queries[:, :, None], axis=1)
    else:
      make_block = lambda i: block_cls(**kwargs, name=f"blocks_{i}")  # noqa: E731
      x, outputs = _apply_in_turn(make_block, self.depth, x, extra, per_layer, queries)
    return x if per_layer is None else (x, outputs)


def _slice_layers(collections: Mapping[str, Any], depth: int) -> dict[str, Any]:
  """{collection: stacked block variables ([depth, ...] leaves)} -> {collection: {`blocks_i`: slice i}}."""
  return {
    name: {f"blocks_{i}": jax.tree.map(lambda a, i=i: a[i], dict(tree)) for i in range(depth)}
    for name, tree in collections.items()
  }


class _BlockLoop(nn.Module):
  """`depth` blocks `blocks_0 ..` applied in a Python loop; per_layer as in `BlockStack`."""

  block_cls: Any
  block_kwargs: Mapping[str, Any]
  depth: int

  @nn.compact
  def __call__(self, x: jax.Array, extra: Any, per_layer: Any, queries: jax.Array | None) -> tuple[jax.Array, Any]:
    return _apply_in_turn(
      lambda i: self.block_cls(**self.block_kwargs, name=f"blocks_{i}"), self.depth, x, extra, per_layer, queries
    )


def _apply_in_turn(
  make_block: Any, depth: int, x: jax.Array, extra: Any, per_layer: Any, queries: jax.Array | None = None
) -> tuple[jax.Array, Any]:
  """Blocks `make_block(0) .. make_block(depth - 1)` one after the other; per_layer, queries as in `BlockStack`."""
  outputs = []
  for i in range(depth):
    layer_input = None if per_layer is None else jax.tree.map(lambda a, i=i: a[i], per_layer)
    if queries is not None and i == depth - 1:
      x, out = make_block(i)(x, extra, layer_input, queries=queries)
    else:
      x, out = make_block(i)(x, extra, layer_input)
    outputs.append(out)
  outputs = None if per_layer is None else jax.tree.map(lambda *a: jnp.stack(a), *outputs)
  return x, outputs


def unstack_block_params(params: Mapping[str, Any]) -> dict[str, Any]:
  """Scanned layout (`blocks` with a leading [depth] axis) -> `blocks_0 ..`, recursively."""
  out: dict[str, Any] = {}
  for key, value in params.items():
    if key == "blocks" and isinstance(value, Mapping):
      depth = jax.tree.leaves(value)[0].shape[0]
      for i in range(depth):
        out[f"blocks_{i}"] = jax.tree.map(lambda a, i=i: a[i], dict(value))
    elif isinstance(value, Mapping):
      out[key] = unstack_block_params(value)
    else:
      out[key] = value
  return out


def stack_block_params(params: Mapping[str, Any]) -> dict[str, Any]:
  """Inverse of `unstack_block_params`."""
  out: dict[str, Any] = {}
  per_block = sorted((k for k in params if k.startswith("blocks_")), key=lambda k: int(k.split("_")[1]))
  if per_block:
    out["blocks"] = jax.tree.map(lambda *xs: jnp.stack(xs), *[dict(params[k]) for k in per_block])
  for key, value in params.items():
    if key in per_block:
      continue
    out[key] = stack_block_params(value) if isinstance(value, Mapping) else value
  return out
