"""The pixel level: R, G, B of one pixel, causally, from one condition.

Dimension letters: N items (pixels), W width, V = 256 values per channel.

Tokens are `[cond_proj(cond), R_emb(r), G_emb(g)]` (the official code also
appends `B_emb(b)`, whose output is never read; with causal attention
dropping it changes nothing), then LayerNorm, causal timm blocks without
dropout and a final LayerNorm. The logits of channel c come from position c,
`x @ codebook_c.T + bias_c` in float32: the output layer is tied to that
channel's input codebook. The same module models the guiding pixel (a
patch's mean colour) of MAR levels.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from fractal_jax.model.block_stack import level_blocks
from fractal_jax.model.blocks import KVCache, TimmBlock
from fractal_jax.model.layers import dense, layer_norm

PIXEL_MEAN = (0.485, 0.456, 0.406)
PIXEL_STD = (0.229, 0.224, 0.225)
NUM_VALUES = 256
CHANNELS = ("r", "g", "b")


def pixel_targets(pixels: jax.Array, noise: jax.Array | None) -> jax.Array:
  """Normalised RGB -> int32 ids in 0..255, as the official code.

  `round(255 * (x * std + mean) + 0.01 * noise)`: the tiny Gaussian noise
  breaks rounding ties (it is drawn at evaluation too).

  Args:
    pixels: [N, 3] float, ImageNet-normalised.
    noise: [N, 3] standard normal, or None for none.
  """
  mean = jnp.asarray(PIXEL_MEAN, jnp.float32)
  std = jnp.asarray(PIXEL_STD, jnp.float32)
  values = pixels.astype(jnp.float32) * std + mean
  values = values * 255.0
  if noise is not None:
    values = values + 1e-2 * noise.astype(jnp.float32)
  return jnp.clip(jnp.round(values), 0, NUM_VALUES - 1).astype(jnp.int32)


def ids_to_pixels(ids: jax.Array) -> jax.Array:
  """int ids [..., 3] -> ImageNet-normalised float32 values."""
  mean = jnp.asarray(PIXEL_MEAN, jnp.float32)
  std = jnp.asarray(PIXEL_STD, jnp.float32)
  return (ids.astype(jnp.float32) / 255.0 - mean) / std


def normalize_uint8(images: jax.Array) -> jax.Array:
  """uint8 [..., 3] (what the input pipeline ships) -> ImageNet-normalised float32; float input passes through."""
  if images.dtype == jnp.uint8:
    return ids_to_pixels(images)
  return images


def to_uint8(images: jax.Array) -> jax.Array:
  """ImageNet-normalised float [..., 3] -> uint8 pixel values (rounded, clipped): the inverse of `normalize_uint8`."""
  mean = jnp.asarray(PIXEL_MEAN, jnp.float32)
  std = jnp.asarray(PIXEL_STD, jnp.float32)
  return jnp.clip(jnp.round((images * std + mean) * 255.0), 0, 255).astype(jnp.uint8)


class PixelHead(nn.Module):
  """Call: (cond [N, Dc], ids [N, 3] int) -> logits [N, 3, 256] float32.

  Logits of channel c depend on cond and ids[:, :c] only; ids[:, 2] is unused.
  """

  width: int
  depth: int
  heads: int
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  scan: bool = True
  remat: str = "none"
  cpu_kernels: bool = False  # the CPU-tuned forms of the layers (`blocks` module docstring)
  item_chunks: int = 1  # the blocks run their items in this many sequential chunks (`block_stack`)

  def setup(self) -> None:
    emb_init = nn.with_logical_partitioning(nn.initializers.normal(0.02), ("vocab", "embed"))
    self.codebooks = [
      self.param(f"{c}_codebook", emb_init, (NUM_VALUES, self.width), self.param_dtype) for c in CHANNELS
    ]
    self.biases = [
      self.param(
        f"{c}_mlm_bias",
        nn.with_logical_partitioning(nn.initializers.zeros, (None, "vocab")),
        (1, NUM_VALUES),
        self.param_dtype,
      )
      for c in CHANNELS
    ]
    self.cond_proj = dense(self.width, ("cond", "embed"), self.dtype, self.param_dtype, cpu_kernels=self.cpu_kernels)
    self.ln = layer_norm(self.dtype, self.param_dtype, cpu_kernels=self.cpu_kernels)
    self.layers = level_blocks(
      self, TimmBlock, self.depth, self.item_chunks, width=self.width, heads=self.heads, causal=True
    )
    self.norm = layer_norm(self.dtype, self.param_dtype, cpu_kernels=self.cpu_kernels)

  def _token(self, cond: jax.Array, ids: jax.Array, position: int) -> jax.Array:
    """Input token `position` [N, W]: the condition, then the R and G embeddings."""
    if position == 0:
      return self.cond_proj(cond)
    return jnp.take(self.codebooks[position - 1], ids[:, position - 1], axis=0).astype(self.dtype)

  def _logits(self, x: jax.Array, channel: int) -> jax.Array:
    """Tied output layer in float32: x [N, W] -> [N, 256]."""
    return x.astype(jnp.float32) @ self.codebooks[channel].astype(jnp.float32).T + self.biases[channel].astype(
      jnp.float32
    )

  def __call__(self, cond: jax.Array, ids: jax.Array) -> jax.Array:
    """Teacher-forced logits [N, 3, 256] of R, G, B (ids[:, 2] is unused)."""
    return jnp.stack(self.channel_logits(cond, ids), axis=1)

  def channel_logits(self, cond: jax.Array, ids: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """`__call__`'s logits as three [N, 256] arrays (R, G, B), for losses that need not stack them."""
    x = jnp.stack([self._token(cond, ids, c) for c in range(3)], axis=1)  # [N, 3, W]
    x, _ = self.layers(self.ln(x))
    x = self.norm(x)
    return tuple(self._logits(x[:, c], c) for c in range(3))

  def init_cache(self, batch: int) -> KVCache:
    """Empty KV cache [depth, N, 3, heads, head_dim] for `decode`."""
    shape = (self.depth, batch, 3, self.heads, self.width // self.heads)
    return KVCache(jnp.zeros(shape, self.dtype), jnp.zeros(shape, self.dtype))

  def decode(self, cond: jax.Array, ids: jax.Array, channel: int, cache: KVCache) -> tuple[jax.Array, KVCache]:
    """Logits [N, 256] of `channel` given ids[:, :channel], adding one token to the cache.

    Call with channel 0, 1, 2 in order; equals `__call__(cond, ids)[:, channel]`.
    """
    x = self.ln(self._token(cond, ids, channel)[:, None])
    x, cache = self.layers(x, position=jnp.int32(channel), cache=cache)
    return self._logits(self.norm(x)[:, 0], channel), cache


def pixel_losses(
  logits: jax.Array | Sequence[jax.Array], targets: jax.Array, r_weight: float, train: bool
) -> tuple[jax.Array, jax.Array]:
  """Per-item loss and per-channel cross-entropy.

  Training weights red: `(r_weight * CE_R + CE_G + CE_B) / (r_weight + 2)`;
  evaluation (NLL) weighs the channels equally.

  Args:
    logits: [N, 3, 256] float32, or the three channels' [N, 256] (`PixelHead.channel_logits`).
    targets: [N, 3] int.

  Returns:
    (loss [N], cross_entropy [N, 3]), float32, in nats.
  """
  if isinstance(logits, (tuple, list)):
    # Per channel: stacking the logits (and slicing their gradient) would copy [N, 3, 256] twice.
    ce = jnp.stack(
      [optax.softmax_cross_entropy_with_integer_labels(x, targets[:, c]) for c, x in enumerate(logits)], axis=1
    )
  else:
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
  if train:
    loss = (r_weight * ce[:, 0] + ce[:, 1] + ce[:, 2]) / (r_weight + 2.0)
  else:
    loss = ce.mean(axis=-1)
  return loss, ce
