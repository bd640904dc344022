"""The fractal model: generator levels composed recursively, and its loss.

Dimension letters: B images, S image side, N items at a level (an item is
an image at level 0, a patch at level 1, a patch of a patch at level 2, ...),
L patches per item, D width, Dc condition width.

Level i turns its N items into N * L items for level i+1: every patch becomes
an item, with the level's outputs as its conditions. The recursion of the
official code is a Python loop here, unrolled at trace time (one copy of
each level in the program).

Static shapes (which items go down)
-----------------------------------
The official MAR sends only its masked patches to the next level, so the
next level's batch size varies (about 80% of B * L in training). Under
`jax.jit` shapes are static, so every item carries a 0/1 weight: the product
of the masks on its path (1 when every level above hid it). Each loss is the
weighted mean over a level's items, `sum(w * loss) / sum(w)`, which is
exactly the official mean over the items it received. AR levels pass every
patch down, as in the official code.

How the items below a level are arranged and run is the loss's one hook,
an `ItemArrangement`. The default, `EveryItem`, sends every item down in
raster order with its weight. The training step passes `CompactedItems`
(the training package's `compaction`), which runs the weighted items first
and skips most of the padding, with the same loss and gradients.

Randomness uses four rng streams (`RNG_STREAMS`): "dropout", "mask" (MAR
masks), "noise" (the pixel-target tie-breaking noise) and "labels" (label
drop). For tests and parity checks the loss also takes explicit MAR masks
and noise instead of drawing them.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple, Protocol

import flax.linen as nn
import jax
import jax.numpy as jnp

from fractal_jax.model import layers, masking, patches, pixel_head
from fractal_jax.model.ar_level import ARLevel
from fractal_jax.model.mar_level import MARLevel
from fractal_jax.model.model_config import LevelSpec, ModelSettings

RNG_STREAMS = ("dropout", "mask", "noise", "labels")
NUM_CONDS_FROM_CLASS = 5  # level 0 receives five identical copies of the class embedding

# A level's work on N items: fn(module, inputs {name: [N, ...]}) -> outputs {name: [N, ...]}.
LevelFn = Callable[[nn.Module, dict[str, Any]], dict[str, jax.Array]]


def make_rngs(key: jax.Array) -> dict[str, jax.Array]:
  """One key per rng stream of the model, derived from `key`."""
  return {name: jax.random.fold_in(key, i) for i, name in enumerate(RNG_STREAMS)}


class Items(NamedTuple):
  """The N items of one level, in the order an `ItemArrangement` chose (raster order by default)."""

  images: jax.Array  # [N, S, S, 3] float, ImageNet-normalised: images at level 0, patches below
  conds: list[jax.Array]  # the conditions from the level above (middle first), [N, Dc] each
  weights: jax.Array  # [N] float32: 1 when every MAR level above hid the item (it carries loss), else 0
  ids: jax.Array  # [N] int32: the item's raster index among its level's items (for given masks and noise)
  layout: Any = None  # what the arrangement needs to run a level on these items; None: nothing


class ItemArrangement(Protocol):
  """How the items below a level are arranged and run: the hook of `FractalModel.__call__`."""

  def arrange(self, model: FractalModel, items: Items, levels_above: Sequence[LevelSpec]) -> Items:
    """The items below `levels_above` (top first) as the next level will receive them (the same N items)."""
    ...

  def run(
    self, model: FractalModel, module: nn.Module, fn: LevelFn, inputs: dict[str, Any], items: Items
  ) -> dict[str, jax.Array]:
    """`fn(module, inputs)` on arranged `items` (inputs [N, ...] in their order): outputs [N, ...] in that order."""
    ...


class EveryItem:
  """The default arrangement: every item goes down with its weight, in raster order, and runs at once."""

  def arrange(self, model: FractalModel, items: Items, levels_above: Sequence[LevelSpec]) -> Items:
    del model, levels_above
    return items

  def run(
    self, model: FractalModel, module: nn.Module, fn: LevelFn, inputs: dict[str, Any], items: Items
  ) -> dict[str, jax.Array]:
    del model, items
    return fn(module, inputs)


def _weighted_mean(values: jax.Array, weights: jax.Array) -> jax.Array:
  """sum(w * v) / sum(w) over the leading axis; 0 when no weight (never in practice)."""
  total = jnp.sum(weights)
  weights = weights.reshape(weights.shape + (1,) * (values.ndim - 1))
  return jnp.sum(weights * values, axis=0) / jnp.maximum(total, 1.0)


class FractalModel(nn.Module):
  """Class-conditional fractal generative model.

  Parameters: `class_emb` [num_classes, D0], `fake_latent` [1, D0] (the
  learned "no class" condition), `levels_i` (one generator per level) and
  `pixel_head`.
  """

  settings: ModelSettings

  def setup(self) -> None:
    s = self.settings
    dtype, param_dtype = jnp.dtype(s.dtype), jnp.dtype(s.param_dtype)
    common = dict(
      dtype=dtype, param_dtype=param_dtype, scan=s.scan_blocks, remat=s.remat_policy, cpu_kernels=s.kernels == "cpu"
    )
    init = nn.initializers.normal(0.02)
    self.class_emb = nn.Embed(
      s.num_classes,
      s.class_width,
      embedding_init=nn.with_logical_partitioning(init, ("classes", "embed")),
      param_dtype=param_dtype,
    )
    self.fake_latent = self.param(
      "fake_latent", nn.with_logical_partitioning(init, (None, "embed")), (1, s.class_width), param_dtype
    )
    levels = []
    for spec in s.levels:
      if spec.kind == "ar":
        levels.append(ARLevel(spec, **common))
      else:
        levels.append(MARLevel(spec, attn_dropout=s.attn_dropout, proj_dropout=s.proj_dropout, **common))
    self.levels = levels
    self.pixel_head = pixel_head.PixelHead(
      width=s.pixel.width, depth=s.pixel.depth, heads=s.pixel.heads, item_chunks=s.pixel.item_chunks, **common
    )

  def class_condition(self, labels: jax.Array, *, drop: bool) -> jax.Array:
    """Level-0 condition [B, D0] float32: class embeddings, `fake_latent` where dropped.

    Args:
      labels: int [B] class ids.
      drop: replace each label by `fake_latent` with probability
        `label_drop_prob` (training, for classifier-free guidance).
    """
    fake = self.fake_latent.astype(jnp.float32)
    emb = self.class_emb(labels).astype(jnp.float32)
    if drop and self.settings.label_drop_prob > 0:
      dropped = jax.random.uniform(self.make_rng("labels"), labels.shape) < self.settings.label_drop_prob
      emb = jnp.where(dropped[:, None], fake, emb)
    return emb

  def label_condition(self, labels: jax.Array) -> jax.Array:
    """Level-0 condition [B, D0] float32 of labels int [B] in -1..C-1: the class embedding, `fake_latent` for -1."""
    fake = jnp.broadcast_to(self.fake_latent.astype(jnp.float32), (labels.shape[0], self.settings.class_width))
    return jnp.where((labels < 0)[:, None], fake, self.class_condition(jnp.maximum(labels, 0), drop=False))

  def __call__(
    self,
    images: jax.Array,
    labels: jax.Array,
    *,
    train: bool,
    unconditional: bool | None = None,
    masks: Sequence[jax.Array | None] | None = None,
    pixel_noise: jax.Array | None = None,
    guide_noise: Sequence[jax.Array | None] | None = None,
    arrangement: ItemArrangement | None = None,
  ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The official loss of a batch.

    Args:
      images: [B, S, S, 3] float, ImageNet-normalised.
      labels: int [B] class ids.
      train: training semantics (label drop, dropout, the truncated-normal
        MAR mask, red-weighted pixel loss). Otherwise evaluation semantics
        (the official NLL: uniform MAR mask, equal channel weights).
      unconditional: condition on `fake_latent` instead of the labels;
        defaults to `not train` (the official NLL is unconditional).
      masks: per generator level, None (draw) or bool [N_i, L_i] with
        N_i = B * (product of the L_j above): the hidden patches of every
        item of that MAR level, items in raster order within their parent.
        Ignored for AR levels.
      pixel_noise: [N_pixels, 3] standard-normal tie-breaking noise of the
        pixel targets (N_pixels = B * S * S, items in the order above), or
        None to draw it.
      guide_noise: per level, None or [N_i, 3] noise of the guiding-pixel
        targets.
      arrangement: how the items below each level are arranged and run
        (training only; None: `EveryItem`).

    Returns:
      (loss, aux): the scalar total loss (pixel loss plus guiding-pixel
      losses, nats) and a dict of its parts: `pixel_loss`, `pixel_ce` [3]
      per channel, and `guide_loss_<i>` for levels with a guiding pixel.
    """
    if arrangement is None:
      arrangement = EveryItem()
    elif not train:
      raise ValueError("an item arrangement is for training: evaluation sends every item down (arrangement=None)")
    s = self.settings
    items = _batch_sharded(self._class_items(images, labels, train=train, unconditional=unconditional))
    aux: dict[str, jax.Array] = {}
    total = jnp.zeros((), jnp.float32)
    # Each level on its items; its patches, conditioned on its outputs and weighted by its mask, are the next
    # level's items.
    for spec, level in zip(s.levels, self.levels):
      inputs = self._level_inputs(spec, items, train, masks, guide_noise)
      out = arrangement.run(self, level, functools.partial(_level_items, spec, train), inputs, items)
      if spec.guiding_pixel:
        aux[f"guide_loss_{spec.index}"] = _weighted_mean(out["guide_loss"], items.weights)
        total = total + aux[f"guide_loss_{spec.index}"]
      items = arrangement.arrange(self, _next_items(spec, items, inputs, out["middle"]), s.levels[: spec.index + 1])
      items = _batch_sharded(items)
    # The pixel head on the last items: single pixels.
    inputs = {
      "cond": items.conds[0],
      "pixels": items.images.reshape(items.images.shape[0], 3),
      "noise": self._noise(pixel_noise, items.ids),
    }
    pixel_fn = functools.partial(_pixel_items, s.pixel.r_weight, train)
    out = arrangement.run(self, self.pixel_head, pixel_fn, inputs, items)
    aux["pixel_loss"] = _weighted_mean(out["loss"], items.weights)
    aux["pixel_ce"] = _weighted_mean(out["ce"], items.weights)
    total = total + aux["pixel_loss"]
    aux["loss"] = total
    return total, aux

  def _class_items(self, images: jax.Array, labels: jax.Array, *, train: bool, unconditional: bool | None) -> Items:
    """Level 0's items: the B images, each with five copies of its class condition [B, D0] and weight 1."""
    s = self.settings
    batch = images.shape[0]
    if unconditional is None:
      unconditional = not train
    cond = self.class_condition(labels, drop=train and not unconditional)
    if unconditional:
      cond = jnp.broadcast_to(self.fake_latent.astype(jnp.float32), (batch, s.class_width))
    cond = cond.astype(jnp.dtype(s.dtype))
    weights = jnp.ones((batch,), jnp.float32)
    return Items(images, [cond] * NUM_CONDS_FROM_CLASS, weights, jnp.arange(batch, dtype=jnp.int32))

  def _level_inputs(
    self,
    spec: LevelSpec,
    items: Items,
    train: bool,
    masks: Sequence[jax.Array | None] | None,
    guide_noise: Sequence[jax.Array | None] | None,
  ) -> dict[str, Any]:
    """What `_level_items` reads: the items and conditions, and for MAR levels the mask (and guide noise)."""
    inputs: dict[str, Any] = {"items": items.images, "conds": items.conds[: spec.num_conds]}
    if spec.kind == "mar":
      inputs["mask"] = self._mask(spec, items, train, None if masks is None else masks[spec.index])
      if spec.guiding_pixel:
        inputs["guide_noise"] = self._noise(None if guide_noise is None else guide_noise[spec.index], items.ids)
    return inputs

  def _mask(self, spec: LevelSpec, items: Items, train: bool, given: jax.Array | None) -> jax.Array:
    """bool [N, L], True where the patch is hidden: drawn, or taken from `given` [N, L] in raster order."""
    num_items = items.ids.shape[0]
    if given is None:
      draw = masking.training_mask if train else masking.uniform_eval_mask
      return draw(self.make_rng("mask"), num_items, spec.seq_len)
    given = jnp.asarray(given, bool)
    if given.shape != (num_items, spec.seq_len):
      raise ValueError(f"mask of level {spec.index} has shape {given.shape}, expected {(num_items, spec.seq_len)}")
    return given[items.ids]

  def _noise(self, given: jax.Array | None, ids: jax.Array) -> jax.Array:
    """[N, 3] tie-breaking noise of the items `ids`: drawn, or taken from `given` [raster items, 3]."""
    if given is None:
      return jax.random.normal(self.make_rng("noise"), (ids.shape[0], 3), jnp.float32)
    return jnp.asarray(given, jnp.float32)[ids]


