"""`--mode=sample`: class-conditional images from a checkpoint, as PNGs and a GIF."""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import jax
import numpy as np
from tqdm import tqdm

from fractal_jax.io import image_files
from fractal_jax.model import model_config
from fractal_jax.sampling import loaded
from fractal_jax.sampling.from_config import parse_label_list, plan_from_config


@dataclasses.dataclass(frozen=True)
class SampleRequest:
  """The run-specific flags of --mode=sample."""

  checkpoint: str
  labels: str | None
  num_images: int | None
  seed: int
  output: str | None
  output_dir: str | None
  gif: str | None
  weights: str = "raw"
  step: int | None = None  # the checkpoint step (None: the newest)


def parse_labels(request: SampleRequest, num_classes: int) -> np.ndarray:
  """--labels=207,360 or --num_images=N (N / num_classes of each class, as the official evaluation)."""
  if request.labels and request.num_images:
    raise model_config.ConfigError("give either --labels or --num_images, not both")
  if request.labels:
    return parse_label_list(request.labels, num_classes)
  if request.num_images:
    if request.num_images % num_classes:
      raise model_config.ConfigError(
        f"--num_images={request.num_images} is not a multiple of the {num_classes} classes (class-balanced "
        f"sampling draws N / {num_classes} images of each); use a multiple, or --labels"
      )
    return np.repeat(np.arange(num_classes, dtype=np.int32), request.num_images // num_classes)
  raise model_config.ConfigError("say what to sample: --labels=207,360,... or --num_images=N")


def run(config: Any, request: SampleRequest) -> None:
  """Validates everything, then loads, compiles, samples and writes."""
  model_settings = model_config.settings(config.model)
  sample_cfg = config.sample
  plan_from_config(model_settings, sample_cfg)  # check config.sample before the flags (the plan is built below)
  labels = parse_labels(request, model_settings.num_classes)
  if not (request.output or request.output_dir or request.gif):
    raise model_config.ConfigError("nothing to write: give --output=grid.png, --output_dir=<dir> and/or --gif=<path>")
  if not request.checkpoint:
    raise model_config.ConfigError("--checkpoint is required: a training workdir or a converted checkpoint")
  sampler = loaded.from_checkpoint(
    config,
    request.checkpoint,
    min(int(sample_cfg.batch_size), len(labels)),
    weights=request.weights,
    record_frames=bool(request.gif),
    step=request.step,
  )
  batch = sampler.batch_size
  print(
    f"sampling {len(labels)} images of {model_settings.img_size}x{model_settings.img_size} in batches of {batch} "
    f"on {sampler.mesh.size} device(s); cfg {sample_cfg.cfg} ({sample_cfg.cfg_schedule}), temperature "
    f"{sample_cfg.temperature}, iterations {tuple(sample_cfg.num_iter)}"
  )
  print(f"compiled in {sampler.compile_seconds:.1f} s")
  key = jax.random.key(request.seed)
  images, first_frames = [], None
  start = time.perf_counter()
  for first in tqdm(range(0, len(labels), batch), desc="batches", unit="batch"):
    chunk = labels[first : first + batch]
    out, frames = sampler(chunk, first, key)
    out = np.asarray(out)[: len(chunk)]  # the last batch is padded
    if request.output_dir:
      image_files.save_each(out, request.output_dir, first, chunk)
    if frames is not None and first_frames is None:
      first_frames = np.asarray(frames)[:, : len(chunk)]
    images.append(out)
  seconds = time.perf_counter() - start
  images = np.concatenate(images)
  print(
    f"{len(images)} images in {seconds:.1f} s: {len(images) / seconds:.3f} images/s "
    f"(compile {sampler.compile_seconds:.1f} s)"
  )
  if request.output:
    image_files.save_grid(images, request.output)
    print(f"grid: {request.output}")
  if request.output_dir:
    print(f"images: {request.output_dir}/")
  if request.gif:
    image_files.save_gif(first_frames, request.gif)
    print(f"generation of the first batch: {request.gif}")
