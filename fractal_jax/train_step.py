"""One optimisation step: the official training loss, AdamW, and metrics.

Pure: the state is a pytree and the step's randomness is
`fold_in(key, state.step)`, so a resumed run repeats an uninterrupted one.
Sharding (jit with in/out shardings over the mesh) is applied by the caller.
"""

from __future__ import annotations

from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax

from fractal_jax import fractal


@flax.struct.dataclass
class TrainState:
  step: jax.Array  # int32 scalar: optimisation steps done
  params: Any
  opt_state: Any


def init_state(params: Any, optimizer: optax.GradientTransformation) -> TrainState:
  return TrainState(jnp.zeros((), jnp.int32), params, optimizer.init(params))


def train_step(
  model: fractal.FractalModel,
  optimizer: optax.GradientTransformation,
  state: TrainState,
  images: jax.Array,
  labels: jax.Array,
  key: jax.Array,
) -> tuple[TrainState, dict[str, jax.Array]]:
  """One step on a batch.

  Args:
    images: [B, S, S, 3] float, ImageNet-normalised.
    labels: int [B].
    key: the run's key; this step uses `fold_in(key, state.step)`.

  Returns:
    (new state, metrics): `loss`, `pixel_loss`, `pixel_ce_{r,g,b}`,
    `guide_loss_<level>` (with a guiding pixel) and `grad_norm`, float32 scalars.
  """
  step_key = jax.random.fold_in(key, state.step)

  def loss_fn(params: Any) -> tuple[jax.Array, dict[str, jax.Array]]:
    return model.apply({"params": params}, images, labels, train=True, rngs=fractal.make_rngs(step_key))

  (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  metrics = {k: v for k, v in aux.items() if k != "pixel_ce"}
  metrics.update({f"pixel_ce_{c}": aux["pixel_ce"][i] for i, c in enumerate("rgb")})
  metrics["loss"] = loss
  metrics["grad_norm"] = optax.tree.norm(grads)
  return TrainState(state.step + 1, params, opt_state), metrics
