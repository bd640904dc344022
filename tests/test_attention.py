"""Attention with probability dropout: its written-out gradient vs autodiff, and the dropout masks it uses."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fractal_jax.model import attention, dropout

KEEP_PROB = 0.9


def _autodiff_reference(query, key, value, keep, causal):
  """The same attention in plain jax.numpy, differentiated by JAX."""
  logits = jnp.einsum("btnh,bsnh->bnts", query, key, preferred_element_type=jnp.float32) * query.shape[-1] ** -0.5
  if causal:
    logits = jnp.where(jnp.tril(jnp.ones(logits.shape[-2:], bool)), logits, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(logits, axis=-1)
  probs = jnp.where(keep, probs / KEEP_PROB, 0.0).astype(value.dtype)
  return jnp.einsum("bnts,bsnh->btnh", probs, value)


def _inputs(queries, keys, dtype):
  k = jax.random.split(jax.random.key(0), 5)
  shape = lambda n: (2, n, 3, 8)  # noqa: E731  [B, T or S, N, H]
  query = jax.random.normal(k[0], shape(queries), dtype)
  key, value = (jax.random.normal(k[i], shape(keys), dtype) for i in (1, 2))
  keep = jax.random.bernoulli(k[3], KEEP_PROB, (2, 3, queries, keys))
  cotangent = jax.random.normal(k[4], shape(queries), dtype)
  return query, key, value, keep, cotangent


@pytest.mark.parametrize(
  "queries,keys,causal,dtype", [(7, 7, False, "float32"), (7, 7, True, "float32"), (3, 7, False, "float32"),
                                (7, 7, False, "bfloat16")]
)  # fmt: skip
def test_dropout_attention_gradient_equals_autodiff(queries, keys, causal, dtype):
  query, key, value, keep, cotangent = _inputs(queries, keys, jnp.dtype(dtype))

  def loss(fn):
    return lambda q, k, v: jnp.sum(fn(q, k, v).astype(jnp.float32) * cotangent.astype(jnp.float32))

  ours = lambda q, k, v: attention.dot_product_attention(  # noqa: E731
    q, k, v, causal=causal, dropout_keep=keep, keep_prob=KEEP_PROB
  )
  reference = lambda q, k, v: _autodiff_reference(q, k, v, keep, causal)  # noqa: E731
  ours_value, ours_grads = jax.jit(jax.value_and_grad(loss(ours), argnums=(0, 1, 2)))(query, key, value)
  ref_value, ref_grads = jax.jit(jax.value_and_grad(loss(reference), argnums=(0, 1, 2)))(query, key, value)
  tol = dict(rtol=1e-5, atol=1e-5) if dtype == "float32" else dict(rtol=2e-2, atol=2e-2)
  np.testing.assert_allclose(ours_value, ref_value, **tol)
  for ours_grad, ref_grad in zip(ours_grads, ref_grads):
    assert ours_grad.dtype == ref_grad.dtype == jnp.dtype(dtype)
    np.testing.assert_allclose(np.float32(ours_grad), np.float32(ref_grad), **tol)


def test_keep_mask_is_the_mask_dropout_applies():
  """`Dropout.keep_mask` (what attention dropout uses) equals the elements `Dropout.__call__` keeps."""

  class Drop(nn.Module):  # the same module path and rng either way
    mask_only: bool

    @nn.compact
    def __call__(self, x):
      layer = dropout.Dropout(0.25, deterministic=False, name="drop")
      return layer.keep_mask(x.shape) if self.mask_only else layer(x)

  ones = jnp.ones((4, 5, 6))
  rngs = {"dropout": jax.random.key(3)}
  dropped = Drop(False).apply({}, ones, rngs=rngs)
  keep = Drop(True).apply({}, ones, rngs=rngs)
  assert keep.dtype == jnp.bool_ and 0 < keep.mean() < 1
  np.testing.assert_array_equal(keep, dropped > 0)
  np.testing.assert_allclose(dropped[keep], 1 / 0.75)
