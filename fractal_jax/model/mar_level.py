"""The MAR generator level (bidirectional, masked; timm-style blocks).

Dimension letters: N items, L patches, D width, Dc condition width,
K = num_conds condition tokens, G = 1 with a guiding pixel else 0,
P* = 3 * patch_size**2 patch vector length.

Tokens, front to back: `[guiding pixel, cond_{K-1}, ..., cond_0, patches]`
(the official code prepends each condition in turn, so the list appears
reversed); every condition goes through one shared `cond_emb`; masked patch
tokens are replaced by the learned `mask_token`; learned positions
`[1, G + K + L, D]`; LayerNorm; bidirectional `TimmBlock`s with the dropout
flags; final LayerNorm. The outputs at patch positions become the next
level's conditions (middle, top, right, bottom, left: `patches.neighbour_conditions`).

With a guiding pixel (levels >= 1 of the 256x256 models) the level first
models the patch's mean colour with its own pixel head (`guiding_pixel_loss`,
`LevelSpec.guide_head`: width 128, depth 3, heads 4, red weight 5)
conditioned on the middle condition; the mean enters as a token through
`pix_proj`.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from fractal_jax.model.block_stack import level_blocks
from fractal_jax.model.blocks import TimmBlock
from fractal_jax.model.layers import dense, layer_norm
from fractal_jax.model.model_config import LevelSpec
from fractal_jax.model.pixel_head import PixelHead


class MARLevel(nn.Module):
  spec: LevelSpec
  attn_dropout: float = 0.1
  proj_dropout: float = 0.1
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  scan: bool = True
  remat: str = "none"
  cpu_kernels: bool = False  # the CPU-tuned forms of the layers (`blocks` module docstring)

  def setup(self) -> None:
    spec = self.spec
    init = nn.initializers.normal(0.02)
    self.mask_token = self.param(
      "mask_token", nn.with_logical_partitioning(init, (None, None, "embed")), (1, 1, spec.width), self.param_dtype
    )
    self.patch_emb = dense(spec.width, ("patch", "embed"), self.dtype, self.param_dtype, cpu_kernels=self.cpu_kernels)
    self.patch_emb_ln = layer_norm(self.dtype, self.param_dtype, cpu_kernels=self.cpu_kernels)
    self.cond_emb = dense(spec.width, ("cond", "embed"), self.dtype, self.param_dtype, cpu_kernels=self.cpu_kernels)
    num_prefix = spec.num_conds + int(spec.guiding_pixel)
    self.pos_embed_learned = self.param(
      "pos_embed_learned",
      nn.with_logical_partitioning(init, (None, "seq", "embed")),
      (1, num_prefix + spec.seq_len, spec.width),
      self.param_dtype,
    )
    if spec.guide_head is not None:
      self.pix_proj = dense(spec.width, ("patch", "embed"), self.dtype, self.param_dtype, cpu_kernels=self.cpu_kernels)
      self.guiding_pixel_loss = PixelHead(
        width=spec.guide_head.width,
        depth=spec.guide_head.depth,
        heads=spec.guide_head.heads,
        dtype=self.dtype,
        param_dtype=self.param_dtype,
        scan=self.scan,
        remat=self.remat,
        cpu_kernels=self.cpu_kernels,
      )
    self.layers = level_blocks(
      self,
      TimmBlock,
      spec.depth,
      spec.item_chunks,
      width=spec.width,
      heads=spec.heads,
      causal=False,
      attn_dropout=self.attn_dropout,
      proj_dropout=self.proj_dropout,
    )
    self.norm = layer_norm(self.dtype, self.param_dtype, cpu_kernels=self.cpu_kernels)

  def guiding_channel_logits(self, cond: jax.Array, ids: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Guiding-pixel head: (middle cond [N, Dc], ids [N, 3] int) -> R, G, B logits, [N, 256] float32 each."""
    return self.guiding_pixel_loss.channel_logits(cond, ids)

  def __call__(
    self,
    patches: jax.Array,
    conds: list[jax.Array],
    mask: jax.Array,
    guide: jax.Array | None = None,
    deterministic: bool = True,
    queries: jax.Array | None = None,
  ) -> jax.Array:
    """Outputs at the patch positions (all, or `queries`).

    Args:
      patches: [N, L, P*] patches (values under the mask are ignored).
      conds: list of at least K conditions [N, Dc].
      mask: [N, L] bool, True where the patch is hidden (to be predicted).
      guide: [N, 3] the patch's mean colour (normalised), with a guiding pixel.
      deterministic: no dropout (evaluation and sampling).
      queries: int [N, Q] patch positions: only their outputs are computed
        in the last block (sampling needs those of the patches it predicts).

    Returns:
      [N, L, D] the middle condition of every patch, or [N, Q, D] of `queries`.
    """
    spec = self.spec
    x = self.patch_emb(patches)
    x = jnp.where(mask[..., None], self.mask_token.astype(x.dtype), x)
    prefix = [self.cond_emb(conds[i])[:, None] for i in reversed(range(spec.num_conds))]
    if spec.guiding_pixel:
      if guide is None:
        raise ValueError(f"level {spec.index} has a guiding pixel: pass guide=[N, 3]")
      prefix.insert(0, self.pix_proj(guide.astype(self.dtype))[:, None])
    x = jnp.concatenate(prefix + [x], axis=1)  # [N, G + K + L, D]
    x = x + self.pos_embed_learned.astype(x.dtype)
    x = self.patch_emb_ln(x)
    if queries is not None:
      x, _ = self.layers(x, queries=queries + len(prefix), deterministic=deterministic)
      return self.norm(x)
    x, _ = self.layers(x, deterministic=deterministic)
    x = self.norm(x)
    return x[:, len(prefix) :]
