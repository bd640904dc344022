"""Pixel-by-pixel sampling: the whole recursive generation as one jitted program.

Dimension letters: B images, N items of a level (images, patches, ...),
G = 2 with classifier-free guidance (conditional half, then unconditional
half) else 1, L patches per item, C patches per chunk, D width,
P* = 3 * patch_size**2.

Each level's sampler is a Python function that, inside its own `lax` loop
body, calls the next level's sampler; tracing happens once per level, so the
program holds one copy of each level's loop, nested. Per level:

* AR: L steps in raster order with an explicit KV cache `[depth, G*N, L,
  heads, head_dim]` (`ARLevel.decode_step`); the `num_iter` setting is
  ignored, as in the official code.
* MAR: a random order per item; T steps of the official cosine schedule
  computed on the host in float64 (`mar_schedule`); step t predicts the
  order positions `[lo_t, hi_t)`. The count differs from step to step while
  shapes must be static, so the patches of a step go to the level below in
  chunks of C (a `while_loop` over `ceil(count_t / C)` chunks): the padding
  wasted is less than one chunk per step, instead of up to 1.75x of the
  lower levels' work when every step is padded to the largest count. C is
  chosen on the host per level (`chunk_size`). With a guiding pixel the
  level first samples the patch's mean colour.
* Pixel head: R, G, B in order, one new token each (KV cache).
  **The temperature multiplies the logits**
  (official semantics: 1.1 sharpens). With guidance, where the conditional
  probability is below `filter_threshold` the unconditional logit becomes
  `max(u, c - max(c) + max(u))`, then `logits = u + cfg * (c - u)`.

Guidance: both halves share the partial image (sampled values are written
once and duplicated); level 0 follows `cfg_schedule` ("linear": AR
`1 + (cfg-1)(t+1)/L`, MAR `1 + (cfg-1)(L - m_t)/L` with m_t the clamped
count; "constant": cfg) and lower levels get the current value as a constant.

Randomness: item keys, not batch positions. Image i uses `fold_in(key, i)`;
the child of patch p of an item uses `fold_in(item_key, p)`. Images are
therefore independent of the batch size, the chunk size and the device
count.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from fractal_jax import fractal, patches, pixel_head
from fractal_jax import mesh as mesh_lib
from fractal_jax.mar_schedule import MarSchedule, clamp_num_iter, mar_schedule
from fractal_jax.model_config import ModelSettings

# fold_in salts for per-item randomness other than children (children use their position).
_ORDER_SALT = 2**31 - 1
_GUIDE_SALT = 2**31 - 2
CFG_SCHEDULES = ("linear", "constant")
# Cost of one call of the level below, in items, for choosing MAR chunk sizes
# (measured on CPU: SMALL MAR samples ~15% faster with chunks (2, 6) than (2, 3)).
PIXEL_CALL_OVERHEAD = 4.0


class SampleError(ValueError):
  """Bad sampling input; the message says what to change."""


class Hyper(NamedTuple):
  """Run-time scalars: changing them does not recompile."""

  cfg: jax.Array
  temperature: jax.Array
  filter_threshold: jax.Array


@dataclasses.dataclass(frozen=True)
class SamplePlan:
  """Static sampling settings: one compiled program per plan (and batch size)."""

  schedules: tuple[MarSchedule | None, ...]  # per generator level; None for AR
  chunks: tuple[int, ...]  # MAR chunk size per level (0 for AR)
  cfg_schedule: str
  guided: bool
  record_frames: bool = False


def chunk_size(counts: Sequence[int], overhead: float = 0.5) -> int:
  """Chunk size C minimising padded work + `overhead` items per chunk.

  E.g. counts (2, 3, 5, 6) (L=16, T=4) -> C=3: 6 chunks, 18 items for 16
  needed, where padding each step to 6 computes 24; counts all 1 -> C=1.
  With `overhead=4` (the level above the pixel head) the same counts give
  C=6: 4 calls of the pixel head's 3 passes instead of 6.
  """
  best, best_cost = 1, math.inf
  for size in range(1, max(counts) + 1):
    chunks = sum(-(-c // size) for c in counts)
    cost = chunks * size + overhead * chunks
    if cost < best_cost:
      best, best_cost = size, cost
  return best


def make_plan(
  model_settings: ModelSettings,
  num_iter: Sequence[int],
  cfg: float,
  cfg_schedule: str = "linear",
  temperature: float = 1.0,
  record_frames: bool = False,
) -> SamplePlan:
  """Checks the sampling settings and computes the static plan (host side, float64).

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
      chunks.append(0)
    else:
      schedule = mar_schedule(spec.seq_len, clamp_num_iter(spec.seq_len, int(steps), spec.index))
      schedules.append(schedule)
      # Below the last generator level is the pixel head: cheap per item, costly per call
      # (3 sequential passes), so that level takes fewer, padded chunks.
      above_pixel_head = spec.index == len(levels) - 1
      chunks.append(chunk_size(schedule.counts, overhead=PIXEL_CALL_OVERHEAD if above_pixel_head else 0.5))
  return SamplePlan(tuple(schedules), tuple(chunks), cfg_schedule, cfg != 1.0, record_frames)


