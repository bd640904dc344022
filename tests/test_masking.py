"""MAR masks: the official training distribution and placement, and the uniform evaluation mask."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from scipy import stats

from fractal_jax.model import masking


def test_training_mask_ratio_distribution():
  seq_len, num = 64, 20000
  mask = np.asarray(masking.training_mask(jax.random.key(0), num, seq_len))
  counts = mask.sum(-1)
  # ceil(L * ratio), ratio ~ truncnorm(-4, 0, loc=1, scale=0.25): compare with scipy's law.
  ratios = stats.truncnorm(-4, 0, loc=1.0, scale=0.25).rvs(200000, random_state=0)
  expected = np.ceil(seq_len * ratios)
  assert abs(counts.mean() / seq_len - 0.80) < 0.01
  assert abs(counts.mean() - expected.mean()) < 0.3
  assert abs(counts.std() - expected.std()) < 0.3
  assert counts.min() >= 1 and counts.max() == seq_len
  # Positions are uniform: every position is hidden equally often.
  per_position = mask.mean(0)
  assert np.abs(per_position - per_position.mean()).max() < 0.02


def test_mask_hides_positions_with_order_below_count():
  orders = jnp.asarray([[2, 0, 3, 1], [0, 1, 2, 3]])
  mask = np.asarray(masking.mask_from_orders(orders, jnp.asarray([2, 3])))
  np.testing.assert_array_equal(mask, [[False, True, False, True], [True, True, True, False]])


def test_random_orders_are_permutations():
  orders = np.asarray(masking.random_orders(jax.random.key(1), 50, 16))
  np.testing.assert_array_equal(np.sort(orders, axis=-1), np.tile(np.arange(16), (50, 1)))


def test_uniform_eval_mask():
  seq_len = 16
  keys = jax.random.split(jax.random.key(0), 800)
  masks = np.asarray(jax.vmap(lambda k: masking.uniform_eval_mask(k, 5, seq_len))(keys))
  per_item = masks.sum(-1)  # [800, 5]
  assert (per_item == per_item[:, :1]).all()  # one count for the whole batch
  counts = per_item[:, 0]
  assert counts.min() >= 1 and counts.max() <= seq_len
  histogram = np.bincount(counts, minlength=seq_len + 1)[1:]
  assert stats.chisquare(histogram).pvalue > 1e-3  # uniform over 1..L
  assert set(counts) == set(range(1, seq_len + 1))


def test_first_n_mask():
  np.testing.assert_array_equal(masking.first_n_mask(2, 4, 3), [[1, 1, 1, 0], [1, 1, 1, 0]])
