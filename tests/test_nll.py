"""NLL in bits/dim: a hand-checked value, and the multi-pass MAR estimate against all masks of a 2x2 image."""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tiny_models

from fractal_jax.evaluation import nll
from fractal_jax.model import fractal, pixel_head


def test_uniform_pixel_head_gives_exactly_8_bits_per_dim():
  """Zero codebooks and output biases: every logit is 0, so each channel costs ln 256 nats = 8 bits."""
  s = tiny_models.settings("mar_2")
  params = tiny_models.init_params(s)
  head = params["pixel_head"]
  for name in list(head):
    if name.endswith("_codebook") or name.endswith("_mlm_bias"):
      head[name] = jnp.zeros_like(head[name])
  images = jnp.asarray(np.random.default_rng(0).integers(0, 256, (3, s.img_size, s.img_size, 3)), jnp.uint8)
  out = jax.jit(lambda p: nll.per_image_losses(fractal.build(s), p, images, jax.random.key(0), jnp.arange(3)))(params)
  np.testing.assert_allclose(out["pixel_loss"], np.log(256.0), rtol=1e-6)
  np.testing.assert_allclose(out["bits_per_dim"], 8.0, rtol=1e-6)


def test_multi_pass_estimate_is_unbiased_on_a_2x2_image():
  """Mean over passes of the random evaluation mask -> the average over every (count, subset) the mask can take."""
  s = tiny_models.settings("mar_2", img_size_list=(2, 1))
  model = fractal.build(s)
  params = tiny_models.init_params(s)
  image = jnp.asarray(np.random.default_rng(1).integers(0, 256, (1, 2, 2, 3)), jnp.uint8)
  labels = jnp.zeros((1,), jnp.int32)

  @jax.jit
  def loss_with_mask(mask):
    rngs = fractal.make_rngs(jax.random.key(0))
    _, aux = model.apply(
      {"params": params}, pixel_head.normalize_uint8(image), labels, train=False, masks=[mask], rngs=rngs
    )
    return aux["pixel_loss"]

  values, weights = [], []
  for count in range(1, 5):
    subsets = list(itertools.combinations(range(4), count))
    for subset in subsets:
      mask = np.zeros((1, 4), bool)
      mask[0, list(subset)] = True
      values.append(float(loss_with_mask(jnp.asarray(mask))))
      weights.append(1.0 / (4 * len(subsets)))  # count uniform in 1..4, then a uniform subset
  values, weights = np.asarray(values), np.asarray(weights)
  exact = float(values @ weights)
  spread = float(np.sqrt(weights @ (values - exact) ** 2))

  passes = 400
  estimate = nll._per_image_mean(s, passes)(params, image, jnp.arange(1), jax.random.key(7))
  estimate = float(estimate["pixel_loss"][0])
  assert spread > 0.01  # the mask matters, so the test has teeth
  assert abs(estimate - exact) < 4 * spread / np.sqrt(passes), (estimate, exact, spread)


def test_official_bits_per_dim_of_a_guiding_pixel_model_is_image_plus_guides():
  """The official figure (compute_nll: the whole loss / ln 2) = the image's bits/dim + every guiding pixel's bits."""
  from fractal_jax.parallel import mesh as mesh_lib

  s = tiny_models.settings("mar_guiding_4")
  params = tiny_models.init_params(s)
  images = np.random.default_rng(2).integers(0, 256, (4, s.img_size, s.img_size, 3)).astype(np.uint8)
  batches = [{"image": images, "label": np.zeros(4, np.int32), "mask": np.ones(4, np.float32)}]
  figures = nll.evaluate(s, params, batches, mesh_lib.make_mesh((1, 1, 1), jax.devices()[:1]), jax.random.key(3))
  guides = [value for name, value in figures.items() if name.startswith("guide_bits_")]
  assert len(guides) == 2 and min(guides) > 0  # levels 1 and 2 have a guiding pixel
  assert figures["bits_per_dim"] == pytest.approx(figures["image_bits_per_dim"] + sum(guides), rel=1e-5)
  assert figures["bits_per_dim_stderr"] > 0 and figures["image_bits_per_dim_stderr"] > 0


def test_bits_per_dim_of_a_model_without_guiding_pixels_is_the_image_alone():
  s = tiny_models.settings("mar_mar")
  params = tiny_models.init_params(s)
  images = jnp.asarray(np.random.default_rng(4).integers(0, 256, (2, s.img_size, s.img_size, 3)), jnp.uint8)
  out = nll.per_image_losses(fractal.build(s), params, images, jax.random.key(5), jnp.arange(2))
  np.testing.assert_array_equal(out["bits_per_dim"], out["image_bits_per_dim"])
