"""Patch layout shared by all levels.

Dimension letters: B batch (items), S image side, P patch side, G grid side
(S = G * P), L = G * G patches, C = 3 channels, D width.

Images are NHWC `[B, S, S, 3]`. A patch vector is ordered (channel, row, col),
`3 * P * P` long, as in the official code, so that official `patch_emb`
weights apply unchanged; patches are in raster order.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def patchify(images: jax.Array, patch_size: int) -> jax.Array:
  """[B, S, S, 3] -> [B, L, 3*P*P], patch vectors ordered (channel, row, col)."""
  batch, side, _, channels = images.shape
  grid = side // patch_size
  x = images.reshape(batch, grid, patch_size, grid, patch_size, channels)
  x = x.transpose(0, 1, 3, 5, 2, 4)  # [B, G, G, C, P, P]
  return x.reshape(batch, grid * grid, channels * patch_size * patch_size)


def unpatchify(patches: jax.Array, patch_size: int) -> jax.Array:
  """[B, L, 3*P*P] -> [B, S, S, 3]; inverse of `patchify`."""
  batch, seq_len, _ = patches.shape
  grid = round(seq_len**0.5)
  x = patches.reshape(batch, grid, grid, 3, patch_size, patch_size)
  x = x.transpose(0, 1, 4, 2, 5, 3)  # [B, G, P, G, P, C]
  return x.reshape(batch, grid * patch_size, grid * patch_size, 3)


def patches_as_images(patches: jax.Array, patch_size: int) -> jax.Array:
  """[B, L, 3*P*P] -> [B*L, P, P, 3]: every patch becomes an item of the next level."""
  batch, seq_len, _ = patches.shape
  x = patches.reshape(batch * seq_len, 3, patch_size, patch_size)
  return x.transpose(0, 2, 3, 1)


def neighbour_conditions(middle: jax.Array, num_conds: int) -> list[jax.Array]:
  """The official five conditions per patch, of which the first `num_conds`.

  Args:
    middle: [B, L, D] outputs at the patch positions.
    num_conds: 1..5; order middle, top, right, bottom, left.

  Returns:
    list of [B, L, D]: "top" of a patch is the output of the patch above it
    (zeros on the first row), "right" the one to its right (zeros on the last
    column), and so on.
  """
  batch, seq_len, width = middle.shape
  grid = round(seq_len**0.5)
  grid_x = middle.reshape(batch, grid, grid, width)
  zero_row = jnp.zeros((batch, 1, grid, width), middle.dtype)
  zero_col = jnp.zeros((batch, grid, 1, width), middle.dtype)
  shifted = [
    grid_x,
    jnp.concatenate([zero_row, grid_x[:, :-1]], axis=1),  # top
    jnp.concatenate([grid_x[:, :, 1:], zero_col], axis=2),  # right
    jnp.concatenate([grid_x[:, 1:], zero_row], axis=1),  # bottom
    jnp.concatenate([zero_col, grid_x[:, :, :-1]], axis=2),  # left
  ]
  return [c.reshape(batch, seq_len, width) for c in shifted[:num_conds]]
