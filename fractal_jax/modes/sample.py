"""`--mode=sample`: class-conditional images from a checkpoint, as PNGs and a GIF."""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from fractal_jax.io import images as image_io
from fractal_jax.io import model_checkpoint as checkpoint_io
from fractal_jax.model import settings as model_config
from fractal_jax.parallel import mesh as mesh_lib
from fractal_jax.sampling import sampler


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


def parse_label_list(text: str, num_classes: int) -> np.ndarray:
  """`--labels=207,360` -> int32 [K]; each a class id or -1 (no class)."""
  try:
    labels = np.asarray([int(x) for x in text.split(",") if x.strip()], np.int32)
  except ValueError as error:
    raise model_config.ConfigError(f"--labels must be comma-separated class ids, got {text!r}") from error
  bad = labels[(labels < -1) | (labels >= num_classes)]
  if bad.size:
    raise model_config.ConfigError(
      f"--labels {bad.tolist()} out of range: this model has classes 0..{num_classes - 1} (-1: no class)"
    )
  return labels


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


def plan_from_config(
  model_settings: model_config.ModelSettings, sample_cfg: Any, record_frames: bool = False
) -> sampler.SamplePlan:
  """`sampler.make_plan` from `config.sample`; a bad setting is a ConfigError naming the field."""
  try:
    return sampler.make_plan(
      model_settings,
      sample_cfg.num_iter,
      cfg=float(sample_cfg.cfg),
      cfg_schedule=sample_cfg.cfg_schedule,
      temperature=float(sample_cfg.temperature),
      record_frames=record_frames,
    )
  except sampler.SampleError as error:
    raise model_config.ConfigError(f"config.sample: {error}") from error


def run(config, request: SampleRequest) -> None:
  """Validates everything, then loads, compiles, samples and writes."""
  model_settings = model_config.settings(config.model)
  sample_cfg = config.sample
  plan = plan_from_config(model_settings, sample_cfg, record_frames=bool(request.gif))
  labels = parse_labels(request, model_settings.num_classes)
  if not (request.output or request.output_dir or request.gif):
    raise model_config.ConfigError("nothing to write: give --output=grid.png, --output_dir=<dir> and/or --gif=<path>")
  if not request.checkpoint:
    raise model_config.ConfigError("--checkpoint is required: a training workdir or a converted checkpoint")
  device_mesh = mesh_lib.make_mesh(config.mesh_shape)
  per_step = mesh_lib.batch_size_per_step(device_mesh)
  batch = -(-min(int(sample_cfg.batch_size), len(labels)) // per_step) * per_step
  params = checkpoint_io.load_params(request.checkpoint, config.model, weights=request.weights)
  params = jax.device_put(params, mesh_lib.replicated(device_mesh))
  print(
    f"sampling {len(labels)} images of {model_settings.img_size}x{model_settings.img_size} in batches of {batch} "
    f"on {device_mesh.size} device(s); cfg {sample_cfg.cfg} ({sample_cfg.cfg_schedule}), temperature "
    f"{sample_cfg.temperature}, iterations {tuple(sample_cfg.num_iter)}"
  )
  start = time.perf_counter()
  compiled = sampler.compile_sample(model_settings, plan, params, batch, device_mesh)
  compile_seconds = time.perf_counter() - start
  print(f"compiled in {compile_seconds:.1f} s")
  hyper = sampler.Hyper(
    jnp.float32(sample_cfg.cfg), jnp.float32(sample_cfg.temperature), jnp.float32(sample_cfg.filter_threshold)
  )
  key = jax.random.key(request.seed)
  images, first_frames = [], None
  start = time.perf_counter()
  for first in tqdm(range(0, len(labels), batch), desc="batches", unit="batch"):
    chunk = labels[first : first + batch]
    padded = np.concatenate([chunk, np.full(batch - len(chunk), chunk[-1], np.int32)])  # last batch: pad, drop
    ids = np.arange(first, first + batch, dtype=np.int32)
    out, frames = compiled(params, jnp.asarray(padded), jnp.asarray(ids), key, hyper)
    out = np.asarray(out)[: len(chunk)]
    if request.output_dir:
      image_io.save_each(out, request.output_dir, first, chunk)
    if frames is not None and first_frames is None:
      first_frames = np.asarray(frames)[:, : len(chunk)]
    images.append(out)
  seconds = time.perf_counter() - start
  images = np.concatenate(images)
  print(
    f"{len(images)} images in {seconds:.1f} s: {len(images) / seconds:.3f} images/s (compile {compile_seconds:.1f} s)"
  )
  if request.output:
    image_io.save_grid(images, request.output)
    print(f"grid: {request.output}")
  if request.output_dir:
    print(f"images: {request.output_dir}/")
  if request.gif:
    image_io.save_gif(first_frames, request.gif)
    print(f"generation of the first batch: {request.gif}")
