"""The official optimiser recipe with optax.

AdamW (b1 0.9, b2 0.95), weight decay 0.05 on every parameter except biases
and the parameters that are 1-D in the official code (LayerNorm and RMSNorm
weights); learning rate `base_lr * global_batch / 256`, linear warm-up from 0
then a half cosine from the end of warm-up to the end, updated every step;
gradients clipped at global norm 3.0 (before the update, like the official
loss scaler).
"""

from __future__ import annotations

from typing import Any

import jax
import optax

NO_DECAY_NAMES = ("bias", "scale")  # Linear/LayerNorm biases, the MLM biases, LayerNorm/RMSNorm weights


def decays(path: tuple[Any, ...]) -> bool:
  """The official rule on our names: no decay for biases and 1-D (norm) parameters."""
  name = str(getattr(path[-1], "key", path[-1]))
  return not (name in NO_DECAY_NAMES or name.endswith("_bias"))


def weight_decay_mask(params: Any) -> Any:
  """A tree of bools shaped like `params`: True where weight decay applies."""
  return jax.tree_util.tree_map_with_path(lambda path, _: decays(path), params)


def peak_learning_rate(base_lr: float, global_batch: int) -> float:
  return base_lr * global_batch / 256


def learning_rate_schedule(peak_lr: float, warmup_steps: int, total_steps: int, min_lr: float = 0.0) -> optax.Schedule:
  """0 -> peak linearly over `warmup_steps`, then a half cosine to `min_lr` at `total_steps`."""
  return optax.warmup_cosine_decay_schedule(
    init_value=0.0,
    peak_value=peak_lr,
    warmup_steps=warmup_steps,
    decay_steps=total_steps,
    end_value=min_lr,
  )


def make_optimizer(
  schedule: optax.Schedule, weight_decay: float = 0.05, grad_clip: float = 3.0
) -> optax.GradientTransformation:
  return optax.chain(
    optax.clip_by_global_norm(grad_clip),
    optax.adamw(schedule, b1=0.9, b2=0.95, weight_decay=weight_decay, mask=weight_decay_mask),
  )
