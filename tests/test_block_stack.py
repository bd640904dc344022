"""`BlockStack`'s three execution paths compute the same function, teacher-forced and cached, for both block kinds.

Paths: "scan" (`nn.scan`, what every stack runs with standard kernels and stacks deeper than `LOOP_MAX_DEPTH`
with CPU kernels), "loop" (a Python loop over the same stacked parameters) and "unscanned" (`blocks_0 ..`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fractal_jax.model import block_stack, rotary
from fractal_jax.model.blocks import KVCache, LlamaBlock, TimmBlock

BATCH, DEPTH = 2, 3
LLAMA = dict(width=16, heads=2)  # head width 8: 2-D rotary needs a multiple of 4
TIMM = dict(width=12, heads=3)
PATHS = ("scan", "loop", "unscanned")


def _stack(block_cls, kwargs, path, remat="none", item_chunks=1):
  loop_depth = DEPTH if path == "loop" else 0
  return block_stack.BlockStack(
    block_cls, kwargs, DEPTH, scan=path != "unscanned", remat=remat, loop_depth=loop_depth, item_chunks=item_chunks
  )


def _params(block_cls, kwargs, x, **call):
  """Random stacked parameters ([DEPTH, ...] leaves) with non-trivial norms and biases."""
  shapes = jax.eval_shape(lambda: _stack(block_cls, kwargs, "scan").init(jax.random.key(0), x, **call))["params"]
  rng = np.random.default_rng(0)

  def draw(path, leaf):
    scale = jax.tree_util.keystr(path).endswith("['scale']")
    return jnp.asarray((1.0 if scale else 0.0) + rng.normal(0.0, 0.1 if scale else 0.2, leaf.shape), leaf.dtype)

  return jax.tree_util.tree_map_with_path(draw, shapes)


def _apply(block_cls, kwargs, path, params, x, remat="none", method=None, item_chunks=1, rngs=None, **call):
  """The stack on the given path; parameters in the stacked layout whatever the path."""
  if path == "unscanned":
    params = block_stack.unstack_block_params(params)
  stack = _stack(block_cls, kwargs, path, remat, item_chunks)
  return stack.apply({"params": params}, x, rngs=rngs, **call) if method is None else method(stack, params)


@pytest.mark.parametrize("remat", ["none", "full"])
def test_timm_paths_agree_in_value_gradient_and_queries(remat):
  x = jax.random.normal(jax.random.key(1), (BATCH, 7, TIMM["width"]))
  params = _params(TimmBlock, TIMM, x)
  queries = jnp.asarray([[6, 0], [2, 2]])

  def loss(path, p):
    out, cache = _apply(TimmBlock, TIMM, path, p, x, remat)
    assert cache is None
    return jnp.sum(jnp.tanh(out))

  want, want_grads = jax.value_and_grad(lambda p: loss("unscanned", p))(params)
  full, _ = _apply(TimmBlock, TIMM, "unscanned", params, x)
  for path in PATHS:
    value, grads = jax.value_and_grad(lambda p, path=path: loss(path, p))(params)
    np.testing.assert_allclose(value, want, rtol=1e-5, err_msg=path)
    jax.tree.map(
      lambda a, b, path=path: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6, err_msg=path), grads, want_grads
    )
    picked, _ = _apply(TimmBlock, TIMM, path, params, x, queries=queries)
    np.testing.assert_allclose(picked, jnp.take_along_axis(full, queries[..., None], axis=1), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("remat", ["none", "full"])
@pytest.mark.parametrize("path", PATHS)
def test_item_chunks_equal_one_pass_in_value_and_gradient(path, remat):
  """Blocks that run their items in sequential chunks compute the same function (6 items: 4 chunks -> 3 of 2)."""
  x = jax.random.normal(jax.random.key(4), (6, 5, TIMM["width"]))
  params = _params(TimmBlock, TIMM, x)
  table = jnp.asarray(rotary.rotary_table(2, LLAMA["width"] // LLAMA["heads"]))
  y = jax.random.normal(jax.random.key(5), (6, table.shape[0], LLAMA["width"]))
  llama = dict(LLAMA, resid_dropout=0.0, ffn_dropout=0.0)
  llama_params = _params(LlamaBlock, llama, y, rotary=table)
  assert [block_stack.item_chunks(6, k) for k in (1, 2, 4, 6, 9)] == [1, 2, 3, 6, 6]

  def loss(p, q, chunks):  # training, with the blocks' dropout rates at 0
    out, cache = _apply(TimmBlock, TIMM, path, p, x, remat, item_chunks=chunks, deterministic=False)
    ar, _ = _apply(LlamaBlock, llama, path, q, y, remat, item_chunks=chunks, rotary=table, deterministic=False)
    assert cache is None and out.shape == x.shape and ar.shape == y.shape
    return jnp.sum(jnp.tanh(out) * x) + jnp.sum(jnp.tanh(ar) * y)

  want, want_grads = jax.value_and_grad(loss, argnums=(0, 1))(params, llama_params, 1)
  for chunks in (2, 4):
    value, grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)), static_argnums=2)(params, llama_params, chunks)
    np.testing.assert_allclose(value, want, rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), grads, want_grads)


def test_item_chunks_draw_dropout_per_chunk():
  """With dropout, each chunk draws its own masks (chunks give other outputs than one pass), reproducibly."""
  kwargs = dict(TIMM, attn_dropout=0.0, proj_dropout=0.5)
  x = jnp.ones((8, 4, TIMM["width"]))
  params = _params(TimmBlock, TIMM, x)
  call = dict(rngs={"dropout": jax.random.key(7)}, deterministic=False)
  whole, _ = _apply(TimmBlock, kwargs, "scan", params, x, **call)
  chunked, _ = _apply(TimmBlock, kwargs, "scan", params, x, item_chunks=4, **call)
  again, _ = _apply(TimmBlock, kwargs, "scan", params, x, item_chunks=4, **call)
  np.testing.assert_array_equal(chunked, again)  # the same key, the same draws

  assert not np.allclose(chunked, whole)
  assert not np.allclose(chunked[0::4], chunked[1::4])  # items 0, 4 (chunk 0) and 1, 5 (chunk 1): alike inputs


@pytest.mark.parametrize("path", PATHS)
def test_llama_paths_agree_and_cached_decoding_equals_teacher_forcing(path):
  table = jnp.asarray(rotary.rotary_table(2, LLAMA["width"] // LLAMA["heads"]))  # [5, H/2, 2]
  length = table.shape[0]
  x = jax.random.normal(jax.random.key(2), (BATCH, length, LLAMA["width"]))
  params = _params(LlamaBlock, LLAMA, x, rotary=table)
  forced, _ = _apply(LlamaBlock, LLAMA, "unscanned", params, x, rotary=table)
  out, cache = _apply(LlamaBlock, LLAMA, path, params, x, rotary=table)
  assert cache is None
  np.testing.assert_allclose(out, forced, rtol=1e-5, atol=1e-6)
  shape = (DEPTH, BATCH, length, LLAMA["heads"], LLAMA["width"] // LLAMA["heads"])
  cache = KVCache(jnp.zeros(shape), jnp.zeros(shape))
  for t in range(length):
    step, cache = _apply(
      LlamaBlock, LLAMA, path, params, x[:, t : t + 1], rotary=table[t : t + 1], position=t, cache=cache
    )
    np.testing.assert_allclose(step[:, 0], forced[:, t], rtol=1e-5, atol=1e-5, err_msg=f"position {t}")
  assert cache.k.shape == shape


@pytest.mark.parametrize("path", PATHS)
def test_causal_timm_cached_decoding_equals_teacher_forcing(path):
  causal = dict(TIMM, causal=True)
  x = jax.random.normal(jax.random.key(3), (BATCH, 3, TIMM["width"]))
  params = _params(TimmBlock, causal, x)
  forced, _ = _apply(TimmBlock, causal, "unscanned", params, x)
  shape = (DEPTH, BATCH, 3, TIMM["heads"], TIMM["width"] // TIMM["heads"])
  cache = KVCache(jnp.zeros(shape), jnp.zeros(shape))
  for t in range(3):
    step, cache = _apply(TimmBlock, causal, path, params, x[:, t : t + 1], position=jnp.int32(t), cache=cache)
    np.testing.assert_allclose(step[:, 0], forced[:, t], rtol=1e-5, atol=1e-5, err_msg=f"position {t}")


def test_blocks_reject_inputs_of_the_other_kind():
  x = jnp.zeros((1, 5, 16))
  table = jnp.asarray(rotary.rotary_table(2, 8))
  with pytest.raises(ValueError, match="rotary"):
    LlamaBlock(**LLAMA).init(jax.random.key(0), x)
  with pytest.raises(ValueError, match="query selection"):
    LlamaBlock(**LLAMA).init(jax.random.key(0), x, rotary=table, queries=jnp.zeros((1, 2), jnp.int32))
  with pytest.raises(ValueError, match="rotary"):
    TimmBlock(width=16, heads=2).init(jax.random.key(0), x, rotary=table)
