"""Scaled dot-product attention shared by every level.

Dimension letters: B batch, T query length, S key length, N heads, H head width.

Attention goes through `jax.nn.dot_product_attention` (the backend's fused
attention, logits and softmax in float32 for low-precision inputs, as the
official code's upcast), with two exceptions:
  * attention-probability dropout, used by the MAR levels when training:
    `jax.nn.dot_product_attention` has no dropout, so that case computes the
    same softmax explicitly (float32 logits) and drops probabilities before
    the value product, exactly where the official code does
    (`_dropped_softmax_attention`, differentiated by JAX);
  * very short sequences (the pixel heads' three tokens, `SHORT_SEQUENCE`).
TPUs store every array's two minor dimensions in tiles of 8 x 128, so the
[B, N, T, S] logits of short sequences take many times their size (57x for
T = S = 3: forward and backward of the pixel head's attention over the
1.25M pixel items one chip trains at 32 FractalMAR-256 images need 47.6 GiB
of temporaries in the standard form, 3.0 GiB with the items last; see
docs/performance.md): these cases compute with the item axis B last
(`_short_attention(items_last=True)`; dropout attention over at most
`ITEMS_LAST_KEYS` keys), the same functions (`tests/test_kernels.py`).

With CPU kernels (`model_config.ModelSettings.kernels`, the default on CPU)
two cases take written-out forms that XLA's CPU backend runs faster, the
same functions (`tests/test_kernels.py`):
  * dropout attention with a written-out gradient (`_dropout_attention`)
    whose products XLA's CPU matmul library accepts (autodiff's contract the
    query axis, which is not minor);
  * very short sequences (the pixel heads' three tokens): `_short_attention`,
    the softmax written out per query and key position, because XLA's CPU
    backend runs batched 3x3 matrix products with a high cost per matrix.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

SHORT_SEQUENCE = 4  # query lengths up to this take `_short_attention`
ITEMS_LAST_KEYS = 64  # dropout attention over this many keys or fewer computes with the item axis last


def dot_product_attention(
  query: jax.Array,
  key: jax.Array,
  value: jax.Array,
  *,
  causal: bool,
  dropout_keep: jax.Array | None = None,
  keep_prob: float = 1.0,
  cpu_kernels: bool = False,
) -> jax.Array:
  """Multi-head attention.

  Args:
    query: [B, T, N, H].
    key: [B, S, N, H].
    value: [B, S, N, H].
    causal: mask keys after each query (T == S).
    dropout_keep: bool [B, N, T, S] (training): attention-probability dropout
      keeps these probabilities, scaled by 1 / keep_prob, and zeroes the rest.
    keep_prob: the dropout's keep probability.
    cpu_kernels: the written-out forms of the module docstring.

  Returns:
    [B, T, N, H] in value's dtype.
  """
  if dropout_keep is None:
    if max(query.shape[1], key.shape[1]) <= SHORT_SEQUENCE:
      return _short_attention(query, key, value, causal=causal, items_last=not cpu_kernels)
    return jax.nn.dot_product_attention(query, key, value, is_causal=causal)
  if cpu_kernels:
    return _dropout_attention(query, key, value, dropout_keep, causal, keep_prob)
  return _dropped_softmax_attention(query, key, value, dropout_keep, causal, keep_prob)


def _dropped_softmax_attention(
  query: jax.Array, key: jax.Array, value: jax.Array, keep: jax.Array, causal: bool, keep_prob: float
) -> jax.Array:
  """Softmax attention with dropout on the probabilities, differentiated by JAX: [B, T, N, H] in value's dtype.

  The logits and probabilities are [B, N, T, S], or [N, T, S, B] with the
  item axis last when S <= ITEMS_LAST_KEYS: TPUs store an array's two minor
  dimensions in tiles of 8 x 128, so [T, S] minor with S ~ 20 (the lower MAR
  levels: ~1e5 items per chip) takes ~6x its size; items as the minor
  dimension are not padded once a chip holds 128 or more.
  """
  length, keys_length = query.shape[1], key.shape[1]
  if keys_length > ITEMS_LAST_KEYS:
    return _dropped_softmax_attention_items_first(query, key, value, keep, causal, keep_prob)
  scale = query.shape[-1] ** -0.5
  logits = jnp.einsum("btnh,bsnh->ntsb", query, key, preferred_element_type=jnp.float32) * scale
  if causal:
    lower = jnp.tril(jnp.ones((length, keys_length), dtype=bool))[:, :, None]
    logits = jnp.where(lower, logits, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(logits, axis=2)
  dropped = _dropped(probs, jnp.moveaxis(keep, 0, -1), keep_prob, key.dtype)
  return jnp.einsum("ntsb,bsnh->btnh", dropped, value)


def _dropped_softmax_attention_items_first(
  query: jax.Array, key: jax.Array, value: jax.Array, keep: jax.Array, causal: bool, keep_prob: float
) -> jax.Array:
  """`_dropped_softmax_attention` with [B, N, T, S] logits, whatever the length: [B, T, N, H] in value's dtype."""
  _, dropped = _dropout_probs(query, key, keep, causal, keep_prob)
  return jnp.einsum("bnts,bsnh->btnh", dropped, value)


