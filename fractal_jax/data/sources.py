"""Data sources: random-access image/label records for the grain input pipeline.

Every source follows grain's `RandomAccessDataSource` protocol (`len(source)`,
`source[i]`) and is picklable, so grain worker processes can read it. A record
is a dict

  {"image": <encoded image bytes> or uint8 [H, W, 3], "label": int}

decoded and cropped later by `fractal_jax.data.input_pipeline`. Each source also
has `num_classes` (labels are 0..num_classes-1).

- `digits_source(split)`: scikit-learn's bundled 8x8 digits (no download).
- `image_folder_source(root, split)`: `<root>/<split>/<class>/<image file>`,
  the official ImageNet layout (ILSVRC2012 train and the sorted val folders).
- `tfds_source(name, split, data_dir)`: a built TFDS dataset in ArrayRecord
  format, read without TensorFlow.

A missing or malformed dataset raises `DataError` naming the problem and the fix.
"""

from __future__ import annotations

import concurrent.futures
import functools
from collections.abc import Sequence
from typing import Any, Protocol

import numpy as np
from absl import logging
from etils import epath

# Suffixes (compared lower-case) that `image_folder_source` reads; torchvision's ImageFolder list.
IMAGE_SUFFIXES = (".jpeg", ".jpg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")

DIGITS_SPLITS = ("train", "val")
DIGITS_VAL_PER_CLASS = 30  # 10 classes x 30 = 300 held-out images; the other 1497 train.
_DIGITS_SPLIT_SEED = 0


class DataSource(Protocol):
  """grain's RandomAccessDataSource: `len(source)` records, `source[i]` -> {"image": ..., "label": int}."""

  def __len__(self) -> int: ...

  def __getitem__(self, index: int) -> dict[str, Any]: ...


class DataError(ValueError):
  """A dataset is missing or malformed; the message names the path or name and the fix."""


# --- scikit-learn digits ------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def _digits_all() -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
  """All 1797 digits as (uint8 [N, 8, 8, 3], int32 [N], {split: sorted int64 indices})."""
  from sklearn.datasets import load_digits  # bundled with scikit-learn: no download

  digits = load_digits()
  grey = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)  # values 0..16 -> 0..255
  images = np.repeat(grey[..., None], 3, axis=-1)
  labels = digits.target.astype(np.int32)
  rng = np.random.default_rng(_DIGITS_SPLIT_SEED)
  val = []
  for label in range(10):
    members = np.flatnonzero(labels == label)
    val.append(rng.permutation(members)[:DIGITS_VAL_PER_CLASS])
  val_indices = np.sort(np.concatenate(val))
  train_indices = np.setdiff1d(np.arange(len(labels)), val_indices)
  for array in (images, labels, val_indices, train_indices):
    array.setflags(write=False)  # cached: callers get copies or read-only views
  return images, labels, {"train": train_indices, "val": val_indices}


def digits_arrays(split: str) -> tuple[np.ndarray, np.ndarray]:
  """One split of scikit-learn's digits: (images uint8 [N, 8, 8, 3], labels int32 [N]).

  Pixel value round(v * 255 / 16) of the original 0..16 grey level, on 3 equal channels.
  The split is fixed: "val" holds 30 images of each class (300), picked by a
  `np.random.default_rng(0)` permutation of that class's indices; "train" holds
  the other 1497. Both keep the order of `load_digits()`.
  """
  if split not in DIGITS_SPLITS:
    raise DataError(f"digits has splits {DIGITS_SPLITS}, not {split!r}; set the split to 'train' or 'val'.")
  images, labels, splits = _digits_all()
  indices = splits[split]
  return images[indices], labels[indices]


class DigitsSource:
  """Random-access digits records: {"image": uint8 [8, 8, 3], "label": int}."""

  num_classes = 10

  def __init__(self, split: str):
    self.split = split
    self.images, self.labels = digits_arrays(split)

  def __len__(self) -> int:
    return len(self.labels)

  def __getitem__(self, index: int) -> dict[str, Any]:
    return {"image": self.images[index], "label": int(self.labels[index])}

  def __repr__(self) -> str:
    return f"DigitsSource(split={self.split!r}, size={len(self)})"


