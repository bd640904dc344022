"""Negative log-likelihood of images under the official evaluation semantics.

Evaluation loss (`FractalModel(..., train=False)`): the "no class"
condition, equal channel weights, and at MAR levels the uniform evaluation
mask (one count m uniform in 1..L, a random set of m patches hidden). The
official code draws one m per batch; here every image is its own batch of
one (a `vmap`), so every image draws its own m: the same expectation, and
each image's figure is independent of its batch-mates (padding is exact).

Two figures, equal for models without a guiding pixel (all 64x64 ones):
* `bits_per_dim`, the official figure: the model's whole loss (the pixel
  loss plus every level's guiding-pixel loss, nats) / ln 2, what the
  official `compute_nll` prints and the paper reports;
* `image_bits_per_dim`: the pixel loss alone / ln 2, the bits per channel
  value of the image itself. The guiding-pixel losses are also reported
  one by one (`guide_bits_<level>`).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from tqdm import tqdm

from fractal_jax.model import fractal, pixel_head
from fractal_jax.parallel import mesh as mesh_lib

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
    `loss` [B] (the model's whole loss, nats), `pixel_loss` [B] (nats per
    channel value), `bits_per_dim` [B] (official: loss / ln 2),
    `image_bits_per_dim` [B] (pixel_loss / ln 2) and `guide_loss_<level>` [B]
    for levels with a guiding pixel; float32.
  """
  labels = jnp.zeros((1,), jnp.int32)  # ignored: the evaluation is unconditional

  def one(image: jax.Array, image_id: jax.Array) -> dict[str, jax.Array]:
    rngs = fractal.make_rngs(jax.random.fold_in(key, image_id))
    _, aux = model.apply({"params": params}, pixel_head.normalize_uint8(image[None]), labels, train=False, rngs=rngs)
    return {k: v for k, v in aux.items() if k in ("loss", "pixel_loss") or k.startswith("guide_loss_")}

  out = jax.vmap(one)(images, image_ids)
  out["bits_per_dim"] = out["loss"] / LN2
  out["image_bits_per_dim"] = out["pixel_loss"] / LN2
  return out


@functools.cache
def _per_image_mean(settings: Any, passes: int) -> Any:
  """jit: (params, images, ids, key) -> per-image losses averaged over `passes` evaluation masks."""
  model = fractal.build(settings)

  def run(params: Any, images: jax.Array, ids: jax.Array, key: jax.Array) -> dict[str, jax.Array]:
    def one_pass(total: dict[str, jax.Array], index: jax.Array) -> tuple[dict[str, jax.Array], None]:
      out = per_image_losses(model, params, images, jax.random.fold_in(key, index), ids)
      return jax.tree.map(jnp.add, total, out), None

    shapes = jax.eval_shape(lambda: per_image_losses(model, params, images, key, ids))
    zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
    total, _ = jax.lax.scan(one_pass, zeros, jnp.arange(passes))
    return jax.tree.map(lambda x: x / passes, total)

  return jax.jit(run)


def evaluate(
  settings: Any,
  params: Any,
  batches: Iterable[dict[str, np.ndarray]],
  mesh: Mesh,
  key: jax.Array,
  *,
  passes: int = 1,
  max_images: int = 0,
  progress: bool = False,
) -> dict[str, float]:
  """Held-out NLL over `batches` (this host's part of each batch, with a 0/1 `mask` for padding).

  Each image's loss is the mean over `passes` evaluation masks (MAR levels;
  AR-only models are deterministic and need one), its key
  `fold_in(fold_in(key, pass), image id)`. Returns float scalars, equal on
  every host: `bits_per_dim` (official, module docstring) and
  `image_bits_per_dim`, each with its standard error over images
  (`<name>_stderr`), `num_images`, and `guide_bits_<level>` (bits per
  channel value of each level's guiding pixels).
  """
  sharding = NamedSharding(mesh, mesh_lib.batch_spec())
  run = _per_image_mean(settings, passes)
  figures = ("bits_per_dim", "image_bits_per_dim")
  sums: dict[str, float] = {}
  squares = dict.fromkeys(figures, 0.0)
  count, first_id = 0, 0
  batches = tqdm(batches, desc="nll batches", unit="batch", disable=not progress or jax.process_index() != 0)
  for batch in batches:
    local = batch["image"].shape[0]
    ids = first_id + jax.process_index() * local + np.arange(local, dtype=np.int32)
    first_id += local * jax.process_count()
    put = functools.partial(jax.make_array_from_process_local_data, sharding)
    mask = put(batch["mask"].astype(np.float32))
    out = run(params, put(batch["image"]), put(ids), key)
    for name, values in out.items():
      sums[name] = sums.get(name, 0.0) + float(jnp.sum(values * mask))
    for name in figures:
      squares[name] += float(jnp.sum(out[name] ** 2 * mask))
    count += int(jnp.sum(mask))
    if max_images and count >= max_images:
      break
  if count == 0:
    raise ValueError("no held-out images to evaluate")
  result = {}
  for name in figures:
    mean = sums[name] / count
    variance = max(squares[name] / count - mean * mean, 0.0)
    result[name] = mean
    result[f"{name}_stderr"] = math.sqrt(variance / max(count - 1, 1))
  result["num_images"] = float(count)
  for name, total in sums.items():
    if name.startswith("guide_loss_"):
      result["guide_bits_" + name.rsplit("_", 1)[1]] = total / count / LN2
  return result