def _batch_sharded(items: Items) -> Items:
  """Items laid out along the logical "batch" axis (`layers.along_batch`): they come from reshapes, sorts and
  gathers of the level above, which the partitioner may otherwise keep whole on every device."""
  laid = lambda x: layers.along_batch(x) if isinstance(x, jax.Array) else x  # noqa: E731
  return Items(
    *(jax.tree.map(laid, field) for field in (items.images, items.conds, items.weights, items.ids)), items.layout
  )


def _next_items(spec: LevelSpec, items: Items, inputs: dict[str, Any], middle: jax.Array) -> Items:
  """The N * L items below a level: its patches, conditioned on its outputs `middle` [N, L, D].

  A patch's weight is its parent's times 1 if the level hid it (MAR; AR levels send every patch).
  """
  num_items = items.images.shape[0]
  next_conds = patches.neighbour_conditions(middle, spec.next_num_conds)
  hidden = inputs["mask"] if spec.kind == "mar" else jnp.ones((num_items, spec.seq_len), bool)
  images = patches.patches_as_images(patches.patchify(items.images, spec.patch_size), spec.patch_size)
  conds = [c.reshape(num_items * spec.seq_len, -1) for c in next_conds]
  weights = (items.weights[:, None] * hidden).reshape(-1)
  ids = (items.ids[:, None] * spec.seq_len + jnp.arange(spec.seq_len, dtype=jnp.int32)).reshape(-1)
  return Items(images, conds, weights, ids)


