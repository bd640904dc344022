"""Run by tests/test_sharding.py in a subprocess with 8 simulated CPU devices.

1. One training step with the batch over a (data=4, fsdp=2) mesh and the
   parameters and optimizer state FSDP-sharded by the config's logical-axis
   rules equals the same step on one device (loss and updated parameters);
   with the argument `deep`, for a model whose levels 0 and 1 are 9-block
   scanned stacks (standard kernels, as on TPU), and nothing else.
2. With fsdp=8, a state created born-sharded (`jit(init, out_shardings)`)
   puts about 1/8 of the parameter and optimizer bytes on each device.
Exits non-zero otherwise.
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

from fractal_jax.model import fractal  # noqa: E402
from fractal_jax.parallel import mesh, sharding  # noqa: E402
from fractal_jax.train import optimizer, train_step  # noqa: E402


def state_shardings(model, opt, device_mesh):
  params = sharding.param_shardings(model, device_mesh)
  abstract = jax.eval_shape(lambda: fractal.init_params(model, jax.random.key(0)))
  replicated = mesh.replicated(device_mesh)
  return train_step.TrainState(replicated, params, sharding.opt_state_shardings(opt, params, abstract, device_mesh))


def check_step_equals_single_device(s) -> None:
  model = fractal.build(s)
  opt = optimizer.make_optimizer(optimizer.learning_rate_schedule(1e-3, 2, 10))
  state = train_step.init_state(tiny_models.init_params(s), opt)
  images = tiny_models.images_8bit(jax.random.key(0), 8, s.img_size)
  labels = jnp.arange(8) % s.num_classes
  step = functools.partial(train_step.train_step, model, opt)
  key = jax.random.key(1)
  single_state, single_metrics = jax.jit(step)(state, images, labels, key)

  device_mesh = mesh.make_mesh((4, 2, 1))
  shardings = state_shardings(model, opt, device_mesh)
  kernel = shardings.params["levels_0"]["layers"]["blocks"]["mlp"]["fc1"]["kernel"]
  assert kernel.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor"), kernel.spec  # [depth, D, 4D]
  replicated = mesh.replicated(device_mesh)
  batch = NamedSharding(device_mesh, mesh.batch_spec())
  # As the trainer: the loss compacts the items of each batch shard on its own.
  sharded_step = jax.jit(
    functools.partial(step, batch_shards=mesh.batch_size_per_step(device_mesh), axis_rules=sharding.default_rules()),
    in_shardings=(shardings, batch, batch, replicated),
    out_shardings=(shardings, replicated),
  )
  with jax.set_mesh(device_mesh):
    sharded_state, sharded_metrics = sharded_step(
      jax.device_put(state, shardings), jax.device_put(images, batch), jax.device_put(labels, batch), key
    )
  np.testing.assert_allclose(sharded_metrics["loss"], single_metrics["loss"], rtol=1e-5)
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6),
    sharded_state.params,
    single_state.params,
  )
  print("sharded train step equals single-device step")


def check_fsdp_memory() -> None:
  s = tiny_models.settings("mar_2", widths=(128, 64))
  model = fractal.build(s)
  opt = optimizer.make_optimizer(optimizer.learning_rate_schedule(1e-3, 2, 10))
  device_mesh = mesh.make_mesh((1, 8, 1))
  shardings = state_shardings(model, opt, device_mesh)
  with jax.set_mesh(device_mesh):
    state = jax.jit(lambda k: train_step.init_state(fractal.init_params(model, k), opt), out_shardings=shardings)(
      jax.random.key(0)
    )
  total = sum(x.nbytes for x in jax.tree.leaves((state.params, state.opt_state)))
  per_device = sharding.bytes_per_device((state.params, state.opt_state))
  assert len(per_device) == 8, per_device
  worst = max(per_device.values())
  print(f"fsdp=8: {total} bytes in all, at most {worst} per device ({worst / total:.3f} of the total)")
  assert worst < 1.2 * total / 8, (worst, total)
  # The same values as an unsharded init with the same key.
  reference = jax.jit(lambda k: fractal.init_params(model, k))(jax.random.key(0))
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), state.params, reference)
  print("fsdp=8 holds about 1/8 of the state per device")


if __name__ == "__main__":
  assert jax.device_count() == 8, jax.devices()
  if sys.argv[1:] == ["deep"]:  # levels 0 and 1 with 9 blocks, scanned as on TPU (standard kernels)
    check_step_equals_single_device(tiny_models.deep_settings("mar_mar", kernels="standard"))
  else:
    check_step_equals_single_device(tiny_models.settings("mar_2", widths=(16, 8)))
    check_fsdp_memory()