def to_uint8(images: jax.Array) -> jax.Array:
  """ImageNet-normalised [..., 3] -> uint8 (the pixel values the model sampled)."""
  mean = jnp.asarray(pixel_head.PIXEL_MEAN, jnp.float32)
  std = jnp.asarray(pixel_head.PIXEL_STD, jnp.float32)
  return jnp.clip(jnp.round((images * std + mean) * 255.0), 0, 255).astype(jnp.uint8)


def guided_logits(cond: jax.Array, uncond: jax.Array, cfg: jax.Array, filter_threshold: jax.Array) -> jax.Array:
  """The official guidance rule on [N, V] logits (after temperature)."""
  low = jax.nn.softmax(cond, axis=-1) < filter_threshold
  lifted = jnp.maximum(uncond, cond - cond.max(-1, keepdims=True) + uncond.max(-1, keepdims=True))
  uncond = jnp.where(low, lifted, uncond)
  return uncond + cfg * (cond - uncond)


def _fold(keys: jax.Array, data: jax.Array | int) -> jax.Array:
  """fold_in per item: keys [N], data scalar or [N] -> [N]."""
  data = jnp.broadcast_to(jnp.asarray(data, jnp.uint32), keys.shape)
  return jax.vmap(jax.random.fold_in)(keys, data)


def _patch_vectors(items: jax.Array) -> jax.Array:
  """[N, P, P, 3] -> [N, 3*P*P] ordered (channel, row, col), as `patches.patchify`."""
  return items.transpose(0, 3, 1, 2).reshape(items.shape[0], -1)


