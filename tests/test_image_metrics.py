"""FID, Inception Score and precision/recall on synthetic features and logits."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg
import scipy.special

from fractal_jax.evaluation import image_metrics


def _fid_by_scipy(a: np.ndarray, b: np.ndarray) -> float:
  """The textbook formula, written independently."""
  mu_a, mu_b = a.mean(0), b.mean(0)
  cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
  root = scipy.linalg.sqrtm(cov_a @ cov_b).real
  return float(np.sum((mu_a - mu_b) ** 2) + np.trace(cov_a + cov_b - 2 * root))


def test_fid_of_a_set_against_its_own_statistics_is_zero():
  features = np.random.default_rng(0).normal(size=(500, 16))
  mu, sigma = image_metrics.feature_statistics(features)
  assert abs(image_metrics.frechet_distance(mu, sigma, mu, sigma)) < 1e-8


def test_fid_matches_scipy_and_separates_different_sets():
  rng = np.random.default_rng(1)
  a, b = rng.normal(size=(400, 12)), rng.normal(0.1, 1.2, size=(300, 12))
  fid = image_metrics.frechet_distance(*image_metrics.feature_statistics(a), *image_metrics.feature_statistics(b))
  assert fid == pytest.approx(_fid_by_scipy(a, b), rel=1e-8)
  far = rng.normal(3.0, 1.0, size=(300, 12))
  far_fid = image_metrics.frechet_distance(*image_metrics.feature_statistics(a), *image_metrics.feature_statistics(far))
  assert far_fid > 50 * fid and far_fid > 100


def test_inception_score_of_uniform_logits_is_one():
  mean, std = image_metrics.inception_score(np.zeros((100, 1008)))
  assert mean == pytest.approx(1.0) and std == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("k", [2, 5, 10])
def test_inception_score_of_confident_even_spread_over_k_classes_is_k(k):
  labels = np.arange(100 * k) % k
  logits = np.full((labels.size, 1008), -1e4)
  logits[np.arange(labels.size), labels] = 0.0
  mean, _ = image_metrics.inception_score(logits, splits=10, shuffle=False)  # every split holds k classes evenly
  assert mean == pytest.approx(k, rel=1e-6)


def _torch_fidelity_isc(logits: np.ndarray, splits: int = 10, seed: int = 2020) -> tuple[float, float]:
  """torch-fidelity's `isc_features_to_metric` procedure, written independently (scipy, one row at a time)."""
  count = len(logits)
  shuffled = np.asarray(logits, np.float64)[np.random.RandomState(seed).permutation(count)]
  scores = []
  for k in range(splits):
    part = shuffled[k * count // splits : (k + 1) * count // splits]
    log_p = scipy.special.log_softmax(part, axis=1)
    log_q = np.log(np.exp(log_p).mean(axis=0))
    kls = [float(np.dot(np.exp(row), row - log_q)) for row in log_p]
    scores.append(np.exp(np.mean(kls)))
  return float(np.mean(scores)), float(np.std(scores))


@pytest.mark.parametrize("count", [1000, 1003])  # 1003: splits of unequal size, cut at k * N // 10
@pytest.mark.parametrize("class_sorted", [False, True])
def test_inception_score_follows_torch_fidelity(count, class_sorted):
  rng = np.random.default_rng(7)
  logits = rng.normal(scale=4.0, size=(count, 37))
  if class_sorted:  # as --mode=fid generates them: class by class
    logits = logits[np.argsort(logits.argmax(axis=1), kind="stable")]
  mean, std = image_metrics.inception_score(logits)
  expected_mean, expected_std = _torch_fidelity_isc(logits)
  assert mean == pytest.approx(expected_mean, rel=1e-10) and std == pytest.approx(expected_std, rel=1e-8)


def test_class_sorted_samples_are_shuffled_before_splitting():
  # 5 confident samples of each of 1000 classes, class by class: unshuffled, each split sees only 100 classes.
  labels = np.repeat(np.arange(1000), 5)
  logits = np.full((labels.size, 1008), -50.0)
  logits[np.arange(labels.size), labels] = 50.0
  unshuffled, _ = image_metrics.inception_score(logits, shuffle=False)
  shuffled, _ = image_metrics.inception_score(logits)
  assert unshuffled == pytest.approx(100.0, rel=1e-6)
  assert shuffled == pytest.approx(_torch_fidelity_isc(logits)[0], rel=1e-10) and shuffled > 350.0


def test_precision_recall_of_identical_sets_is_one():
  features = np.random.default_rng(2).normal(size=(200, 8))
  assert image_metrics.precision_recall(features, features.copy(), block=64) == (1.0, 1.0)


def test_precision_recall_of_disjoint_sets_is_zero_and_partial_overlap_in_between():
  rng = np.random.default_rng(3)
  real = rng.normal(size=(300, 4))
  assert image_metrics.precision_recall(real, rng.normal(50.0, 1.0, size=(300, 4))) == (0.0, 0.0)
  # Fakes covering only half of the real distribution: high precision, lower recall.
  half = real[real[:, 0] > 0]
  precision, recall = image_metrics.precision_recall(real, half + 1e-3)
  assert precision > 0.95 and 0.3 < recall < 0.8


def test_reference_statistics_round_trip_and_errors(tmp_path):
  mu, sigma = np.arange(4.0), np.eye(4)
  image_metrics.save_reference_stats(tmp_path / "ref.npz", mu, sigma)
  loaded = image_metrics.load_reference_stats(tmp_path / "ref.npz", dim=4)
  np.testing.assert_array_equal(loaded[0], mu)
  with pytest.raises(ValueError, match="do not fit 2048-d features"):
    image_metrics.load_reference_stats(tmp_path / "ref.npz")
  with pytest.raises(FileNotFoundError, match="--mode=ref_stats"):
    image_metrics.load_reference_stats(tmp_path / "missing.npz")
  np.savez(tmp_path / "bad.npz", mean=mu)
  with pytest.raises(ValueError, match="'mu' and 'sigma'"):
    image_metrics.load_reference_stats(tmp_path / "bad.npz", dim=4)


@pytest.mark.parametrize("count", [20, 100])
def test_fid_to_features_equals_the_full_computation(count):
  rng = np.random.default_rng(4)
  reference = rng.normal(size=(200, 64)) @ rng.normal(size=(64, 64))
  features = rng.normal(0.3, 1.1, size=(count, 64))
  mu, sigma = image_metrics.feature_statistics(reference)
  full = image_metrics.frechet_distance(*image_metrics.feature_statistics(features), mu, sigma)
  assert image_metrics.frechet_distance_to_features(features, mu, sigma) == pytest.approx(full, rel=1e-7)
  assert full == pytest.approx(_fid_by_scipy(features, reference), rel=1e-6)
