"""The fractal model: generator levels composed recursively, and its loss.

Dimension letters: B images, S image side, N items at a level (an item is
an image at level 0, a patch at level 1, a patch of a patch at level 2, ...),
L patches per item, D width.

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
exactly the official mean over the items it received.

In training, below the first MAR level, the items are sorted with the
weighted ones first and cut at a static capacity; the rest runs only on the
steps where some weighted item falls past it (`compaction`; exact either
way). That saves most of the padding: ~27% of the FLOPs of the SMALL MAR
step. Evaluation (the uniform mask hides every count from 1 to L) and
initialisation send every item down with its weight. AR levels pass every
patch down, as in the official code, so AR models pay nothing.

Randomness uses four rng streams (`RNG_STREAMS`): "dropout", "mask" (MAR
masks), "noise" (the pixel-target tie-breaking noise) and "labels" (label
drop). For tests and parity checks `loss` also takes explicit MAR masks and
noise instead of drawing them.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from fractal_jax.model import masking, patches, pixel_head
from fractal_jax.model.ar_level import ARLevel
from fractal_jax.model.mar_level import MARLevel
from fractal_jax.model.settings import GUIDING_HEAD, LevelSpec, ModelSettings
from fractal_jax.train import compaction

RNG_STREAMS = ("dropout", "mask", "noise", "labels")
NUM_CONDS_FROM_CLASS = 5  # level 0 receives five identical copies of the class embedding


def make_rngs(key: jax.Array) -> dict[str, jax.Array]:
  """One key per rng stream of the model, derived from `key`."""
  return {name: jax.random.fold_in(key, i) for i, name in enumerate(RNG_STREAMS)}


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
    common = dict(dtype=dtype, param_dtype=param_dtype, scan=s.scan_blocks, remat=s.remat_policy)
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
    self.pixel_head = pixel_head.PixelHead(width=s.pixel.width, depth=s.pixel.depth, heads=s.pixel.heads, **common)

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

    Returns:
      (loss, aux): the scalar total loss (pixel loss plus guiding-pixel
      losses, nats) and a dict of its parts: `pixel_loss`, `pixel_ce` [3]
      per channel, and `guide_loss_<i>` for levels with a guiding pixel.
    """
    s = self.settings
    batch = images.shape[0]
    if unconditional is None:
      unconditional = not train
    cond = self.class_condition(labels, drop=train and not unconditional)
    if unconditional:
      cond = jnp.broadcast_to(self.fake_latent.astype(jnp.float32), (batch, s.class_width))
    cond = cond.astype(jnp.dtype(s.dtype))
    # The current level's items: images, conditions, 0/1 weights, raster index (for injected masks and noise).
    items = images
    conds = [cond] * NUM_CONDS_FROM_CLASS
    weights = jnp.ones((batch,), jnp.float32)
    ids = jnp.arange(batch, dtype=jnp.int32)
    layout = None  # (counts [G], main capacity C) once items are compacted: in training, below a MAR level
    raster_items = batch
    aux: dict[str, jax.Array] = {}
    total = jnp.zeros((), jnp.float32)
    for spec, level in zip(s.levels, self.levels):
      num_items = items.shape[0]
      inputs: dict[str, Any] = {"items": items, "conds": conds[: spec.num_conds]}
      if spec.kind == "mar":
        given = None if masks is None else masks[spec.index]
        if given is None:
          draw = masking.training_mask if train else masking.uniform_eval_mask
          inputs["mask"] = draw(self.make_rng("mask"), num_items, spec.seq_len)
        else:
          given = jnp.asarray(given, bool)
          if given.shape != (raster_items, spec.seq_len):
            raise ValueError(
              f"mask of level {spec.index} has shape {given.shape}, expected {(raster_items, spec.seq_len)}"
            )
          inputs["mask"] = given[ids]
        if spec.guiding_pixel:
          inputs["guide_noise"] = self._noise(None if guide_noise is None else guide_noise[spec.index], ids)
      out = self._per_item(level, functools.partial(_level_items, spec, train), inputs, layout)
      if spec.guiding_pixel:
        aux[f"guide_loss_{spec.index}"] = _weighted_mean(out["guide_loss"], weights)
        total = total + aux[f"guide_loss_{spec.index}"]
      next_conds = patches.neighbour_conditions(out["middle"], spec.next_num_conds)
      hidden = inputs["mask"] if spec.kind == "mar" else jnp.ones((num_items, spec.seq_len), bool)  # AR: all go down
      items = patches.patches_as_images(patches.patchify(items, spec.patch_size), spec.patch_size)
      conds = [c.reshape(num_items * spec.seq_len, -1) for c in next_conds]
      weights = (weights[:, None] * hidden).reshape(-1)
      ids = (ids[:, None] * spec.seq_len + jnp.arange(spec.seq_len, dtype=jnp.int32)).reshape(-1)
      raster_items *= spec.seq_len
      if train and not self.is_initializing() and any(level.kind == "mar" for level in s.levels[: spec.index + 1]):
        items, conds, weights, ids, layout = self._compact(items, conds, weights, ids, batch, spec.index + 1)
    inputs = {"cond": conds[0], "pixels": items.reshape(items.shape[0], 3), "noise": self._noise(pixel_noise, ids)}
    out = self._per_item(self.pixel_head, functools.partial(_pixel_items, s.pixel.r_weight, train), inputs, layout)
    aux["pixel_loss"] = _weighted_mean(out["loss"], weights)
    aux["pixel_ce"] = _weighted_mean(out["ce"], weights)
    total = total + aux["pixel_loss"]
    aux["loss"] = total
    return total, aux

  def _noise(self, given: jax.Array | None, ids: jax.Array) -> jax.Array:
    """[N, 3] tie-breaking noise of the items `ids`: drawn, or taken from `given` [raster items, 3]."""
    if given is None:
      return jax.random.normal(self.make_rng("noise"), (ids.shape[0], 3), jnp.float32)
    return jnp.asarray(given, jnp.float32)[ids]

  def _compact(
    self,
    items: jax.Array,
    conds: list[jax.Array],
    weights: jax.Array,
    ids: jax.Array,
    batch: int,
    levels_above: int,
  ) -> tuple[jax.Array, list[jax.Array], jax.Array, jax.Array, tuple[jax.Array, int] | None]:
    """Items with weight first, per group (`compaction`); returns them and (counts [G], main capacity C)."""
    s = self.settings
    groups = s.item_groups
    kinds, seq_lens = compaction.level_kinds(s.levels[:levels_above])
    main = compaction.capacity(batch // groups, kinds, seq_lens)
    if main * groups == weights.shape[0]:
      return items, conds, weights, ids, None  # not worth it at this level: every item goes on
    order, rank, counts = compaction.compact(weights, groups)
    take = functools.partial(compaction.gather, order=order, rank=rank)
    return take(items), [take(c) for c in conds], take(weights), take(ids), (counts, main)

  def _per_item(self, module: nn.Module, fn: Any, inputs: dict[str, Any], layout: tuple[jax.Array, int] | None) -> Any:
    """`fn(module, inputs)`, over compacted items: the main part directly, the overflow only when needed.

    The overflow applies an unbound copy of `module` to its parameters (read
    from this bound module), so that gradients reach them as usual.
    """
    if layout is None:
      return fn(module, inputs)
    counts, main = layout
    groups = counts.shape[0]
    head, rest = compaction.split(inputs, groups, main)
    out = fn(module, head)
    if jax.tree.leaves(rest)[0].shape[0] == 0:
      return out
    unbound = module.clone(parent=None)

    def run(params: Any, x: dict[str, Any], key: jax.Array) -> Any:
      return unbound.apply({"params": params}, x, method=fn, rngs={"dropout": key})

    # Without a "dropout" rng (evaluation) the levels are deterministic and ignore the key.
    key = self.make_rng("dropout") if self.has_rng("dropout") else jax.random.key(0)
    overflow = compaction.skippable(run, jnp.any(counts > main), module.variables["params"], rest, key)
    return compaction.join(out, overflow, groups)


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
      level.guiding_channel_logits, inputs["conds"][0], guide, inputs["guide_noise"], GUIDING_HEAD["r_weight"], train
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


def count_params(tree: Any) -> int:
  """Number of scalars in a tree of arrays or shapes."""
  return int(sum(math.prod(x.shape) for x in jax.tree.leaves(tree)))