class _Recursion:
  """Trace-time recursion over the levels of one bound model."""

  def __init__(self, model: fractal.FractalModel, params: Any, plan: SamplePlan, hyper: Hyper):
    self.model, self.params, self.plan, self.hyper = model, params, plan, hyper
    self.levels = model.settings.levels
    self.frames: jax.Array | None = None  # [T0, N, S, S, 3] uint8, set by level 0 when recording

  def call(self, fn: Callable, *args: Any) -> Any:
    return self.model.apply({"params": self.params}, *args, method=fn)

  def dup(self, x: jax.Array) -> jax.Array:
    return jnp.concatenate([x, x], axis=0) if self.plan.guided else x

  def level(self, index: int, conds: list[jax.Array], cfg: jax.Array, keys: jax.Array) -> jax.Array:
    """Samples N items of level `index`: [N, S, S, 3] normalised (conds are [G*N, Dc])."""
    if index == len(self.levels):
      ids = self.pixel_ids(lambda m: m.pixel_head, conds[0], cfg, keys)
      return pixel_head.ids_to_pixels(ids)[:, None, None, :]
    if self.levels[index].kind == "ar":
      return self.ar(index, conds, cfg, keys)
    return self.mar(index, conds, cfg, keys)

  def pixel_ids(self, head: Callable, cond: jax.Array, cfg: jax.Array, keys: jax.Array) -> jax.Array:
    """R, G, B ids [N, 3] int32 of the pixel head `head(model)` (cond [G*N, Dc]), KV-cached."""
    num = keys.shape[0]
    ids = jnp.zeros((num, 3), jnp.int32)
    cache = self.call(lambda m: head(m).init_cache(cond.shape[0]))
    for channel in range(3):
      logits, cache = self.call(lambda m, *a, c=channel: head(m).decode(*a[:2], c, a[2]), cond, self.dup(ids), cache)
      logits = logits * self.hyper.temperature
      if self.plan.guided:
        logits = guided_logits(logits[:num], logits[num:], cfg, self.hyper.filter_threshold)
      sampled = jax.vmap(jax.random.categorical)(_fold(keys, channel), logits)
      ids = ids.at[:, channel].set(sampled.astype(jnp.int32))
    return ids

  def _frames(self, index: int, num: int) -> jax.Array | None:
    if index or not self.plan.record_frames:
      return None
    spec = self.levels[0]
    steps = spec.seq_len if spec.kind == "ar" else self.plan.schedules[0].num_iter
    return jnp.zeros((steps, num, spec.img_size, spec.img_size, 3), jnp.uint8)

  def _record(self, frames: jax.Array | None, step: jax.Array, level_patches: jax.Array, patch_size: int) -> Any:
    if frames is None:
      return None
    return frames.at[step].set(to_uint8(patches.unpatchify(level_patches, patch_size)))

  def ar(self, index: int, conds: list[jax.Array], cfg: jax.Array, keys: jax.Array) -> jax.Array:
    spec = self.levels[index]
    num = keys.shape[0]
    cache = self.call(lambda m: m.levels[index].init_cache(conds[0].shape[0]))
    state = (jnp.zeros((num, spec.seq_len, spec.patch_dim), jnp.float32), cache, self._frames(index, num))

    def step(t: jax.Array, state: Any) -> Any:
      level_patches, cache, frames = state
      previous = jax.lax.dynamic_index_in_dim(level_patches, jnp.maximum(t - 1, 0), axis=1, keepdims=False)
      middle, cache = self.call(lambda m, *a: m.levels[index].decode_step(*a), conds[0], self.dup(previous), t, cache)
      cfg_t = cfg
      if index == 0 and self.plan.cfg_schedule == "linear":
        cfg_t = 1.0 + (cfg - 1.0) * (t + 1) / spec.seq_len
      child = self.level(index + 1, [middle], cfg_t, _fold(keys, t))
      level_patches = jax.lax.dynamic_update_index_in_dim(level_patches, _patch_vectors(child), t, axis=1)
      return level_patches, cache, self._record(frames, t, level_patches, spec.patch_size)

    level_patches, _, frames = jax.lax.fori_loop(0, spec.seq_len, step, state)
    if index == 0:
      self.frames = frames
    return patches.unpatchify(level_patches, spec.patch_size)

  def mar(self, index: int, conds: list[jax.Array], cfg: jax.Array, keys: jax.Array) -> jax.Array:
    spec, schedule, chunk = self.levels[index], self.plan.schedules[index], self.plan.chunks[index]
    num, length, groups = keys.shape[0], spec.seq_len, 2 if self.plan.guided else 1
    orders = jax.vmap(lambda k: jax.random.permutation(jax.random.fold_in(k, _ORDER_SALT), length))(keys)
    orders = orders.astype(jnp.int32)  # [N, L] position at each order index
    ranks = jnp.argsort(orders, axis=-1)  # [N, L] order index of each position
    guide = None
    if spec.guiding_pixel:
      ids = self.pixel_ids(lambda m: m.levels[index].guiding_pixel_loss, conds[0], cfg, _fold(keys, _GUIDE_SALT))
      guide = self.dup(pixel_head.ids_to_pixels(ids))
    lo, hi = jnp.asarray(schedule.lo, jnp.int32), jnp.asarray(schedule.hi, jnp.int32)
    if index == 0 and self.plan.cfg_schedule == "linear":
      progress = jnp.asarray([(length - m) / length for m in schedule.mask_len], jnp.float32)
    else:
      progress = None
    rows = jnp.arange(num)[:, None]

    def step(t: jax.Array, state: Any) -> Any:
      level_patches, frames = state
      hidden = ranks < hi[t]  # [N, L]: order positions [0, hi_t) are still hidden
      middle = self.call(
        lambda m, *a: m.levels[index](*a),
        self.dup(level_patches),
        conds[: spec.num_conds],
        self.dup(hidden),
        guide,
      )
      outputs = patches.neighbour_conditions(middle, spec.next_num_conds)  # [G*N, L, D] each
      cfg_t = cfg if progress is None else 1.0 + (cfg - 1.0) * progress[t]

      def one_chunk(c: jax.Array, level_patches: jax.Array) -> jax.Array:
        order_index = hi[t] - c * chunk - 1 - jnp.arange(chunk)  # [C], descending
        valid = order_index >= lo[t]
        order_index = jnp.broadcast_to(jnp.maximum(order_index, 0), (num, chunk))
        positions = jnp.take_along_axis(orders, order_index, axis=1)  # [N, C]
        gathered = [
          jnp.take_along_axis(o.reshape(groups, num, length, -1), positions[None, :, :, None], axis=2).reshape(
            groups * num * chunk, -1
          )
          for o in outputs
        ]
        child_keys = _fold(jnp.repeat(keys, chunk), positions.reshape(-1))
        child = self.level(index + 1, gathered, cfg_t, child_keys)  # [N*C, P, P, 3]
        write = jnp.where(valid[None, :], positions, length)  # padding goes out of range: dropped
        return level_patches.at[rows, write].set(_patch_vectors(child).reshape(num, chunk, -1), mode="drop")

      num_chunks = (hi[t] - lo[t] + chunk - 1) // chunk
      level_patches = jax.lax.fori_loop(0, num_chunks, one_chunk, level_patches)
      return level_patches, self._record(frames, t, level_patches, spec.patch_size)

    state = (jnp.zeros((num, length, spec.patch_dim), jnp.float32), self._frames(index, num))
    level_patches, frames = jax.lax.fori_loop(0, schedule.num_iter, step, state)
    if index == 0:
      self.frames = frames
    return patches.unpatchify(level_patches, spec.patch_size)


