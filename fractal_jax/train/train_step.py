"""One optimisation step: the official training loss, AdamW, and metrics.

Pure: the state is a pytree and the step's randomness is
`fold_in(key, state.step)`, so a resumed run repeats an uninterrupted one.
Sharding (jit with in/out shardings over the mesh) is applied by the caller
(`fractal_jax.train.trainer`).

The loss arranges the items below MAR levels with
`compaction.CompactedItems`, one group per batch shard (`batch_shards`):
the same loss and gradients as the plain recursion, with less padding.

A step whose loss or gradient is not finite changes nothing: it returns the
old state with `metrics["finite"] = False`, so the host can stop with the
last good state (and checkpoint) intact.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from fractal_jax.model import fractal, pixel_head
from fractal_jax.train import compaction


@flax.struct.dataclass
class TrainState:
  step: jax.Array  # int32 scalar: optimisation steps done
  params: Any
  opt_state: Any
  ema_params: Any = None  # exponential moving average of params, or None when EMA is off


def init_state(params: Any, optimizer: optax.GradientTransformation, ema: bool = False) -> TrainState:
  ema_params = jax.tree.map(jnp.copy, params) if ema else None
  return TrainState(jnp.zeros((), jnp.int32), params, optimizer.init(params), ema_params)


def _loss_and_grads(
  model: fractal.FractalModel,
  params: Any,
  images: jax.Array,
  labels: jax.Array,
  key: jax.Array,
  arrangement: fractal.ItemArrangement,
) -> tuple[dict[str, jax.Array], Any]:
  """The training loss's parts (`FractalModel.__call__`'s aux) and its gradient with respect to `params`."""

  def loss_fn(p: Any) -> tuple[jax.Array, dict[str, jax.Array]]:
    rngs = fractal.make_rngs(key)
    return model.apply(
      {"params": p}, pixel_head.normalize_uint8(images), labels, train=True, arrangement=arrangement, rngs=rngs
    )

  (_, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
  return aux, grads


def _accumulated(
  model: fractal.FractalModel,
  params: Any,
  images: jax.Array,
  labels: jax.Array,
  key: jax.Array,
  accum_steps: int,
  arrangement: fractal.ItemArrangement,
) -> tuple[dict[str, jax.Array], Any]:
  """Mean loss parts and gradients over `accum_steps` micro-batches (a `lax.scan`).

  Micro-batch i holds images i, i + accum_steps, ...: a strided split keeps
  every device's part of a batch-sharded array on that device. Each
  micro-batch's loss is its own (masked) mean, so the result is the mean of
  micro-batch means: equal to the full-batch loss for AR models, and for MAR
  models up to the different normalisation of the masked means.
  """
  batch = images.shape[0]
  if batch % accum_steps:
    raise ValueError(f"batch {batch} is not divisible by grad_accum_steps={accum_steps}")

  def split(x: jax.Array) -> jax.Array:
    return jnp.swapaxes(x.reshape(batch // accum_steps, accum_steps, *x.shape[1:]), 0, 1)

  def body(carry: Any, micro: tuple[jax.Array, jax.Array, jax.Array]) -> tuple[Any, None]:
    aux_sum, grad_sum = carry
    micro_images, micro_labels, index = micro
    micro_key = jax.random.fold_in(key, index)
    aux, grads = _loss_and_grads(model, params, micro_images, micro_labels, micro_key, arrangement)
    return (jax.tree.map(jnp.add, aux_sum, aux), jax.tree.map(jnp.add, grad_sum, grads)), None

  aux_shape, _ = jax.eval_shape(
    lambda: _loss_and_grads(model, params, split(images)[0], split(labels)[0], key, arrangement)
  )
  zeros = (jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), aux_shape), jax.tree.map(jnp.zeros_like, params))
  (aux_sum, grad_sum), _ = jax.lax.scan(body, zeros, (split(images), split(labels), jnp.arange(accum_steps)))
  scale = 1.0 / accum_steps
  return jax.tree.map(lambda x: x * scale, aux_sum), jax.tree.map(lambda g: g * scale, grad_sum)


def train_step(
  model: fractal.FractalModel,
  optimizer: optax.GradientTransformation,
  state: TrainState,
  images: jax.Array,
  labels: jax.Array,
  key: jax.Array,
  *,
  accum_steps: int = 1,
  ema_decay: float | None = None,
  batch_shards: int = 1,
  axis_rules: Sequence[tuple[str, Any]] = (),
) -> tuple[TrainState, dict[str, jax.Array]]:
  """One step on a batch.

  Args:
    images: [B, S, S, 3] uint8, or float ImageNet-normalised.
    labels: int [B].
    key: the run's key; this step uses `fold_in(key, state.step)`.
    accum_steps: split the batch into this many micro-batches (gradient
      accumulation: the same update with less activation memory).
    ema_decay: decay of `state.ema_params`: required when the state has them
      (EMA on, `init_state(..., ema=True)`), None when it does not.
    batch_shards: devices the batch is split over (`mesh.batch_size_per_step`):
      the loss compacts the items of each shard on its own, so that the
      sorts and gathers stay on-device (`compaction.CompactedItems`).
    axis_rules: logical axis -> mesh axes (`config.sharding_rules`), in force
      while the loss is traced: the model lays every level's items along
      "batch" (none: the partitioner decides).

  Returns:
    (new state, metrics): `loss`, `pixel_loss`, `pixel_ce_{r,g,b}`,
    `guide_loss_<level>` (with a guiding pixel), `grad_norm` (float32
    scalars) and `finite` (bool: False means the state was left unchanged).

  Raises:
    ValueError: `ema_decay` is None for a state with EMA parameters, or given for one without.
  """
  if state.ema_params is not None and ema_decay is None:
    raise ValueError("the state has EMA parameters (init_state(..., ema=True)): pass their ema_decay")
  if state.ema_params is None and ema_decay is not None:
    raise ValueError(f"ema_decay={ema_decay} given, but the state has no EMA parameters (init_state(..., ema=False))")
  step_key = jax.random.fold_in(key, state.step)
  arrangement = compaction.CompactedItems(groups=batch_shards)
  with nn.logical_axis_rules(tuple(tuple(rule) for rule in axis_rules)):
    if accum_steps == 1:
      aux, grads = _loss_and_grads(model, state.params, images, labels, step_key, arrangement)
    else:
      aux, grads = _accumulated(model, state.params, images, labels, step_key, accum_steps, arrangement)
  updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  ema_params = state.ema_params
  if ema_params is not None:
    ema_params = optax.incremental_update(params, ema_params, step_size=1.0 - ema_decay)
  metrics = {k: v for k, v in aux.items() if k != "pixel_ce"}
  metrics.update({f"pixel_ce_{c}": aux["pixel_ce"][i] for i, c in enumerate("rgb")})
  metrics["grad_norm"] = optax.tree.norm(grads)
  # The update too: a bad learning rate or optimizer state shows up there first.
  finite = jnp.isfinite(metrics["loss"]) & jnp.isfinite(metrics["grad_norm"]) & jnp.isfinite(optax.tree.norm(updates))
  metrics["finite"] = finite
  new_state = TrainState(state.step + 1, params, opt_state, ema_params)
  # A non-finite step is dropped whole: the caller sees `finite` and stops.
  new_state = jax.tree.map(lambda new, old: jnp.where(finite, new, old), new_state, state)
  return new_state, metrics
