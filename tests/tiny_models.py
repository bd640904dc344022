"""Small model settings and helpers for tests (odd sizes catch axis mix-ups)."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from fractal_jax.config import base_config
from fractal_jax.model import fractal, model_config, patches, pixel_head

# name -> config.model overrides; every family of the official code, 2 to 4 levels.
FAMILIES: dict[str, dict[str, Any]] = {
  "ar_ar": dict(
    img_size_list=(6, 2, 1), widths=(24, 16, 8), depths=(2, 1, 1), heads=(2, 1, 2), types=("ar", "ar", "pixel")
  ),
  "mar_mar": dict(
    img_size_list=(6, 2, 1),
    widths=(24, 16, 8),
    depths=(2, 1, 1),
    heads=(3, 2, 2),
    types=("mar", "mar", "pixel"),
    num_conds=5,
  ),
  "mar_guiding_4": dict(
    img_size_list=(8, 4, 2, 1),
    widths=(24, 16, 8, 8),
    depths=(1, 2, 1, 1),
    heads=(2, 2, 1, 2),
    types=("mar", "mar", "mar", "pixel"),
    num_conds=5,
    guiding_pixel=True,
  ),
  "ar_over_mar": dict(
    img_size_list=(4, 2, 1),
    widths=(16, 16, 8),
    depths=(1, 1, 1),
    heads=(2, 2, 2),
    types=("mar", "ar", "pixel"),
    num_conds=3,
  ),
  "mar_over_ar": dict(
    img_size_list=(4, 2, 1),
    widths=(16, 16, 8),
    depths=(1, 1, 1),
    heads=(2, 2, 2),
    types=("ar", "mar", "pixel"),
    num_conds=1,
  ),
  "mar_2": dict(img_size_list=(3, 1), widths=(16, 8), depths=(1, 1), heads=(2, 2), types=("mar", "pixel"), num_conds=2),
}


# Deep stacks: levels 0 and 1 deeper than block_stack.LOOP_MAX_DEPTH (paper configs' level 0 has 24-40 blocks).
DEEP = 9
DEEP_FAMILIES: dict[str, dict[str, Any]] = {
  "ar_ar": dict(
    img_size_list=(4, 2, 1), widths=(16, 16, 8), depths=(DEEP, DEEP, 1), heads=(2, 2, 2), types=("ar", "ar", "pixel")
  ),
  "mar_mar": dict(
    img_size_list=(4, 2, 1),
    widths=(12, 12, 8),
    depths=(DEEP, DEEP, 1),
    heads=(3, 2, 2),
    types=("mar", "mar", "pixel"),
    num_conds=5,
  ),
}


def deep_settings(family: str, **overrides: Any) -> model_config.ModelSettings:
  """A tiny model whose levels 0 and 1 have `DEEP` blocks."""
  return settings(family, **{**DEEP_FAMILIES[family], **overrides})


def model_cfg(family: str, **overrides: Any):
  config = base_config()
  config.model.num_classes = 7
  config.model.update(FAMILIES[family])
  config.model.update(overrides)
  return config.model


def settings(family: str, **overrides: Any) -> model_config.ModelSettings:
  return model_config.settings(model_cfg(family, **overrides))


def init_params(model_settings: model_config.ModelSettings, seed: int = 0) -> Any:
  """Random parameters with non-trivial biases and norms (zero biases hide layout bugs).

  Shapes come from `jax.eval_shape` and values from NumPy: nothing is compiled.
  """
  model = fractal.build(model_settings)
  shapes = jax.eval_shape(lambda key: fractal.init_params(model, key), jax.random.key(0))
  rng = np.random.default_rng(seed)

  def draw(path, leaf):
    scale = jax.tree_util.keystr(path).endswith("['scale']")
    value = (1.0 if scale else 0.0) + rng.normal(0.0, 0.1 if scale else 0.2, leaf.shape)
    return jnp.asarray(value, leaf.dtype)

  return jax.tree_util.tree_map_with_path(draw, shapes)


def images_8bit(key: jax.Array, batch: int, side: int) -> jax.Array:
  """ImageNet-normalised images with 8-bit values: [B, S, S, 3] float32."""
  values = jax.random.randint(key, (batch, side, side, 3), 0, 256).astype(jnp.float32) / 255.0
  mean = jnp.asarray([0.485, 0.456, 0.406])
  std = jnp.asarray([0.229, 0.224, 0.225])
  return (values - mean) / std


def random_masks(model_settings: model_config.ModelSettings, batch: int, seed: int = 0) -> list[np.ndarray | None]:
  """Independent random masks for every item of every MAR level (None for AR levels)."""
  rng = np.random.default_rng(seed)
  masks, num_items = [], batch
  for spec in model_settings.levels:
    if spec.kind == "mar":
      masks.append(rng.random((num_items, spec.seq_len)) < 0.6)
    else:
      masks.append(None)
    num_items *= spec.seq_len
  return masks


def num_pixels(model_settings: model_config.ModelSettings, batch: int) -> int:
  return batch * model_settings.img_size**2


def official_style_loss(model, params, images, masks, pixel_noise, guide_noise, train=False):
  """The official loss (evaluation weights, or training weights without dropout), computed as the official code does.

  Eager recursion with dynamic shapes: every MAR level passes only its hidden
  patches (boolean indexing) to the next level, and each level's loss is the
  plain mean over the items it received. Uses our level modules, so it checks
  the static-shape composition (weights over all items) against the official
  one. `masks`/noise are given for all items, as `FractalModel` takes them.
  """
  s = model.settings
  bound = model.bind({"params": params})
  batch = images.shape[0]
  cond = jnp.broadcast_to(params["fake_latent"], (batch, s.class_width))
  conds = [cond] * 5
  items = images
  index = np.arange(batch)  # position of each received item among all items of its level
  total = 0.0
  for spec, level in zip(s.levels, bound.levels):
    level_patches = patches.patchify(items, spec.patch_size)
    n = items.shape[0]
    guide = None
    if spec.guiding_pixel:
      guide = items.mean(axis=2).mean(axis=1)
      targets = pixel_head.pixel_targets(guide, guide_noise[spec.index][index])
      logits = jnp.stack(level.guiding_channel_logits(conds[0], targets), axis=1)  # [n, 3, 256]
      total += pixel_head.pixel_losses(logits, targets, spec.guide_head.r_weight, train)[0].mean()
    child_index = (index[:, None] * spec.seq_len + np.arange(spec.seq_len)).reshape(-1)
    if spec.kind == "ar":
      outputs = [level(level_patches, conds)]
      keep = np.ones(n * spec.seq_len, bool)
    else:
      mask = masks[spec.index][index]
      middle = level(level_patches, conds, jnp.asarray(mask), guide)
      outputs = patches.neighbour_conditions(middle, spec.next_num_conds)
      keep = mask.reshape(-1)
    items = patches.patches_as_images(level_patches, spec.patch_size)[keep]
    conds = [c.reshape(n * spec.seq_len, -1)[keep] for c in outputs]
    index = child_index[keep]
  pixels = items.reshape(-1, 3)
  targets = pixel_head.pixel_targets(pixels, pixel_noise[index])
  logits = bound.pixel_head(conds[0], targets)
  return total + pixel_head.pixel_losses(logits, targets, s.pixel.r_weight, train)[0].mean()


def loss_inputs(model_settings, batch=3, seed=0):
  """Images, MAR masks, pixel and guiding-pixel noise for `batch` images (explicit, for parity checks)."""
  key = jax.random.key(seed)
  images = images_8bit(key, batch, model_settings.img_size)
  masks = random_masks(model_settings, batch, seed)
  pixel_noise = jax.random.normal(jax.random.fold_in(key, 1), (num_pixels(model_settings, batch), 3))
  guide_noise, num_items = [], batch
  for spec in model_settings.levels:
    guide_noise.append(jax.random.normal(jax.random.fold_in(key, 2 + spec.index), (num_items, 3)))
    num_items *= spec.seq_len
  return images, masks, pixel_noise, guide_noise