TRACE_COUNT = [0]  # incremented at every trace of `_sample` (tests check "one trace for repeated calls")


def _sample(
  model_settings: ModelSettings,
  plan: SamplePlan,
  params: Any,
  labels: jax.Array,
  image_ids: jax.Array,
  key: jax.Array,
  hyper: Hyper,
) -> tuple[jax.Array, jax.Array | None]:
  TRACE_COUNT[0] += 1
  s = model_settings
  model = fractal.build(s)
  keys = jax.vmap(jax.random.fold_in, in_axes=(None, 0))(key, image_ids.astype(jnp.uint32))
  fake = jnp.broadcast_to(params["fake_latent"].astype(jnp.float32), (labels.shape[0], s.class_width))
  cond = jnp.where((labels < 0)[:, None], fake, params["class_emb"]["embedding"][jnp.maximum(labels, 0)])
  if plan.guided:
    cond = jnp.concatenate([cond, fake], axis=0)
  cond = cond.astype(jnp.dtype(s.dtype))
  recursion = _Recursion(model, params, plan, hyper)
  images = recursion.level(0, [cond] * fractal.NUM_CONDS_FROM_CLASS, hyper.cfg, keys)
  return to_uint8(images), recursion.frames


def _sample_sharded(
  model_settings: ModelSettings,
  plan: SamplePlan,
  mesh: Mesh | None,
  params: Any,
  labels: jax.Array,
  image_ids: jax.Array,
  key: jax.Array,
  hyper: Hyper,
) -> tuple[jax.Array, jax.Array | None]:
  """`_sample` on each device's share of the batch (params replicated); no communication."""
  run = functools.partial(_sample, model_settings, plan)
  if mesh is None or mesh.size == 1:
    return run(params, labels, image_ids, key, hyper)
  batch = mesh_lib.batch_spec()
  frames_spec = P(None, mesh_lib.BATCH_AXES) if plan.record_frames else None
  return jax.shard_map(
    run,
    mesh=mesh,
    in_specs=(P(), batch, batch, P(), P()),
    out_specs=(batch, frames_spec),
    check_vma=False,
  )(params, labels, image_ids, key, hyper)


_sample_jit = jax.jit(_sample_sharded, static_argnums=(0, 1, 2))


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
) -> tuple[jax.Array, jax.Array | None]:
  """Samples images class-conditionally (label -1: the "no class" condition).

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

  Returns:
    (images uint8 [B, S, S, 3], frames uint8 [T0, B, S, S, 3] after each
    level-0 step when `plan.record_frames`, else None).
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
  if image_ids is None:
    image_ids = jnp.arange(labels.shape[0], dtype=jnp.int32)
  hyper = Hyper(
    jnp.asarray(cfg, jnp.float32), jnp.asarray(temperature, jnp.float32), jnp.asarray(filter_threshold, jnp.float32)
  )
  return _sample_jit(model.settings, plan, mesh, params, labels, jnp.asarray(image_ids, jnp.int32), key, hyper)


def compile_sample(
  model_settings: ModelSettings, plan: SamplePlan, params: Any, batch_size: int, mesh: Mesh | None = None
) -> Callable[..., tuple[jax.Array, jax.Array | None]]:
  """Ahead-of-time compiled sampler for batches of `batch_size`.

  Returns `run(params, labels, image_ids, key, hyper)`; inputs are not
  validated (use `sample` for a checked call).
  """
  ints = jax.ShapeDtypeStruct((batch_size,), jnp.int32)
  hyper = Hyper(jnp.float32(1.0), jnp.float32(1.0), jnp.float32(1e-4))
  return _sample_jit.lower(model_settings, plan, mesh, params, ints, ints, jax.random.key(0), hyper).compile()
