"""Sampling settings: the static plan (one compiled program each) and the run-time scalars.

`make_plan` checks the settings and computes, on the host in float64, each
MAR level's schedule (`mar_schedule`) and the sizes of its calls of the level
below (`chunking`). `Hyper` holds the scalars that change without
recompiling.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import NamedTuple

import jax
import numpy as np

from fractal_jax.model.model_config import ModelSettings
from fractal_jax.sampling import chunking
from fractal_jax.sampling.mar_schedule import MarSchedule, clamp_num_iter, mar_schedule

CFG_SCHEDULES = ("linear", "constant")
# Cost of one call of the level below, counted in the patches it could sample instead, for choosing a MAR level's
# call sizes (`chunking`): every call has a fixed cost on top of its per-patch work. The pixel head is cheap per
# pixel but runs 3 passes per call, so a call of it costs relatively more. Measured: docs/performance.md.
CALL_OVERHEAD = 4.0
PIXEL_CALL_OVERHEAD = 16.0


class SampleError(ValueError):
  """Bad sampling input; the message says what to change."""


class Hyper(NamedTuple):
  """Run-time scalars (float32 []): changing them does not recompile."""

  cfg: jax.Array  # classifier-free guidance scale (1: none)
  temperature: jax.Array  # multiplies the logits (official semantics: above 1 sharpens)
  filter_threshold: jax.Array  # guidance lifts unconditional logits where the conditional probability is below


@dataclasses.dataclass(frozen=True)
class SamplePlan:
  """Static sampling settings: one compiled program per plan (and batch size)."""

  schedules: tuple[MarSchedule | None, ...]  # per generator level; None for AR
  chunks: tuple[tuple[int, ...], ...]  # per level: MAR call sizes for the level below (`chunking`); () for AR
  cfg_schedule: str  # level-0 guidance: "linear" (grows with the step) or "constant"
  guided: bool  # classifier-free guidance on (a doubled batch: conditional, then unconditional half)
  record_frames: bool = False  # also return the image after each level-0 step


def make_plan(
  model_settings: ModelSettings,
  num_iter: Sequence[int],
  cfg: float,
  cfg_schedule: str = "linear",
  temperature: float = 1.0,
  record_frames: bool = False,
) -> SamplePlan:
  """Checks the sampling settings and computes the static plan (host side, float64).

  Args:
    model_settings: the model's settings (levels, sizes).
    num_iter: MAR steps per generator level (AR levels always take L steps and ignore theirs).
    cfg: the guidance scale; only whether it is 1 enters the plan.
    cfg_schedule: one of `CFG_SCHEDULES`.
    temperature: checked only (it is a run-time scalar).
    record_frames: also return the image after each level-0 step.

  Raises:
    SampleError: wrong `num_iter` length, cfg < 1, temperature <= 0, unknown schedule.
  """
  levels = model_settings.levels
  num_iter = tuple(num_iter)
  if len(num_iter) != len(levels):
    raise SampleError(
      f"num_iter has {len(num_iter)} entries but the model has {len(levels)} generator levels; give one per "
      f"level, e.g. {tuple(s.seq_len if s.kind == 'ar' else min(16, s.seq_len) for s in levels)} "
      "(AR levels always take L steps and ignore theirs)."
    )
  if any(not isinstance(t, (int, np.integer)) or t < 1 for t in num_iter):
    raise SampleError(f"num_iter entries must be integers >= 1, got {num_iter}")
  if not cfg >= 1.0:
    raise SampleError(f"cfg must be >= 1 (1 disables guidance), got {cfg}")
  if not temperature > 0:
    raise SampleError(f"temperature must be > 0 (it multiplies the logits), got {temperature}")
  if cfg_schedule not in CFG_SCHEDULES:
    raise SampleError(f"cfg_schedule must be one of {CFG_SCHEDULES}, got {cfg_schedule!r}")
  schedules, chunks = [], []
  for spec, steps in zip(levels, num_iter):
    if spec.kind == "ar":
      schedules.append(None)
      chunks.append(())
    else:
      schedule = mar_schedule(spec.seq_len, clamp_num_iter(spec.seq_len, int(steps), spec.index))
      schedules.append(schedule)
      above_pixel_head = spec.index == len(levels) - 1
      chunks.append(chunking.chunk_sizes(schedule.counts, PIXEL_CALL_OVERHEAD if above_pixel_head else CALL_OVERHEAD))
  return SamplePlan(tuple(schedules), tuple(chunks), cfg_schedule, cfg != 1.0, record_frames)