def _item_pixel_loss(
  logits_fn: Any, cond: jax.Array, pixels: jax.Array, noise: jax.Array, r_weight: float, train: bool
) -> tuple[jax.Array, jax.Array]:
  """Per-item loss [N] and cross-entropy [N, 3] of a pixel head on [N, 3] targets.

  `logits_fn(cond, targets)` returns the R, G, B logits as three [N, 256] arrays (`PixelHead.channel_logits`).
  """
  targets = pixel_head.pixel_targets(pixels, noise)
  return pixel_head.pixel_losses(logits_fn(cond, targets), targets, r_weight, train)


def _level_items(spec: LevelSpec, train: bool, level: nn.Module, inputs: dict[str, Any]) -> dict[str, jax.Array]:
  """One generator level on N items: `middle` [N, L, D] and, with a guiding pixel, `guide_loss` [N].

  inputs: `items` [N, S, S, 3], `conds` (K of [N, Dc]), and for MAR `mask` [N, L] (+ `guide_noise` [N, 3]).
  """
  level_patches = patches.patchify(inputs["items"], spec.patch_size)  # [N, L, P*]
  if spec.kind == "ar":
    return {"middle": level(level_patches, inputs["conds"], deterministic=not train)}
  out = {}
  guide = None
  if spec.guiding_pixel:
    # Mean colour of each item (over W, then H, as the official NCHW code).
    guide = inputs["items"].astype(jnp.float32).mean(axis=2).mean(axis=1)  # [N, 3]
    out["guide_loss"] = _item_pixel_loss(
      level.guiding_channel_logits, inputs["conds"][0], guide, inputs["guide_noise"], spec.guide_head.r_weight, train
    )[0]
  out["middle"] = level(level_patches, inputs["conds"], inputs["mask"], guide, deterministic=not train)
  return out


