"""Sample quality for the built-in digits demo, with no download: a small classifier trained on the real digits.

The demo models scikit-learn's bundled digits (`sklearn.sources.load_digits()`: 1797 8x8 images, values 0..16,
10 classes), rendered as RGB uint8 images (value round(v * 255 / 16) on all 3 channels) and possibly upscaled to a
larger square. Generated samples are judged with a one-hidden-layer MLP trained on the real training split:

- `accuracy`: the fraction of samples that the classifier assigns to the class they were generated for;
- `frechet_distance`: the Fréchet distance between Gaussians fitted to the classifier's hidden-layer features of the
  samples and of the real held-out digits (an "FID" whose feature extractor is this classifier, not Inception).

`real_accuracy` and `real_frechet_distance` (real train vs. real held-out features) give the scale of a perfect model.
Like FID, the distance is biased upwards for few samples: compare numbers computed from the same number of samples.

The classifier trains in about a second on the CPU, deterministically, once per process (`functools.cache`).
"""

from __future__ import annotations

import dataclasses
import functools
import warnings

import numpy as np
from sklearn.exceptions import ConvergenceWarning
from sklearn.neural_network import MLPClassifier
from sklearn.preprocessing import StandardScaler

from fractal_jax.data import sources
from fractal_jax.evaluation.image_metrics import feature_statistics, frechet_distance

NUM_CLASSES = 10
BASE_SIZE = 8  # the digits' native resolution: the classifier sees 8x8 images
FEATURE_DIM = 64  # width of the classifier's hidden layer (the features used for the Fréchet distance)
_SEED = 0


def _digits_split() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
  """The digits split of the demo's data (`fractal_jax.data.sources.digits_arrays`): the classifier never sees held-out images.

  Returns:
    (train_images uint8 [1497, 8, 8, 3], train_labels [1497], val_images uint8 [300, 8, 8, 3], val_labels [300]);
    pixel value round(v * 255 / 16) for a digit value v in 0..16, equal on all channels.
  """
  train_x, train_y = sources.digits_arrays("train")
  val_x, val_y = sources.digits_arrays("val")
  return train_x, train_y.astype(np.int64), val_x, val_y.astype(np.int64)


def _check_images(images: np.ndarray) -> np.ndarray:
  """Validates uint8 [N, S, S, 3] images (N >= 1, S a multiple of 8) and returns them as an ndarray."""
  if not isinstance(images, np.ndarray):
    raise TypeError(f"images must be a numpy array, got {type(images).__name__}")
  if images.dtype != np.uint8:
    raise TypeError(f"images must be uint8 (0..255), got dtype {images.dtype}")
  if images.ndim != 4 or images.shape[-1] != 3 or images.shape[1] != images.shape[2]:
    raise ValueError(f"images must have shape [N, S, S, 3] (square RGB), got {images.shape}")
  if images.shape[0] == 0:
    raise ValueError("images is empty (N = 0)")
  size = images.shape[1]
  if size < BASE_SIZE or size % BASE_SIZE:
    raise ValueError(
      f"image size S={size} is not a multiple of {BASE_SIZE}: digits images must be 8x8 or area-upscaled to 8k x 8k"
    )
  return images


def to_features_input(images: np.ndarray) -> np.ndarray:
  """RGB images -> the classifier's input: grayscale, area-downsampled to 8x8, in the digits' 0..16 range, flattened.

  Args:
    images: uint8 [N, S, S, 3], S a multiple of 8 (8, 16, 32, ...).

  Returns:
    float64 [N, 64], values in 0..16. Images upscaled with `np.repeat` map to exactly the values of the 8x8 originals.

  Raises:
    TypeError: images is not a uint8 numpy array.
    ValueError: the shape is not [N, S, S, 3] with S a positive multiple of 8.
  """
  images = _check_images(images)
  count, size = images.shape[0], images.shape[1]
  factor = size // BASE_SIZE
  blocks = images.reshape(count, BASE_SIZE, factor, BASE_SIZE, factor, 3)
  # Exact integer sums, then one division: the result does not depend on the upscaling factor for repeated pixels.
  sums = blocks.sum(axis=(2, 4, 5), dtype=np.int64) * 16
  return (sums / (255 * 3 * factor * factor)).reshape(count, BASE_SIZE * BASE_SIZE)


@dataclasses.dataclass(frozen=True)
class _Reference:
  """The trained classifier and the statistics of the real digits' features."""

  scaler: StandardScaler
  classifier: MLPClassifier
  val_mu: np.ndarray  # float64 [FEATURE_DIM]
  val_sigma: np.ndarray  # float64 [FEATURE_DIM, FEATURE_DIM]
  real_accuracy: float
  real_frechet_distance: float


