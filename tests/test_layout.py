"""Rotary angles, patch layout and neighbour conditions against hand-computed cases."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from fractal_jax.model import patches, rotary


def test_rotary_table_hand_computed():
  # grid 2, head width 8: 4 rotary pairs; pairs 0-1 rotate by the row, 2-3 by the column,
  # with theta_k = 10000^(-4k/8) = 1, 0.01.
  table = rotary.rotary_table(grid_size=2, head_dim=8)
  assert table.shape == (5, 4, 2)
  np.testing.assert_array_equal(table[0], 0.0)  # the condition token: cos = sin = 0
  thetas = np.array([1.0, 0.01])
  for position, (row, col) in enumerate([(0, 0), (0, 1), (1, 0), (1, 1)], start=1):
    angles = np.concatenate([row * thetas, col * thetas])
    np.testing.assert_allclose(table[position, :, 0], np.cos(angles), rtol=1e-6)
    np.testing.assert_allclose(table[position, :, 1], np.sin(angles), rtol=1e-6)


def test_apply_rotary_rotates_adjacent_pairs():
  table = rotary.rotary_table(grid_size=3, head_dim=4)  # pairs: (row, theta 1), (col, theta 1)
  x = np.arange(1, 1 + 10 * 4, dtype=np.float32).reshape(1, 10, 1, 4)
  out = np.asarray(rotary.apply_rotary(jnp.asarray(x), jnp.asarray(table)))
  np.testing.assert_array_equal(out[0, 0, 0], 0.0)  # zeroed condition token
  position = 1 + 2 * 3 + 1  # row 2, column 1
  z_row = complex(x[0, position, 0, 0], x[0, position, 0, 1]) * np.exp(1j * 2.0)
  z_col = complex(x[0, position, 0, 2], x[0, position, 0, 3]) * np.exp(1j * 1.0)
  np.testing.assert_allclose(out[0, position, 0], [z_row.real, z_row.imag, z_col.real, z_col.imag], rtol=1e-5)


def test_patchify_is_channel_first_raster_order():
  side, patch = 6, 3
  rows, cols, chans = np.meshgrid(np.arange(side), np.arange(side), np.arange(3), indexing="ij")
  image = (100 * rows + 10 * cols + chans).astype(np.float32)[None]  # [1, S, S, 3]
  out = np.asarray(patches.patchify(jnp.asarray(image), patch))
  assert out.shape == (1, 4, 27)
  # patch 1 is row 0, column 1 of the grid: pixel (r, 3 + c); vector order (channel, row, col)
  expected = [100 * r + 10 * (3 + c) + ch for ch in range(3) for r in range(3) for c in range(3)]
  np.testing.assert_array_equal(out[0, 1], expected)
  np.testing.assert_array_equal(patches.unpatchify(jnp.asarray(out), patch), image)
  items = np.asarray(patches.patches_as_images(jnp.asarray(out), patch))
  np.testing.assert_array_equal(items[2], image[0, 3:6, 0:3])  # patch 2: grid row 1, column 0


def test_neighbour_conditions():
  grid = np.arange(1, 10, dtype=np.float32).reshape(1, 9, 1)  # 3x3 grid, values 1..9
  middle, top, right, bottom, left = (
    np.asarray(c)[0, :, 0] for c in patches.neighbour_conditions(jnp.asarray(grid), 5)
  )
  np.testing.assert_array_equal(middle, np.arange(1, 10))
  np.testing.assert_array_equal(top, [0, 0, 0, 1, 2, 3, 4, 5, 6])
  np.testing.assert_array_equal(right, [2, 3, 0, 5, 6, 0, 8, 9, 0])
  np.testing.assert_array_equal(bottom, [4, 5, 6, 7, 8, 9, 0, 0, 0])
  np.testing.assert_array_equal(left, [0, 1, 2, 0, 4, 5, 0, 7, 8])
  assert len(patches.neighbour_conditions(jnp.asarray(grid), 2)) == 2
