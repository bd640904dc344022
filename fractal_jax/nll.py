"""Negative log-likelihood of images under the official evaluation semantics.

Evaluation loss (`FractalModel(..., train=False)`): the "no class"
condition, equal channel weights, and at MAR levels the uniform evaluation
mask (one count m uniform in 1..L, a random set of m patches hidden). The
official code draws one m per batch; here every image is its own batch of
one (a `vmap`), so every image draws its own m: the same expectation, and
each image's figure is independent of its batch-mates (padding is exact).

bits/dim = (pixel loss in nats per channel value) / ln 2. Guiding-pixel
losses are reported apart, not in the image bits/dim.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp

from fractal_jax import fractal, train_step

LN2 = math.log(2.0)


def per_image_losses(
  model: fractal.FractalModel, params: Any, images: jax.Array, key: jax.Array, image_ids: jax.Array
) -> dict[str, jax.Array]:
  """Evaluation losses of each image.

  Args:
    images: [B, S, S, 3] uint8 (or ImageNet-normalised float).
    key: the evaluation key; image i uses `fold_in(key, image_ids[i])`.
    image_ids: int [B] global indices of the images.

  Returns:
    `pixel_loss` [B] (nats per channel value), `bits_per_dim` [B] and
    `guide_loss_<level>` [B] for levels with a guiding pixel; float32.
  """
  labels = jnp.zeros((1,), jnp.int32)  # ignored: the evaluation is unconditional

  def one(image: jax.Array, image_id: jax.Array) -> dict[str, jax.Array]:
    rngs = fractal.make_rngs(jax.random.fold_in(key, image_id))
    _, aux = model.apply({"params": params}, train_step.normalize(image[None]), labels, train=False, rngs=rngs)
    return {k: v for k, v in aux.items() if k in ("pixel_loss",) or k.startswith("guide_loss_")}

  out = jax.vmap(one)(images, image_ids)
  out["bits_per_dim"] = out["pixel_loss"] / LN2
  return out
