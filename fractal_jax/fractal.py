"""The fractal model: generator levels composed recursively, and its loss.

Dimension letters: B images, S image side, N items at a level (an item is
an image at level 0, a patch at level 1, a patch of a patch at level 2, ...),
L patches per item, D width.

Level i turns its N items into N * L items for level i+1: every patch becomes
an item, with the level's outputs as its conditions. The recursion of the
official code is a Python loop here, unrolled at trace time (one copy of
each level in the program).

Static shapes (why every item goes down)
----------------------------------------
The official MAR sends only its masked patches to the next level, so the
next level's batch size varies (about 80% of B * L in training). Under
`jax.jit` shapes are static. We send *all* B * L patches down and carry a
0/1 weight per item: the product of the masks on its path (1 when every
level above hid it). Each loss is the weighted mean over a level's items,
`sum(w * loss) / sum(w)`, which is exactly the official mean over the items
it received, and unmasked items get zero gradient. The price is extra work
below MAR levels (DESIGN_HINTS: 1.25x at level 1 and 1.5x at the pixel head
of the 64x64 MAR model, up to 1.8x at the lowest level of the 256x256
models; +13% / +32% of the whole model's FLOPs for MAR-64 / MAR-L). We took
it for exactness, simplicity and a single compiled program that also serves
evaluation (where the uniform evaluation mask hides on average half the
patches, but every count from 1 to L occurs). AR levels pass every patch
down, as in the official code, so AR models pay nothing.

Randomness uses four rng streams (`RNG_STREAMS`): "dropout", "mask" (MAR
masks), "noise" (the pixel-target tie-breaking noise) and "labels" (label
drop). For tests and parity checks `loss` also takes explicit MAR masks and
noise instead of drawing them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from fractal_jax import masking, patches, pixel_head
from fractal_jax.ar_level import ARLevel
from fractal_jax.mar_level import MARLevel
from fractal_jax.model_config import GUIDING_HEAD, ModelSettings

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
    conds = [cond] * NUM_CONDS_FROM_CLASS
    items = images
    weights = jnp.ones((batch,), jnp.float32)
    aux: dict[str, jax.Array] = {}
    total = jnp.zeros((), jnp.float32)
    for spec, level in zip(s.levels, self.levels):
      num_items = items.shape[0]
      level_patches = patches.patchify(items, spec.patch_size)  # [N, L, P*]
      if spec.kind == "ar":
        middle = level(level_patches, conds, deterministic=not train)
        next_conds = [middle]
        next_weights = jnp.broadcast_to(weights[:, None], (num_items, spec.seq_len))
      else:
        mask = None if masks is None else masks[spec.index]
        if mask is None:
          draw = masking.training_mask if train else masking.uniform_eval_mask
          mask = draw(self.make_rng("mask"), num_items, spec.seq_len)
        mask = jnp.asarray(mask, bool)
        if mask.shape != (num_items, spec.seq_len):
          raise ValueError(f"mask of level {spec.index} has shape {mask.shape}, expected {(num_items, spec.seq_len)}")
        guide = None
        if spec.guiding_pixel:
          # Mean colour of each item (over W, then H, as the official NCHW code).
          guide = items.astype(jnp.float32).mean(axis=2).mean(axis=1)  # [N, 3]
          noise = None if guide_noise is None else guide_noise[spec.index]
          guide_loss = self._pixel_loss(
            level.guiding_channel_logits,
            conds[0],
            guide,
            weights,
            noise,
            GUIDING_HEAD["r_weight"],
            train,
          )[0]
          aux[f"guide_loss_{spec.index}"] = guide_loss
          total = total + guide_loss
        middle = level(level_patches, conds, mask, guide, deterministic=not train)
        next_conds = patches.neighbour_conditions(middle, spec.next_num_conds)
        next_weights = weights[:, None] * mask.astype(jnp.float32)
      items = patches.patches_as_images(level_patches, spec.patch_size)
      conds = [c.reshape(num_items * spec.seq_len, -1) for c in next_conds]
      weights = next_weights.reshape(-1)
    pixels = items.reshape(items.shape[0], 3)
    pixel_loss, pixel_ce = self._pixel_loss(
      self.pixel_head.channel_logits, conds[0], pixels, weights, pixel_noise, s.pixel.r_weight, train
    )
    aux["pixel_loss"] = pixel_loss
    aux["pixel_ce"] = pixel_ce
    total = total + pixel_loss
    aux["loss"] = total
    return total, aux

  def _pixel_loss(
    self,
    logits_fn: Any,
    cond: jax.Array,
    pixels: jax.Array,
    weights: jax.Array,
    noise: jax.Array | None,
    r_weight: float,
    train: bool,
  ) -> tuple[jax.Array, jax.Array]:
    """Weighted-mean loss and per-channel CE of a pixel head on [N, 3] targets.

    `logits_fn(cond, targets)` returns the R, G, B logits as three [N, 256] arrays (`PixelHead.channel_logits`).
    """
    if noise is None:
      noise = jax.random.normal(self.make_rng("noise"), pixels.shape, jnp.float32)
    targets = pixel_head.pixel_targets(pixels, noise)
    logits = logits_fn(cond, targets)
    loss, ce = pixel_head.pixel_losses(logits, targets, r_weight, train)
    return _weighted_mean(loss, weights), _weighted_mean(ce, weights)


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
