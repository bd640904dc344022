"""Sampling settings from the run's config (`config.sample`) and from command-line label lists.

A bad setting is a `ConfigError` that names the field or flag to change, so
every entry point (the sample, edit and fid modes, the trainer's periodic
samples) reports it the same way before anything compiles.
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
import numpy as np

from fractal_jax.model.model_config import ConfigError, ModelSettings
from fractal_jax.sampling.plan import Hyper, SampleError, SamplePlan, make_plan


def plan_from_config(model_settings: ModelSettings, sample_cfg: Any, record_frames: bool = False) -> SamplePlan:
  """`make_plan` from `config.sample`; a bad setting is a ConfigError naming the field."""
  try:
    return make_plan(
      model_settings,
      sample_cfg.num_iter,
      cfg=float(sample_cfg.cfg),
      cfg_schedule=sample_cfg.cfg_schedule,
      temperature=float(sample_cfg.temperature),
      record_frames=record_frames,
    )
  except SampleError as error:
    raise ConfigError(f"config.sample: {error}") from error


def hyper_from_config(sample_cfg: Any) -> Hyper:
  """The run-time scalars (float32 []) of `config.sample`: cfg, temperature, filter_threshold."""
  return Hyper(
    jnp.float32(sample_cfg.cfg), jnp.float32(sample_cfg.temperature), jnp.float32(sample_cfg.filter_threshold)
  )


def parse_label_list(text: str, num_classes: int) -> np.ndarray:
  """`--labels=207,360` -> int32 [K]; each a class id or -1 (no class)."""
  try:
    labels = np.asarray([int(x) for x in text.split(",") if x.strip()], np.int32)
  except ValueError as error:
    raise ConfigError(f"--labels must be comma-separated class ids, got {text!r}") from error
  bad = labels[(labels < -1) | (labels >= num_classes)]
  if bad.size:
    raise ConfigError(
      f"--labels {bad.tolist()} out of range: this model has classes 0..{num_classes - 1} (-1: no class)"
    )
  return labels
