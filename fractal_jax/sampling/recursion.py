"""The trace-time recursion over the levels: each level's sampler calls the next level's inside its `lax` loop body.

Dimension letters: N items of a level (images, patches, ...), G = 2 with
classifier-free guidance (conditional half, then unconditional half) else 1,
L patches per item, S item side, P patch side, P* = 3 * P**2 patch vector
length, D width, Dc condition width, T0 level-0 steps.

Tracing happens once per level (and per call size of a MAR level), so the
program holds one copy of each level's loop, nested. Per level:

* AR (`ar`): L steps in raster order with an explicit KV cache `[depth,
  G*N, L, heads, head_dim]` (`ARLevel.decode_step`); the `num_iter` setting
  is ignored, as in the official code.
* MAR (`mar`): a random order per item; T steps of the official cosine
  schedule; step t predicts the order positions `[lo_t, hi_t)`. The count
  differs from step to step while shapes must be static, so the patches of
  a step go to the level below in calls of a few sizes chosen on the host
  (`chunking`), through a `while_loop` and `lax.switch`: padding every step
  to the largest count would waste up to 1.75x of the lower levels' work,
  and every call costs a fixed time. When the level below reads only the
  middle condition (the pixel head, an AR level), the last block is
  computed at the step's slots only, not at all L. With a guiding pixel the
  level first samples the patch's mean colour.
* Pixel head (`pixel_ids`): R, G, B in order, one new token each (KV cache),
  each drawn by inverting its CDF at one uniform number with CPU kernels,
  by `jax.random.categorical` otherwise (`draws.channel_ids`). The temperature multiplies the logits (official
  semantics: 1.1 sharpens); with guidance, `draws.guided_logits`.

Guidance: both halves share the partial image (sampled values are written
once and duplicated, `dup`); level 0 follows `cfg_schedule` ("linear": AR
`1 + (cfg-1)(t+1)/L`, MAR `1 + (cfg-1)(L - m_t)/L` with m_t the clamped
count; "constant": cfg) and lower levels get the current value as a constant.

Editing (`editing.Known`): the pixel head forces known R, G, B values (so
later channels condition on them). An AR level forces known pixels in raster
order: a fully known patch is not sampled (its children are skipped when
the whole batch knows it) but still enters the KV cache, so later patches
see it; AR cannot look ahead at known pixels below or to the right of the
current patch. A MAR level puts its fully known patches at the end of each
item's random order: they are visible from the first step, and the schedule
runs over the U unknown patches only (`editing.edit_schedules`), with
level-0 linear guidance progressing over U. A partly known patch counts as
unknown at its level (the level sees it masked) and its child level is
given its known pixels; a MAR level's guiding pixel is sampled from the
level's condition as in plain sampling, even for a partly known patch.
With nothing known the program computes exactly plain sampling.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import flax
import jax
import jax.numpy as jnp

from fractal_jax.model import fractal, patches, pixel_head
from fractal_jax.model.model_config import LevelSpec
from fractal_jax.sampling import chunking, draws
from fractal_jax.sampling.editing import (
  ItemSchedule,
  Known,
  edit_schedules,
  fully_known,
  known_at,
  known_patches,
  pixel_known,
  take_known,
)
from fractal_jax.sampling.plan import Hyper, SamplePlan


@flax.struct.dataclass
class ARState:
  """Loop state of an AR level."""

  patches: jax.Array  # [N, L, P*] float32: sampled patches in raster order (zeros from the current step on)
  cache: Any  # KVCache: keys and values [depth, G*N, L, heads, head_dim] of the positions decoded so far
  frames: jax.Array | None  # [T0, N, S, S, 3] uint8: the image after each step (level 0, recording), else None


@flax.struct.dataclass
class MARState:
  """Loop state of a MAR level."""

  patches: jax.Array  # [N, L, P*] float32: sampled and fully known patches (zeros where still hidden)
  frames: jax.Array | None  # [T0, N, S, S, 3] uint8: as ARState


@flax.struct.dataclass
class ChunkState:
  """Loop state of one MAR step's calls of the level below."""

  start: jax.Array  # int32 []: the step's first slot not yet sent below
  patches: jax.Array  # [N, L, P*] float32: as MARState


