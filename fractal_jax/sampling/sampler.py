"""Pixel-by-pixel sampling: the whole recursive generation as one jitted program.

Dimension letters: B images, S image side, T0 level-0 steps.

The public API: `make_plan` (static settings, `plan`), `sample` (a checked
call) and `compile_sample` (ahead-of-time compiled, for loops over batches),
`check_known` for editing input. The program is `_sample`: the class
condition from the model (`FractalModel.label_condition`), then the
trace-time recursion over the levels (`recursion`: how AR, MAR and pixel
levels sample, guidance, and how editing keeps known pixels), then uint8
pixels. With a mesh each device runs the whole program on its share of the
batch (`_sample_sharded`).

Randomness follows items, not batch positions (`draws`): image i uses
`fold_in(key, image_ids[i])`, so images do not depend on the batch size, the
chunk size or the device count.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from fractal_jax.model import fractal, pixel_head
from fractal_jax.model.model_config import ModelSettings
from fractal_jax.parallel import mesh as mesh_lib
from fractal_jax.sampling import draws, recursion
from fractal_jax.sampling.editing import Known
from fractal_jax.sampling.plan import CFG_SCHEDULES, Hyper, SampleError, SamplePlan, make_plan

__all__ = [
  "CFG_SCHEDULES",
  "Hyper",
  "Known",
  "SampleError",
  "SamplePlan",
  "check_known",
  "compile_sample",
  "lower_sample",
  "make_plan",
  "sample",
]


def _sample(
  model_settings: ModelSettings,
  plan: SamplePlan,
  params: Any,
  labels: jax.Array,
  image_ids: jax.Array,
  key: jax.Array,
  hyper: Hyper,
  known: Known | None = None,
) -> tuple[jax.Array, jax.Array | None]:
  """The sampling program on one device: (images uint8 [B, S, S, 3], frames uint8 [T0, B, S, S, 3] or None)."""
  model = fractal.build(model_settings)
  keys = draws.item_keys(key, image_ids)
  all_labels = jnp.concatenate([labels, jnp.full_like(labels, -1)]) if plan.guided else labels  # [G*B]
  cond = model.apply({"params": params}, all_labels, method=fractal.FractalModel.label_condition)
  cond = cond.astype(jnp.dtype(model_settings.dtype))
  cfg = jnp.broadcast_to(hyper.cfg, labels.shape)
  levels = recursion.Recursion(model, params, plan, hyper)
  images, frames = levels.level(0, [cond] * fractal.NUM_CONDS_FROM_CLASS, cfg, keys, known)
  return pixel_head.to_uint8(images), frames


def _sample_sharded(
  model_settings: ModelSettings,
  plan: SamplePlan,
  mesh: Mesh | None,
  params: Any,
  labels: jax.Array,
  image_ids: jax.Array,
  key: jax.Array,
  hyper: Hyper,
  known: Known | None = None,
) -> tuple[jax.Array, jax.Array | None]:
  """`_sample` on each device's share of the batch (params replicated); no communication."""
  run = functools.partial(_sample, model_settings, plan)
  if mesh is None or mesh.size == 1:
    return run(params, labels, image_ids, key, hyper, known)
  batch = mesh_lib.batch_spec()
  frames_spec = P(None, mesh_lib.BATCH_AXES) if plan.record_frames else None
  return jax.shard_map(
    run,
    mesh=mesh,
    in_specs=(P(), batch, batch, P(), P(), None if known is None else batch),
    out_specs=(batch, frames_spec),
    check_vma=False,
  )(params, labels, image_ids, key, hyper, known)


# Static: the model settings, the plan and the mesh (each combination is one program).
_sample_jit = jax.jit(_sample_sharded, static_argnums=(0, 1, 2))


def check_known(known_images: Any, known_mask: Any, batch: int, img_size: int) -> Known:
  """Validates editing input: uint8 images [B, S, S, 3] and a bool mask [B, S, S] (True = keep).

  Returns:
    `Known` with ids int32 [B, S, S, 3] and mask bool [B, S, S].

  Raises:
    SampleError: a wrong shape or dtype.
  """
  images, mask = np.asarray(known_images), np.asarray(known_mask)
  if images.shape != (batch, img_size, img_size, 3) or images.dtype != np.uint8:
    raise SampleError(
      f"known images must be uint8 [{batch}, {img_size}, {img_size}, 3] (the model's size), "
      f"got {images.dtype} {list(images.shape)}"
    )
  if mask.shape != (batch, img_size, img_size) or mask.dtype != np.bool_:
    raise SampleError(
      f"the known mask must be bool [{batch}, {img_size}, {img_size}], got {mask.dtype} {list(mask.shape)}"
    )
  return Known(jnp.asarray(images, jnp.int32), jnp.asarray(mask))


