"""The digits sample-quality metric: the classifier, the Fréchet distance, and the input checks."""

from __future__ import annotations

import numpy as np
import pytest

from fractal_jax.evaluation import digits_quality


@pytest.fixture(scope="module")
def split() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
  return digits_quality._digits_split()


def _upscale(images: np.ndarray, factor: int) -> np.ndarray:
  return np.repeat(np.repeat(images, factor, axis=1), factor, axis=2)


def test_split_is_fixed_and_stratified(split):
  train_images, train_labels, val_images, val_labels = split
  assert train_images.shape == (1497, 8, 8, 3) and val_images.shape == (300, 8, 8, 3)
  assert train_images.dtype == np.uint8 and val_images.dtype == np.uint8
  assert np.bincount(val_labels, minlength=10).min() >= 29  # stratified: ~30 per class
  again = digits_quality._digits_split()
  np.testing.assert_array_equal(again[2], val_images)
  np.testing.assert_array_equal(again[3], val_labels)


def test_features_input_recovers_the_digit_values(split):
  _, _, val_images, _ = split
  inputs = digits_quality.to_features_input(val_images)
  assert inputs.shape == (300, 64) and inputs.dtype == np.float64
  assert inputs.min() >= 0.0 and inputs.max() <= 16.0
  # round(v * 255 / 16) * 16 / 255 is within half a uint8 step of an integer v.
  np.testing.assert_allclose(inputs, np.round(inputs), atol=8 / 255)


def test_classifier_held_out_accuracy():
  assert digits_quality._reference().real_accuracy >= 0.95


def test_classifier_is_deterministic():
  first, second = digits_quality._reference(), digits_quality._reference.__wrapped__()
  first_params = first.classifier.coefs_ + first.classifier.intercepts_
  second_params = second.classifier.coefs_ + second.classifier.intercepts_
  for a, b in zip(first_params, second_params, strict=True):
    np.testing.assert_array_equal(a, b)
  assert first.real_frechet_distance == second.real_frechet_distance


def test_real_digits_score_well(split):
  train_images, train_labels, val_images, val_labels = split
  scores = digits_quality.evaluate_samples(val_images, val_labels)
  assert scores["accuracy"] >= 0.95
  assert scores["accuracy"] == pytest.approx(scores["real_accuracy"])
  assert abs(scores["frechet_distance"]) < 1e-6  # the held-out digits themselves
  assert 0.0 < scores["real_frechet_distance"] < 20.0
  # As many real training digits as there are held-out ones: the same scale as the reference distance.
  other = digits_quality.evaluate_samples(train_images[:300], train_labels[:300])
  assert other["accuracy"] >= 0.95
  assert other["frechet_distance"] < 3 * scores["real_frechet_distance"]


def test_wrong_labels_give_low_accuracy(split):
  _, _, val_images, val_labels = split
  shuffled = np.random.default_rng(0).permutation(val_labels)
  scores = digits_quality.evaluate_samples(val_images, shuffled)
  assert scores["accuracy"] < 0.3
  assert abs(scores["frechet_distance"]) < 1e-6  # the distance ignores the labels


def test_noise_is_far_from_the_digits(split):
  _, _, val_images, val_labels = split
  noise = np.random.default_rng(0).integers(0, 256, size=val_images.shape, dtype=np.uint8)
  scores = digits_quality.evaluate_samples(noise, val_labels)
  assert scores["frechet_distance"] > 100 * scores["real_frechet_distance"]
  assert scores["accuracy"] < 0.5


def test_mode_collapse_is_far_from_the_digits(split):
  """One correct image per class, repeated: perfect accuracy, but no diversity."""
  _, _, val_images, val_labels = split
  correct = digits_quality.predict_labels(val_images) == val_labels
  firsts = np.array([np.flatnonzero((val_labels == c) & correct)[0] for c in range(10)])
  indices = np.repeat(firsts, 30)
  scores = digits_quality.evaluate_samples(val_images[indices], val_labels[indices])
  assert scores["accuracy"] == 1.0
  assert scores["frechet_distance"] > 10 * scores["real_frechet_distance"]


def test_upscaled_digits_give_the_same_predictions(split):
  _, _, val_images, val_labels = split
  predictions = digits_quality.predict_labels(val_images)
  assert predictions.shape == (300,) and predictions.dtype == np.int64
  for factor in (2, 4):
    upscaled = _upscale(val_images, factor)
    np.testing.assert_array_equal(
      digits_quality.to_features_input(upscaled), digits_quality.to_features_input(val_images)
    )
    np.testing.assert_array_equal(digits_quality.predict_labels(upscaled), predictions)
  np.testing.assert_array_equal(
    digits_quality.hidden_features(_upscale(val_images, 2)), digits_quality.hidden_features(val_images)
  )
  scores = digits_quality.evaluate_samples(_upscale(val_images, 2), val_labels)
  assert scores["accuracy"] >= 0.95 and abs(scores["frechet_distance"]) < 1e-6


