"""Masks of the MAR levels: which patches are hidden and passed down.

Dimension letters: N items, L patches. A mask is [N, L] bool, True = hidden.

All three are "the first n of a random order": with `orders` a uniformly
random permutation per item, the official training mask hides exactly the
positions j with `orders[j] < n`, while its evaluation mask and sampler hide
the positions `orders[:n]`. Both are a uniformly random n-subset; only the
positions chosen for a given `orders` differ (relevant when injecting
orders into a parity test, not for the distribution).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

# Mask ratio of training: normal(1.0, 0.25) truncated to [0, 1] (mean ~0.80).
RATIO_MEAN = 1.0
RATIO_STD = 0.25


def random_orders(key: jax.Array, num_items: int, seq_len: int) -> jax.Array:
  """A uniformly random permutation of 0..L-1 per item: int32 [N, L]."""
  return jnp.argsort(jax.random.uniform(key, (num_items, seq_len)), axis=-1).astype(jnp.int32)


def mask_from_orders(orders: jax.Array, counts: jax.Array) -> jax.Array:
  """Hides the positions j with `orders[j] < counts` (official training rule).

  Args:
    orders: int [N, L] permutations.
    counts: int [N] or scalar, how many to hide.
  """
  counts = jnp.broadcast_to(jnp.asarray(counts), orders.shape[:1])
  return orders < counts[:, None]


def training_mask(key: jax.Array, num_items: int, seq_len: int) -> jax.Array:
  """Official training mask: per item, n = ceil(L * ratio) random positions.

  ratio ~ normal(1, 0.25) truncated to [0, 1] (scipy `truncnorm(-4, 0)`).
  """
  order_key, ratio_key = jax.random.split(key)
  z = jax.random.truncated_normal(ratio_key, -4.0, 0.0, (num_items,), dtype=jnp.float32)
  ratio = jnp.clip(RATIO_MEAN + RATIO_STD * z, 0.0, 1.0)
  counts = jnp.ceil(seq_len * ratio).astype(jnp.int32)
  return mask_from_orders(random_orders(order_key, num_items, seq_len), counts)


def uniform_eval_mask(key: jax.Array, num_items: int, seq_len: int) -> jax.Array:
  """Official NLL mask: one count m uniform in 1..L for all items, random positions."""
  count_key, order_key = jax.random.split(key)
  count = jax.random.randint(count_key, (), 1, seq_len + 1)
  return mask_from_orders(random_orders(order_key, num_items, seq_len), count)


def first_n_mask(num_items: int, seq_len: int, n: int) -> np.ndarray:
  """Deterministic rule for tests and parity checks: hide the first n positions in raster order."""
  mask = np.zeros((num_items, seq_len), dtype=bool)
  mask[:, :n] = True
  return mask
