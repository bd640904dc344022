"""A model ready to sample: parameters replicated over a device mesh and the sampler compiled for one batch size.

Dimension letters: B the compiled batch size (a multiple of the devices
sharing a batch), K <= B the images asked of one call, S image side, T0
level-0 steps.

Every entry point that samples with `config.sample` (the sample, edit and fid
modes, the trainer's periodic samples) builds one with `from_checkpoint` or
`from_params` and calls it batch after batch.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh

from fractal_jax.io import model_checkpoint
from fractal_jax.model import model_config
from fractal_jax.model.model_config import ModelSettings
from fractal_jax.parallel import mesh as mesh_lib
from fractal_jax.sampling import sampler
from fractal_jax.sampling.editing import Known
from fractal_jax.sampling.from_config import hyper_from_config, plan_from_config
from fractal_jax.sampling.plan import Hyper, SamplePlan


@dataclasses.dataclass(frozen=True)
class LoadedSampler:
  """A compiled sampler with its parameters: call it with labels, the first image id and the run's key."""

  model_settings: ModelSettings
  plan: SamplePlan
  params: Any  # the model's parameters, replicated over `mesh`
  mesh: Mesh
  batch_size: int  # B: images per compiled call
  hyper: Hyper  # config.sample's cfg, temperature and filter_threshold
  run: Callable[..., tuple[jax.Array, jax.Array | None]]  # `sampler.compile_sample`'s function
  edit: bool  # `run` takes known pixels
  compile_seconds: float  # the time `compile_sample` took

  def __call__(
    self, labels: np.ndarray, first_id: int, key: jax.Array, known: Known | None = None
  ) -> tuple[jax.Array, jax.Array | None]:
    """Samples images `first_id` .. `first_id + B - 1` of the run.

    Args:
      labels: int [K], K <= B: class ids or -1 (no class); the batch is padded
        with the last label (callers keep the first K images).
      first_id: the global index of the first image (image i uses `fold_in(key, i)`).
      key: the run's key.
      known: with `edit`, the known pixels of the B images (`sampler.check_known`).

    Returns:
      (images uint8 [B, S, S, 3], frames uint8 [T0, B, S, S, 3] or None), on the devices.
    """
    labels = np.asarray(labels, np.int32)
    padded = np.concatenate([labels, np.full(self.batch_size - len(labels), labels[-1], np.int32)])
    ids = np.arange(first_id, first_id + self.batch_size, dtype=np.int32)
    args = (self.params, padded, ids, key, self.hyper)
    return self.run(*args, known) if self.edit else self.run(*args)


def round_batch(batch_size: int, mesh: Mesh) -> int:
  """`batch_size` rounded up to a multiple of the devices sharing a batch."""
  per_step = mesh_lib.batch_size_per_step(mesh)
  return -(-batch_size // per_step) * per_step


def from_params(
  model_settings: ModelSettings,
  sample_cfg: Any,
  params: Any,
  mesh: Mesh,
  batch_size: int,
  record_frames: bool = False,
  edit: bool = False,
) -> LoadedSampler:
  """The sampler of `config.sample` for parameters in memory (e.g. the training state's).

  Args:
    model_settings: the model's settings.
    sample_cfg: `config.sample`.
    params: the model's parameters, anywhere (they are replicated over `mesh`).
    mesh: the devices that share each batch (`data` x `fsdp`).
    batch_size: images per call, rounded up to a multiple of those devices.
    record_frames: also return the image after each level-0 step.
    edit: compile the editing program (known pixels).

  Raises:
    ConfigError: a bad `config.sample` (before anything is compiled).
  """
  plan = plan_from_config(model_settings, sample_cfg, record_frames=record_frames)
  return _compile(model_settings, plan, hyper_from_config(sample_cfg), params, mesh, batch_size, edit)


def from_checkpoint(
  config: Any,
  checkpoint: str,
  batch_size: int,
  weights: str = "raw",
  record_frames: bool = False,
  edit: bool = False,
  step: int | None = None,
) -> LoadedSampler:
  """The sampler of `config.sample` for a checkpoint (a training workdir or a converted one), on `config.mesh_shape`.

  `weights` is "raw" or "ema"; `step` the checkpoint step (None: the newest); the other arguments are
  `from_params`'s.

  Raises:
    ConfigError: a bad `config.sample` (before the parameters are read).
    MeshError, CheckpointError: a mesh the devices cannot fill, an unreadable checkpoint.
  """
  model_settings = model_config.settings(config.model)
  plan = plan_from_config(model_settings, config.sample, record_frames=record_frames)
  mesh = mesh_lib.make_mesh(config.mesh_shape)
  params = model_checkpoint.load_params(checkpoint, config.model, step=step, weights=weights)
  return _compile(model_settings, plan, hyper_from_config(config.sample), params, mesh, batch_size, edit)


def _compile(
  model_settings: ModelSettings, plan: SamplePlan, hyper: Hyper, params: Any, mesh: Mesh, batch_size: int, edit: bool
) -> LoadedSampler:
  """Replicates `params` over `mesh` and compiles the sampler for `batch_size` rounded up to the mesh."""
  batch = round_batch(batch_size, mesh)
  params = jax.device_put(params, mesh_lib.replicated(mesh))
  start = time.perf_counter()
  run = sampler.compile_sample(model_settings, plan, params, batch, mesh, edit=edit)
  seconds = time.perf_counter() - start
  return LoadedSampler(model_settings, plan, params, mesh, batch, hyper, run, edit, seconds)
