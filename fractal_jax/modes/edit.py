"""`--mode=edit`: regenerate part of an image (inpainting, outpainting, uncropping, class-conditional editing).

The model keeps the known pixels bit-exact and samples the others
conditioned on them, level by level (`sampling.recursion` module docstring:
how AR and MAR levels use what is known). `--num_samples=K` variants come from one
compiled, batched call; variant k uses `fold_in(key(seed), k)`.

Masks: white (255) = regenerate, black (0) = keep; an explicit `--mask`
wins over a preset `--edit`. The presets, for an S x S model (q = S / 4):

* `inpaint`: regenerate the centre square `[q, S-q)` x `[q, S-q)`;
* `outpaint`: keep the left half, regenerate the right half (extending the
  picture sideways, as MaskGIT's outpainting);
* `uncrop`: keep the centre square, regenerate the border around it.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import jax
import numpy as np

from fractal_jax.io import image_files
from fractal_jax.model import model_config
from fractal_jax.sampling import loaded
from fractal_jax.sampling.from_config import parse_label_list, plan_from_config
from fractal_jax.sampling.sampler import check_known

PRESETS = ("inpaint", "outpaint", "uncrop")
MASK_GRAY = 128  # regenerated pixels in the "input" picture of the output grid


@dataclasses.dataclass(frozen=True)
class EditRequest:
  """The run-specific flags of --mode=edit."""

  checkpoint: str | None
  image: str | None
  mask: str | None = None
  edit: str | None = None
  labels: str | None = None
  num_samples: int = 4
  seed: int = 0
  output: str | None = None
  output_dir: str | None = None
  gif: str | None = None
  weights: str = "raw"
  step: int | None = None  # the checkpoint step (None: the newest)


def preset_mask(name: str, side: int) -> np.ndarray:
  """bool [S, S], True = regenerate, for a preset name (module docstring)."""
  if name not in PRESETS:
    raise model_config.ConfigError(f"--edit={name!r} is not a preset; use one of {', '.join(PRESETS)} or --mask")
  quarter = side // 4
  centre = np.zeros((side, side), bool)
  centre[quarter : side - quarter, quarter : side - quarter] = True
  if name == "inpaint":
    return centre
  if name == "uncrop":
    return ~centre
  mask = np.zeros((side, side), bool)
  mask[:, side // 2 :] = True
  return mask


def read_image(path: str, side: int) -> np.ndarray:
  """An S x S picture as uint8 [S, S, 3] (grey or RGBA files are converted to RGB)."""
  with image_files.open_image(path) as picture:
    if picture.size != (side, side):
      raise model_config.ConfigError(
        f"--image {path} is {picture.size[0]}x{picture.size[1]} but this model makes {side}x{side} images; "
        f"resize or crop it to {side}x{side} first"
      )
    return np.asarray(picture.convert("RGB"), np.uint8)


def read_mask(path: str, side: int) -> np.ndarray:
  """A binary S x S mask file as bool [S, S], True = regenerate (white)."""
  with image_files.open_image(path) as picture:
    if picture.size != (side, side):
      raise model_config.ConfigError(
        f"--mask {path} is {picture.size[0]}x{picture.size[1]}; it must match the model's {side}x{side} images"
      )
    values = np.asarray(picture.convert("RGB") if picture.mode != "1" else picture.convert("L"))
  if values.ndim == 3:
    if (values != values[..., :1]).any():
      raise model_config.ConfigError(f"--mask {path} has coloured pixels; use black (keep) and white (regenerate)")
    values = values[..., 0]
  odd = np.setdiff1d(np.unique(values), [0, 255])
  if odd.size:
    raise model_config.ConfigError(
      f"--mask {path} is not binary: it has values {odd[:5].tolist()} besides 0 (keep) and 255 (regenerate); "
      "save it without anti-aliasing or threshold it"
    )
  return values == 255


def edit_labels(labels: str | None, num_samples: int, num_classes: int) -> np.ndarray:
  """--labels: one class for every variant or one per variant; none: the "no class" condition (-1)."""
  if not labels:
    return np.full(num_samples, -1, np.int32)
  parsed = parse_label_list(labels, num_classes)
  if len(parsed) == 1:
    return np.repeat(parsed, num_samples)
  if len(parsed) != num_samples:
    raise model_config.ConfigError(
      f"--labels has {len(parsed)} classes for --num_samples={num_samples}; give one class or one per sample"
    )
  return parsed


def masked_picture(image: np.ndarray, regenerate: np.ndarray) -> np.ndarray:
  """The input with the pixels to regenerate in grey: uint8 [S, S, 3]."""
  return np.where(regenerate[..., None], np.uint8(MASK_GRAY), image)


def run(config: Any, request: EditRequest) -> np.ndarray:
  """Validates everything, then loads, compiles, edits and writes. Returns the variants uint8 [K, S, S, 3]."""
  model_settings = model_config.settings(config.model)
  side = model_settings.img_size
  if not request.checkpoint:
    raise model_config.ConfigError("--checkpoint is required: a training workdir or a converted checkpoint")
  if not request.image:
    raise model_config.ConfigError(f"--image=<png> is required: the {side}x{side} picture to edit")
  if not (request.mask or request.edit):
    raise model_config.ConfigError(f"say what to regenerate: --mask=<png> (white = regenerate) or --edit={PRESETS}")
  if not (request.output or request.output_dir or request.gif):
    raise model_config.ConfigError("nothing to write: give --output=grid.png, --output_dir=<dir> and/or --gif=<path>")
  if request.num_samples < 1:
    raise model_config.ConfigError(f"--num_samples must be >= 1, got {request.num_samples}")
  plan_from_config(model_settings, config.sample)  # check config.sample before the files (the plan is built below)
  labels = edit_labels(request.labels, request.num_samples, model_settings.num_classes)
  image = read_image(request.image, side)
  regenerate = read_mask(request.mask, side) if request.mask else preset_mask(request.edit, side)
  print(
    f"editing {request.image}: regenerating {int(regenerate.sum())} of {side * side} pixels "
    f"({'--mask ' + request.mask if request.mask else 'preset ' + request.edit}), {request.num_samples} variant(s), "
    f"labels {labels.tolist()}"
  )
  sampler = loaded.from_checkpoint(
    config,
    request.checkpoint,
    request.num_samples,
    weights=request.weights,
    record_frames=bool(request.gif),
    edit=True,
    step=request.step,
  )
  print(f"compiled in {sampler.compile_seconds:.1f} s")
  batch = sampler.batch_size
  known = check_known(
    np.broadcast_to(image, (batch, side, side, 3)), np.broadcast_to(~regenerate, (batch, side, side)), batch, side
  )
  start = time.perf_counter()
  out, frames = sampler(labels, 0, jax.random.key(request.seed), known)
  variants = np.asarray(out)[: request.num_samples]
  seconds = time.perf_counter() - start
  print(f"{len(variants)} variant(s) in {seconds:.1f} s (compile {sampler.compile_seconds:.1f} s)")
  if request.output:
    row = np.concatenate([masked_picture(image, regenerate)[None], variants])
    columns = len(row) if len(row) <= 9 else None  # one row for a few variants
    image_files.save_grid(row, request.output, min_side=64 * (columns or 3), columns=columns)
    print(f"grid (the input with the region to regenerate in grey, then the variants): {request.output}")
  if request.output_dir:
    image_files.save_each(variants, request.output_dir, 0, labels)
    print(f"variants: {request.output_dir}/")
  if request.gif:
    image_files.save_gif(np.asarray(frames)[:, : request.num_samples], request.gif)
    print(f"generation: {request.gif}")
  return variants