def _pixel_items(r_weight: float, train: bool, head: nn.Module, inputs: dict[str, jax.Array]) -> dict[str, jax.Array]:
  """The pixel head's per-item `loss` [N] and `ce` [N, 3]; inputs `cond` [N, Dc], `pixels` [N, 3], `noise` [N, 3]."""
  loss, ce = _item_pixel_loss(head.channel_logits, inputs["cond"], inputs["pixels"], inputs["noise"], r_weight, train)
  return {"loss": loss, "ce": ce}


def build(model_settings: ModelSettings) -> FractalModel:
  return FractalModel(model_settings)


def init_params(model: FractalModel, key: jax.Array) -> Any:
  """Freshly initialised parameters (the official initialisers) of `model`.

  Wrap in `jax.jit` to allocate them, or `jax.eval_shape` for shapes only.
  """
  return nn.meta.unbox(boxed_params(model, key))


def boxed_params(model: FractalModel, key: jax.Array) -> Any:
  """`init_params` with every leaf still wrapped in its `nn.LogicallyPartitioned` box (logical axis names)."""
  side = model.settings.img_size
  rngs = make_rngs(key) | {"params": key}
  images = jnp.zeros((1, side, side, 3), jnp.float32)
  return model.init(rngs, images, jnp.zeros((1,), jnp.int32), train=False)["params"]


def abstract_params(model_settings: ModelSettings) -> Any:
  """Parameter shapes of the whole model (a tree of `jax.ShapeDtypeStruct`), without allocating."""
  model = build(model_settings)
  return jax.eval_shape(lambda key: init_params(model, key), jax.random.key(0))


def count_params(tree: Any) -> int:
  """Number of scalars in a tree of arrays or shapes."""
  return int(sum(math.prod(x.shape) for x in jax.tree.leaves(tree)))
