"""Dropout with the masks of `flax.linen.Dropout`, drawn with a hash that XLA's CPU backend fuses.

`jax.random.bernoulli` hashes every element with threefry-2x32, and on CPU
JAX lowers that hash as a `while` loop over its five groups of rounds (to
keep compile times short): every group reads and writes the full-size
state. Written out in plain `jax.numpy` ops, the same hash fuses into one
elementwise loop. `bernoulli` below reproduces
`jax.random.bernoulli(key, p, shape)` bit for bit (threefry keys with
`jax_threefry_partitionable`, JAX's default; anything else falls back to
`jax.random.bernoulli`), so the model's dropout masks, and therefore its
training, are unchanged.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

_ROTATIONS = ((13, 15, 26, 6), (17, 29, 16, 24))


def _rotate_left(x: jax.Array, bits: int) -> jax.Array:
  return lax.shift_left(x, np.uint32(bits)) | lax.shift_right_logical(x, np.uint32(32 - bits))


def threefry2x32(key1: jax.Array, key2: jax.Array, x1: jax.Array, x2: jax.Array) -> tuple[jax.Array, jax.Array]:
  """The Threefry-2x32 hash (20 rounds) of counters (x1, x2), unrolled; equals JAX's `threefry2x32_p`."""
  ks = (key1, key2, key1 ^ key2 ^ np.uint32(0x1BD11BDA))
  x1 = x1 + ks[0]
  x2 = x2 + ks[1]
  for i in range(5):
    for rotation in _ROTATIONS[i % 2]:
      x1 = x1 + x2
      x2 = x1 ^ _rotate_left(x2, rotation)
    x1 = x1 + ks[(i + 1) % 3]
    x2 = x2 + ks[(i + 2) % 3] + np.uint32(i + 1)
  return x1, x2


def _is_fast_path(key: jax.Array, size: int) -> bool:
  if not jax.config.jax_threefry_partitionable or jax.config.jax_enable_x64 or size >= 2**32:
    return False
  if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
    return str(jax.random.key_impl(key)) == "threefry2x32"
  return key.dtype == jnp.uint32 and key.shape == (2,)  # a raw `jax.random.PRNGKey`


def bernoulli(key: jax.Array, p: float, shape: Sequence[int]) -> jax.Array:
  """`jax.random.bernoulli(key, p, shape)` for a Python float `p`, bit for bit."""
  shape = tuple(shape)
  size = math.prod(shape)
  if not _is_fast_path(key, size):
    return jax.random.bernoulli(key, p, shape)
  data = jax.random.key_data(key) if jnp.issubdtype(key.dtype, jax.dtypes.prng_key) else key
  # The counters of JAX's partitionable threefry: the element's row-major index as a 64-bit (hi, lo) pair.
  # (Hashed flat and reshaped after: XLA hoists a reshaped iota out of scan loops and stores it.)
  lo = lax.iota(jnp.uint32, size)
  bits1, bits2 = threefry2x32(data[0], data[1], jnp.zeros_like(lo), lo)
  bits = bits1 ^ bits2
  # `jax.random.uniform`: 23 random mantissa bits under the exponent of 1.0, minus 1.
  one = np.array(1.0, np.float32).view(np.uint32)
  floats = lax.bitcast_convert_type(lax.shift_right_logical(bits, np.uint32(9)) | one, jnp.float32) - np.float32(1.0)
  return (floats < lax.convert_element_type(p, jnp.float32)).reshape(shape)


class Dropout(nn.Dropout):
  """`nn.Dropout`, with the keep mask from `bernoulli` above when `cpu_kernels`: the same rng, masks and outputs.

  Without `cpu_kernels` the mask is `jax.random.bernoulli`'s (standard JAX),
  which on CPU lowers the hash as a loop and is slow there. `keep_mask` gives
  the mask on its own, for attention-probability dropout.
  """

  cpu_kernels: bool = False

  @nn.compact
  def __call__(self, inputs: jax.Array, deterministic: bool | None = None, rng: jax.Array | None = None) -> jax.Array:
    deterministic = nn.merge_param("deterministic", self.deterministic, deterministic)
    if self.rate == 0.0 or deterministic:
      return inputs
    if self.rate == 1.0:
      return jnp.zeros_like(inputs)
    keep_prob = 1.0 - self.rate
    return lax.select(self.keep_mask(inputs.shape, rng), inputs / keep_prob, jnp.zeros_like(inputs))

  def keep_mask(self, shape: Sequence[int], rng: jax.Array | None = None) -> jax.Array:
    """bool [*shape]: the elements `__call__` keeps for inputs of this shape (same rng, same mask)."""
    if rng is None:
      rng = self.make_rng(self.rng_collection)
    broadcast_shape = list(shape)
    for dim in self.broadcast_dims:
      broadcast_shape[dim] = 1
    draw = bernoulli if self.cpu_kernels else jax.random.bernoulli
    return jnp.broadcast_to(draw(rng, 1.0 - self.rate, broadcast_shape), tuple(shape))
