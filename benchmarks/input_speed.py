"""Input pipeline speed: images/s of one host for JPEG read + decode + ADM center crop (+ flip, batching).

    python benchmarks/input_speed.py                              # 512 images, sizes 64 and 256, workers 0 and 2
    python benchmarks/input_speed.py --num_images=2000 --workers=0,4,8

Writes a temporary ImageFolder of `--num_images` JPEGs (500x375 by default,
ImageNet's typical size; smooth random content plus grain noise, quality 90,
so files are ~ImageNet-sized), then times `train_dataset` batches of
`--batch` images after one warm-up batch (worker start-up excluded), and a
plain one-thread loop over `decode_image` for reference. Prints a table.
"""

from __future__ import annotations

import argparse
import io
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from fractal_jax.data import input_pipeline, sources  # noqa: E402


def natural_like_jpeg(rng: np.random.Generator, width: int, height: int, quality: int) -> bytes:
  """Smooth random colours (bicubic from 1/16 resolution) plus noise: JPEG sizes close to real photos."""
  coarse = rng.integers(0, 256, (height // 16 + 1, width // 16 + 1, 3), dtype=np.uint8)
  smooth = np.asarray(Image.fromarray(coarse).resize((width, height), Image.Resampling.BICUBIC), np.float32)
  noisy = np.clip(smooth + rng.normal(0.0, 16.0, smooth.shape), 0, 255).astype(np.uint8)
  buffer = io.BytesIO()
  Image.fromarray(noisy).save(buffer, format="JPEG", quality=quality)
  return buffer.getvalue()


def write_image_folder(root: Path, num_images: int, width: int, height: int, classes: int = 10) -> float:
  """`root/train/class_<c>/<i>.JPEG`; returns the mean file size in KB."""
  rng = np.random.default_rng(0)
  total = 0
  for index in range(num_images):
    directory = root / "train" / f"class_{index % classes:02d}"
    directory.mkdir(parents=True, exist_ok=True)
    data = natural_like_jpeg(rng, width, height, quality=90)
    (directory / f"{index:06d}.JPEG").write_bytes(data)
    total += len(data)
  return total / num_images / 1024


def serial_rate(source, image_size: int, count: int) -> float:
  """Images/s of a plain loop: read + decode_image, one thread."""
  start = time.perf_counter()
  for index in range(count):
    input_pipeline.decode_image(source[index % len(source)]["image"], image_size)
  return count / (time.perf_counter() - start)


def pipeline_rate(source, image_size: int, workers: int, batch: int, num_images: int) -> float:
  """Images/s of `train_dataset` (threads, plus `workers` processes) after one warm-up batch."""
  dataset = input_pipeline.train_dataset(
    source,
    image_size=image_size,
    global_batch=batch,
    seed=0,
    random_flip=True,
    process_index=0,
    process_count=1,
    worker_count=workers,
  )
  iterator = iter(dataset)
  next(iterator)  # warm-up: worker start-up, first reads
  batches = max(1, num_images // batch)
  start = time.perf_counter()
  for _ in range(batches):
    next(iterator)
  elapsed = time.perf_counter() - start
  if hasattr(iterator, "close"):
    iterator.close()
  return batches * batch / elapsed


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--num_images", type=int, default=512, help="JPEGs to write, and images timed per row")
  parser.add_argument("--workers", default="0,2", help="comma-separated grain worker process counts")
  parser.add_argument("--sizes", default="64,256", help="comma-separated crop sizes")
  parser.add_argument("--batch", type=int, default=64, help="images per batch")
  parser.add_argument("--width", type=int, default=500)
  parser.add_argument("--height", type=int, default=375)
  args = parser.parse_args()
  workers = [int(value) for value in args.workers.split(",")]
  sizes = [int(value) for value in args.sizes.split(",")]

  with tempfile.TemporaryDirectory(prefix="input_speed_") as folder:
    mean_kb = write_image_folder(Path(folder), args.num_images, args.width, args.height)
    source = sources.image_folder_source(folder, "train")
    print(f"{len(source)} JPEGs of {args.width}x{args.height}, mean {mean_kb:.0f} KB; batch {args.batch}")
    print(f"{'crop':>5} {'pipeline':>26} {'images/s':>9}")
    for size in sizes:
      count = min(args.num_images, 256)
      print(f"{size:>5} {'decode_image loop, 1 thread':>26} {serial_rate(source, size, count):>9.0f}")
      for worker_count in workers:
        try:
          rate = pipeline_rate(source, size, worker_count, args.batch, args.num_images)
          print(f"{size:>5} {f'train_dataset, {worker_count} workers':>26} {rate:>9.0f}")
        except Exception as error:  # report and go on: worker processes may be unavailable
          print(f"{size:>5} {f'train_dataset, {worker_count} workers':>26} failed: {type(error).__name__}: {error}")


if __name__ == "__main__":
  main()