def digits_source(split: str) -> DigitsSource:
  """scikit-learn's digits as a grain data source; splits as in `digits_arrays`."""
  return DigitsSource(split)


# --- ImageFolder --------------------------------------------------------------------------------------------------

_LAYOUT = "<root>/<split>/<class name>/<image>.JPEG (e.g. imagenet/train/n01440764/n01440764_10026.JPEG)"


class ImageFolderSource:
  """Random-access ImageFolder records: {"image": raw file bytes, "label": class id}.

  `paths[i]` (str) and `labels[i]` (int32) describe record i; `classes[c]` is
  the directory name of class id c.
  """

  def __init__(self, paths: Sequence[str], labels: np.ndarray, classes: Sequence[str], directory: str):
    self.paths = list(paths)
    self.labels = np.asarray(labels, np.int32)
    self.classes = list(classes)
    self.directory = directory
    self.num_classes = len(self.classes)

  def __len__(self) -> int:
    return len(self.paths)

  def __getitem__(self, index: int) -> dict[str, Any]:
    return {"image": epath.Path(self.paths[index]).read_bytes(), "label": int(self.labels[index])}

  def describe(self, index: int) -> str:
    """A human-readable name of record `index` (its file path), for warnings."""
    return self.paths[index]

  def __repr__(self) -> str:
    return f"ImageFolderSource({self.directory!r}, {len(self)} images, {self.num_classes} classes)"


_LISTING_THREADS = 16  # directory listings in parallel: each is a round trip on gs://


def _class_directories(directory: epath.Path) -> list[str]:
  """Sorted names of the sub-directories of `directory`, hidden ones (".name") left out."""
  entries = [entry for entry in directory.iterdir() if not entry.name.startswith(".")]
  with concurrent.futures.ThreadPoolExecutor(_LISTING_THREADS) as pool:
    is_directory = list(pool.map(lambda entry: entry.is_dir(), entries))
  return sorted(entry.name for entry, keep in zip(entries, is_directory) if keep)


def _image_files(directory: epath.Path) -> list[str]:
  """Sorted paths (str) of the files in `directory` with an image suffix (any case)."""
  return sorted(str(entry) for entry in directory.iterdir() if entry.suffix.lower() in IMAGE_SUFFIXES)


def image_folder_source(root: str | epath.PathLike, split: str) -> ImageFolderSource:
  """Lists `<root>/<split>/<class>/*` into an `ImageFolderSource`.

  Classes are the sorted sub-directory names (ids 0..C-1); the files of each
  class are sorted by name, so the record order is deterministic. Files whose
  suffix is in `IMAGE_SUFFIXES` (any case: .JPEG, .jpg, .png, ...) are read;
  other files are ignored. The paths go through `etils.epath`, so `gs://...`
  roots work as well as local ones (only local folders are tested here). When
  `<root>/train` exists, another split must have the same class names, or the
  labels would not line up. A class directory without images is logged as a
  warning (its id stays reserved).

  Raises:
    DataError: the split directory is missing, has no class directories, has
      no image files, or its classes differ from those of `<root>/train`.
  """
  directory = epath.Path(root) / split
  if not directory.is_dir():
    raise DataError(f"image folder {str(directory)!r} does not exist; expected the layout {_LAYOUT}.")
  classes = _class_directories(directory)
  if not classes:
    raise DataError(
      f"image folder {str(directory)!r} has no class directories; expected the layout {_LAYOUT}. "
      "ImageNet's validation tar unpacks flat: sort its 50,000 images into one folder per class first "
      "(e.g. with the widely used valprep.sh)."
    )
  train_directory = epath.Path(root) / "train"
  if split != "train" and train_directory.is_dir():
    train_classes = _class_directories(train_directory)
    if train_classes != classes:
      missing = sorted(set(train_classes) - set(classes))[:5]
      extra = sorted(set(classes) - set(train_classes))[:5]
      raise DataError(
        f"the classes of {str(directory)!r} ({len(classes)}) differ from those of {str(train_directory)!r} "
        f"({len(train_classes)}; e.g. missing {missing}, extra {extra}): class ids would not line up. "
        "Give every split the same class directories."
      )
  paths: list[str] = []
  labels: list[int] = []
  empty: list[str] = []
  with concurrent.futures.ThreadPoolExecutor(_LISTING_THREADS) as pool:
    listings = list(pool.map(_image_files, [directory / name for name in classes]))
  for class_id, (name, files) in enumerate(zip(classes, listings)):
    if not files:
      empty.append(name)
    paths.extend(files)
    labels.extend([class_id] * len(files))
  if not paths:
    raise DataError(
      f"image folder {str(directory)!r} has {len(classes)} class directories but no image files "
      f"(suffixes {', '.join(IMAGE_SUFFIXES)}, any case); expected the layout {_LAYOUT}."
    )
  if empty:
    logging.warning("image folder %s: %d class directories without images, e.g. %s", directory, len(empty), empty[:5])
  return ImageFolderSource(paths, np.asarray(labels, np.int32), classes, str(directory))


