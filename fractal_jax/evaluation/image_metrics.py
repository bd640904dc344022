"""Image-quality metrics on features: FID, Inception Score, precision / recall, reference statistics.

Pure NumPy/SciPy on host arrays (features come from `fractal_jax.evaluation.inception`
or any other extractor):
  * `frechet_distance` / `feature_statistics`: FID's formula, as pytorch-fid
    and the ADM evaluator (float64, unbiased covariance; traces from symmetric eigendecompositions);
  * `inception_score`: exp(E_x KL(p(y|x) || p(y))) over 10 splits of the
    shuffled samples (mean and standard deviation), as torch-fidelity, which
    the official evaluation uses;
  * `precision_recall`: the k-NN manifold estimate of Kynkaanniemi et al.
    as the ADM evaluator computes it (k = 3; a sample is "in" a manifold
    when it lies within the k-th-neighbour radius of some point of it);
  * `load_reference_stats` / `save_reference_stats`: `.npz` files with `mu`
    and `sigma` (the official `fid_stats/adm_in64_stats.npz` layout).
"""

from __future__ import annotations

import os

import numpy as np

from fractal_jax.io import paths


def feature_statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """float [N, D] features (N >= 2) -> (mean float64 [D], covariance float64 [D, D], unbiased as in FID tools)."""
  features = np.asarray(features, dtype=np.float64)
  if features.ndim != 2 or features.shape[0] < 2:
    raise ValueError(f"features must have shape [N, D] with N >= 2, got {features.shape}")
  return features.mean(axis=0), np.cov(features, rowvar=False)


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
  """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2), as in FID.

  d^2 = |mu1 - mu2|^2 + Tr(sigma1) + Tr(sigma2) - 2 Tr((sigma1 sigma2)^(1/2)). The last trace is computed from
  symmetric eigendecompositions: (sigma1 sigma2)^(1/2) is similar to (A sigma2 A)^(1/2) with A = sigma1^(1/2), so
  its trace is the sum of the square roots of the eigenvalues of the symmetric PSD matrix A sigma2 A. That equals
  what pytorch-fid gets from `scipy.linalg.sqrtm(sigma1 @ sigma2)` (tested), is exact for singular covariances
  (no eps offset needed; round-off negatives are clipped to 0), and takes seconds instead of minutes at D = 2048.

  Args:
    mu1, mu2: float [D] means.
    sigma1, sigma2: float [D, D] covariances (symmetric positive semi-definite).

  Returns:
    The squared Fréchet distance (the quantity FID reports), a Python float; ~0 (possibly -1e-10) for equal inputs.
  """
  mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
  sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
  dim = mu1.shape[0]
  if mu1.shape != (dim,) or mu2.shape != (dim,):
    raise ValueError(f"means must both have shape [D], got {mu1.shape} and {mu2.shape}")
  if sigma1.shape != (dim, dim) or sigma2.shape != (dim, dim):
    raise ValueError(f"covariances must both have shape [{dim}, {dim}], got {sigma1.shape} and {sigma2.shape}")
  diff = mu1 - mu2
  values, vectors = np.linalg.eigh((sigma1 + sigma1.T) / 2)
  root1 = (vectors * np.sqrt(np.clip(values, 0.0, None))) @ vectors.T
  inner = root1 @ sigma2 @ root1
  trace_covmean = np.sqrt(np.clip(np.linalg.eigvalsh((inner + inner.T) / 2), 0.0, None)).sum()
  return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * trace_covmean)


def frechet_distance_to_features(features: np.ndarray, mu: np.ndarray, sigma: np.ndarray) -> float:
  """`frechet_distance` between float [N, D] features and N(mu, sigma), exact and fast when N <= D.

  With centred features X, sigma_f = X^T X / (N - 1) has rank < N, and the nonzero eigenvalues of sigma sigma_f
  are those of the N x N matrix X sigma X^T / (N - 1): small sample sets (quick checks, tests) cost an N x N
  eigendecomposition instead of two D x D ones.
  """
  features = np.asarray(features, np.float64)
  if features.ndim != 2 or features.shape[0] < 2:
    raise ValueError(f"features must have shape [N, D] with N >= 2, got {features.shape}")
  count, dim = features.shape
  if count > dim:
    return frechet_distance(*feature_statistics(features), mu, sigma)
  mu, sigma = np.asarray(mu, np.float64), np.asarray(sigma, np.float64)
  if mu.shape != (dim,) or sigma.shape != (dim, dim):
    raise ValueError(f"statistics {mu.shape} / {sigma.shape} do not fit {dim}-d features")
  mean = features.mean(axis=0)
  centred = features - mean
  inner = centred @ sigma @ centred.T / (count - 1)
  trace_covmean = np.sqrt(np.clip(np.linalg.eigvalsh((inner + inner.T) / 2), 0.0, None)).sum()
  diff = mean - mu
  trace_features = float((centred * centred).sum()) / (count - 1)
  return float(diff @ diff + trace_features + np.trace(sigma) - 2.0 * trace_covmean)


