"""The AR generator level (LlamaGen-style, causal, raster order).

Dimension letters: N items, L patches, D width, Dc condition width,
P* = 3 * patch_size**2 patch vector length.

Tokens `[cond_emb(cond), patch_emb(patch_1 .. patch_{L-1})]`, plus learned
positions, LayerNorm, causal `LlamaBlock`s with the official 2-D rotary
embedding, final LayerNorm. Output position t is the condition of patch t
(teacher forcing). The official code also feeds patch_L, whose output it
drops; under causal attention leaving it out changes nothing and saves a
token.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from fractal_jax.model import rotary
from fractal_jax.model.block_stack import level_blocks
from fractal_jax.model.blocks import KVCache, LlamaBlock
from fractal_jax.model.layers import dense, layer_norm
from fractal_jax.model.model_config import LevelSpec


class ARLevel(nn.Module):
  spec: LevelSpec
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  scan: bool = True
  remat: str = "none"
  cpu_kernels: bool = False  # the CPU-tuned forms of the layers (`blocks` module docstring)

  def setup(self) -> None:
    spec = self.spec
    self.patch_emb = dense(spec.width, ("patch", "embed"), self.dtype, self.param_dtype, cpu_kernels=self.cpu_kernels)
    self.patch_emb_ln = layer_norm(self.dtype, self.param_dtype, cpu_kernels=self.cpu_kernels)
    self.cond_emb = dense(spec.width, ("cond", "embed"), self.dtype, self.param_dtype, cpu_kernels=self.cpu_kernels)
    self.pos_embed_learned = self.param(
      "pos_embed_learned",
      nn.with_logical_partitioning(nn.initializers.normal(0.02), (None, "seq", "embed")),
      (1, spec.seq_len + 1, spec.width),
      self.param_dtype,
    )
    self.layers = level_blocks(self, LlamaBlock, spec.depth, spec.item_chunks, width=spec.width, heads=spec.heads)
    self.norm = layer_norm(self.dtype, self.param_dtype, cpu_kernels=self.cpu_kernels)

  def rotary_table(self) -> jax.Array:
    """[L+1, H/2, 2] float32; row 0 (condition token) is zeros."""
    return jnp.asarray(rotary.rotary_table(self.spec.grid_size, self.spec.head_dim))

  def __call__(self, patches: jax.Array, conds: list[jax.Array], deterministic: bool = True) -> jax.Array:
    """Teacher-forced conditions for every patch.

    Args:
      patches: [N, L, P*] ground-truth patches, raster order.
      conds: list whose first entry [N, Dc] is this level's condition.
      deterministic: no dropout (evaluation).

    Returns:
      [N, L, D]: position t is the condition for patch t.
    """
    length = self.spec.seq_len
    x = self.patch_emb(patches[:, : length - 1])
    cond = self.cond_emb(conds[0])[:, None]
    x = jnp.concatenate([cond, x], axis=1)  # [N, L, D]
    x = x + self.pos_embed_learned[:, :length].astype(x.dtype)
    x = self.patch_emb_ln(x)
    x, _ = self.layers(x, rotary=self.rotary_table()[:length], deterministic=deterministic)
    return self.norm(x)

  def init_cache(self, batch: int) -> KVCache:
    """Empty KV cache [depth, B, L, N, H] for keys and values, in the compute dtype."""
    spec = self.spec
    shape = (spec.depth, batch, spec.seq_len, spec.heads, spec.head_dim)
    return KVCache(jnp.zeros(shape, self.dtype), jnp.zeros(shape, self.dtype))

  def decode_step(
    self, cond: jax.Array, previous_patch: jax.Array, position: jax.Array, cache: KVCache
  ) -> tuple[jax.Array, KVCache]:
    """One cached decoding step: the condition of patch `position`.

    Args:
      cond: [B, Dc] this level's condition (the input token at position 0).
      previous_patch: [B, P*] patch `position - 1` (the input token at later positions).
      position: int32 scalar in 0..L-1.
      cache: keys and values [depth, B, L, N, H] of positions < `position`.

    Returns:
      ([B, D] the output at `position`, the cache with `position` written).
    """
    token = jnp.where(position == 0, self.cond_emb(cond), self.patch_emb(previous_patch))[:, None]
    pos = jax.lax.dynamic_slice_in_dim(self.pos_embed_learned[0], position, 1)  # [1, D]
    token = self.patch_emb_ln(token + pos.astype(token.dtype))
    row = jax.lax.dynamic_slice_in_dim(self.rotary_table(), position, 1)  # [1, H/2, 2]
    x, cache = self.layers(token, rotary=row, position=position, cache=cache)
    return self.norm(x)[:, 0], cache
