"""The model's loss: static-shape formulation vs the official dynamic one, scan vs loop, options."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import tiny_models

from fractal_jax.model import block_stack, fractal, pixel_head

BATCH = 3
KEY = jax.random.key(0)


def _both_losses(family):
  """(params, our static-shape loss fn, the official-style dynamic loss fn) on the same masks and noise."""
  s = tiny_models.settings(family)
  model = fractal.build(s)
  params = tiny_models.init_params(s)
  images, masks, pixel_noise, guide_noise = tiny_models.loss_inputs(s)
  labels = jnp.zeros((BATCH,), jnp.int32)

  def ours(p):
    return model.apply(
      {"params": p}, images, labels, train=False, masks=masks, pixel_noise=pixel_noise, guide_noise=guide_noise
    )[0]

  def official(p):
    return tiny_models.official_style_loss(model, p, images, masks, pixel_noise, guide_noise)

  return params, ours, official


@pytest.mark.parametrize("family", ["mar_mar", "mar_guiding_4", "ar_over_mar", "mar_over_ar", "ar_ar", "mar_2"])
def test_static_loss_equals_official_masked_mean(family):
  params, ours, official = _both_losses(family)
  # The masks are concrete NumPy arrays, so the official dynamic shapes are static under jit.
  np.testing.assert_allclose(jax.jit(ours)(params), jax.jit(official)(params), rtol=2e-6)


@pytest.mark.parametrize("family", ["mar_mar", "ar_over_mar"])
def test_static_gradients_equal_official(family):
  """Unmasked items carry zero weight, not a wrong one: the gradients agree too."""
  params, ours, official = _both_losses(family)
  grads_ours = jax.jit(jax.grad(ours))(params)
  grads_official = jax.jit(jax.grad(official))(params)
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(grads_ours), jax.tree.leaves(grads_official)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7, err_msg=jax.tree_util.keystr(path))


@pytest.mark.parametrize("family", ["mar_guiding_4", "ar_ar"])
def test_scanned_equals_unscanned(family):
  s = tiny_models.settings(family)
  s_loop = tiny_models.settings(family, scan_blocks=False)
  params = tiny_models.init_params(s)
  images, masks, pixel_noise, guide_noise = tiny_models.loss_inputs(s)
  labels = jnp.arange(BATCH) % 7
  kwargs = dict(train=False, unconditional=False, masks=masks, pixel_noise=pixel_noise, guide_noise=guide_noise)
  scanned = jax.jit(lambda p: fractal.build(s).apply({"params": p}, images, labels, **kwargs))(params)
  unstacked = block_stack.unstack_block_params(params)
  assert "blocks_0" in unstacked["levels_0"]["layers"]
  looped = jax.jit(lambda p: fractal.build(s_loop).apply({"params": p}, images, labels, **kwargs))(unstacked)
  for key in scanned[1]:
    np.testing.assert_allclose(scanned[1][key], looped[1][key], rtol=1e-6, err_msg=key)
  restacked = block_stack.stack_block_params(unstacked)
  jax.tree.map(np.testing.assert_array_equal, restacked, params)


def test_remat_policy_gives_same_loss_and_grads():
  s = tiny_models.settings("mar_2")
  s_remat = tiny_models.settings("mar_2", remat_policy="full")
  params = tiny_models.init_params(s)
  images, masks, pixel_noise, _ = tiny_models.loss_inputs(s)
  labels = jnp.arange(BATCH) % 7
  rngs = fractal.make_rngs(jax.random.key(5))

  def loss(model_settings, p):
    return fractal.build(model_settings).apply({"params": p}, images, labels, train=True, rngs=rngs)[0]

  a, ga = jax.jit(jax.value_and_grad(lambda p: loss(s, p)))(params)
  b, gb = jax.jit(jax.value_and_grad(lambda p: loss(s_remat, p)))(params)
  np.testing.assert_allclose(a, b, rtol=1e-6)
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-7), ga, gb)


def test_label_drop_rate():
  s = tiny_models.settings("mar_2", label_drop_prob=0.1)
  model = fractal.build(s)
  params = tiny_models.init_params(s)
  labels = jnp.arange(20000) % 7
  cond = model.apply(
    {"params": params},
    labels,
    drop=True,
    rngs={"labels": jax.random.key(3)},
    method=fractal.FractalModel.class_condition,
  )
  dropped = np.all(np.asarray(cond) == np.asarray(params["fake_latent"]), axis=-1)
  assert abs(dropped.mean() - 0.1) < 0.01
  kept = ~dropped
  np.testing.assert_array_equal(cond[kept], params["class_emb"]["embedding"][labels[kept]])
  no_drop = model.apply({"params": params}, labels[:50], drop=False, method=fractal.FractalModel.class_condition)
  np.testing.assert_array_equal(no_drop, params["class_emb"]["embedding"][labels[:50]])


def test_train_and_eval_losses_differ_as_official():
  """Training weighs red by r_weight; evaluation weighs channels equally (same logits)."""
  logits = jax.random.normal(jax.random.key(0), (5, 3, 256))
  targets = jax.random.randint(jax.random.key(1), (5, 3), 0, 256)
  ce = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
  train, _ = pixel_head.pixel_losses(logits, targets, 5.0, train=True)
  evaluation, _ = pixel_head.pixel_losses(logits, targets, 5.0, train=False)
  np.testing.assert_allclose(train, (5 * ce[:, 0] + ce[:, 1] + ce[:, 2]) / 7, rtol=1e-6)
  np.testing.assert_allclose(evaluation, ce.sum(-1) / 3, rtol=1e-6)


def test_pixel_targets_round_like_official():
  values = np.array([[0, 127, 255], [1, 128, 254]], np.float32)
  normalised = (values / 255.0 - np.array([0.485, 0.456, 0.406])) / np.array([0.229, 0.224, 0.225])
  ids = pixel_head.pixel_targets(jnp.asarray(normalised, jnp.float32), jnp.zeros((2, 3)))
  np.testing.assert_array_equal(ids, values.astype(np.int32))
  noisy = pixel_head.pixel_targets(jnp.asarray(normalised, jnp.float32), jnp.full((2, 3), 3.0))
  np.testing.assert_array_equal(noisy, values.astype(np.int32))  # 0.03 never crosses a rounding boundary
  np.testing.assert_allclose(pixel_head.ids_to_pixels(ids), normalised, rtol=1e-5, atol=1e-6)


def test_bfloat16_compute_keeps_float32_params():
  s32 = tiny_models.settings("mar_mar")
  s16 = tiny_models.settings("mar_mar", dtype="bfloat16")
  params = tiny_models.init_params(s32)
  images, masks, pixel_noise, guide_noise = tiny_models.loss_inputs(s32)
  labels = jnp.arange(BATCH) % 7
  kwargs = dict(train=False, masks=masks, pixel_noise=pixel_noise, guide_noise=guide_noise)
  loss32 = jax.jit(lambda p: fractal.build(s32).apply({"params": p}, images, labels, **kwargs)[0])(params)
  loss16_fn = lambda p: fractal.build(s16).apply({"params": p}, images, labels, **kwargs)[0]  # noqa: E731
  loss16, grads = jax.jit(jax.value_and_grad(loss16_fn))(params)
  assert loss16.dtype == jnp.float32
  np.testing.assert_allclose(loss16, loss32, rtol=2e-2)
  assert {g.dtype for g in jax.tree.leaves(grads)} == {jnp.dtype(jnp.float32)}
