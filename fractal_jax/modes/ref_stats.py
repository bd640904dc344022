"""`--mode=ref_stats`: the Inception statistics of a split of `config.data`, as FID reference.

    python -m fractal_jax.main --config=configs/demo.py --mode=ref_stats --split=train \
      --inception=default_1.pt --output=digits_train_stats.npz

Writes `mu`, `sigma` and up to `config.eval.ref_features` pool features (for
precision / recall) of at most `config.eval.max_images` images
(`evaluation.fid`).
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import jax

from fractal_jax.data import input_pipeline
from fractal_jax.evaluation import fid
from fractal_jax.model import model_config
from fractal_jax.parallel import mesh as mesh_lib


@dataclasses.dataclass(frozen=True)
class RefStatsRequest:
  """The run-specific flags of --mode=ref_stats."""

  inception: str | None
  output: str | None
  split: str = "train"


def run(config: Any, request: RefStatsRequest) -> dict[str, float]:
  """Validates the flags, then extracts, writes `--output` and prints."""
  if not request.output:
    raise model_config.ConfigError("--output=<stats.npz> is required")
  model_settings = model_config.settings(config.model)
  extractor = fid.Extractor(request.inception)
  source = input_pipeline.make_source(config.data, request.split)
  device_mesh = mesh_lib.make_mesh(config.mesh_shape)
  batch = int(config.eval.batch_size)
  if batch % (mesh_lib.batch_size_per_step(device_mesh) * jax.process_count()):
    raise model_config.ConfigError(f"config.eval.batch_size={batch} is not a multiple of the devices sharing a batch")
  batches = input_pipeline.eval_batches(
    source, image_size=model_settings.img_size, batch_size=batch // jax.process_count()
  )
  start = time.perf_counter()
  features = fid.dataset_features(batches, extractor, device_mesh, max_images=int(config.eval.max_images))
  kept = fid.save_reference(request.output, features, int(config.eval.ref_features))
  seconds = time.perf_counter() - start
  print(
    f"reference statistics of {config.data.name}:{request.split}: {len(features)} images "
    f"({len(features) / seconds:.1f} images/s), {len(kept)} features kept for precision/recall -> {request.output}"
  )
  return {"num_images": float(len(features))}