@flax.struct.dataclass
class MarOrder:
  """Each item's random generation order at a MAR level (fully known patches last)."""

  orders: jax.Array  # [N, L] int32: the patch position at each order index
  ranks: jax.Array  # [N, L] int32: the order index of each position
  unknown: jax.Array  # [N] int32: patches not fully known, U (the schedule runs over these)


@flax.struct.dataclass
class StepTargets:
  """What one MAR step sends to the level below: its slots, order positions `hi_t - 1` downwards."""

  outputs: list[jax.Array]  # per condition the level below reads: [G, N, slots, D] at_slots, else [G, N, L, D]
  order_index: jax.Array  # [N, slots] int32: the order index of each slot; below `lo` it is padding
  positions: jax.Array  # [N, slots] int32: the patch position of each slot (padding: a valid, unused one)
  lo: jax.Array  # [N] int32: the step's first order index, lo_t
  count: jax.Array  # int32 []: the most patches any item predicts at this step
  cfg: jax.Array  # [N] float32: the guidance scale of the step
  at_slots: bool = flax.struct.field(pytree_node=False)  # outputs at the slots only, not at every position


@dataclasses.dataclass(frozen=True)
class MarLayout:
  """How a MAR level's steps reach the level below (static, from the plan)."""

  sizes: tuple[int, ...]  # call sizes of the level below, ascending (`chunking`)
  slots: int  # slots per step: the order positions the calls of any step's count reach (`chunking.span`)
  at_slots: bool  # compute the level's last block at the slots only (the level below reads the middle condition)


def patch_vectors(items: jax.Array) -> jax.Array:
  """Items [N, P, P, 3] -> patch vectors [N, P*] ordered (channel, row, col), as `patches.patchify`."""
  return items.transpose(0, 3, 1, 2).reshape(items.shape[0], -1)