def sample(
  model: fractal.FractalModel,
  params: Any,
  labels: jax.Array,
  key: jax.Array,
  plan: SamplePlan,
  cfg: float = 1.0,
  temperature: float = 1.0,
  filter_threshold: float = 1e-4,
  image_ids: jax.Array | None = None,
  mesh: Mesh | None = None,
  known_images: Any = None,
  known_mask: Any = None,
) -> tuple[jax.Array, jax.Array | None]:
  """Samples images class-conditionally (label -1: the "no class" condition), or edits given ones.

  Args:
    model: the `FractalModel` (its settings are static).
    params: its parameters (arguments of the compiled program, not constants).
    labels: int [B] class ids, or -1 for unconditional samples.
    key: the run's key; image i uses `fold_in(key, image_ids[i])`.
    plan: from `make_plan` (static: iterations, guidance on/off, chunks).
    cfg, temperature, filter_threshold: run-time scalars (no recompilation).
    image_ids: int [B] global image indices (default 0..B-1), so that a
      batch split over calls or devices gives the same images.
    mesh: split the batch over its `data` x `fsdp` devices (each runs the
      whole recursion on its images); B must be a multiple of their number.
    known_images, known_mask: editing (both or neither): uint8 [B, S, S, 3]
      and bool [B, S, S], True where the pixel is known. Known pixels are
      kept bit-exact and the others sampled conditioned on them (`recursion`
      module docstring: how each level does it).

  Returns:
    (images uint8 [B, S, S, 3], frames uint8 [T0, B, S, S, 3] after each
    level-0 step when `plan.record_frames`, else None).

  Raises:
    SampleError: labels out of range, cfg not matching the plan, a batch the
      mesh cannot split, incomplete or malformed editing input.
  """
  labels = jnp.asarray(labels, jnp.int32)
  num_classes = model.settings.num_classes
  host_labels = np.asarray(labels)
  if host_labels.ndim != 1 or ((host_labels >= num_classes) | (host_labels < -1)).any():
    raise SampleError(f"labels must be class ids in 0..{num_classes - 1} (or -1 for no class), got {host_labels}")
  if (cfg != 1.0) != plan.guided:
    raise SampleError(f"cfg={cfg} does not match the plan (made for guidance {'on' if plan.guided else 'off'})")
  if mesh is not None and labels.shape[0] % mesh_lib.batch_size_per_step(mesh):
    raise SampleError(
      f"batch {labels.shape[0]} is not a multiple of the {mesh_lib.batch_size_per_step(mesh)} devices sharing it"
    )
  if (known_images is None) != (known_mask is None):
    raise SampleError("editing needs both known_images and known_mask")
  known = None
  if known_images is not None:
    known = check_known(known_images, known_mask, labels.shape[0], model.settings.img_size)
  if image_ids is None:
    image_ids = jnp.arange(labels.shape[0], dtype=jnp.int32)
  hyper = Hyper(
    jnp.asarray(cfg, jnp.float32), jnp.asarray(temperature, jnp.float32), jnp.asarray(filter_threshold, jnp.float32)
  )
  return _sample_jit(model.settings, plan, mesh, params, labels, jnp.asarray(image_ids, jnp.int32), key, hyper, known)


def lower_sample(
  model_settings: ModelSettings,
  plan: SamplePlan,
  params: Any,
  batch_size: int,
  mesh: Mesh | None = None,
  edit: bool = False,
) -> jax.stages.Lowered:
  """The sampler for batches of `batch_size`, lowered: `.compile()` it (or read its costs).

  `params` may be arrays or `jax.ShapeDtypeStruct`s (with their shardings):
  every other argument is abstract, so this also lowers for devices that
  are not attached (`fractal_jax.train.aot`).
  """
  sharding = None if mesh is None else mesh_lib.replicated(mesh)
  abstract = lambda shape, dtype: jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)  # noqa: E731
  ints = abstract((batch_size,), jnp.int32)
  scalar = abstract((), jnp.float32)
  key = abstract((), jax.eval_shape(lambda: jax.random.key(0)).dtype)
  known = None
  if edit:
    side = model_settings.img_size
    known = Known(abstract((batch_size, side, side, 3), jnp.int32), abstract((batch_size, side, side), bool))
  return _sample_jit.lower(model_settings, plan, mesh, params, ints, ints, key, Hyper(scalar, scalar, scalar), known)


def compile_sample(
  model_settings: ModelSettings,
  plan: SamplePlan,
  params: Any,
  batch_size: int,
  mesh: Mesh | None = None,
  edit: bool = False,
) -> Callable[..., tuple[jax.Array, jax.Array | None]]:
  """Ahead-of-time compiled sampler for batches of `batch_size`.

  Returns `run(params, labels, image_ids, key, hyper)`, or with `edit`
  `run(params, labels, image_ids, key, hyper, known)` (`Known` from
  `check_known`); inputs are not validated (use `sample` for a checked call).
  """
  compiled = lower_sample(model_settings, plan, params, batch_size, mesh, edit).compile()
  if edit:
    return compiled
  return lambda params, labels, image_ids, key, hyper: compiled(params, labels, image_ids, key, hyper, None)
