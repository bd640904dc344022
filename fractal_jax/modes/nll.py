"""`--mode=nll`: bits per dimension of a held-out split, with its standard error.

    python -m fractal_jax.main --config=configs/fractalmar_64.py --mode=nll \
      --checkpoint=checkpoints/fractalmar_64 --config.data.root=/data/imagenet

The official semantics (`fractal_jax.evaluation.nll`): the "no class" condition, equal
channel weights, and at MAR levels the uniform evaluation mask averaged over
`config.eval.nll_passes` masks per image. `bits_per_dim` is the official
figure (for guiding-pixel models it includes the guiding-pixel losses, as the
official `compute_nll`); `image_bits_per_dim` is the image alone. Batches are split over the mesh's devices and
over hosts (each host reads its shard of the split).
"""

from __future__ import annotations

import json
import time
from typing import Any

import jax

from fractal_jax.data import input_pipeline
from fractal_jax.evaluation import nll
from fractal_jax.io import model_checkpoint, paths
from fractal_jax.model import model_config
from fractal_jax.parallel import mesh as mesh_lib


def run(
  config: Any, checkpoint: str | None, output: str | None, weights: str = "raw", step: int | None = None
) -> dict[str, float]:
  """Checks the inputs, loads, evaluates, prints (and writes `output` as JSON when given)."""
  if not checkpoint:
    raise model_config.ConfigError("--checkpoint is required: a training workdir or a converted checkpoint")
  model_settings = model_config.settings(config.model)
  device_mesh = mesh_lib.make_mesh(config.mesh_shape)
  batch, per_step = int(config.eval.batch_size), mesh_lib.batch_size_per_step(device_mesh)
  if batch % (per_step * jax.process_count()):
    raise model_config.ConfigError(
      f"config.eval.batch_size={batch} is not a multiple of the {per_step} devices sharing a batch "
      f"(x {jax.process_count()} hosts)"
    )
  if config.eval.nll_passes < 1:
    raise model_config.ConfigError("config.eval.nll_passes must be at least 1")
  source = input_pipeline.make_source(config.data, config.data.eval_split)
  params = model_checkpoint.load_params(checkpoint, config.model, step=step, weights=weights)
  params = jax.device_put(params, mesh_lib.replicated(device_mesh))
  passes = int(config.eval.nll_passes) if any(spec.kind == "mar" for spec in model_settings.levels) else 1
  print(
    f"NLL of {config.data.name}:{config.data.eval_split} ({len(source)} images), {passes} evaluation mask(s) per "
    f"image, batches of {batch} on {device_mesh.size} device(s)"
  )
  batches = input_pipeline.eval_batches(
    source, image_size=model_settings.img_size, batch_size=batch // jax.process_count()
  )
  start = time.perf_counter()
  result = nll.evaluate(
    model_settings,
    params,
    batches,
    device_mesh,
    jax.random.key(config.seed),
    passes=passes,
    max_images=int(config.eval.max_images),
    progress=True,
  )
  seconds = time.perf_counter() - start
  print(
    f"bits/dim: {result['bits_per_dim']:.4f} +- {result['bits_per_dim_stderr']:.4f} (standard error over "
    f"{result['num_images']:.0f} images; {seconds:.1f} s)"
  )
  guides = {name.rsplit("_", 1)[1]: value for name, value in result.items() if name.startswith("guide_bits_")}
  if guides:
    print(
      "  that is the official figure (the official compute_nll: image + guiding-pixel losses, / ln 2); "
      f"image alone: {result['image_bits_per_dim']:.4f} +- {result['image_bits_per_dim_stderr']:.4f} bits/dim"
    )
    for level, value in guides.items():
      print(f"  guiding pixel of level {level}: {value:.4f} bits per channel value")
  if output and jax.process_index() == 0:
    paths.write_text(output, json.dumps(result, indent=2) + "\n")
  return result