def inception_score(
  logits: np.ndarray, splits: int = 10, shuffle: bool = True, seed: int = 2020
) -> tuple[float, float]:
  """Inception Score (mean, std over `splits`) of float [N, C] logits, as torch-fidelity computes it.

  The official evaluation uses torch-fidelity (`isc_features_to_metric`):
  the rows are first permuted with `np.random.RandomState(seed)` (so that
  every split sees every class even when samples come class by class), then
  in float64 `p = softmax`, `log p = log_softmax`, and split k (rows
  `[k*N//splits, (k+1)*N//splits)`) scores `exp(mean_x sum_y p (log p - log mean_x p))`.
  The std is NumPy's population std of the split scores. Probabilities that
  underflow to 0 contribute 0 (torch-fidelity would give NaN there).

  Args:
    logits: float [N, C], N >= splits: the Inception logits (torch-fidelity's
      `logits_unbiased`: without the fc bias).
    splits: number of splits.
    shuffle, seed: torch-fidelity's `samples_shuffle` and `rng_seed`.
  """
  logits = np.asarray(logits, np.float64)
  if logits.ndim != 2 or logits.shape[0] < splits:
    raise ValueError(f"logits must be [N, C] with N >= splits={splits}, got {logits.shape}")
  count = logits.shape[0]
  if shuffle:
    logits = logits[np.random.RandomState(seed).permutation(count)]
  log_probs = logits - logits.max(axis=1, keepdims=True)
  log_probs = log_probs - np.log(np.exp(log_probs).sum(axis=1, keepdims=True))
  probs = np.exp(log_probs)
  scores = []
  for k in range(splits):
    rows = slice(k * count // splits, (k + 1) * count // splits)
    marginal = probs[rows].mean(axis=0, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):  # p = 0 (underflow) contributes 0, not 0 * inf
      terms = np.where(probs[rows] > 0, probs[rows] * (log_probs[rows] - np.log(marginal)), 0.0)
    kl = terms.sum(axis=1)
    scores.append(float(np.exp(kl.mean())))
  return float(np.mean(scores)), float(np.std(scores))


def _squared_distances(a: np.ndarray, b: np.ndarray) -> np.ndarray:
  """[N, M] squared Euclidean distances (float64)."""
  return np.maximum((a * a).sum(1)[:, None] - 2.0 * a @ b.T + (b * b).sum(1)[None, :], 0.0)


def _radii(features: np.ndarray, k: int, block: int) -> np.ndarray:
  """Squared distance of every point to its k-th nearest other point of the same set."""
  radii = np.empty(features.shape[0])
  for start in range(0, features.shape[0], block):
    d = _squared_distances(features[start : start + block], features)
    radii[start : start + block] = np.partition(d, k, axis=1)[:, k]  # index 0 is the point itself
  return radii


def _coverage(points: np.ndarray, manifold: np.ndarray, radii: np.ndarray, block: int) -> float:
  """Fraction of `points` within the radius of at least one manifold point."""
  inside = 0
  for start in range(0, points.shape[0], block):
    d = _squared_distances(points[start : start + block], manifold)
    inside += int((d <= radii[None, :]).any(axis=1).sum())
  return inside / points.shape[0]


def precision_recall(real: np.ndarray, fake: np.ndarray, k: int = 3, block: int = 1024) -> tuple[float, float]:
  """(precision, recall) of `fake` float [M, D] features against `real` float [N, D] (k-NN manifolds)."""
  real, fake = np.asarray(real, np.float64), np.asarray(fake, np.float64)
  if real.ndim != 2 or fake.ndim != 2 or real.shape[1] != fake.shape[1]:
    raise ValueError(f"features must be [N, D] and [M, D] with the same D, got {real.shape} and {fake.shape}")
  if min(real.shape[0], fake.shape[0]) <= k:
    raise ValueError(f"precision/recall with k={k} needs more than {k} features in each set")
  precision = _coverage(fake, real, _radii(real, k, block), block)
  recall = _coverage(real, fake, _radii(fake, k, block), block)
  return precision, recall


def save_reference_stats(path: str | os.PathLike, mu: np.ndarray, sigma: np.ndarray) -> None:
  """Writes `mu` and `sigma` as float64 to an `.npz` (local or gs://)."""
  paths.save_npz(path, mu=np.asarray(mu, np.float64), sigma=np.asarray(sigma, np.float64))


def load_reference_stats(path: str | os.PathLike, dim: int = 2048) -> tuple[np.ndarray, np.ndarray]:
  """`mu` [dim] and `sigma` [dim, dim] of a reference-statistics `.npz` (local or gs://), checked."""
  if not paths.path(path).is_file():
    raise FileNotFoundError(
      f"reference statistics {path} not found: use the official fid_stats/adm_in64_stats.npz (ImageNet 64x64) or "
      "make them with --mode=ref_stats"
    )
  with paths.load_npz(path) as data:
    if "mu" not in data or "sigma" not in data:
      raise ValueError(f"{path} must hold arrays 'mu' and 'sigma' (it has {sorted(data.keys())})")
    mu, sigma = np.asarray(data["mu"], np.float64), np.asarray(data["sigma"], np.float64)
  if mu.shape != (dim,) or sigma.shape != (dim, dim):
    raise ValueError(
      f"{path}: mu {mu.shape} and sigma {sigma.shape} do not fit {dim}-d features (expected ({dim},) and "
      f"({dim}, {dim})): statistics of another feature extractor?"
    )
  return mu, sigma
