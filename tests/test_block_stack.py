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


def _stack(block_cls, kwargs, path, remat="none"):
  loop_depth = DEPTH if path == "loop" else 0
  return block_stack.BlockStack(block_cls, kwargs, DEPTH, scan=path != "unscanned", remat=remat, loop_depth=loop_depth)


def _params(block_cls, kwargs, x, **call):
  """Random stacked parameters ([DEPTH, ...] leaves) with non-trivial norms and biases."""
  shapes = jax.eval_shape(lambda: _stack(block_cls, kwargs, "scan").init(jax.random.key(0), x, **call))["params"]
  rng = np.random.default_rng(0)

  def draw(path, leaf):
    scale = jax.tree_util.keystr(path).endswith("['scale']")
    return jnp.asarray((1.0 if scale else 0.0) + rng.normal(0.0, 0.1 if scale else 0.2, leaf.shape), leaf.dtype)

  return jax.tree_util.tree_map_with_path(draw, shapes)


def _apply(block_cls, kwargs, path, params, x, remat="none", method=None, **call):
  """The stack on the given path; parameters in the stacked layout whatever the path."""
  if path == "unscanned":
    params = block_stack.unstack_block_params(params)
  stack = _stack(block_cls, kwargs, path, remat)
  return stack.apply({"params": params}, x, **call) if method is None else method(stack, params)


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
