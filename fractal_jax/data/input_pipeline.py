"""Grain input pipelines: decode + ADM center crop, shuffled infinite training batches, padded eval batches.

Batches are dicts of NumPy arrays, this host's share of the global batch:

  {"image": uint8 [B_local, S, S, 3], "label": int32 [B_local]}      (training)
  {..., "mask": float32 [B_local]}                                   (evaluation; 0 marks padding)

Images stay uint8 (normalisation happens on device). `make_source` turns the
`config.data` ConfigDict (defaults in `fractal_jax.config.base_config`) into a
source from `fractal_jax.data.sources`.
"""

from __future__ import annotations

import io
import itertools
import math
import threading
from collections.abc import Iterator
from typing import Any

import grain
import ml_collections
import numpy as np
from absl import flags, logging
from PIL import Image

from fractal_jax.data.sources import DataError, DataSource, digits_source, image_folder_source, tfds_source

Batch = dict[str, np.ndarray]

# Exceptions PIL raises for files it cannot read (truncated, not an image, broken headers, absurdly large).
_UNREADABLE = (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError)


# --- decoding -----------------------------------------------------------------------------------------------------


def adm_center_crop(pil_image: Image.Image, image_size: int) -> Image.Image:
  """The ADM center crop (guided-diffusion `center_crop_arr`, used by the official fractalgen).

  While the short side is >= 2 * image_size, halve both sides (floor) with a
  BOX filter; then BICUBIC-resize so the short side is image_size (each side
  round(side * image_size / short side)); then crop the [image_size, image_size]
  centre (offset floor((side - image_size) / 2)). Returns a new PIL image of
  size (image_size, image_size) in the input's mode.
  """
  while min(*pil_image.size) >= 2 * image_size:
    pil_image = pil_image.resize(tuple(side // 2 for side in pil_image.size), resample=Image.Resampling.BOX)
  scale = image_size / min(*pil_image.size)
  pil_image = pil_image.resize(tuple(round(side * scale) for side in pil_image.size), resample=Image.Resampling.BICUBIC)
  left = (pil_image.width - image_size) // 2
  top = (pil_image.height - image_size) // 2
  return pil_image.crop((left, top, left + image_size, top + image_size))


def decode_image(record_image: bytes | np.ndarray, image_size: int) -> np.ndarray:
  """A record's image -> uint8 [image_size, image_size, 3].

  Encoded bytes (JPEG, PNG, ...) are decoded with PIL, converted to RGB from
  any mode (L, RGBA, CMYK, P, ...; alpha is dropped, as torchvision's loader
  does) and ADM-center-cropped. Arrays (uint8 [H, W], [H, W, 1|3|4]; the digits)
  are returned as they are when already [S, S, 3]; square ones are otherwise
  resized with PIL BILINEAR, non-square ones ADM-cropped.

  Raises:
    OSError, ValueError, SyntaxError, EOFError, PIL.Image.DecompressionBombError:
      the bytes are not a readable image (the pipeline skips such records).
  """
  if isinstance(record_image, bytes | bytearray | memoryview):
    with Image.open(io.BytesIO(record_image)) as picture:
      picture = picture.convert("RGB")  # also loads (decodes) the whole file
    return np.asarray(adm_center_crop(picture, image_size))
  array = np.asarray(record_image)
  if array.shape == (image_size, image_size, 3) and array.dtype == np.uint8:
    return array
  if array.dtype != np.uint8:
    raise ValueError(f"image arrays must be uint8, got {array.dtype} {array.shape}")
  if array.ndim == 3 and array.shape[-1] == 1:
    array = array[..., 0]
  picture = Image.fromarray(array).convert("RGB")
  if picture.width == picture.height:
    picture = picture.resize((image_size, image_size), resample=Image.Resampling.BILINEAR)
  else:
    picture = adm_center_crop(picture, image_size)
  return np.asarray(picture)


class DecodeStats:
  """Thread-safe counts of decoded and skipped (unreadable) images in this process.

  Grain worker processes (worker_count > 0) keep their own counts: their
  warnings appear in the log, but the main process's counts do not include them.
  """

  def __init__(self):
    self._lock = threading.Lock()
    self.decoded = 0
    self.skipped = 0

  def add(self, *, skipped: bool) -> tuple[int, int]:
    """Counts one image; returns (decoded, skipped) after it."""
    with self._lock:
      if skipped:
        self.skipped += 1
      else:
        self.decoded += 1
      return self.decoded, self.skipped

  def reset(self) -> None:
    with self._lock:
      self.decoded = 0
      self.skipped = 0


DECODE_STATS = DecodeStats()


def skipped_images() -> int:
  """How many unreadable images this process has skipped since start (or `DECODE_STATS.reset()`)."""
  return DECODE_STATS.skipped


def log_skipped_summary() -> None:
  """One warning "skipped N unreadable images" when this process skipped any."""
  if DECODE_STATS.skipped:
    logging.warning(
      "skipped %d unreadable images (decoded %d) in this process", DECODE_STATS.skipped, DECODE_STATS.decoded
    )


class _RecordDecoder:
  """grain map_with_index step: (source index, record) -> {"image": uint8 [S, S, 3], "label": int32 []}.

  An unreadable image is logged, counted in `DECODE_STATS` and replaced by
  None (training: grain drops it) or, with `eval_mode`, by a black image with
  "mask" 0 (evaluation keeps one slot per record); eval records get "mask" 1.
  When more than half of the images fail (after 16 failures) the data is
  broken, not a few files: DataError.
  """

  def __init__(self, source: DataSource, image_size: int, eval_mode: bool = False):
    self.source = source
    self.image_size = image_size
    self.eval_mode = eval_mode

  def _describe(self, index: int) -> str:
    describe = getattr(self.source, "describe", None)
    return describe(index) if describe is not None else f"record {index} of a {type(self.source).__name__}"

  def __call__(self, index: int, record: dict[str, Any]) -> dict[str, Any] | None:
    label = np.int32(record["label"])
    try:
      image = decode_image(record["image"], self.image_size)
    except _UNREADABLE as error:
      decoded, skipped = DECODE_STATS.add(skipped=True)
      logging.warning(
        "skipping unreadable image %s (%s: %s); %d skipped in this process so far",
        self._describe(index),
        type(error).__name__,
        error,
        skipped,
      )
      if skipped >= 16 and skipped > decoded:
        raise DataError(
          f"{skipped} of {skipped + decoded} images could not be decoded (last: {self._describe(index)}); "
          "the data is damaged or not images: check the files or rebuild the dataset."
        ) from error
      if not self.eval_mode:
        return None
      blank = np.zeros((self.image_size, self.image_size, 3), np.uint8)
      return {"image": blank, "label": label, "mask": np.float32(0.0)}
    DECODE_STATS.add(skipped=False)
    if self.eval_mode:
      return {"image": image, "label": label, "mask": np.float32(1.0)}
    return {"image": image, "label": label}


def _random_flip(record: dict[str, Any] | None, rng: np.random.Generator) -> dict[str, Any] | None:
  """Mirrors the image left-right with probability 1/2 (grain random_map; None passes through)."""
  if record is None or rng.random() >= 0.5:
    return record
  return {**record, "image": np.ascontiguousarray(record["image"][:, ::-1])}


# --- pipelines ----------------------------------------------------------------------------------------------------


def _process_layout(process_index: int | None, process_count: int | None) -> tuple[int, int]:
  """(process_index, process_count), JAX's when None; checked."""
  if process_index is None or process_count is None:
    import jax  # only here: worker processes unpickling this module need not start JAX

    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index {process_index} is outside 0..{process_count - 1}")
  return process_index, process_count


def _derived_seed(seed: int, process_index: int, stream: int) -> int:
  """A 32-bit seed for one random stream (0: shuffle, 1: flips) of one host."""
  return int(np.random.SeedSequence([seed & (2**64 - 1), process_index, stream]).generate_state(1)[0])


def _ensure_absl_flags_parsed() -> None:
  """grain worker processes read absl flags; outside `absl.app.run` they are unparsed (UnparsedFlagAccessError)."""
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()


def train_dataset(
  source: DataSource,
  *,
  image_size: int,
  global_batch: int,
  seed: int,
  random_flip: bool,
  process_index: int | None = None,
  process_count: int | None = None,
  worker_count: int = 0,
) -> grain.IterDataset:
  """An infinite, shuffled, per-host training stream of batches.

  Host `process_index` reads records process_index::process_count of the
  source, shuffles them with a seed derived from (seed, process_index) and a
  fresh permutation each epoch, decodes + ADM-crops them (unreadable images are
  skipped, see `_RecordDecoder`), mirrors each with probability 1/2 when
  `random_flip` (a per-record seed: the same position of the stream always
  gets the same flip), and yields {"image": uint8 [B, S, S, 3], "label": int32
  [B]} with B = global_batch // process_count (drop_remainder). process_index
  and process_count default to JAX's.

  `it = iter(dataset)` supports `it.get_state()` (a dict) and
  `it.set_state(state)`: a fresh iterator of the same pipeline set to a saved
  state continues with the next unseen batch. `worker_count` > 0 decodes in
  that many grain worker processes (mp_prefetch: spawned processes, so the
  main script needs the `if __name__ == "__main__":` guard; close the
  iterator with `it.close()` when done); changing it changes the order of
  batches, and a state saved with one worker_count only restores with the same.

  Raises:
    ValueError: global_batch not divisible by process_count, or an empty shard.
  """
  process_index, process_count = _process_layout(process_index, process_count)
  if global_batch <= 0 or global_batch % process_count:
    raise ValueError(f"global_batch {global_batch} must be a positive multiple of the {process_count} processes")
  local_batch = global_batch // process_count
  dataset = grain.MapDataset.source(source).map_with_index(_RecordDecoder(source, image_size))
  dataset = dataset[process_index::process_count]
  if len(dataset) == 0:
    raise ValueError(f"host {process_index} of {process_count} gets no records of {source!r}")
  dataset = dataset.shuffle(seed=_derived_seed(seed, process_index, 0)).repeat()
  if random_flip:
    dataset = dataset.random_map(_random_flip, seed=_derived_seed(seed, process_index, 1))
  batches = dataset.to_iter_dataset().batch(local_batch, drop_remainder=True)
  if worker_count > 0:
    _ensure_absl_flags_parsed()
    batches = batches.mp_prefetch(grain.MultiprocessingOptions(num_workers=worker_count))
  return batches


class EvalBatches:
  """Finite, padded evaluation batches of one host: iterate it once per evaluation.

  Each element: {"image": uint8 [B, S, S, 3], "label": int32 [B], "mask":
  float32 [B]}; mask 1 marks a real record, 0 padding after the last one (and
  an unreadable image, which is counted in `DECODE_STATS` and summarised in a
  warning after the last batch). Every host yields
  `len(self)` batches (computed from the largest shard), so hosts stay in step.
  """

  def __init__(self, source: DataSource, *, image_size: int, batch_size: int, process_index: int, process_count: int):
    if batch_size <= 0:
      raise ValueError(f"batch_size must be positive, got {batch_size}")
    self.image_size = image_size
    self.batch_size = batch_size
    self._records = grain.MapDataset.source(source).map_with_index(_RecordDecoder(source, image_size, eval_mode=True))
    self._records = self._records[process_index::process_count]
    self.num_records = len(self._records)  # this host's real records
    self.num_batches = math.ceil(math.ceil(len(source) / process_count) / batch_size)

  def __len__(self) -> int:
    return self.num_batches

  def _padding(self, count: int) -> Batch:
    return {
      "image": np.zeros((count, self.image_size, self.image_size, 3), np.uint8),
      "label": np.zeros((count,), np.int32),
      "mask": np.zeros((count,), np.float32),
    }

  def __iter__(self) -> Iterator[Batch]:
    records = iter(self._records.to_iter_dataset())
    for _ in range(self.num_batches):
      chunk = list(itertools.islice(records, self.batch_size))
      batch = {
        "image": np.zeros((0, self.image_size, self.image_size, 3), np.uint8),
        "label": np.zeros((0,), np.int32),
        "mask": np.zeros((0,), np.float32),
      }
      if chunk:
        batch = {key: np.stack([record[key] for record in chunk]) for key in batch}
      if len(chunk) < self.batch_size:
        padding = self._padding(self.batch_size - len(chunk))
        batch = {key: np.concatenate([batch[key], padding[key]]) for key in batch}
      yield batch
    log_skipped_summary()


def eval_batches(
  source: DataSource,
  *,
  image_size: int,
  batch_size: int,
  process_index: int | None = None,
  process_count: int | None = None,
) -> EvalBatches:
  """Every record of `source` exactly once, in order, as this host's padded batches (see `EvalBatches`).

  Host `process_index` gets records process_index::process_count; batch_size
  is per host. process_index and process_count default to JAX's.
  """
  process_index, process_count = _process_layout(process_index, process_count)
  return EvalBatches(
    source, image_size=image_size, batch_size=batch_size, process_index=process_index, process_count=process_count
  )


# --- configuration ------------------------------------------------------------------------------------------------

DATA_NAMES = ("digits", "imagefolder", "tfds")


def make_source(data_config: ml_collections.ConfigDict, split: str) -> DataSource:
  """The source of split `split` (e.g. data_config.train_split) of the dataset `data_config` names.

  Raises:
    DataError: unknown name, imagefolder without root, or what the source itself raises.
  """
  name = data_config.name
  if name == "digits":
    return digits_source(split)
  if name == "imagefolder":
    if not data_config.root:
      raise DataError(
        "data.name='imagefolder' needs data.root, the folder holding <split>/<class>/<images> "
        "(e.g. --config.data.root=/data/imagenet)."
      )
    return image_folder_source(data_config.root, split)
  if name == "tfds":
    return tfds_source(data_config.tfds_name, split, data_config.tfds_data_dir or None)
  raise DataError(f"data.name must be one of {DATA_NAMES}, not {name!r}.")