def test_features_input_area_downsamples():
  images = np.zeros((1, 16, 16, 3), np.uint8)
  images[0, 0, 0] = 255  # one bright pixel of four in the top-left block, on all channels
  images[0, 2:4, 2:4, 0] = 255  # a red-only block: a third of the gray value
  inputs = digits_quality.to_features_input(images).reshape(8, 8)
  assert inputs[0, 0] == pytest.approx(4.0)
  assert inputs[1, 1] == pytest.approx(16 / 3)
  assert np.count_nonzero(inputs) == 2


def _random_covariance(rng: np.random.Generator, dim: int) -> np.ndarray:
  factor = rng.normal(size=(dim, 2 * dim))
  return factor @ factor.T / (2 * dim)


def test_frechet_distance_of_a_gaussian_with_itself_is_zero():
  rng = np.random.default_rng(0)
  mu, sigma = rng.normal(size=6), _random_covariance(rng, 6)
  assert digits_quality.frechet_distance(mu, sigma, mu, sigma) == pytest.approx(0.0, abs=1e-8)


def test_frechet_distance_matches_the_diagonal_closed_form():
  rng = np.random.default_rng(1)
  mu1, mu2 = rng.normal(size=5), rng.normal(size=5)
  s1, s2 = rng.uniform(0.1, 3.0, size=5), rng.uniform(0.1, 3.0, size=5)
  expected = np.sum((mu1 - mu2) ** 2) + np.sum(s1 + s2 - 2 * np.sqrt(s1 * s2))
  distance = digits_quality.frechet_distance(mu1, np.diag(s1), mu2, np.diag(s2))
  assert isinstance(distance, float)
  assert distance == pytest.approx(expected, rel=1e-9)
  # Symmetric, and a full covariance rotated into the same basis on both sides gives the same value.
  assert digits_quality.frechet_distance(mu2, np.diag(s2), mu1, np.diag(s1)) == pytest.approx(expected, rel=1e-9)
  rotation, _ = np.linalg.qr(rng.normal(size=(5, 5)))
  rotated = digits_quality.frechet_distance(
    rotation @ mu1, rotation @ np.diag(s1) @ rotation.T, rotation @ mu2, rotation @ np.diag(s2) @ rotation.T
  )
  assert rotated == pytest.approx(expected, rel=1e-7)


@pytest.mark.filterwarnings("error")
def test_frechet_distance_handles_singular_covariances():
  rng = np.random.default_rng(2)
  mu1, mu2 = rng.normal(size=4), rng.normal(size=4)
  s2 = rng.uniform(0.5, 2.0, size=4)
  expected = np.sum((mu1 - mu2) ** 2) + np.sum(s2)  # sigma1 = 0: no cross term
  distance = digits_quality.frechet_distance(mu1, np.zeros((4, 4)), mu2, np.diag(s2))
  assert np.isfinite(distance) and distance == pytest.approx(expected, abs=1e-2)


def test_bad_inputs_raise_clear_errors(split):
  _, _, val_images, val_labels = split
  images, labels = val_images[:20], val_labels[:20]
  with pytest.raises(TypeError, match="uint8"):
    digits_quality.evaluate_samples(images.astype(np.float32), labels)
  with pytest.raises(TypeError, match="numpy array"):
    digits_quality.to_features_input(images.tolist())
  with pytest.raises(ValueError, match=r"\[N, S, S, 3\]"):
    digits_quality.evaluate_samples(images[..., 0], labels)
  with pytest.raises(ValueError, match=r"\[N, S, S, 3\]"):
    digits_quality.to_features_input(np.zeros((2, 8, 16, 3), np.uint8))
  with pytest.raises(ValueError, match="multiple of 8"):
    digits_quality.to_features_input(np.zeros((2, 12, 12, 3), np.uint8))
  with pytest.raises(ValueError, match="multiple of 8"):
    digits_quality.to_features_input(np.zeros((2, 4, 4, 3), np.uint8))
  with pytest.raises(ValueError, match="empty"):
    digits_quality.to_features_input(np.zeros((0, 8, 8, 3), np.uint8))
  with pytest.raises(ValueError, match="20 images but 19"):
    digits_quality.evaluate_samples(images, labels[:19])
  with pytest.raises(ValueError, match=r"shape \[N\]"):
    digits_quality.evaluate_samples(images, labels[:, None])
  with pytest.raises(ValueError, match=r"0\.\.9"):
    digits_quality.evaluate_samples(images, np.where(np.arange(20) == 3, 10, labels))
  with pytest.raises(ValueError, match=r"0\.\.9"):
    digits_quality.evaluate_samples(images, np.where(np.arange(20) == 3, -1, labels))
  with pytest.raises(TypeError, match="integers"):
    digits_quality.evaluate_samples(images, labels.astype(np.float32))
  with pytest.raises(ValueError, match="at least 2"):
    digits_quality.evaluate_samples(images[:1], labels[:1])
  with pytest.raises(ValueError, match="means"):
    digits_quality.frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(3))
  with pytest.raises(ValueError, match="covariances"):
    digits_quality.frechet_distance(np.zeros(3), np.eye(3), np.zeros(3), np.eye(4))
