"""Random draws of the sampler: per-item keys, the guidance rule on logits, and the pixel values' draws.

Dimension letters: N items, V values per draw (256 for a pixel channel).

Randomness follows items, not batch positions: image i uses `fold_in(key, i)`
and the child of patch p of an item uses `fold_in(item_key, p)`, so images do
not depend on the batch size, the chunk size or the device count. Draws other
than children fold in a salt far above any patch position.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

ORDER_SALT = 2**31 - 1  # a MAR level's random order
GUIDE_SALT = 2**31 - 2  # a MAR level's guiding pixel


def item_keys(key: jax.Array, image_ids: jax.Array) -> jax.Array:
  """Keys [B] of images `image_ids` (int [B]): `fold_in(key, image_id)`."""
  return jax.vmap(jax.random.fold_in, in_axes=(None, 0))(key, image_ids.astype(jnp.uint32))


def fold_keys(keys: jax.Array, data: jax.Array | int) -> jax.Array:
  """fold_in per item: keys [N] with data, a scalar or int [N] (a child's position, a salt) -> keys [N]."""
  data = jnp.broadcast_to(jnp.asarray(data, jnp.uint32), keys.shape)
  return jax.vmap(jax.random.fold_in)(keys, data)


def guided_logits(cond: jax.Array, uncond: jax.Array, cfg: jax.Array, filter_threshold: jax.Array) -> jax.Array:
  """The official guidance rule on float32 logits [N, V] (after temperature) -> guided logits [N, V].

  Where the conditional probability is below `filter_threshold`, the
  unconditional logit becomes `max(u, c - max(c) + max(u))` (a token the
  conditional model rules out cannot be boosted by a large unconditional
  logit); then `u + cfg * (c - u)`. cfg is a scalar or [N, 1].
  """
  low = jax.nn.softmax(cond, axis=-1) < filter_threshold
  lifted = jnp.maximum(uncond, cond - cond.max(-1, keepdims=True) + uncond.max(-1, keepdims=True))
  uncond = jnp.where(low, lifted, uncond)
  return uncond + cfg * (cond - uncond)


def categorical(logits: jax.Array, uniform: jax.Array) -> jax.Array:
  """Draws ids [N] int32 from softmax(logits [N, V]) by inverting the CDF at `uniform` [N] float32 in [0, 1).

  Exact categorical sampling, like `jax.random.categorical`, but from one
  uniform number per draw instead of V Gumbel variates: generating random
  bits is costly on CPU, and a pixel would otherwise need 3 x 256 of them.
  Id j is drawn when cdf_{j-1} <= u * cdf_{V-1} < cdf_j, so ids of
  probability 0 never are.
  """
  probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
  vocab = logits.shape[-1]
  lower = jnp.asarray(np.triu(np.ones((vocab, vocab), np.float32)))  # cdf = probs @ lower (sums ids <= j)
  cdf = jnp.dot(probs, lower, precision=jax.lax.Precision.HIGHEST)
  threshold = uniform[:, None] * cdf[:, -1:]
  return jnp.sum(cdf <= threshold, axis=-1).astype(jnp.int32)


def channel_ids(logits: jax.Array, keys: jax.Array, channel: int, *, inverse_cdf: bool) -> jax.Array:
  """Ids [N] int32 of one pixel channel drawn from softmax(logits [N, V]) with the items' keys [N].

  With `inverse_cdf` (CPU kernels) item n inverts its CDF at the channel's
  entry of `uniform(keys[n], (3,))` (`categorical`); otherwise it takes
  `jax.random.categorical(fold_in(keys[n], channel), logits[n])` (Gumbel-max,
  the standard draw). Both draw exactly from the softmax; they give different
  samples for the same key.
  """
  if inverse_cdf:
    uniforms = jax.vmap(lambda k: jax.random.uniform(k, (3,)))(keys)  # [N, 3]: one number per channel
    return categorical(logits, uniforms[:, channel])
  channel_keys = fold_keys(keys, channel)
  return jax.vmap(jax.random.categorical)(channel_keys, logits.astype(jnp.float32)).astype(jnp.int32)
