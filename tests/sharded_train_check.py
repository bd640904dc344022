"""Run by tests/test_sharding.py in a subprocess with 8 simulated CPU devices.

One training step with the batch split over a (data=4, fsdp=2) mesh and
replicated state equals the same step on one device. Exits non-zero otherwise.
"""

from __future__ import annotations

import functools
import os
import sys

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))
import tiny_models  # noqa: E402

from fractal_jax import fractal, mesh, optimizer, train_step  # noqa: E402


def main() -> None:
  assert jax.device_count() == 8, jax.devices()
  s = tiny_models.settings("mar_2")
  model = fractal.build(s)
  opt = optimizer.make_optimizer(optimizer.learning_rate_schedule(1e-3, 2, 10))
  state = train_step.init_state(tiny_models.init_params(s), opt)
  images = tiny_models.images_8bit(jax.random.key(0), 8, s.img_size)
  labels = jnp.arange(8) % s.num_classes
  step = functools.partial(train_step.train_step, model, opt)
  key = jax.random.key(1)

  single_state, single_metrics = jax.jit(step)(state, images, labels, key)

  device_mesh = mesh.make_mesh((4, 2, 1))
  replicated = mesh.replicated(device_mesh)
  batch = NamedSharding(device_mesh, mesh.batch_spec())
  sharded_step = jax.jit(
    step,
    in_shardings=(replicated, batch, batch, replicated),
    out_shardings=(replicated, replicated),
  )
  with jax.set_mesh(device_mesh):
    sharded_state, sharded_metrics = sharded_step(
      jax.device_put(state, replicated), jax.device_put(images, batch), jax.device_put(labels, batch), key
    )
  np.testing.assert_allclose(sharded_metrics["loss"], single_metrics["loss"], rtol=1e-5)
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6),
    sharded_state.params,
    single_state.params,
  )
  print("sharded train step equals single-device step")


if __name__ == "__main__":
  main()
