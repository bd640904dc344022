"""What each level of a model costs: parameters and forward FLOPs per image.

Nothing is allocated: parameter shapes come from `jax.eval_shape` of the
initialiser, FLOPs from XLA's cost analysis of each level's lowered forward
(not compiled). XLA counts a `scan` body once whatever its trip count, so
the FLOP count lowers an unscanned copy of each level.

FLOPs are per image for one teacher-forced forward pass in which every patch
goes to the next level (`fractal.EveryItem`; the official training step
sends only the masked patches below a MAR level). Sampling costs more: a MAR
level runs its forward once per iteration.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from fractal_jax.model import fractal
from fractal_jax.model.ar_level import ARLevel
from fractal_jax.model.mar_level import MARLevel
from fractal_jax.model.model_config import LevelSpec, ModelSettings, PixelHeadSpec, items_per_image
from fractal_jax.model.pixel_head import PixelHead


@dataclasses.dataclass(frozen=True)
class LevelRow:
  """One row of the cost table: a level (or the class embedding, or the total) and what it costs."""

  name: str
  kind: str  # "ar", "mar", "pixel"; "table" for the class embedding, "" for the total
  seq_len: int
  patch_size: int
  width: int
  depth: int
  heads: int
  items_per_image: int
  params: int
  gflops_per_image: float  # NaN when FLOPs were not counted


def _flops(module: nn.Module, *args: Any) -> float:
  """Forward FLOPs of `module(*args)` from XLA's cost analysis of the lowered program."""
  params = jax.eval_shape(lambda *a: module.init(jax.random.key(0), *a), *args)
  lowered = jax.jit(lambda p, *a: module.apply(p, *a)).lower(params, *args)
  cost = lowered.cost_analysis()
  if isinstance(cost, (list, tuple)):  # older JAX returned one dict per computation
    cost = cost[0]
  return float(cost["flops"])


def _common(model_settings: ModelSettings) -> dict[str, Any]:
  """Module settings for counting FLOPs: the compute dtype, unscanned (see the module docstring)."""
  return dict(dtype=jnp.dtype(model_settings.dtype), param_dtype=jnp.float32, scan=False)


def pixel_head_flops(head: PixelHeadSpec, model_settings: ModelSettings, num_items: int) -> float:
  """Forward FLOPs of a pixel head on `num_items` pixels."""
  module = PixelHead(head.width, head.depth, head.heads, **_common(model_settings))
  cond = jax.ShapeDtypeStruct((num_items, head.cond_width), jnp.float32)
  return _flops(module, cond, jax.ShapeDtypeStruct((num_items, 3), jnp.int32))


def level_flops(spec: LevelSpec, model_settings: ModelSettings, num_items: int) -> float:
  """Forward FLOPs of a generator level (with its guiding-pixel head) on `num_items` items."""
  common = _common(model_settings)
  spec = dataclasses.replace(spec, item_chunks=1)  # one pass: a chunk loop's body would count once
  abstract = jax.ShapeDtypeStruct
  patches = abstract((num_items, spec.seq_len, spec.patch_dim), jnp.float32)
  conds = [abstract((num_items, spec.cond_width), jnp.float32)] * spec.num_conds
  if spec.kind == "ar":
    return _flops(ARLevel(spec, **common), patches, conds)
  mask = abstract((num_items, spec.seq_len), jnp.bool_)
  guide = abstract((num_items, 3), jnp.float32) if spec.guiding_pixel else None
  flops = _flops(MARLevel(spec, **common), patches, conds, mask, guide)
  if spec.guide_head is not None:
    flops += pixel_head_flops(spec.guide_head, model_settings, num_items)
  return flops


def summarize(model_settings: ModelSettings, with_flops: bool = True) -> list[LevelRow]:
  """One row per level plus the class embedding; the last row is the total."""
  params = fractal.abstract_params(model_settings)
  class_params = fractal.count_params({"c": params["class_emb"], "f": params["fake_latent"]})
  rows = [LevelRow("class embedding", "table", 0, 0, model_settings.class_width, 0, 0, 1, class_params, 0.0)]
  levels = model_settings.levels
  for spec in levels:
    num_items = items_per_image(levels, spec.index)
    flops = level_flops(spec, model_settings, num_items) if with_flops else float("nan")
    rows.append(
      LevelRow(
        f"level {spec.index}" + (" (+guiding pixel)" if spec.guiding_pixel else ""),
        spec.kind,
        spec.seq_len,
        spec.patch_size,
        spec.width,
        spec.depth,
        spec.heads,
        num_items,
        fractal.count_params(params[f"levels_{spec.index}"]),
        flops / 1e9,
      )
    )
  pixel = model_settings.pixel
  num_pixels = items_per_image(levels, len(levels))
  pixel_flops = pixel_head_flops(pixel, model_settings, num_pixels) if with_flops else float("nan")
  pixel_params = fractal.count_params(params["pixel_head"])
  name = f"level {len(levels)}"
  rows.append(
    LevelRow(name, "pixel", 3, 1, pixel.width, pixel.depth, pixel.heads, num_pixels, pixel_params, pixel_flops / 1e9)
  )
  total_params = fractal.count_params(params)
  total = LevelRow("total", "", 0, 0, 0, 0, 0, 0, total_params, sum(r.gflops_per_image for r in rows))
  assert total.params == sum(r.params for r in rows), "every parameter belongs to one row"
  return rows + [total]