@dataclasses.dataclass(frozen=True)
class Recursion:
  """Trace-time recursion over the levels of one model and its parameters."""

  model: fractal.FractalModel
  params: Any  # the model's parameters (traced arguments of the compiled program)
  plan: SamplePlan
  hyper: Hyper

  @property
  def levels(self) -> tuple[LevelSpec, ...]:
    return self.model.settings.levels

  def _run(self, method: Callable[[fractal.FractalModel], Callable[..., Any]], **kwargs: Any) -> Any:
    """`method(model)(**kwargs)` with the parameters, e.g. `method=lambda m: m.levels[0].decode_step`."""
    return self.model.apply({"params": self.params}, method=lambda model, **kw: method(model)(**kw), **kwargs)

  def dup(self, x: jax.Array) -> jax.Array:
    """[N, ...] -> [G*N, ...]: the same values for both guidance halves."""
    return jnp.concatenate([x, x], axis=0) if self.plan.guided else x

  def level(
    self, index: int, conds: list[jax.Array], cfg: jax.Array, keys: jax.Array, known: Known | None = None
  ) -> tuple[jax.Array, jax.Array | None]:
    """Samples N items of level `index` (the pixel head past the last generator level).

    Args:
      index: the level.
      conds: the conditions the level reads, [G*N, Dc] each.
      cfg: float32 [N] the guidance scale per item.
      keys: [N] the items' keys.
      known: the items' known pixels (ids [N, S, S, 3], mask [N, S, S]), which the result keeps; or None.

    Returns:
      (items [N, S, S, 3] float32 ImageNet-normalised, frames [T0, N, S, S, 3]
      uint8 after each step at level 0 when the plan records them, else None).
    """
    if index == len(self.levels):
      pixel = None if known is None else pixel_known(known)
      ids = self.pixel_ids(lambda m: m.pixel_head, conds[0], cfg, keys, pixel)
      return pixel_head.ids_to_pixels(ids)[:, None, None, :], None
    if known is not None:
      known = known_patches(known, self.levels[index].patch_size)
    if self.levels[index].kind == "ar":
      return self.ar(index, conds, cfg, keys, known)
    return self.mar(index, conds, cfg, keys, known)

  def pixel_ids(
    self,
    head: Callable[[fractal.FractalModel], Any],
    cond: jax.Array,
    cfg: jax.Array,
    keys: jax.Array,
    known: Known | None = None,
  ) -> jax.Array:
    """R, G, B ids [N, 3] int32 of the pixel head `head(model)` on cond [G*N, Dc], KV-cached.

    known: ids [N, 3] and mask [N]; known pixels' values are forced channel by channel.
    """
    num = keys.shape[0]
    ids = jnp.zeros((num, 3), jnp.int32)
    inverse_cdf = self.model.settings.kernels == "cpu"
    cache = self._run(lambda m: head(m).init_cache, batch=cond.shape[0])
    for channel in range(3):
      logits, cache = self._run(lambda m: head(m).decode, cond=cond, ids=self.dup(ids), channel=channel, cache=cache)
      logits = logits * self.hyper.temperature
      if self.plan.guided:
        logits = draws.guided_logits(logits[:num], logits[num:], cfg[:, None], self.hyper.filter_threshold)
      sampled = draws.channel_ids(logits, keys, channel, inverse_cdf=inverse_cdf)
      if known is not None:
        sampled = jnp.where(known.mask, known.ids[:, channel], sampled)
      ids = ids.at[:, channel].set(sampled)
    return ids

  def _frames(self, index: int, num: int) -> jax.Array | None:
    """Zero frames [T0, N, S, S, 3] uint8 at level 0 when the plan records them, else None."""
    if index or not self.plan.record_frames:
      return None
    spec = self.levels[0]
    steps = spec.seq_len if spec.kind == "ar" else self.plan.schedules[0].num_iter
    return jnp.zeros((steps, num, spec.img_size, spec.img_size, 3), jnp.uint8)

  def _record(
    self, frames: jax.Array | None, step: jax.Array, level_patches: jax.Array, patch_size: int
  ) -> jax.Array | None:
    """frames with the image of `level_patches` [N, L, P*] written at `step`; None stays None."""
    if frames is None:
      return None
    return frames.at[step].set(pixel_head.to_uint8(patches.unpatchify(level_patches, patch_size)))

  def ar(
    self, index: int, conds: list[jax.Array], cfg: jax.Array, keys: jax.Array, known: Known | None
  ) -> tuple[jax.Array, jax.Array | None]:
    """An AR level: `level`'s result, with known (if any) split into patches [N, L, P, P(, 3)]."""
    spec = self.levels[index]
    num = keys.shape[0]
    decode = functools.partial(self._run, lambda m: m.levels[index].decode_step)
    cache = self._run(lambda m: m.levels[index].init_cache, batch=conds[0].shape[0])
    state = ARState(jnp.zeros((num, spec.seq_len, spec.patch_dim), jnp.float32), cache, self._frames(index, num))
    linear = index == 0 and self.plan.cfg_schedule == "linear"

    def step(t: jax.Array, state: ARState) -> ARState:
      previous = jax.lax.dynamic_index_in_dim(state.patches, jnp.maximum(t - 1, 0), axis=1, keepdims=False)
      middle, cache = decode(cond=conds[0], previous_patch=self.dup(previous), position=t, cache=state.cache)
      cfg_t = 1.0 + (cfg - 1.0) * (t + 1) / spec.seq_len if linear else cfg
      child = self._ar_child(index, middle, cfg_t, draws.fold_keys(keys, t), known, t)
      level_patches = jax.lax.dynamic_update_index_in_dim(state.patches, patch_vectors(child), t, axis=1)
      return ARState(level_patches, cache, self._record(state.frames, t, level_patches, spec.patch_size))

    state = jax.lax.fori_loop(0, spec.seq_len, step, state)
    return patches.unpatchify(state.patches, spec.patch_size), state.frames

  def _ar_child(
    self, index: int, middle: jax.Array, cfg: jax.Array, keys: jax.Array, known: Known | None, t: jax.Array
  ) -> jax.Array:
    """Patch t of every item [N, P, P, 3] from its condition `middle` [G*N, D]: sampled, or known by the whole batch."""
    if known is None:
      return self.level(index + 1, [middle], cfg, keys)[0]
    known_t = known_at(known, t)
    return jax.lax.cond(
      known_t.mask.all(),  # the whole batch knows this patch: nothing to sample below
      lambda: pixel_head.ids_to_pixels(known_t.ids),
      lambda: self.level(index + 1, [middle], cfg, keys, known_t)[0],
    )

  def mar(
    self, index: int, conds: list[jax.Array], cfg: jax.Array, keys: jax.Array, known: Known | None
  ) -> tuple[jax.Array, jax.Array | None]:
    """A MAR level: `level`'s result, with known (if any) split into patches [N, L, P, P(, 3)]."""
    spec = self.levels[index]
    num = keys.shape[0]
    whole = None if known is None else fully_known(known)
    order = self._order(keys, spec.seq_len, whole)
    state = MARState(self._initial_patches(index, num, known, whole), self._frames(index, num))
    guide = None
    if spec.guiding_pixel:
      ids = self.pixel_ids(
        lambda m: m.levels[index].guiding_pixel_loss, conds[0], cfg, draws.fold_keys(keys, draws.GUIDE_SALT)
      )
      guide = self.dup(pixel_head.ids_to_pixels(ids))
    tables = edit_schedules(spec.seq_len, self.plan.schedules[index].num_iter)
    schedule = tables.rows(order.unknown)
    slots = chunking.span(tables.most_per_step, self.plan.chunks[index])
    layout = MarLayout(self.plan.chunks[index], slots, spec.next_num_conds == 1 and slots < spec.seq_len)

    def step(t: jax.Array, state: MARState) -> MARState:
      targets = self._predict(index, state.patches, t, conds, cfg, guide, order, schedule, layout)
      level_patches = self._sample_below(index, targets, keys, known, state.patches, layout.sizes)
      return MARState(level_patches, self._record(state.frames, t, level_patches, spec.patch_size))

    state = jax.lax.fori_loop(0, schedule.num_steps, step, state)
    frames = state.frames
    if frames is not None:  # editing can take fewer steps than T0: hold the last frame
      done = jnp.arange(frames.shape[0]) >= schedule.num_steps
      final = pixel_head.to_uint8(patches.unpatchify(state.patches, spec.patch_size))
      frames = jnp.where(done[:, None, None, None, None], final[None], frames)
    return patches.unpatchify(state.patches, spec.patch_size), frames

  def _order(self, keys: jax.Array, length: int, whole: jax.Array | None) -> MarOrder:
    """A random order per item of keys [N] over L = `length` patches; fully known ones (whole [N, L] bool) last."""
    orders = jax.vmap(lambda k: jax.random.permutation(jax.random.fold_in(k, draws.ORDER_SALT), length))(keys)
    orders = orders.astype(jnp.int32)
    unknown = jnp.full((keys.shape[0],), length, jnp.int32)
    if whole is not None:
      # Stable: the unknown patches keep their random order.
      orders = jnp.take_along_axis(orders, jnp.argsort(jnp.take_along_axis(whole, orders, 1), axis=1, stable=True), 1)
      unknown = length - whole.sum(-1).astype(jnp.int32)
    return MarOrder(orders, jnp.argsort(orders, axis=-1), unknown)

  def _initial_patches(self, index: int, num: int, known: Known | None, whole: jax.Array | None) -> jax.Array:
    """The level's patches [N, L, P*] float32 before its first step: the fully known ones, zeros elsewhere."""
    spec = self.levels[index]
    level_patches = jnp.zeros((num, spec.seq_len, spec.patch_dim), jnp.float32)
    if known is None:
      return level_patches
    vectors = patch_vectors(pixel_head.ids_to_pixels(known.ids).reshape(num * spec.seq_len, *known.ids.shape[2:]))
    return jnp.where(whole[..., None], vectors.reshape(num, spec.seq_len, -1), level_patches)

  def _predict(
    self,
    index: int,
    level_patches: jax.Array,
    t: jax.Array,
    conds: list[jax.Array],
    cfg: jax.Array,
    guide: jax.Array | None,
    order: MarOrder,
    schedule: ItemSchedule,
    layout: MarLayout,
  ) -> StepTargets:
    """Runs the level on the partial image `level_patches` [N, L, P*] at step t: its outputs for the step's slots."""
    spec = self.levels[index]
    num, groups = level_patches.shape[0], 2 if self.plan.guided else 1
    lo_t, hi_t = schedule.lo[:, t], schedule.hi[:, t]  # [N]
    hidden = order.ranks < hi_t[:, None]  # [N, L]: order positions [0, hi_t) are still hidden
    order_index = hi_t[:, None] - 1 - jnp.arange(layout.slots)  # [N, slots]
    positions = jnp.take_along_axis(order.orders, jnp.maximum(order_index, 0), axis=1)
    middle = self._run(
      lambda m: m.levels[index],
      patches=self.dup(level_patches),
      conds=conds[: spec.num_conds],
      mask=self.dup(hidden),
      guide=guide,
      queries=self.dup(positions) if layout.at_slots else None,
    )
    if layout.at_slots:  # [G*N, slots, D]: the outputs at `positions`
      outputs = [middle.reshape(groups, num, layout.slots, -1)]
    else:  # [G*N, L, D] each: the outputs at every position, gathered per call below
      conditions = patches.neighbour_conditions(middle, spec.next_num_conds)
      outputs = [o.reshape(groups, num, spec.seq_len, -1) for o in conditions]
    linear = index == 0 and self.plan.cfg_schedule == "linear"
    cfg_t = 1.0 + (cfg - 1.0) * schedule.progress[:, t] if linear else cfg
    return StepTargets(outputs, order_index, positions, lo_t, (hi_t - lo_t).max(), cfg_t, layout.at_slots)

  def _sample_below(
    self,
    index: int,
    targets: StepTargets,
    keys: jax.Array,
    known: Known | None,
    level_patches: jax.Array,
    sizes: tuple[int, ...],
  ) -> jax.Array:
    """Samples the step's patches with calls of `sizes` of the level below; returns level_patches [N, L, P*] with them."""
    branches = [functools.partial(self._sample_chunk, index, targets, keys, known, size) for size in sizes]

    def call_below(state: ChunkState) -> ChunkState:
      which = chunking.next_size(targets.count - state.start, sizes)
      level_patches = jax.lax.switch(which, branches, state.start, state.patches)  # one size: a plain call
      return ChunkState(state.start + jnp.asarray(sizes)[which], level_patches)

    state = ChunkState(jnp.int32(0), level_patches)
    return jax.lax.while_loop(lambda state: state.start < targets.count, call_below, state).patches

  def _sample_chunk(
    self,
    index: int,
    targets: StepTargets,
    keys: jax.Array,
    known: Known | None,
    chunk: int,
    start: jax.Array,
    level_patches: jax.Array,
  ) -> jax.Array:
    """Samples the patches at slots [start, start + chunk) with one call of the level below and writes them."""
    spec = self.levels[index]
    num, groups = level_patches.shape[0], 2 if self.plan.guided else 1
    chunk_index = jax.lax.dynamic_slice_in_dim(targets.order_index, start, chunk, axis=1)  # [N, C]
    valid = chunk_index >= targets.lo[:, None]
    chunk_positions = jax.lax.dynamic_slice_in_dim(targets.positions, start, chunk, axis=1)
    if targets.at_slots:
      gathered = [jax.lax.dynamic_slice_in_dim(o, start, chunk, axis=2) for o in targets.outputs]
    else:
      gathered = [jnp.take_along_axis(o, chunk_positions[None, :, :, None], axis=2) for o in targets.outputs]
    gathered = [g.reshape(groups * num * chunk, -1) for g in gathered]
    child_keys = draws.fold_keys(jnp.repeat(keys, chunk), chunk_positions.reshape(-1))
    child_known = None if known is None else take_known(known, chunk_positions)
    child, _ = self.level(index + 1, gathered, jnp.repeat(targets.cfg, chunk), child_keys, child_known)
    write = jnp.where(valid, chunk_positions, spec.seq_len)  # padding goes out of range: dropped
    rows = jnp.arange(num)[:, None]
    return level_patches.at[rows, write].set(patch_vectors(child).reshape(num, chunk, -1), mode="drop")
