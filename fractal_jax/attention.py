"""Scaled dot-product attention shared by every level.

Dimension letters: B batch, T query length, S key length, N heads, H head width.

Attention goes through `jax.nn.dot_product_attention` (XLA's fused attention,
logits and softmax in float32 for low-precision inputs, as the official code's
upcast). The one exception is attention-probability dropout, used by the MAR
levels when training: `jax.nn.dot_product_attention` has no dropout, so that
case computes the same softmax explicitly (float32 logits) and drops
probabilities before the value product, exactly where the official code does.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp


def dot_product_attention(
  query: jax.Array,
  key: jax.Array,
  value: jax.Array,
  *,
  causal: bool,
  probs_dropout: Callable[[jax.Array], jax.Array] | None = None,
) -> jax.Array:
  """Multi-head attention.

  Args:
    query: [B, T, N, H].
    key: [B, S, N, H].
    value: [B, S, N, H].
    causal: mask keys after each query (T == S).
    probs_dropout: applied to the attention probabilities when given (training).

  Returns:
    [B, T, N, H] in value's dtype.
  """
  if probs_dropout is None:
    return jax.nn.dot_product_attention(query, key, value, is_causal=causal)
  scale = query.shape[-1] ** -0.5
  logits = jnp.einsum("btnh,bsnh->bnts", query, key, preferred_element_type=jnp.float32) * scale
  if causal:
    t, s = logits.shape[-2:]
    allowed = jnp.tril(jnp.ones((t, s), dtype=bool))
    logits = jnp.where(allowed, logits, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(logits, axis=-1)
  probs = probs_dropout(probs).astype(value.dtype)
  return jnp.einsum("bnts,bsnh->btnh", probs, value)
