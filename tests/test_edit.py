"""Editing (known pixels kept, the rest sampled conditioned on them) in the compiled sampler."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tiny_models

from fractal_jax.model import fractal
from fractal_jax.sampling import editing, mar_schedule, sampler

# family -> num_iter; AR, MAR with a guiding pixel over 4 levels, and both mixes.
EDIT_FAMILIES = {"ar_ar": (6, 4), "mar_guiding_4": (3, 2, 2), "ar_over_mar": (2, 4), "mar_over_ar": (4, 3)}
BATCH = 3
CFG = 2.0


@pytest.fixture(scope="module")
def edit_models():
  out = {}
  for family, num_iter in EDIT_FAMILIES.items():
    s = tiny_models.settings(family)
    out[family] = (s, fractal.build(s), tiny_models.init_params(s), sampler.make_plan(s, num_iter, cfg=CFG))
  return out


def _edit(models, family, images, mask, seed=0, labels=(1, 3, 5)):
  s, model, params, plan = models[family]
  return sampler.sample(
    model, params, jnp.asarray(labels), jax.random.key(seed), plan, cfg=CFG, known_images=images, known_mask=mask
  )


def _random_known(s, seed=0):
  """Random pixels, and a mask with a fully known top-left block plus scattered known pixels (partly known patches)."""
  rng = np.random.default_rng(seed)
  images = rng.integers(0, 256, (BATCH, s.img_size, s.img_size, 3), dtype=np.uint8)
  mask = rng.random((BATCH, s.img_size, s.img_size)) < 0.4
  half = s.img_size // 2
  mask[:, :half, :half] = True
  return images, mask


@pytest.mark.parametrize("family", sorted(EDIT_FAMILIES))
def test_known_pixels_are_kept_bit_exact(edit_models, family):
  s = edit_models[family][0]
  images, mask = _random_known(s)
  out, _ = _edit(edit_models, family, images, mask)
  out = np.asarray(out)
  np.testing.assert_array_equal(out[mask], images[mask])
  # The unknown pixels are sampled: another seed changes most of them.
  other = np.asarray(_edit(edit_models, family, images, mask, seed=1)[0])
  assert (other[~mask] != out[~mask]).mean() > 0.5
  np.testing.assert_array_equal(other[mask], images[mask])


@pytest.mark.parametrize("family", ["ar_ar", "mar_guiding_4"])
def test_all_known_returns_the_input(edit_models, family):
  s = edit_models[family][0]
  images, _ = _random_known(s, seed=2)
  out, _ = _edit(edit_models, family, images, np.ones(images.shape[:3], bool))
  np.testing.assert_array_equal(out, images)


@pytest.mark.parametrize("family", ["mar_guiding_4", "ar_over_mar"])
def test_all_unknown_equals_plain_sampling(edit_models, family):
  s, model, params, plan = edit_models[family]
  labels = jnp.asarray([1, 3, 5])
  plain, _ = sampler.sample(model, params, labels, jax.random.key(7), plan, cfg=CFG)
  images, _ = _random_known(s, seed=3)
  edited, _ = _edit(edit_models, family, images, np.zeros(images.shape[:3], bool), seed=7)
  np.testing.assert_array_equal(edited, plain)


def test_ar_edit_of_a_generation_prefix_reproduces_the_sample(edit_models):
  """AR samples in raster order at every level: knowing what it generated first changes nothing."""
  s, model, params, plan = edit_models["ar_ar"]
  labels = jnp.asarray([1, 3, 5])
  plain = np.asarray(sampler.sample(model, params, labels, jax.random.key(5), plan, cfg=CFG)[0])
  # Level 0: 3x3 patches of 2x2 pixels. Known: patches 0..3 whole, and the first row of patch 4
  # (a partly known patch: its level's AR forces pixel 0 and 1, then samples 2 and 3).
  mask = np.zeros(plain.shape[:3], bool)
  mask[:, 0:2, 0:6] = True  # patches 0, 1, 2
  mask[:, 2:4, 0:2] = True  # patch 3
  mask[:, 2, 2:4] = True  # top row of patch 4
  edited = _edit(edit_models, "ar_ar", plain, mask, seed=5)[0]
  np.testing.assert_array_equal(edited, plain)


def test_edit_schedules_run_over_the_unknown_patches():
  lo, hi, progress, steps = editing.edit_schedules(16, 6)
  plain = mar_schedule.mar_schedule(16, 6)
  assert steps[16] == 6 and tuple(lo[16]) == plain.lo and tuple(hi[16]) == plain.hi
  assert steps[0] == 0 and steps[1] == 1 and steps[8] == 3  # T_U = min(U, ceil(T * U / L))
  part = mar_schedule.mar_schedule(8, 3)
  assert tuple(lo[8, :3]) == part.lo and tuple(hi[8, :3]) == part.hi and (hi[8, 3:] == 0).all()
  np.testing.assert_allclose(progress[8, :3], [(8 - m) / 8 for m in part.mask_len])
  # Every U: the steps predict each unknown order position exactly once.
  for unknown in range(1, 17):
    counts = hi[unknown, : steps[unknown]] - lo[unknown, : steps[unknown]]
    assert counts.sum() == unknown and (counts >= 1).all()


def test_frames_of_an_edit_end_on_the_result(edit_models):
  s, model, params, _ = edit_models["mar_guiding_4"]
  plan = sampler.make_plan(s, EDIT_FAMILIES["mar_guiding_4"], cfg=1.0, record_frames=True)
  images, mask = _random_known(s, seed=4)
  mask[:, s.img_size // 2 :] = True  # fewer unknown patches: fewer steps than num_iter
  out, frames = sampler.sample(
    model, params, jnp.asarray([0, 1, 2]), jax.random.key(0), plan, known_images=images, known_mask=mask
  )
  assert frames.shape[0] == plan.schedules[0].num_iter
  np.testing.assert_array_equal(frames[-1], out)


def test_bad_edit_inputs(edit_models):
  s, model, params, plan = edit_models["ar_ar"]
  images, mask = _random_known(s)
  with pytest.raises(sampler.SampleError, match="needs both"):
    sampler.sample(model, params, jnp.asarray([1, 2, 3]), jax.random.key(0), plan, cfg=CFG, known_images=images)
  with pytest.raises(sampler.SampleError, match=r"known images must be uint8 \[3, 6, 6, 3\]"):
    _edit(edit_models, "ar_ar", images[:, :4, :4], mask)
  with pytest.raises(sampler.SampleError, match="known mask must be bool"):
    _edit(edit_models, "ar_ar", images, mask.astype(np.uint8))
