"""Data sources and grain input pipelines: digits, ImageFolder, TFDS, ADM crop, resume, host shards, eval padding."""

from __future__ import annotations

import io
import logging
import pathlib

import numpy as np
import pytest
from PIL import Image

from fractal_jax.config import base_config
from fractal_jax.data import input_pipeline, sources
from fractal_jax.data.sources import DataError

# --- helpers ------------------------------------------------------------------------------------------------------


def center_crop_arr(pil_image: Image.Image, image_size: int) -> np.ndarray:
  """guided-diffusion's `center_crop_arr` (improved-diffusion image_datasets.py), transcribed as published."""
  while min(*pil_image.size) >= 2 * image_size:
    pil_image = pil_image.resize(tuple(x // 2 for x in pil_image.size), resample=Image.BOX)
  scale = image_size / min(*pil_image.size)
  pil_image = pil_image.resize(tuple(round(x * scale) for x in pil_image.size), resample=Image.BICUBIC)
  arr = np.array(pil_image)
  crop_y = (arr.shape[0] - image_size) // 2
  crop_x = (arr.shape[1] - image_size) // 2
  return arr[crop_y : crop_y + image_size, crop_x : crop_x + image_size]


def numbered_source(count: int, side: int = 4) -> list[dict]:
  """In-memory records whose label is their index; images asymmetric left-right (so a flip shows)."""
  records = []
  for index in range(count):
    image = np.zeros((side, side, 3), np.uint8)
    image[:, 0] = index + 1  # only the left column is lit
    records.append({"image": image, "label": index})
  return records


def take(iterator, count: int) -> list[dict]:
  return [next(iterator) for _ in range(count)]


def encoded(array: np.ndarray, fmt: str, mode: str | None = None) -> bytes:
  picture = Image.fromarray(array)
  if mode:
    picture = picture.convert(mode)
  buffer = io.BytesIO()
  picture.save(buffer, format=fmt)
  return buffer.getvalue()


def smooth_rgb(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
  coarse = rng.integers(0, 256, (max(2, height // 8), max(2, width // 8), 3), dtype=np.uint8)
  return np.asarray(Image.fromarray(coarse).resize((width, height), Image.BILINEAR))


@pytest.fixture(scope="module")
def image_root(tmp_path_factory) -> pathlib.Path:
  """root/{train,val}/{cat,dog}/...: RGB JPEGs, one grayscale JPEG, one RGBA PNG, one corrupt file, one text file."""
  rng = np.random.default_rng(0)
  root = tmp_path_factory.mktemp("imagefolder")
  files = {
    "train/cat/a.JPEG": encoded(smooth_rgb(rng, 30, 40), "JPEG"),
    "train/cat/b_gray.jpg": encoded(smooth_rgb(rng, 50, 33), "JPEG", mode="L"),
    "train/cat/c_rgba.png": encoded(smooth_rgb(rng, 20, 20), "PNG", mode="RGBA"),
    "train/dog/d.jpeg": encoded(smooth_rgb(rng, 17, 25), "JPEG"),
    "train/dog/e_corrupt.jpg": b"\xff\xd8\xff\xe0 this is not a JPEG",
    "train/dog/f.PNG": encoded(smooth_rgb(rng, 24, 24), "PNG", mode="P"),
    "train/dog/notes.txt": b"not an image",
    "val/cat/g.jpg": encoded(smooth_rgb(rng, 20, 30), "JPEG"),
    "val/dog/h.jpg": encoded(smooth_rgb(rng, 30, 20), "JPEG", mode="CMYK"),
  }
  for name, data in files.items():
    (root / name).parent.mkdir(parents=True, exist_ok=True)
    (root / name).write_bytes(data)
  return root


# --- digits -------------------------------------------------------------------------------------------------------


def test_digits_source_split_and_records():
  from sklearn.datasets import load_digits

  train, val = sources.digits_source("train"), sources.digits_source("val")
  assert (len(train), len(val), train.num_classes) == (1497, 300, 10)
  record = train[0]
  assert record["image"].shape == (8, 8, 3) and record["image"].dtype == np.uint8 and isinstance(record["label"], int)
  images, labels = sources.digits_arrays("val")
  assert images.shape == (300, 8, 8, 3) and images.dtype == np.uint8 and labels.dtype == np.int32
  assert np.bincount(labels).tolist() == [30] * 10  # 30 held-out images per class
  train_images, train_labels = sources.digits_arrays("train")
  digits = load_digits()
  expected = np.round(digits.images * 255 / 16).astype(np.uint8)
  # The two splits partition the 1797 images: match every image to its original by content and label.
  both = np.concatenate([train_images, images])[..., 0].reshape(1797, -1)
  both_labels = np.concatenate([train_labels, labels])
  order = np.lexsort(np.concatenate([both, both_labels[:, None]], axis=1).T)
  original = np.concatenate([expected.reshape(1797, -1), digits.target[:, None]], axis=1)
  ours = np.concatenate([both, both_labels[:, None]], axis=1)
  np.testing.assert_array_equal(ours[order], original[np.lexsort(original.T)])
  assert np.all(images[..., 0] == images[..., 2]) and images.max() == 255
  np.testing.assert_array_equal(sources.digits_arrays("val")[0], images)  # deterministic
  with pytest.raises(DataError, match="'train' or 'val'"):
    sources.digits_source("test")


# --- ImageFolder --------------------------------------------------------------------------------------------------


def test_image_folder_source_lists_sorted_images(image_root):
  source = sources.image_folder_source(image_root, "train")
  assert source.classes == ["cat", "dog"] and source.num_classes == 2
  names = [pathlib.Path(path).name for path in source.paths]
  assert names == ["a.JPEG", "b_gray.jpg", "c_rgba.png", "d.jpeg", "e_corrupt.jpg", "f.PNG"]  # no notes.txt
  assert source.labels.tolist() == [0, 0, 0, 1, 1, 1]
  assert source[2] == {"image": (image_root / "train/cat/c_rgba.png").read_bytes(), "label": 0}


def test_image_folder_decodes_modes_and_skips_corrupt(image_root, caplog):
  source = sources.image_folder_source(image_root, "train")
  gray = input_pipeline.decode_image(source[1]["image"], 16)
  assert gray.shape == (16, 16, 3) and gray.dtype == np.uint8
  assert np.array_equal(gray[..., 0], gray[..., 1]) and np.array_equal(gray[..., 1], gray[..., 2])
  for index in (0, 2, 3, 5):  # RGB JPEG, RGBA PNG, small JPEG (upscaled), palette PNG
    assert input_pipeline.decode_image(source[index]["image"], 16).shape == (16, 16, 3)
  with pytest.raises(OSError):
    input_pipeline.decode_image(source[4]["image"], 16)

  input_pipeline.DECODE_STATS.reset()
  before = input_pipeline.skipped_images()
  with caplog.at_level(logging.WARNING):
    batches = list(input_pipeline.eval_batches(source, image_size=16, batch_size=4, process_index=0, process_count=1))
  assert input_pipeline.skipped_images() == before + 1
  assert "e_corrupt.jpg" in caplog.text and "skipped 1 unreadable images" in caplog.text
  mask = np.concatenate([batch["mask"] for batch in batches])
  assert mask.tolist() == [1, 1, 1, 1, 0, 1, 0, 0]  # the corrupt record's slot and the padding are masked

  # Training drops it: one epoch of the 5 readable images fills exactly the first batch of 5.
  stream = iter(input_pipeline.train_dataset(source, image_size=16, global_batch=5, seed=0, random_flip=False))
  batch = next(stream)
  assert batch["image"].shape == (5, 16, 16, 3) and batch["image"].dtype == np.uint8
  assert sorted(batch["label"].tolist()) == [0, 0, 0, 1, 1] and batch["label"].dtype == np.int32
  assert input_pipeline.skipped_images() >= before + 2  # prefetching threads may have read later epochs too


def test_image_folder_errors(image_root, tmp_path):
  with pytest.raises(DataError, match=r"does not exist.*<root>/<split>/<class name>"):
    sources.image_folder_source(tmp_path, "train")
  (tmp_path / "val").mkdir()
  (tmp_path / "val" / "ILSVRC2012_val_00000001.JPEG").write_bytes(b"")
  with pytest.raises(DataError, match="no class directories.*one folder per class"):
    sources.image_folder_source(tmp_path, "val")
  (tmp_path / "train" / "cat").mkdir(parents=True)
  (tmp_path / "train" / "cat" / "readme.txt").write_text("x")
  with pytest.raises(DataError, match=r"train' has 1 class directories but no image files"):
    sources.image_folder_source(tmp_path, "train")
  (image_root / "test" / "cat").mkdir(parents=True, exist_ok=True)
  with pytest.raises(DataError, match="differ from those of"):
    sources.image_folder_source(image_root, "test")  # classes [cat] vs train's [cat, dog]


# --- TFDS ---------------------------------------------------------------------------------------------------------


def test_tfds_unbuilt_and_unknown_datasets(tmp_path):
  with pytest.raises(DataError) as error:
    sources.tfds_source("imagenet2012", "validation", str(tmp_path))
  message = str(error.value)
  assert "not built" in message and f"{tmp_path}/downloads/manual/" in message
  assert "ILSVRC2012_img_train.tar" in message and "ILSVRC2012_img_val.tar" in message
  assert f"tfds build imagenet2012 --data_dir={tmp_path} --file_format=array_record" in message
  with pytest.raises(DataError, match="no dataset 'no_such_dataset_xyz'"):
    sources.tfds_source("no_such_dataset_xyz", "train", str(tmp_path))


def test_tfds_reads_a_tiny_built_dataset(tmp_path):
  """A two-split dataset built here (ArrayRecord, no TensorFlow) is read back through the pipeline."""
  import tensorflow_datasets as tfds

  pictures = [encoded(np.full((6, 9, 3), 20 * index, np.uint8), "PNG") for index in range(5)]

  class TinyImages(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
      features = {"image": tfds.features.Image(shape=(None, None, 3)), "label": tfds.features.ClassLabel(num_classes=3)}
      return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(features), disable_shuffling=True)

    def _split_generators(self, dl_manager):
      return {"train": self._generate_examples(range(3)), "validation": self._generate_examples(range(3, 5))}

    def _generate_examples(self, indices):
      for index in indices:
        yield index, {"image": io.BytesIO(pictures[index]), "label": index % 3}

  TinyImages(data_dir=tmp_path, file_format="array_record").download_and_prepare()
  source = sources.tfds_source("tiny_images", "validation", str(tmp_path))
  assert len(source) == 2 and source.num_classes == 3
  assert source[1] == {"image": pictures[4], "label": 1}  # still encoded
  (batch,) = list(input_pipeline.eval_batches(source, image_size=4, batch_size=2, process_index=0, process_count=1))
  assert batch["label"].tolist() == [0, 1] and np.all(batch["image"][1] == 80)
  with pytest.raises(DataError, match=r"has splits \['train', 'validation'\], not 'val'"):
    sources.tfds_source("tiny_images", "val", str(tmp_path))


# --- decoding -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [32, 64])
def test_adm_center_crop_matches_guided_diffusion(size):
  rng = np.random.default_rng(size)
  for height, width in [(375, 500), (500, 375), (333, 517), (131, 130), (64, 64), (40, 50), (257, 1000), (300, 17)]:
    picture = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
    ours = input_pipeline.adm_center_crop(picture, size)
    assert ours.size == (size, size)
    np.testing.assert_array_equal(np.asarray(ours), center_crop_arr(picture, size))
  jpeg = encoded(smooth_rgb(rng, 375, 500), "JPEG")
  np.testing.assert_array_equal(
    input_pipeline.decode_image(jpeg, size), center_crop_arr(Image.open(io.BytesIO(jpeg)).convert("RGB"), size)
  )


def test_decode_image_arrays():
  image = np.arange(8 * 8 * 3, dtype=np.uint8).reshape(8, 8, 3)
  assert input_pipeline.decode_image(image, 8) is image  # the right size: untouched
  expected = np.asarray(Image.fromarray(image).resize((16, 16), Image.BILINEAR))
  np.testing.assert_array_equal(input_pipeline.decode_image(image, 16), expected)
  assert input_pipeline.decode_image(image[..., 0], 8).shape == (8, 8, 3)  # grey [H, W] -> RGB


# --- training stream ----------------------------------------------------------------------------------------------


def test_train_resume_continues_with_the_next_batches():
  source = sources.digits_source("train")  # 1497 records: 6 batches of 256 cross the first epoch boundary
  dataset = input_pipeline.train_dataset(
    source, image_size=8, global_batch=256, seed=3, random_flip=True, process_index=0, process_count=1
  )
  iterator = iter(dataset)
  take(iterator, 4)
  state = iterator.get_state()
  expected = take(iterator, 3)
  resumed = iter(dataset)
  resumed.set_state(state)
  for ours, theirs in zip(take(resumed, 3), expected, strict=True):
    np.testing.assert_array_equal(ours["image"], theirs["image"])
    np.testing.assert_array_equal(ours["label"], theirs["label"])


def test_train_shuffles_each_epoch_and_is_deterministic():
  source = numbered_source(10)

  def epochs(seed: int) -> list[list[int]]:
    stream = iter(input_pipeline.train_dataset(source, image_size=4, global_batch=5, seed=seed, random_flip=False))
    labels = [label for batch in take(stream, 6) for label in batch["label"].tolist()]
    return [labels[start : start + 10] for start in range(0, 30, 10)]

  first = epochs(seed=0)
  assert all(sorted(epoch) == list(range(10)) for epoch in first)  # each epoch: every record once
  assert len({tuple(epoch) for epoch in first}) == 3  # a new order each epoch
  assert epochs(seed=0) == first and epochs(seed=1) != first


def test_train_host_shards_are_disjoint_and_cover():
  source = numbered_source(10)
  seen = []
  for process_index in range(2):
    stream = iter(
      input_pipeline.train_dataset(
        source, image_size=4, global_batch=10, seed=0, random_flip=False, process_index=process_index, process_count=2
      )
    )
    batch = next(stream)  # one epoch of this host's 5 records
    assert batch["label"].shape == (5,)
    seen.append(set(batch["label"].tolist()))
  assert seen == [{0, 2, 4, 6, 8}, {1, 3, 5, 7, 9}]
  with pytest.raises(ValueError, match="multiple of the 2 processes"):
    input_pipeline.train_dataset(
      source, image_size=4, global_batch=5, seed=0, random_flip=False, process_index=0, process_count=2
    )


def test_flip_off_keeps_images_and_flip_on_mirrors_some():
  source = numbered_source(10)
  originals = np.stack([record["image"] for record in source])
  for random_flip in (False, True):
    stream = iter(input_pipeline.train_dataset(source, image_size=4, global_batch=10, seed=0, random_flip=random_flip))
    batches = take(stream, 3)
    images = np.concatenate([batch["image"] for batch in batches])
    labels = np.concatenate([batch["label"] for batch in batches])
    mirrored = np.array([not np.array_equal(image, originals[label]) for image, label in zip(images, labels)])
    if not random_flip:
      assert not mirrored.any()
    else:
      assert 0 < mirrored.sum() < len(mirrored)
      np.testing.assert_array_equal(images[mirrored], originals[labels[mirrored]][:, :, ::-1])


# --- evaluation ---------------------------------------------------------------------------------------------------


def test_eval_batches_cover_every_record_once():
  source = numbered_source(11)
  real_labels = []
  for process_index in range(2):
    batches = input_pipeline.eval_batches(
      source, image_size=4, batch_size=4, process_index=process_index, process_count=2
    )
    listed = list(batches)
    assert len(listed) == len(batches) == 2  # the same count on both hosts
    mask = np.concatenate([batch["mask"] for batch in listed])
    labels = np.concatenate([batch["label"] for batch in listed])
    assert mask.dtype == np.float32 and listed[0]["image"].shape == (4, 4, 4, 3)
    expected_real = 6 if process_index == 0 else 5
    assert mask.tolist() == [1.0] * expected_real + [0.0] * (8 - expected_real)
    real_labels.extend(labels[mask == 1].tolist())
    images = np.concatenate([batch["image"] for batch in listed])[mask == 1]
    np.testing.assert_array_equal(images, np.stack([source[label]["image"] for label in labels[mask == 1]]))
  assert sorted(real_labels) == list(range(11))


# --- configuration ------------------------------------------------------------------------------------------------


def test_make_source_dispatch(image_root):
  config = base_config().data
  assert (config.name, config.random_flip, config.worker_count, config.eval_split) == ("imagefolder", True, 0, "val")
  config.name = "digits"
  assert len(input_pipeline.make_source(config, config.eval_split)) == 300
  config.name = "imagefolder"
  with pytest.raises(DataError, match="needs data.root"):
    input_pipeline.make_source(config, "train")
  config.root = str(image_root)
  assert input_pipeline.make_source(config, config.eval_split).classes == ["cat", "dog"]
  config.name = "cifar"
  with pytest.raises(DataError, match="must be one of"):
    input_pipeline.make_source(config, "train")