def _dropout_probs(
  query: jax.Array, key: jax.Array, keep: jax.Array, causal: bool, keep_prob: float
) -> tuple[jax.Array, jax.Array]:
  """(softmax probabilities [B, N, T, S] float32, the same after dropout in key's (= value's) dtype)."""
  scale = query.shape[-1] ** -0.5
  logits = jnp.einsum("btnh,bsnh->bnts", query, key, preferred_element_type=jnp.float32) * scale
  if causal:
    t, s = logits.shape[-2:]
    logits = jnp.where(jnp.tril(jnp.ones((t, s), dtype=bool)), logits, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(logits, axis=-1)
  return probs, _dropped(probs, keep, keep_prob, key.dtype)


def _dropped(probs: jax.Array, keep: jax.Array, keep_prob: float, dtype: jnp.dtype) -> jax.Array:
  """Probabilities after dropout: kept ones scaled by 1 / keep_prob, the rest 0; in `dtype`."""
  return jnp.where(keep, probs / keep_prob, 0.0).astype(dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _dropout_attention(
  query: jax.Array, key: jax.Array, value: jax.Array, keep: jax.Array, causal: bool, keep_prob: float
) -> jax.Array:
  """Softmax attention with dropout on the probabilities (where the official code drops them).

  A custom gradient, because autodiff's products for dK and dV contract the
  query axis of [B, N, T, S] arrays, which is not their minor axis: XLA's CPU
  backend then falls back from its fast matmul library to a generic dot.
  Here every product's operands are laid out
  with the contracted axis minor (explicit transposes of the small [T, S]
  matrices).
  """
  return _dropout_attention_fwd(query, key, value, keep, causal, keep_prob)[0]


def _dropout_attention_fwd(
  query: jax.Array, key: jax.Array, value: jax.Array, keep: jax.Array, causal: bool, keep_prob: float
) -> tuple[jax.Array, tuple[jax.Array, ...]]:
  probs, dropped = _dropout_probs(query, key, keep, causal, keep_prob)
  out = jnp.einsum("bnts,bsnh->btnh", dropped, value)
  return out, (query, key, value, keep, probs)


def _dropout_attention_bwd(
  causal: bool, keep_prob: float, residuals: tuple[jax.Array, ...], d_out: jax.Array
) -> tuple[jax.Array, jax.Array, jax.Array, None]:
  query, key, value, keep, probs = residuals
  scale = query.shape[-1] ** -0.5
  dropped = _dropped(probs, keep, keep_prob, value.dtype)  # recomputed: cheaper to store probs only
  d_value = jnp.einsum("bnst,btnh->bsnh", jnp.swapaxes(dropped, -1, -2), d_out)
  d_dropped = jnp.einsum("btnh,bsnh->bnts", d_out, value, preferred_element_type=jnp.float32)
  d_probs = _dropped(d_dropped, keep, keep_prob, jnp.float32)  # dropout's gradient is the same mask and scale
  # Softmax backward; causally masked entries have probability 0, hence gradient 0.
  d_logits = probs * (d_probs - jnp.sum(d_probs * probs, axis=-1, keepdims=True)) * scale
  d_query = jnp.einsum("bnts,bsnh->btnh", d_logits.astype(key.dtype), key)
  d_key = jnp.einsum("bnst,btnh->bsnh", jnp.swapaxes(d_logits, -1, -2).astype(query.dtype), query)
  return d_query.astype(query.dtype), d_key.astype(key.dtype), d_value.astype(value.dtype), None


_dropout_attention.defvjp(_dropout_attention_fwd, _dropout_attention_bwd)


def _short_attention(
  query: jax.Array, key: jax.Array, value: jax.Array, *, causal: bool, items_last: bool = False
) -> jax.Array:
  """`jax.nn.dot_product_attention` written out per (query, key) pair, for short T; same shapes and dtypes.

  Logits and softmax in float32; probabilities cast to the key dtype before the
  value product, as `jax.nn.dot_product_attention`. Causally masked keys are
  left out (their probability there is exactly 0).

  items_last: every intermediate holds the item axis B last ([N, H, B] per
  position, [N, B] per logit). TPUs store an array's two minor dimensions in
  tiles of 8 x 128: the standard [B, N, T, S] logits of the pixel heads' 3
  tokens take about 57x their size, and their [B, T, N, H] operands are
  padded too, while with B minor nothing small is tiled. Without it each
  position is [B, N, H] (the CPU form).
  """
  length, keys_length = query.shape[1], key.shape[1]
  if causal and length != keys_length:
    raise ValueError(f"causal attention needs as many keys as queries, got {length} and {keys_length}")
  scale = np.float32(query.shape[-1] ** -0.5)
  f32 = jnp.float32
  head_axis = 1 if items_last else -1  # of one position's [N, H, B] or [B, N, H]

  def positions(x: jax.Array) -> list[jax.Array]:
    if items_last:
      x = jnp.moveaxis(x, 0, -1).astype(f32)  # [T, N, H, B]
      return [x[i] for i in range(x.shape[0])]
    # Split (whose gradient is a concatenation), not indexed (whose gradients would be padded and summed).
    return [p[:, 0].astype(f32) for p in jnp.split(x, x.shape[1], axis=1)]

  queries, keys, values = positions(query), positions(key), positions(value)
  outputs = []
  for t in range(length):
    keys_seen = range(t + 1) if causal else range(keys_length)
    logits = [jnp.sum(queries[t] * keys[s], axis=head_axis) * scale for s in keys_seen]  # [N, B] or [B, N]
    peak = logits[0]
    for logit in logits[1:]:
      peak = jnp.maximum(peak, logit)
    weights = [jnp.exp(logit - peak) for logit in logits]
    total = weights[0]
    for weight in weights[1:]:
      total = total + weight
    out = None
    for s, weight in zip(keys_seen, weights):
      prob = (weight / total).astype(key.dtype).astype(f32)
      term = jnp.expand_dims(prob, head_axis) * values[s]
      out = term if out is None else out + term
    outputs.append(out.astype(value.dtype))
  if items_last:
    return jnp.moveaxis(jnp.stack(outputs, axis=0), -1, 0)
  return jnp.stack(outputs, axis=1)
