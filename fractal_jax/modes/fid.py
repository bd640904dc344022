"""`--mode=fid`: FID / Inception Score / precision / recall of a checkpoint's samples, offline and resumable.

    python -m fractal_jax.main --config=configs/fractalmar_64.py --mode=fid --checkpoint=ckpt \
      --num_images=50000 --inception=pt_inception-2015-12-05-6726825d.pth \
      --ref_stats=fid_stats/adm_in64_stats.npz --output_dir=fid_run

N images, N / num_classes of each class, sampled in shards kept in
`--output_dir` (a rerun resumes; `evaluation.fid`). `--write_images` also
writes the samples as PNGs, `--adm_npz=<file>` as the ADM evaluator's
`arr_0` batch. Prints FID against `--ref_stats`, the Inception Score (needs
a weight file with logits), precision / recall (needs reference features,
which `--mode=ref_stats` stores) and images/s.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import jax

from fractal_jax.evaluation import fid
from fractal_jax.io import paths
from fractal_jax.model import model_config
from fractal_jax.sampling import loaded


@dataclasses.dataclass(frozen=True)
class FidRequest:
  """The run-specific flags of --mode=fid."""

  checkpoint: str | None
  num_images: int | None
  seed: int
  inception: str | None
  ref_stats: str | None
  output_dir: str | None
  output: str | None = None
  write_images: bool = False
  adm_npz: str | None = None
  weights: str = "raw"
  step: int | None = None  # the checkpoint step (None: the newest)


def _require(condition: bool, message: str) -> None:
  if not condition:
    raise model_config.ConfigError(message)


def run(config: Any, request: FidRequest) -> dict[str, float]:
  """Validates everything, then samples shard by shard (skipping finished ones), scores and prints."""
  num_classes = model_config.settings(config.model).num_classes
  _require(bool(request.checkpoint), "--checkpoint is required: a training workdir or a converted checkpoint")
  _require(bool(request.output_dir), "--output_dir is required: finished shards are kept there (a rerun resumes)")
  _require(bool(request.num_images), "--num_images=N is required (N / num_classes images of each class)")
  _require(
    request.num_images % num_classes == 0,
    f"--num_images={request.num_images} is not a multiple of the {num_classes} classes (class-balanced sampling)",
  )
  extractor = fid.Extractor(request.inception)
  reference = None
  if request.ref_stats:
    try:
      reference = fid.load_reference(request.ref_stats)
    except ValueError as error:
      raise model_config.ConfigError(f"--ref_stats: {error}") from None
  _require(
    reference is not None or extractor.has_logits or bool(request.adm_npz or request.write_images),
    f"--mode=fid would compute nothing: {request.inception or 'the Inception file'} has no logits for the Inception "
    "Score, and FID and precision/recall need --ref_stats=<stats.npz> (--mode=ref_stats makes one)",
  )
  sampler = loaded.from_checkpoint(
    config, request.checkpoint, int(config.sample.batch_size), weights=request.weights, step=request.step
  )
  labels = fid.class_balanced_labels(request.num_images, num_classes)
  shards = fid.num_shards(len(labels), sampler.batch_size)
  out_dir = paths.path(request.output_dir)
  paths.make_dir(out_dir)
  print(
    f"FID of {len(labels)} samples in {shards} shards of {sampler.batch_size} on {sampler.mesh.size} device(s); "
    f"{len(fid.finished_shards(out_dir, shards))} shards already done in {out_dir}; "
    f"Inception weights: {extractor.source}"
  )
  start = time.perf_counter()
  key = jax.random.key(request.seed)
  sampled = fid.sample_shards(
    sampler, extractor, labels, key, out_dir, keep_images=bool(request.adm_npz), write_images=request.write_images
  )
  seconds = time.perf_counter() - start
  features = fid.read_shards(out_dir, shards)
  results = {"num_images": float(len(features["pool"]))}
  if sampled:
    results["images_per_s"] = sampled / seconds
  results.update(fid.score(features, reference))
  if request.adm_npz:
    _require("images" in features, f"--adm_npz: shards in {out_dir} from a run without it hold no images")
    fid.save_adm_batch(request.adm_npz, features["images"])
  print("; ".join(f"{k} {v:.4f}" for k, v in results.items()))
  if not extractor.has_logits:
    print(
      f"Inception Score: not computed: {extractor.source} has no logits layer (use torch-fidelity's or "
      "pytorch-fid's weight file)"
    )
  if request.output:
    fid.save_results(request.output, results)
  return results
