"""The optimiser recipe against the official rules."""

from __future__ import annotations

import math

import jax
import numpy as np
import pytest
import tiny_models

from fractal_jax.io import torch_layout
from fractal_jax.model import fractal
from fractal_jax.train import optimizer


@pytest.mark.parametrize("family", ["mar_guiding_4", "ar_ar"])
def test_weight_decay_mask_matches_official_rule(family):
  """Official: no decay where `len(shape) == 1 or name.endswith('.bias')`, on the official names."""
  s = tiny_models.settings(family)
  shapes = fractal.abstract_params(s)
  mask = optimizer.weight_decay_mask(shapes)
  as_arrays = jax.tree.map(lambda flag, leaf: np.full(leaf.shape, flag), mask, shapes)
  official = torch_layout.params_to_state_dict(as_arrays, s)
  for name, flags in official.items():
    assert flags.all() or not flags.any(), name  # one decision per official tensor
    expected = not (flags.ndim == 1 or name.endswith(".bias"))
    assert bool(flags.all()) == expected, name
  assert "fake_latent" in official and official["fake_latent"].all()  # [1, D]: decayed officially


def test_schedule_matches_official_formula():
  peak, warmup, total = optimizer.peak_learning_rate(5e-5, 2048), 40, 800
  assert peak == pytest.approx(4e-4)
  schedule = optimizer.learning_rate_schedule(peak, warmup, total)
  for step in (0, 1, 20, 39, 40, 41, 400, 799, 800):
    if step < warmup:
      expected = peak * step / warmup
    else:
      expected = 0.5 * peak * (1 + math.cos(math.pi * (step - warmup) / (total - warmup)))
    assert float(schedule(step)) == pytest.approx(expected, rel=1e-5, abs=1e-6 * peak), step