# --- TFDS ---------------------------------------------------------------------------------------------------------


class TfdsSource:
  """A built TFDS split as records {"image": encoded bytes, "label": int} (images decoded later)."""

  def __init__(self, source: Sequence[dict[str, Any]], name: str, split: str, num_classes: int | None):
    self.source = source
    self.name = name
    self.split = split
    self.num_classes = num_classes

  def __len__(self) -> int:
    return len(self.source)

  def __getitem__(self, index: int) -> dict[str, Any]:
    record = self.source[index]
    return {"image": record["image"], "label": int(record["label"])}

  def __repr__(self) -> str:
    return f"TfdsSource({self.name!r}, split={self.split!r}, size={len(self)})"


def _build_instructions(name: str, data_root: str) -> str:
  """How to build TFDS dataset `name` once under `data_root`, in the format grain reads."""
  command = f"tfds build {name} --data_dir={data_root} --file_format=array_record"
  if name.split("/")[0].split(":")[0] == "imagenet2012":
    return (
      f"build it once: put ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar (from image-net.org) in "
      f"{data_root}/downloads/manual/ and run `{command}` (needs TensorFlow and a few hours)."
    )
  return f"build it once with `{command}` (datasets with a manual download need their files in {data_root}/downloads/manual/)."


def tfds_source(name: str, split: str, data_dir: str | None = None) -> TfdsSource:
  """A built TFDS dataset's split as a grain source, read without TensorFlow.

  `name` may carry a config and version ("imagenet2012", "imagenet2012:5.1.0");
  `data_dir` None or "" means TFDS's default (`$TFDS_DATA_DIR` or
  ~/tensorflow_datasets). The dataset must have "image" and "label" features
  and be built in ArrayRecord format (random access); images are left encoded
  (`tfds.decode.SkipDecoding`) and decoded by the input pipeline.

  Raises:
    DataError: unknown name, dataset not built (with the build command), built
      as TFRecord (not random-access), unknown split, or missing features.
  """
  import tensorflow_datasets as tfds  # imported here: the other sources do not need it

  data_dir = data_dir or None
  try:
    builder = tfds.builder(name, data_dir=data_dir)
  except tfds.core.registered.DatasetNotFoundError as error:
    raise DataError(f"TFDS has no dataset {name!r} (and none is built under {data_dir!r}); check the name.") from error
  data_root = str(builder.data_dir_root)
  if not builder.is_prepared():
    raise DataError(f"TFDS dataset {name!r} is not built in {builder.data_dir}; {_build_instructions(name, data_root)}")
  if builder.info.file_format != tfds.core.FileFormat.ARRAY_RECORD:
    raise DataError(
      f"TFDS dataset {name!r} in {builder.data_dir} is stored as {builder.info.file_format.value}, which has no "
      f"random access; rebuild it as ArrayRecord: {_build_instructions(name, data_root)}"
    )
  if split not in builder.info.splits:
    raise DataError(f"TFDS dataset {name!r} has splits {sorted(builder.info.splits)}, not {split!r}.")
  features = builder.info.features
  if "image" not in features or "label" not in features:
    raise DataError(f"TFDS dataset {name!r} needs 'image' and 'label' features; it has {sorted(features.keys())}.")
  source = builder.as_data_source(split=split, decoders={"image": tfds.decode.SkipDecoding()})
  num_classes = getattr(features["label"], "num_classes", None)
  return TfdsSource(source, name, split, num_classes)
