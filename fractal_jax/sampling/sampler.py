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
  calls of a few sizes chosen on the host per level (`chunking`: e.g. 3 or
  6 patches per item), through a `while_loop` and `lax.switch`: padding
  every step to the largest count would waste up to 1.75x of the lower
  levels' work, and many small calls cost a fixed time each. When the level
  below reads only the middle condition (the pixel head, an AR level), the
  last block is computed at the step's positions only (`queries`), not at
  all L. With a guiding pixel the level first samples the patch's mean
  colour.
* Pixel head: R, G, B in order, one new token each (KV cache), each drawn
  by inverting its CDF at one uniform number (`categorical`).
  **The temperature multiplies the logits**
  (official semantics: 1.1 sharpens). With guidance, where the conditional
  probability is below `filter_threshold` the unconditional logit becomes
  `max(u, c - max(c) + max(u))`, then `logits = u + cfg * (c - u)`.

Guidance: both halves share the partial image (sampled values are written
once and duplicated); level 0 follows `cfg_schedule` ("linear": AR
`1 + (cfg-1)(t+1)/L`, MAR `1 + (cfg-1)(L - m_t)/L` with m_t the clamped
count; "constant": cfg) and lower levels get the current value as a constant.

Editing (`known`): some pixels are given and kept; the rest are sampled
conditioned on them. Every level receives its items' known pixels and mask.
The pixel head forces known R, G, B values (so later channels condition on
them). An AR level forces known pixels in raster order: a fully known patch
is not sampled (its children are skipped) but still enters the KV cache, so
later patches see it; AR cannot look ahead at known pixels below or to the
right of the current patch. A MAR level puts its fully known patches at the
end of each item's random order: they are visible from the first step, and
the cosine schedule runs over the U unknown patches only, with
`T_U = min(U, ceil(T * U / L))` steps (the same pace, patches per step, as
full generation; `T_L = T`) and level-0 linear guidance progressing over U.
Schedules for every U are tables computed on the host (float64 formula).
A partly known patch counts as unknown at its level (the level sees it
masked) and its child level is given its known pixels; a MAR level's guiding
pixel (mean colour) is sampled from the level's condition as in plain
sampling, even for a partly known patch. With nothing known the program
computes exactly plain sampling.

Randomness: item keys, not batch positions. Image i uses `fold_in(key, i)`;
the child of patch p of an item uses `fold_in(item_key, p)`. Images are
therefore independent of the batch size, the chunk size and the device
count.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from fractal_jax.model import fractal, patches, pixel_head
from fractal_jax.model.settings import ModelSettings
from fractal_jax.parallel import mesh as mesh_lib
from fractal_jax.sampling import chunking
from fractal_jax.sampling.mar_schedule import MarSchedule, clamp_num_iter, mar_schedule

# fold_in salts for per-item randomness other than children (children use their position).
_ORDER_SALT = 2**31 - 1
_GUIDE_SALT = 2**31 - 2
CFG_SCHEDULES = ("linear", "constant")
# Cost of one call of the level below, in its patches, for choosing a MAR level's call sizes (`chunking`).
# The pixel head is cheap per pixel but runs 3 passes per call. On CPU, SMALL MAR (L=64, T=16 over L=16,
# T=4) samples 1.15-1.2x faster with sizes ((3, 6), (6,)) than with ((2,), (6,)) or ((6,), (6,)).
CALL_OVERHEAD = 4.0
PIXEL_CALL_OVERHEAD = 16.0


class SampleError(ValueError):
  """Bad sampling input; the message says what to change."""


class Known(NamedTuple):
  """Known pixels of N items of side s: kept bit-exact by the sampler."""

  ids: jax.Array  # [N, s, s, 3] int32 pixel values 0..255 (ignored where unknown)
  mask: jax.Array  # [N, s, s] bool, True where known


def _known_patches(known: Known, patch_size: int) -> Known:
  """Splits items into their L patches in raster order: ids [N, L, P, P, 3], mask [N, L, P, P]."""
  num, side = known.mask.shape[:2]
  grid = side // patch_size

  def split(x: jax.Array) -> jax.Array:
    x = x.reshape(num, grid, patch_size, grid, patch_size, *x.shape[3:])
    x = jnp.swapaxes(x, 2, 3)  # [N, G, G, P, P, ...]
    return x.reshape(num, grid * grid, patch_size, patch_size, *x.shape[5:])

  return Known(split(known.ids), split(known.mask))


def _take_known(known: Known, positions: jax.Array) -> Known:
  """Patches at `positions` [N, C] of Known with a patch axis -> items [N*C, P, P(, 3)]."""

  def take(x: jax.Array) -> jax.Array:
    index = positions.reshape(positions.shape + (1,) * (x.ndim - 2))
    picked = jnp.take_along_axis(x, index, axis=1)
    return picked.reshape(-1, *x.shape[2:])

  return Known(take(known.ids), take(known.mask))


