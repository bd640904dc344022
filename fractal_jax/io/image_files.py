"""Writing images: PNG grids, numbered PNGs, animated GIFs (uint8 [B, H, W, 3]); reading a picture.

Paths may be local or `gs://...` (`fractal_jax.io.paths`): PIL encodes into
memory in the format the file name's extension says, then the bytes are
written in one go.
"""

from __future__ import annotations

import io
import math
import os

import numpy as np
from PIL import Image

from fractal_jax.io import paths


def _write(picture: Image.Image, path: str | os.PathLike, **options: object) -> None:
  """`picture.save(path, **options)` for a local or remote path (the format from the extension, as PIL does)."""
  target = paths.path(path)
  image_format = Image.registered_extensions().get(target.suffix.lower())
  if image_format is None:
    raise ValueError(f"unknown image file extension {target.suffix!r}: {path}")  # what PIL would say
  buffer = io.BytesIO()
  picture.save(buffer, format=image_format, **options)
  paths.make_parent(target)
  target.write_bytes(buffer.getvalue())


def open_image(path: str | os.PathLike) -> Image.Image:
  """A picture file, local or remote, read whole (use as a context manager, like `Image.open`)."""
  return Image.open(io.BytesIO(paths.path(path).read_bytes()))


def grid(images: np.ndarray, columns: int | None = None, padding: int = 2) -> np.ndarray:
  """[B, H, W, 3] uint8 -> one [rows*(H+p)+p, cols*(W+p)+p, 3] image, white padding."""
  images = np.asarray(images)
  count, height, width, _ = images.shape
  columns = columns or math.ceil(math.sqrt(count))
  rows = math.ceil(count / columns)
  canvas = np.full((rows * (height + padding) + padding, columns * (width + padding) + padding, 3), 255, np.uint8)
  for i, image in enumerate(images):
    top = padding + (i // columns) * (height + padding)
    left = padding + (i % columns) * (width + padding)
    canvas[top : top + height, left : left + width] = image
  return canvas


def _upscale(image: np.ndarray, min_side: int) -> Image.Image:
  """Nearest-neighbour upscaling so that small (8x8, 32x32) samples stay visible."""
  picture = Image.fromarray(image)
  factor = max(1, min_side // max(image.shape[:2]))
  return picture.resize((picture.width * factor, picture.height * factor), Image.NEAREST) if factor > 1 else picture


def save_grid(images: np.ndarray, path: str | os.PathLike, min_side: int = 256, columns: int | None = None) -> None:
  _write(_upscale(grid(images, columns), min_side), path)


def save_each(images: np.ndarray, directory: str | os.PathLike, first_index: int, labels: np.ndarray) -> None:
  """One PNG per image, `<index:06d>_class<label>.png`, at the model's resolution (for FID tools)."""
  directory = paths.path(directory)
  paths.make_dir(directory)
  for offset, (image, label) in enumerate(zip(np.asarray(images), np.asarray(labels))):
    _write(Image.fromarray(image), directory / f"{first_index + offset:06d}_class{int(label)}.png")


def save_gif(frames: np.ndarray, path: str | os.PathLike, seconds: float = 4.0, min_side: int = 256) -> None:
  """frames uint8 [T, B, H, W, 3] -> an animated GIF of the batch's grid, last frame held."""
  pictures = [_upscale(grid(frame), min_side) for frame in np.asarray(frames)]
  duration = max(20, int(1000 * seconds / len(pictures)))
  durations = [duration] * (len(pictures) - 1) + [2000]
  _write(pictures[0], path, save_all=True, append_images=pictures[1:], duration=durations, loop=0)
