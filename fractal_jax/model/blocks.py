"""Transformer blocks: the LlamaGen block of AR levels and the timm ViT block of MAR levels and pixel heads.

Dimension letters: B batch, L sequence, T tokens of this call, S cached
positions, D width, N heads, H head width, Q query positions.

Two block families, named as in the official code so that weights map
one-to-one:
  * `LlamaBlock` (AR levels, LlamaGen-style): RMSNorm, fused `wqkv` and `wo`
    without bias, 2-D rotary, SwiGLU MLP without bias; residual and MLP
    dropout fixed at 0.1 as in the official AR (it ignores the dropout flags).
  * `TimmBlock` (MAR levels and pixel heads, timm ViT-style): LayerNorm,
    `qkv` and `proj` with bias, GELU (erf) MLP x4; dropout on the attention
    probabilities, after `proj`, after the GELU and after `fc2`.

Every block is called the same way,

    block(x, *, rotary=None, position=None, cache=None, queries=None) -> (x, cache)

with x [B, T, D]. `rotary` ([T, H/2, 2] rotary rows of the tokens) is for
`LlamaBlock` only, `queries` for bidirectional `TimmBlock`s only. With a
`cache` (this layer's keys and values [B, S, N, H]) the call is one causal
decoding step: T = 1, the token at `position`, and the returned cache holds
its key and value. `block_stack.BlockStack` stacks blocks.

`cpu_kernels` (every module here) selects the CPU-tuned forms of the layers,
attention, dropout masks and SwiGLU's fused product; without it the
standard Flax/JAX operations run (`model_config.ModelSettings.kernels`).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from fractal_jax.model import attention, rotary
from fractal_jax.model.dropout import Dropout
from fractal_jax.model.layers import Kernel, RMSNorm, dense, gelu, layer_norm, swiglu_hidden

Dtype = Any


class KVCache(NamedTuple):
  """Keys and values of the positions decoded so far: [B, S, N, H] each ([depth, ...] stacked)."""

  k: jax.Array
  v: jax.Array


def split_qkv(qkv: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
  """[B, L, 3, N, H] -> q, k, v [B, L, N, H] each.

  With `jnp.split` (whose gradient is a concatenation) rather than indexing
  (whose gradients XLA pads and sums, in one large fusion).
  """
  q, k, v = jnp.split(qkv, 3, axis=2)
  return q[:, :, 0], k[:, :, 0], v[:, :, 0]


def attend_with_cache(
  q: jax.Array, k: jax.Array, v: jax.Array, cache: KVCache, position: jax.Array
) -> tuple[jax.Array, KVCache]:
  """One decoding step: writes k, v [B, 1, N, H] at `position`, attends to positions 0..position.

  Returns (the attention output [B, 1, N, H] in q's dtype, the updated cache [B, S, N, H] each).
  """
  start = (0, position, 0, 0)
  keys = jax.lax.dynamic_update_slice(cache.k, k.astype(cache.k.dtype), start)
  values = jax.lax.dynamic_update_slice(cache.v, v.astype(cache.v.dtype), start)
  valid = jnp.full((q.shape[0],), position + 1, jnp.int32)
  out = jax.nn.dot_product_attention(q, keys.astype(q.dtype), values.astype(q.dtype), key_value_seq_lengths=valid)
  return out, KVCache(keys, values)


class LlamaAttention(nn.Module):
  """LlamaGen's causal attention with 2-D rotary embedding; `wqkv` and `wo` without bias."""

  width: int
  heads: int
  dtype: Dtype
  param_dtype: Dtype
  cpu_kernels: bool = False

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
    cpu = self.cpu_kernels
    qkv = dense(
      3 * self.width, ("embed", "qkv"), self.dtype, self.param_dtype, use_bias=False, name="wqkv", cpu_kernels=cpu
    )(x)
    qkv = qkv.reshape(batch, length, 3, self.heads, head_dim)
    q, k, v = split_qkv(qkv)
    q = rotary.apply_rotary(q, table)
    k = rotary.apply_rotary(k, table)
    if cache is None:
      out = attention.dot_product_attention(q, k, v, causal=True, cpu_kernels=cpu)
    else:
      out, cache = attend_with_cache(q, k, v, cache, position)
    out = out.reshape(batch, length, self.width)
    wo = dense(self.width, ("heads", "embed"), self.dtype, self.param_dtype, use_bias=False, name="wo", cpu_kernels=cpu)
    return wo(out), cache


class SwiGLU(nn.Module):
  """LlamaGen's MLP `w2(silu(w1 x) * w3 x)` without bias: [..., D] -> [..., D]."""

  width: int
  dtype: Dtype
  param_dtype: Dtype
  cpu_kernels: bool = False

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    hidden = swiglu_hidden(self.width)
    w1 = Kernel(hidden, ("embed", "mlp"), self.param_dtype, name="w1")(x.shape[-1]).astype(self.dtype)
    w3 = Kernel(hidden, ("embed", "mlp"), self.param_dtype, name="w3")(x.shape[-1]).astype(self.dtype)
    x = x.astype(self.dtype)
    if self.cpu_kernels:
      # w1 and w3 as one [D, 2F] product of the flattened input: one larger matrix product (and one for the input
      # gradient) rather than two that XLA's CPU backend runs side by side.
      both = jnp.dot(x.reshape(-1, x.shape[-1]), jnp.concatenate([w1, w3], axis=1))
      gate, up = jnp.split(both.reshape(*x.shape[:-1], 2 * hidden), 2, axis=-1)
    else:
      gate, up = x @ w1, x @ w3
    w2 = dense(
      self.width,
      ("mlp", "embed"),
      self.dtype,
      self.param_dtype,
      use_bias=False,
      name="w2",
      cpu_kernels=self.cpu_kernels,
    )
    return w2(nn.silu(gate) * up)


class LlamaBlock(nn.Module):
  """Pre-norm causal block of the AR levels (call signature: module docstring; needs `rotary`)."""

  width: int
  heads: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  deterministic: bool = True
  resid_dropout: float = 0.1  # official AR: fixed, whatever the flags say
  ffn_dropout: float = 0.1
  cpu_kernels: bool = False

  @nn.compact
  def __call__(
    self,
    x: jax.Array,
    *,
    rotary: jax.Array | None = None,
    position: jax.Array | None = None,
    cache: KVCache | None = None,
    queries: jax.Array | None = None,
  ) -> tuple[jax.Array, KVCache | None]:
    """x [B, T, D], rotary [T, H/2, 2] -> ([B, T, D], cache); with a cache, one decoding step at `position`."""
    if rotary is None:
      raise ValueError("LlamaBlock needs the rotary rows of its tokens (rotary=[T, H/2, 2])")
    if queries is not None:
      raise ValueError("query selection is for bidirectional TimmBlocks")
    cpu = self.cpu_kernels
    attn = LlamaAttention(self.width, self.heads, self.dtype, self.param_dtype, cpu, name="attention")
    h = RMSNorm(param_dtype=self.param_dtype, name="attention_norm")(x)
    h, cache = attn(h, rotary, cache, position)
    x = x + Dropout(self.resid_dropout, cpu_kernels=cpu)(h, deterministic=self.deterministic)
    h = RMSNorm(param_dtype=self.param_dtype, name="ffn_norm")(x)
    h = SwiGLU(self.width, self.dtype, self.param_dtype, cpu, name="feed_forward")(h)
    x = x + Dropout(self.ffn_dropout, cpu_kernels=cpu)(h, deterministic=self.deterministic)
    return x, cache


class TimmAttention(nn.Module):
  """timm's attention (`qkv`, `proj` with bias), causal or bidirectional, with attention-probability dropout."""

  width: int
  heads: int
  causal: bool
  attn_dropout: float
  proj_dropout: float
  deterministic: bool
  dtype: Dtype
  param_dtype: Dtype
  cpu_kernels: bool = False

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
    cpu = self.cpu_kernels
    qkv = dense(3 * self.width, ("embed", "qkv"), self.dtype, self.param_dtype, name="qkv", cpu_kernels=cpu)(x)
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
        keep = Dropout(self.attn_dropout, cpu_kernels=cpu).keep_mask((batch, self.heads, length, k.shape[1]))
      out = attention.dot_product_attention(
        q, k, v, causal=self.causal, dropout_keep=keep, keep_prob=1.0 - self.attn_dropout, cpu_kernels=cpu
      )
    out = dense(self.width, ("heads", "embed"), self.dtype, self.param_dtype, name="proj", cpu_kernels=cpu)(
      out.reshape(batch, length, self.width)
    )
    return Dropout(self.proj_dropout, cpu_kernels=cpu)(out, deterministic=self.deterministic), cache


class TimmMlp(nn.Module):
  """timm's MLP `fc2(gelu(fc1 x))`, hidden 4D, with dropout after the GELU and after `fc2`: [..., D] -> [..., D]."""

  width: int
  dropout: float
  deterministic: bool
  dtype: Dtype
  param_dtype: Dtype
  cpu_kernels: bool = False

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    cpu = self.cpu_kernels
    h = dense(4 * self.width, ("embed", "mlp"), self.dtype, self.param_dtype, name="fc1", cpu_kernels=cpu)(x)
    h = Dropout(self.dropout, cpu_kernels=cpu)(gelu(h, cpu_kernels=cpu), deterministic=self.deterministic)
    h = dense(self.width, ("mlp", "embed"), self.dtype, self.param_dtype, name="fc2", cpu_kernels=cpu)(h)
    return Dropout(self.dropout, cpu_kernels=cpu)(h, deterministic=self.deterministic)


class TimmBlock(nn.Module):
  """Pre-norm ViT block of MAR levels and pixel heads (call signature: module docstring; no `rotary`)."""

  width: int
  heads: int
  causal: bool = False
  attn_dropout: float = 0.0
  proj_dropout: float = 0.0
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  deterministic: bool = True
  cpu_kernels: bool = False

  @nn.compact
  def __call__(
    self,
    x: jax.Array,
    *,
    rotary: jax.Array | None = None,
    position: jax.Array | None = None,
    cache: KVCache | None = None,
    queries: jax.Array | None = None,
  ) -> tuple[jax.Array, KVCache | None]:
    """Full sequence (cache None), or one causal decoding step at `position` with this layer's cache.

    queries: int [B, Q]: the block's outputs at these positions only, [B, Q, D]
    (keys and values still come from every position; the rest of the block
    runs on Q tokens instead of L).
    """
    if rotary is not None:
      raise ValueError("TimmBlocks use learned positions, not rotary embeddings")
    cpu = self.cpu_kernels
    h = layer_norm(self.dtype, self.param_dtype, name="norm1", cpu_kernels=cpu)(x)
    h, cache = TimmAttention(
      self.width,
      self.heads,
      self.causal,
      self.attn_dropout,
      self.proj_dropout,
      self.deterministic,
      self.dtype,
      self.param_dtype,
      cpu,
      name="attn",
    )(h, cache, position, queries)
    if queries is not None:
      x = jnp.take_along_axis(x, queries[:, :, None], axis=1)
    x = x + h
    h = layer_norm(self.dtype, self.param_dtype, name="norm2", cpu_kernels=cpu)(x)
    mlp = TimmMlp(self.width, self.proj_dropout, self.deterministic, self.dtype, self.param_dtype, cpu, name="mlp")
    return x + mlp(h), cache
