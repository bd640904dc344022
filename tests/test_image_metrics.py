"""FID, Inception Score and precision/recall on synthetic features and logits."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg

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
  mean, _ = image_metrics.inception_score(logits, splits=10)
  assert mean == pytest.approx(k, rel=1e-6)


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
