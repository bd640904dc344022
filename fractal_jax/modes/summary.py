"""`--mode=summary`: a table of the levels with parameters and forward FLOPs.

Nothing is allocated: parameter shapes come from `jax.eval_shape` of the
initialiser, FLOPs from XLA's cost analysis of each level's lowered forward
(not compiled). XLA counts a `scan` body once whatever its trip count, so
the FLOP count lowers an unscanned copy of each level.

FLOPs are per image for one teacher-forced forward pass in which every patch
goes to the next level (what our static-shape training step computes; the
official training step sends only the masked patches below a MAR level).
Sampling costs more: a MAR level runs its forward once per iteration.
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
from fractal_jax.model.pixel_head import PixelHead
from fractal_jax.model.settings import GUIDING_HEAD, LevelSpec, ModelSettings, items_per_image


@dataclasses.dataclass(frozen=True)
class LevelRow:
  name: str
  kind: str
  seq_len: int
  patch_size: int
  width: int
  depth: int
  heads: int
  items_per_image: int
  params: int
  gflops_per_image: float


count_params = fractal.count_params


def abstract_params(model_settings: ModelSettings) -> Any:
  """Parameter shapes of the whole model (ShapeDtypeStructs), without allocating."""
  model = fractal.build(model_settings)
  return jax.eval_shape(lambda key: fractal.init_params(model, key), jax.random.key(0))


def _flops(module: nn.Module, *args: Any) -> float:
  """Forward FLOPs of `module(*args)` from XLA's cost analysis of the lowered program."""
  params = jax.eval_shape(lambda *a: module.init(jax.random.key(0), *a), *args)
  lowered = jax.jit(lambda p, *a: module.apply(p, *a)).lower(params, *args)
  cost = lowered.cost_analysis()
  if isinstance(cost, (list, tuple)):  # older JAX returned one dict per computation
    cost = cost[0]
  return float(cost["flops"])


def _level_flops(spec: LevelSpec, model_settings: ModelSettings, num_items: int) -> float:
  common = dict(dtype=jnp.dtype(model_settings.dtype), param_dtype=jnp.float32, scan=False)
  abstract = jax.ShapeDtypeStruct
  patches = abstract((num_items, spec.seq_len, spec.patch_dim), jnp.float32)
  conds = [abstract((num_items, spec.cond_width), jnp.float32)] * spec.num_conds
  if spec.kind == "ar":
    return _flops(ARLevel(spec, **common), patches, conds)
  mask = abstract((num_items, spec.seq_len), jnp.bool_)
  guide = abstract((num_items, 3), jnp.float32) if spec.guiding_pixel else None
  flops = _flops(MARLevel(spec, **common), patches, conds, mask, guide)
  if spec.guiding_pixel:
    head = PixelHead(GUIDING_HEAD["width"], GUIDING_HEAD["depth"], GUIDING_HEAD["heads"], **common)
    flops += _flops(head, conds[0], abstract((num_items, 3), jnp.int32))
  return flops


def summarize(model_settings: ModelSettings, with_flops: bool = True) -> list[LevelRow]:
  """One row per level plus the class embedding; the last row is the total."""
  params = abstract_params(model_settings)
  rows = [
    LevelRow(
      "class embedding",
      "table",
      0,
      0,
      model_settings.class_width,
      0,
      0,
      1,
      count_params({"c": params["class_emb"], "f": params["fake_latent"]}),
      0.0,
    )
  ]
  levels = model_settings.levels
  for spec in levels:
    num_items = items_per_image(levels, spec.index)
    flops = _level_flops(spec, model_settings, num_items) if with_flops else float("nan")
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
        count_params(params[f"levels_{spec.index}"]),
        flops / 1e9,
      )
    )
  pixel = model_settings.pixel
  num_pixels = items_per_image(levels, len(levels))
  pixel_flops = float("nan")
  if with_flops:
    common = dict(dtype=jnp.dtype(model_settings.dtype), param_dtype=jnp.float32, scan=False)
    head = PixelHead(pixel.width, pixel.depth, pixel.heads, **common)
    cond = jax.ShapeDtypeStruct((num_pixels, pixel.cond_width), jnp.float32)
    pixel_flops = _flops(head, cond, jax.ShapeDtypeStruct((num_pixels, 3), jnp.int32))
  rows.append(
    LevelRow(
      f"level {len(levels)}",
      "pixel",
      3,
      1,
      pixel.width,
      pixel.depth,
      pixel.heads,
      num_pixels,
      count_params(params["pixel_head"]),
      pixel_flops / 1e9,
    )
  )
  total = LevelRow("total", "", 0, 0, 0, 0, 0, 0, count_params(params), sum(r.gflops_per_image for r in rows))
  assert total.params == sum(r.params for r in rows), "every parameter belongs to one row"
  return rows + [total]


def format_table(rows: list[LevelRow]) -> str:
  header = ("level", "type", "seq", "patch", "width", "depth", "heads", "items/img", "params", "GFLOPs/img")
  lines = []
  for r in rows:
    if r.name == "total":
      cells = (r.name, "", "", "", "", "", "", "", f"{r.params:,}", f"{r.gflops_per_image:.2f}")
    elif r.kind == "table":
      cells = (r.name, "", "", "", str(r.width), "", "", "", f"{r.params:,}", "")
    else:
      cells = (
        r.name,
        r.kind,
        str(r.seq_len),
        str(r.patch_size),
        str(r.width),
        str(r.depth),
        str(r.heads),
        f"{r.items_per_image:,}",
        f"{r.params:,}",
        f"{r.gflops_per_image:.2f}",
      )
    lines.append(cells)
  widths = [max(len(c) for c in col) for col in zip(header, *lines)]
  fmt = lambda cells: "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths)))  # noqa: E731
  rule = "-" * (sum(widths) + 2 * (len(widths) - 1))
  return "\n".join([fmt(header), rule] + [fmt(c) for c in lines[:-1]] + [rule, fmt(lines[-1])])
