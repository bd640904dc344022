"""Small model settings and helpers for tests (odd sizes catch axis mix-ups)."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from fractal_jax import fractal, model_config
from fractal_jax.config_base import base_config

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
