"""Stacks deeper than `LOOP_MAX_DEPTH` (level 0 of every paper config: 24-40 blocks) on tiny models.

With CPU kernels, stacks of up to 8 blocks run as loops and deeper ones as `nn.scan`; with standard kernels
(TPU, GPU) every stack is a scan. Here levels 0 and 1 have 9 blocks: the scanned, looped, unscanned and
official-style (eager, dynamic-shape) losses and gradients agree; KV-cached decoding through a deep scanned AR
stack equals teacher forcing; every remat policy the config offers equals none; and the sharded training step
equals the single-device one (tests/sharded_train_check.py).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tiny_models
from test_sharding import _run_on_8_devices

from fractal_jax.model import ar_level, block_stack, blocks, fractal, model_config

DEEP = tiny_models.DEEP
deep_settings = tiny_models.deep_settings


@pytest.mark.parametrize("family", sorted(tiny_models.DEEP_FAMILIES))
def test_deep_stack_paths_and_official_loss_agree(family, monkeypatch):
  """Evaluation loss and gradients: scanned (standard kernels), looped and unscanned (CPU kernels), official."""
  scanned = deep_settings(family, kernels="standard")
  params = tiny_models.init_params(scanned)
  images, masks, pixel_noise, guide_noise = tiny_models.loss_inputs(scanned)
  labels = jnp.zeros((images.shape[0],), jnp.int32)
  inputs = dict(train=False, masks=masks, pixel_noise=pixel_noise, guide_noise=guide_noise)

  def loss_and_grads(model_settings, p):
    model = fractal.build(model_settings)
    return jax.jit(jax.value_and_grad(lambda q: model.apply({"params": q}, images, labels, **inputs)[0]))(p)

  want = loss_and_grads(scanned, params)
  official = jax.value_and_grad(
    lambda q: tiny_models.official_style_loss(fractal.build(scanned), q, images, masks, pixel_noise, guide_noise)
  )(params)
  unscanned = deep_settings(family, kernels="cpu", scan_blocks=False)
  got_unscanned = loss_and_grads(unscanned, block_stack.unstack_block_params(params))
  monkeypatch.setattr(block_stack, "LOOP_MAX_DEPTH", DEEP)  # CPU kernels, every stack applied as a loop
  looped = loss_and_grads(deep_settings(family, kernels="cpu"), params)
  for got in (official, looped, (got_unscanned[0], block_stack.stack_block_params(got_unscanned[1]))):
    np.testing.assert_allclose(got[0], want[0], rtol=2e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), got[1], want[1])


def test_cached_decoding_through_a_deep_scanned_stack_equals_teacher_forcing():
  s = deep_settings("ar_ar", kernels="standard")
  spec = s.levels[0]
  level = ar_level.ARLevel(spec)
  level_params = tiny_models.init_params(s)["levels_0"]
  patches = jax.random.normal(jax.random.key(1), (2, spec.seq_len, spec.patch_dim))
  cond = jax.random.normal(jax.random.key(2), (2, spec.cond_width))
  forced = level.apply({"params": level_params}, patches, [cond])  # [2, L, D]
  cache = level.apply({"params": level_params}, 2, method=ar_level.ARLevel.init_cache)
  assert cache.k.shape[0] == DEEP
  decode = jax.jit(lambda c, prev, t, kv: level.apply({"params": level_params}, c, prev, t, kv, method="decode_step"))
  for t in range(spec.seq_len):
    previous = patches[:, max(t - 1, 0)]
    out, cache = decode(cond, previous, jnp.int32(t), cache)
    np.testing.assert_allclose(out, forced[:, t], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("policy", [p for p in model_config.REMAT_POLICIES if p != "none"])
def test_every_remat_policy_equals_none_on_a_deep_scanned_stack(policy):
  kwargs = dict(width=12, heads=3, attn_dropout=0.1, proj_dropout=0.1)
  x = jax.random.normal(jax.random.key(3), (2, 7, 12))

  def loss_and_grads(remat):
    stack = block_stack.BlockStack(blocks.TimmBlock, kwargs, DEEP, scan=True, remat=remat)
    params = stack.init({"params": jax.random.key(4), "dropout": jax.random.key(5)}, x)
    run = lambda p: jnp.sum(jnp.tanh(stack.apply(p, x, deterministic=False, rngs={"dropout": jax.random.key(6)})[0]))  # noqa: E731
    return jax.jit(jax.value_and_grad(run))(params)

  want, got = loss_and_grads("none"), loss_and_grads(policy)
  np.testing.assert_allclose(got[0], want[0], rtol=1e-5)  # rematerialised forward: another summation order
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4), got[1], want[1])


def test_deep_sharded_train_step_equals_single_device():
  result = _run_on_8_devices("sharded_train_check.py", "deep")
  assert result.returncode == 0, result.stdout + result.stderr
  assert "sharded train step equals single-device step" in result.stdout