def _hidden(reference: _Reference, inputs: np.ndarray) -> np.ndarray:
  """float [N, 64] classifier inputs -> float64 [N, FEATURE_DIM] hidden-layer activations (after the ReLU)."""
  standardized = reference.scaler.transform(inputs)
  pre_activation = standardized @ reference.classifier.coefs_[0] + reference.classifier.intercepts_[0]
  return np.maximum(pre_activation, 0.0)


@functools.cache
def _reference() -> _Reference:
  """Trains the classifier on the real training split (deterministic, ~1 s) and measures it on the held-out split."""
  train_images, train_labels, val_images, val_labels = _digits_split()
  train_inputs, val_inputs = to_features_input(train_images), to_features_input(val_images)
  scaler = StandardScaler().fit(train_inputs)
  classifier = MLPClassifier(hidden_layer_sizes=(FEATURE_DIM,), activation="relu", max_iter=500, random_state=_SEED)
  with warnings.catch_warnings():
    # A ConvergenceWarning would mean a weaker classifier than documented: fail loudly.
    warnings.simplefilter("error", ConvergenceWarning)
    classifier.fit(scaler.transform(train_inputs), train_labels)
  real_accuracy = float(classifier.score(scaler.transform(val_inputs), val_labels))
  partial = _Reference(scaler, classifier, np.empty(0), np.empty(0), real_accuracy, float("nan"))
  val_mu, val_sigma = feature_statistics(_hidden(partial, val_inputs))
  train_mu, train_sigma = feature_statistics(_hidden(partial, train_inputs))
  for array in (val_mu, val_sigma):
    array.setflags(write=False)
  return dataclasses.replace(
    partial,
    val_mu=val_mu,
    val_sigma=val_sigma,
    real_frechet_distance=frechet_distance(train_mu, train_sigma, val_mu, val_sigma),
  )


def hidden_features(images: np.ndarray) -> np.ndarray:
  """uint8 [N, S, S, 3] images (S a multiple of 8) -> float64 [N, FEATURE_DIM] hidden-layer features of the classifier."""
  return _hidden(_reference(), to_features_input(images))


def predict_labels(images: np.ndarray) -> np.ndarray:
  """uint8 [N, S, S, 3] images (S a multiple of 8) -> int64 [N] classes 0..9 predicted by the classifier."""
  reference = _reference()
  return reference.classifier.predict(reference.scaler.transform(to_features_input(images))).astype(np.int64)


def evaluate_samples(images: np.ndarray, intended_labels: np.ndarray) -> dict[str, float]:
  """Scores generated digits against the real ones.

  Args:
    images: uint8 [N, S, S, 3] samples, N >= 2, S a multiple of 8 (8x8 digits or their upscaled versions).
    intended_labels: integer [N] classes 0..9 the samples were generated for.

  Returns:
    float values: `accuracy` (fraction of samples classified as their intended class), `frechet_distance` (between
    the samples' hidden features and the real held-out digits'), `real_accuracy` (the classifier's held-out accuracy)
    and `real_frechet_distance` (real train vs. real held-out features), and `num_samples` (N).

  Raises:
    TypeError: images is not a uint8 numpy array, or the labels are not integers.
    ValueError: bad shapes, fewer than 2 samples, a length mismatch, or labels outside 0..9.
  """
  images = _check_images(images)
  labels = np.asarray(intended_labels)
  if labels.dtype == np.bool_ or not np.issubdtype(labels.dtype, np.integer):
    raise TypeError(f"intended_labels must be integers 0..{NUM_CLASSES - 1}, got dtype {labels.dtype}")
  if labels.ndim != 1:
    raise ValueError(f"intended_labels must have shape [N], got {labels.shape}")
  if labels.shape[0] != images.shape[0]:
    raise ValueError(f"{images.shape[0]} images but {labels.shape[0]} intended labels")
  if images.shape[0] < 2:
    raise ValueError("at least 2 samples are needed to estimate a covariance for the Fréchet distance")
  if labels.min() < 0 or labels.max() >= NUM_CLASSES:
    raise ValueError(f"intended_labels must be in 0..{NUM_CLASSES - 1}, got values in {labels.min()}..{labels.max()}")
  reference = _reference()
  inputs = to_features_input(images)
  predictions = reference.classifier.predict(reference.scaler.transform(inputs))
  mu, sigma = feature_statistics(_hidden(reference, inputs))
  return {
    "accuracy": float(np.mean(predictions == labels)),
    "frechet_distance": frechet_distance(mu, sigma, reference.val_mu, reference.val_sigma),
    "real_accuracy": reference.real_accuracy,
    "real_frechet_distance": reference.real_frechet_distance,
    "num_samples": float(images.shape[0]),
  }
