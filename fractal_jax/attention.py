"""Scaled dot-product attention shared by every level.

Dimension letters: B batch, T query length, S key length, N heads, H head width.

Attention goes through `jax.nn.dot_product_attention` (XLA's fused attention,
logits and softmax in float32 for low-precision inputs, as the official code's
upcast). The one exception is attention-probability dropout, used by the MAR
levels when training: `jax.nn.dot_product_attention` has no dropout, so that
case computes the same softmax explicitly (float32 logits) and drops
probabilities before the value product, exactly where the official code does.

Very short sequences (the pixel heads' three tokens) take `_short_attention`,
the same softmax written out per query and key position: on CPU XLA runs
`dot_product_attention`'s batched 3x3 matrix products with a high cost per
matrix, and the written-out form makes the pixel head's attention (forward
and backward) about 3x faster.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

SHORT_SEQUENCE = 4  # query lengths up to this take `_short_attention`


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
    if max(query.shape[1], key.shape[1]) <= SHORT_SEQUENCE:
      return _short_attention(query, key, value, causal=causal)
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


def _short_attention(query: jax.Array, key: jax.Array, value: jax.Array, *, causal: bool) -> jax.Array:
  """`jax.nn.dot_product_attention` written out per (query, key) pair, for short T; same shapes and dtypes.

  Logits and softmax in float32; probabilities cast to the key dtype before the
  value product, as `jax.nn.dot_product_attention`. Causally masked keys are
  left out (their probability there is exactly 0).
  """
  length, keys_length = query.shape[1], key.shape[1]
  if causal and length != keys_length:
    raise ValueError(f"causal attention needs as many keys as queries, got {length} and {keys_length}")
  scale = np.float32(query.shape[-1] ** -0.5)
  f32 = jnp.float32
  # Split (whose gradient is a concatenation), not indexed (whose gradients would be padded and summed).
  queries = [q[:, 0].astype(f32) for q in jnp.split(query, length, axis=1)]  # [B, N, H] each
  keys = [k[:, 0].astype(f32) for k in jnp.split(key, keys_length, axis=1)]
  values = [v[:, 0].astype(f32) for v in jnp.split(value, keys_length, axis=1)]
  outputs = []
  for t in range(length):
    positions = range(t + 1) if causal else range(keys_length)
    logits = [jnp.sum(queries[t] * keys[s], axis=-1) * scale for s in positions]  # [B, N] each
    peak = logits[0]
    for logit in logits[1:]:
      peak = jnp.maximum(peak, logit)
    weights = [jnp.exp(logit - peak) for logit in logits]
    total = weights[0]
    for weight in weights[1:]:
      total = total + weight
    out = None
    for s, weight in zip(positions, weights):
      prob = (weight / total).astype(key.dtype).astype(f32)
      term = prob[..., None] * values[s]
      out = term if out is None else out + term
    outputs.append(out.astype(value.dtype))
  return jnp.stack(outputs, axis=1)
