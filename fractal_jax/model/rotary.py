"""The official 2-D rotary position embedding of the AR levels.

Dimension letters: L sequence, N heads, H head width, G grid side.

Each head of width H holds H/2 rotary pairs of adjacent elements
(x[2i], x[2i+1]). The first H/4 pairs rotate by the patch's row index, the
next H/4 by its column index, both with frequencies
theta_k = base^(-4k/H), k = 0..H/4-1 (the denominator is H/2, not H as in
1-D RoPE). Row 0 of the table belongs to the condition token and is all
zeros (cos = sin = 0), a quirk of the official code that we keep: that
token's query and key become zero vectors.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def rotary_table(grid_size: int, head_dim: int, base: float = 10000.0) -> np.ndarray:
  """Cos/sin table for the condition token followed by a raster-order grid.

  Returns:
    float32 [1 + G*G, H/2, 2]; [..., 0] is cos, [..., 1] is sin; row 0 is zeros.
  """
  if head_dim % 4:
    raise ValueError(f"2-D rotary needs a head width divisible by 4, got {head_dim}")
  half = head_dim // 2
  # Computed in float32 like the official table, so angles match bit for bit.
  exponents = np.arange(0, half, 2, dtype=np.float32)[: half // 2] / np.float32(half)
  freqs = (np.float32(1.0) / (np.float32(base) ** exponents)).astype(np.float32)
  positions = np.arange(grid_size, dtype=np.float32)
  angles_1d = np.outer(positions, freqs).astype(np.float32)  # [G, H/4]
  rows = np.broadcast_to(angles_1d[:, None, :], (grid_size, grid_size, half // 2))
  cols = np.broadcast_to(angles_1d[None, :, :], (grid_size, grid_size, half // 2))
  angles = np.concatenate([rows, cols], axis=-1).reshape(grid_size * grid_size, half)
  table = np.stack([np.cos(angles), np.sin(angles)], axis=-1).astype(np.float32)
  return np.concatenate([np.zeros((1, half, 2), np.float32), table], axis=0)


def apply_rotary(x: jax.Array, table: jax.Array) -> jax.Array:
  """Rotates adjacent pairs of every head.

  Args:
    x: [B, L, N, H] queries or keys.
    table: [L, H/2, 2] rows of `rotary_table` for these positions.

  Returns:
    [B, L, N, H] in x's dtype (the rotation itself runs in float32).
  """
  pairs = x.astype(jnp.float32).reshape(*x.shape[:-1], -1, 2)
  cos = table[None, :, None, :, 0]
  sin = table[None, :, None, :, 1]
  even, odd = pairs[..., 0], pairs[..., 1]
  rotated = jnp.stack([even * cos - odd * sin, odd * cos + even * sin], axis=-1)
  return rotated.reshape(x.shape).astype(x.dtype)