@functools.lru_cache(maxsize=64)
def edit_schedules(seq_len: int, num_iter: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
  """Host tables of the MAR schedule over U unknown patches, for every U in 0..L.

  Returns (lo, hi, progress) [L+1, T] and steps [L+1]: with U unknown
  patches, step t < steps[U] predicts order positions [lo, hi) of the
  mar_schedule(U, T_U) with T_U = min(U, ceil(T * U / L)); progress is
  (U - mask_len_t) / U for level-0 linear guidance. Rows U = L are the plain
  schedule. Steps past T_U predict nothing (lo = hi = 0).
  """
  lo = np.zeros((seq_len + 1, num_iter), np.int32)
  hi = np.zeros_like(lo)
  progress = np.ones((seq_len + 1, num_iter), np.float32)
  steps = np.zeros(seq_len + 1, np.int32)
  for unknown in range(1, seq_len + 1):
    schedule = mar_schedule(unknown, min(unknown, -(-num_iter * unknown // seq_len)))
    count = schedule.num_iter
    steps[unknown] = count
    lo[unknown, :count], hi[unknown, :count] = schedule.lo, schedule.hi
    progress[unknown, :count] = [(unknown - m) / unknown for m in schedule.mask_len]
  return lo, hi, progress, steps


class Hyper(NamedTuple):
  """Run-time scalars: changing them does not recompile."""

  cfg: jax.Array
  temperature: jax.Array
  filter_threshold: jax.Array


@dataclasses.dataclass(frozen=True)
class SamplePlan:
  """Static sampling settings: one compiled program per plan (and batch size)."""

  schedules: tuple[MarSchedule | None, ...]  # per generator level; None for AR
  chunks: tuple[tuple[int, ...], ...]  # per level: MAR call sizes for the level below (`chunking`); () for AR
  cfg_schedule: str
  guided: bool
  record_frames: bool = False


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
      chunks.append(())
    else:
      schedule = mar_schedule(spec.seq_len, clamp_num_iter(spec.seq_len, int(steps), spec.index))
      schedules.append(schedule)
      above_pixel_head = spec.index == len(levels) - 1
      chunks.append(chunking.chunk_sizes(schedule.counts, PIXEL_CALL_OVERHEAD if above_pixel_head else CALL_OVERHEAD))
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


def categorical(logits: jax.Array, uniform: jax.Array) -> jax.Array:
  """Draws ids [N] int32 from softmax(logits [N, V]) by inverting the CDF at `uniform` [N] in [0, 1).

  Exact categorical sampling, like `jax.random.categorical`, but from one
  uniform per draw instead of V Gumbel variates: on CPU the threefry hash
  runs as a rolled loop of small operations, and drawing 3 x 256 numbers per
  pixel took ~15% of the SMALL MAR sampler's time. Id j is drawn when
  cdf_{j-1} <= u * cdf_{V-1} < cdf_j, so ids of probability 0 never are.
  """
  probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
  vocab = logits.shape[-1]
  lower = jnp.asarray(np.triu(np.ones((vocab, vocab), np.float32)))  # cdf = probs @ lower (sums ids <= j)
  cdf = jnp.dot(probs, lower, precision=jax.lax.Precision.HIGHEST)
  threshold = uniform[:, None] * cdf[:, -1:]
  return jnp.sum(cdf <= threshold, axis=-1).astype(jnp.int32)


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

  def level(
    self, index: int, conds: list[jax.Array], cfg: jax.Array, keys: jax.Array, known: Known | None = None
  ) -> jax.Array:
    """Samples N items of level `index`: [N, S, S, 3] normalised.

    conds are [G*N, Dc]; cfg [N] the guidance scale per item; keys [N];
    known (optional) the items' known pixels, which the result keeps.
    """
    if index == len(self.levels):
      pixel_known = None if known is None else Known(known.ids[:, 0, 0], known.mask[:, 0, 0])
      ids = self.pixel_ids(lambda m: m.pixel_head, conds[0], cfg, keys, pixel_known)
      return pixel_head.ids_to_pixels(ids)[:, None, None, :]
    if known is not None:
      known = _known_patches(known, self.levels[index].patch_size)
    if self.levels[index].kind == "ar":
      return self.ar(index, conds, cfg, keys, known)
    return self.mar(index, conds, cfg, keys, known)

  def pixel_ids(
    self, head: Callable, cond: jax.Array, cfg: jax.Array, keys: jax.Array, known: Known | None = None
  ) -> jax.Array:
    """R, G, B ids [N, 3] int32 of the pixel head `head(model)` (cond [G*N, Dc]), KV-cached.

    known: ids [N, 3] and mask [N]; known pixels' values are forced channel by channel.
    """
    num = keys.shape[0]
    ids = jnp.zeros((num, 3), jnp.int32)
    uniforms = jax.vmap(lambda k: jax.random.uniform(k, (3,)))(keys)  # [N, 3]: one draw per channel
    cache = self.call(lambda m: head(m).init_cache(cond.shape[0]))
    for channel in range(3):
      logits, cache = self.call(lambda m, *a, c=channel: head(m).decode(*a[:2], c, a[2]), cond, self.dup(ids), cache)
      logits = logits * self.hyper.temperature
      if self.plan.guided:
        logits = guided_logits(logits[:num], logits[num:], cfg[:, None], self.hyper.filter_threshold)
      sampled = categorical(logits, uniforms[:, channel])
      if known is not None:
        sampled = jnp.where(known.mask, known.ids[:, channel], sampled)
      ids = ids.at[:, channel].set(sampled)
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

  def ar(self, index: int, conds: list[jax.Array], cfg: jax.Array, keys: jax.Array, known: Known | None) -> jax.Array:
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
      child_keys = _fold(keys, t)
      if known is None:
        child = self.level(index + 1, [middle], cfg_t, child_keys)
      else:
        known_t = Known(*(jax.lax.dynamic_index_in_dim(x, t, axis=1, keepdims=False) for x in known))
        child = jax.lax.cond(
          known_t.mask.all(),  # the whole batch knows this patch: nothing to sample below
          lambda: pixel_head.ids_to_pixels(known_t.ids),
          lambda: self.level(index + 1, [middle], cfg_t, child_keys, known_t),
        )
      level_patches = jax.lax.dynamic_update_index_in_dim(level_patches, _patch_vectors(child), t, axis=1)
      return level_patches, cache, self._record(frames, t, level_patches, spec.patch_size)

    level_patches, _, frames = jax.lax.fori_loop(0, spec.seq_len, step, state)
    if index == 0:
      self.frames = frames
    return patches.unpatchify(level_patches, spec.patch_size)

  def mar(self, index: int, conds: list[jax.Array], cfg: jax.Array, keys: jax.Array, known: Known | None) -> jax.Array:
    spec, schedule, sizes = self.levels[index], self.plan.schedules[index], self.plan.chunks[index]
    num, length, groups = keys.shape[0], spec.seq_len, 2 if self.plan.guided else 1
    orders = jax.vmap(lambda k: jax.random.permutation(jax.random.fold_in(k, _ORDER_SALT), length))(keys)
    orders = orders.astype(jnp.int32)  # [N, L] position at each order index
    level_patches = jnp.zeros((num, length, spec.patch_dim), jnp.float32)
    unknown = jnp.full((num,), length, jnp.int32)
    if known is not None:
      whole = known.mask.reshape(num, length, -1).all(-1)  # [N, L] fully known patches
      # Fully known patches go to the end of the order (stable: the unknown keep their random order).
      orders = jnp.take_along_axis(orders, jnp.argsort(jnp.take_along_axis(whole, orders, 1), axis=1, stable=True), 1)
      unknown = length - whole.sum(-1).astype(jnp.int32)
      vectors = _patch_vectors(pixel_head.ids_to_pixels(known.ids).reshape(num * length, *known.ids.shape[2:]))
      level_patches = jnp.where(whole[..., None], vectors.reshape(num, length, -1), level_patches)
    ranks = jnp.argsort(orders, axis=-1)  # [N, L] order index of each position
    guide = None
    if spec.guiding_pixel:
      ids = self.pixel_ids(lambda m: m.levels[index].guiding_pixel_loss, conds[0], cfg, _fold(keys, _GUIDE_SALT))
      guide = self.dup(pixel_head.ids_to_pixels(ids))
    tables = edit_schedules(length, schedule.num_iter)
    lo, hi, progress = (jnp.asarray(table)[unknown] for table in tables[:3])  # [N, T] each
    num_steps = jnp.asarray(tables[3])[unknown].max()
    linear = index == 0 and self.plan.cfg_schedule == "linear"
    rows = jnp.arange(num)[:, None]
    # A step's order positions, descending from hi_t - 1: its patches, then padding up to the slots its
    # calls of the level below reach (`chunking.span`). When that level reads only the middle condition,
    # this level computes its last block at those positions only.
    slots = chunking.span(int((tables[1] - tables[0]).max()), sizes)
    queries = slots if spec.next_num_conds == 1 and slots < length else 0

    def step(t: jax.Array, state: Any) -> Any:
      level_patches, frames = state
      lo_t, hi_t = lo[:, t], hi[:, t]  # [N]
      hidden = ranks < hi_t[:, None]  # [N, L]: order positions [0, hi_t) are still hidden
      order_index = hi_t[:, None] - 1 - jnp.arange(slots)  # [N, slots]
      positions = jnp.take_along_axis(orders, jnp.maximum(order_index, 0), axis=1)
      middle = self.call(
        lambda m, *a: m.levels[index](*a[:4], queries=a[4]),
        self.dup(level_patches),
        conds[: spec.num_conds],
        self.dup(hidden),
        guide,
        self.dup(positions) if queries else None,
      )
      if queries:  # [G*N, slots, D]: the outputs at `positions`
        outputs = [middle.reshape(groups, num, slots, -1)]
      else:  # [G*N, L, D] each: the outputs at every position, gathered below
        outputs = [
          o.reshape(groups, num, length, -1) for o in patches.neighbour_conditions(middle, spec.next_num_conds)
        ]
      cfg_t = 1.0 + (cfg - 1.0) * progress[:, t] if linear else cfg

      def one_chunk(chunk: int, start: jax.Array, level_patches: jax.Array) -> jax.Array:
        """Samples the patches at slots [start, start + chunk) below and writes them."""
        chunk_index = jax.lax.dynamic_slice_in_dim(order_index, start, chunk, axis=1)  # [N, C]
        valid = chunk_index >= lo_t[:, None]
        chunk_positions = jax.lax.dynamic_slice_in_dim(positions, start, chunk, axis=1)
        if queries:
          gathered = [jax.lax.dynamic_slice_in_dim(o, start, chunk, axis=2) for o in outputs]
        else:
          gathered = [jnp.take_along_axis(o, chunk_positions[None, :, :, None], axis=2) for o in outputs]
        gathered = [g.reshape(groups * num * chunk, -1) for g in gathered]
        child_keys = _fold(jnp.repeat(keys, chunk), chunk_positions.reshape(-1))
        child_known = None if known is None else _take_known(known, chunk_positions)
        child = self.level(index + 1, gathered, jnp.repeat(cfg_t, chunk), child_keys, child_known)  # [N*C, P, P, 3]
        write = jnp.where(valid, chunk_positions, length)  # padding goes out of range: dropped
        return level_patches.at[rows, write].set(_patch_vectors(child).reshape(num, chunk, -1), mode="drop")

      count = (hi_t - lo_t).max()
      branches = [functools.partial(one_chunk, size) for size in sizes]

      def call_below(state: tuple[jax.Array, jax.Array]) -> tuple[jax.Array, jax.Array]:
        start, level_patches = state
        which = chunking.next_size(count - start, sizes)
        level_patches = jax.lax.switch(which, branches, start, level_patches)  # one size: a plain call
        return start + jnp.asarray(sizes)[which], level_patches

      _, level_patches = jax.lax.while_loop(lambda state: state[0] < count, call_below, (0, level_patches))
      return level_patches, self._record(frames, t, level_patches, spec.patch_size)

    state = (level_patches, self._frames(index, num))
    level_patches, frames = jax.lax.fori_loop(0, num_steps, step, state)
    if index == 0 and frames is not None:  # editing can take fewer steps: hold the last frame
      done = jnp.arange(frames.shape[0]) >= num_steps
      final = to_uint8(patches.unpatchify(level_patches, spec.patch_size))
      self.frames = jnp.where(done[:, None, None, None, None], final[None], frames)
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
  known: Known | None = None,
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
  cfg = jnp.broadcast_to(hyper.cfg, labels.shape)
  images = recursion.level(0, [cond] * fractal.NUM_CONDS_FROM_CLASS, cfg, keys, known)
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


_sample_jit = jax.jit(_sample_sharded, static_argnums=(0, 1, 2))


def check_known(known_images: Any, known_mask: Any, batch: int, img_size: int) -> Known:
  """Validates editing input: uint8 images [B, S, S, 3] and a bool mask [B, S, S] (True = keep)."""
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
      kept bit-exact and the others sampled conditioned on them (module
      docstring: how each level does it).

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
  ints = jax.ShapeDtypeStruct((batch_size,), jnp.int32)
  hyper = Hyper(jnp.float32(1.0), jnp.float32(1.0), jnp.float32(1e-4))
  side = model_settings.img_size
  known = None
  if edit:
    known = Known(
      jax.ShapeDtypeStruct((batch_size, side, side, 3), jnp.int32), jax.ShapeDtypeStruct((batch_size, side, side), bool)
    )
  args = (model_settings, plan, mesh, params, ints, ints, jax.random.key(0), hyper, known)
  compiled = _sample_jit.lower(*args).compile()
  if edit:
    return compiled
  return lambda params, labels, image_ids, key, hyper: compiled(params, labels, image_ids, key, hyper, None)
