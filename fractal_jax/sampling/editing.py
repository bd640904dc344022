"""Known pixels for editing: their layout at each level, and the MAR schedules over the unknown patches.

Dimension letters: N items of a level, s item side, L patches per item,
P patch side, T the level's MAR steps, U unknown patches of an item.

Every level receives its items' known pixels and mask (`Known`), split into
its patches (`known_patches`); each patch sent down takes its own
(`take_known`, `known_at`), and the pixel head receives one pixel's
(`pixel_known`). A MAR level runs its cosine schedule over the U patches of
an item that are not fully known, with `T_U = min(U, ceil(T * U / L))` steps
(the same pace, patches per step, as full generation); `edit_schedules`
tabulates that schedule on the host for every U, and `EditSchedule.rows`
picks each item's row on the device.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import flax
import jax
import jax.numpy as jnp
import numpy as np

from fractal_jax.sampling.mar_schedule import mar_schedule


class Known(NamedTuple):
  """Known pixels of N items of side s: kept bit-exact by the sampler."""

  ids: jax.Array  # [N, s, s, 3] int32 pixel values 0..255 (ignored where unknown); [N, L, P, P, 3] split
  mask: jax.Array  # [N, s, s] bool, True where known; [N, L, P, P] split


def known_patches(known: Known, patch_size: int) -> Known:
  """Splits items into their L patches in raster order: ids [N, L, P, P, 3], mask [N, L, P, P]."""
  num, side = known.mask.shape[:2]
  grid = side // patch_size

  def split(x: jax.Array) -> jax.Array:
    x = x.reshape(num, grid, patch_size, grid, patch_size, *x.shape[3:])
    x = jnp.swapaxes(x, 2, 3)  # [N, grid, grid, P, P, ...]
    return x.reshape(num, grid * grid, patch_size, patch_size, *x.shape[5:])

  return Known(split(known.ids), split(known.mask))


def take_known(known: Known, positions: jax.Array) -> Known:
  """Patches at `positions` int [N, C] of split Known -> items ids [N*C, P, P, 3], mask [N*C, P, P]."""

  def take(x: jax.Array) -> jax.Array:
    index = positions.reshape(positions.shape + (1,) * (x.ndim - 2))
    picked = jnp.take_along_axis(x, index, axis=1)
    return picked.reshape(-1, *x.shape[2:])

  return Known(take(known.ids), take(known.mask))


def known_at(known: Known, position: jax.Array) -> Known:
  """Patch `position` (int32 scalar) of every item of split Known: ids [N, P, P, 3], mask [N, P, P]."""
  return Known(*(jax.lax.dynamic_index_in_dim(x, position, axis=1, keepdims=False) for x in known))


def pixel_known(known: Known) -> Known:
  """Known of N one-pixel items -> ids [N, 3], mask [N], as the pixel head takes them."""
  return Known(known.ids[:, 0, 0], known.mask[:, 0, 0])


def fully_known(known: Known) -> jax.Array:
  """bool [N, L]: patches of split Known whose pixels are all known."""
  num, length = known.mask.shape[:2]
  return known.mask.reshape(num, length, -1).all(-1)


@flax.struct.dataclass
class ItemSchedule:
  """Each item's MAR schedule (its row of `EditSchedule`) on the device."""

  lo: jax.Array  # [N, T] int32: step t predicts order positions [lo, hi) (lo = hi = 0 past the item's steps)
  hi: jax.Array  # [N, T] int32
  progress: jax.Array  # [N, T] float32: (U - mask_len_t) / U, for level-0 linear guidance
  num_steps: jax.Array  # int32 scalar: the most steps any item takes


class EditSchedule(NamedTuple):
  """Host tables of the MAR schedule over U unknown patches, one row for every U in 0..L (row L: plain sampling)."""

  lo: np.ndarray  # [L+1, T] int32: with U unknown, step t < steps[U] predicts order positions [lo, hi)
  hi: np.ndarray  # [L+1, T] int32
  progress: np.ndarray  # [L+1, T] float32: (U - mask_len_t) / U, 1 past the last step
  steps: np.ndarray  # [L+1] int32: T_U = min(U, ceil(T * U / L))

  @property
  def most_per_step(self) -> int:
    """The largest count of patches any step predicts, over every U."""
    return int((self.hi - self.lo).max())

  def rows(self, unknown: jax.Array) -> ItemSchedule:
    """The schedules of items with `unknown` int32 [N] unknown patches."""
    lo, hi, progress = (jnp.asarray(table)[unknown] for table in (self.lo, self.hi, self.progress))
    return ItemSchedule(lo, hi, progress, jnp.asarray(self.steps)[unknown].max())


@functools.lru_cache(maxsize=64)
def edit_schedules(seq_len: int, num_iter: int) -> EditSchedule:
  """The tables of `EditSchedule` for a level of L = `seq_len` patches and T = `num_iter` steps.

  Row U is `mar_schedule(U, T_U)`; steps past T_U predict nothing.
  """
  lo = np.zeros((seq_len + 1, num_iter), np.int32)
  hi = np.zeros_like(lo)
  progress = np.ones((seq_len + 1, num_iter), np.float32)
  steps = np.zeros(seq_len + 1, np.int32)
  for unknown in range(1, seq_len + 1):
    schedule = mar_schedule(unknown, min(unknown, -(-num_iter * unknown // seq_len)))
    count = schedule.num_iter
    steps[unknown] = count
    lo[unknown, :count], hi[unknown, :count] = schedule.lo, schedule.hi
    progress[unknown, :count] = [(unknown - m) / unknown for m in schedule.mask_len]
  return EditSchedule(lo, hi, progress, steps)
