"""Run by tests/test_sharding.py in a subprocess with 8 simulated CPU devices.

Samples the same images on one device and sharded over an 8-device mesh
(with `sampler.sample`, and with the ahead-of-time compiled `loaded` sampler),
and checks that they are identical. Exits non-zero on a mismatch.
"""

from __future__ import annotations

import os
import sys

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))
import tiny_models  # noqa: E402

from fractal_jax.config import base_config  # noqa: E402
from fractal_jax.model import fractal  # noqa: E402
from fractal_jax.parallel import mesh  # noqa: E402
from fractal_jax.sampling import loaded, sampler  # noqa: E402


def main() -> None:
  assert jax.device_count() == 8, jax.devices()
  s = tiny_models.settings("mar_mar")
  model = fractal.build(s)
  params = tiny_models.init_params(s)
  plan = sampler.make_plan(s, (4, 3), cfg=2.0, record_frames=True)
  labels = jnp.arange(8) % 7
  single, single_frames = sampler.sample(model, params, labels, jax.random.key(3), plan, cfg=2.0)
  device_mesh = mesh.make_mesh((-1, 2, 1))
  sharded, sharded_frames = sampler.sample(model, params, labels, jax.random.key(3), plan, cfg=2.0, mesh=device_mesh)
  assert len(sharded.sharding.device_set) == 8, sharded.sharding
  np.testing.assert_array_equal(np.asarray(single), np.asarray(sharded))
  np.testing.assert_array_equal(np.asarray(single_frames), np.asarray(sharded_frames))
  sample_cfg = base_config().sample
  sample_cfg.update(num_iter=(4, 3), cfg=2.0)
  ready = loaded.from_params(s, sample_cfg, params, device_mesh, batch_size=5, record_frames=True)  # rounded to 8
  compiled, compiled_frames = ready(np.asarray(labels[:5]), 0, jax.random.key(3))
  assert ready.batch_size == 8 and len(compiled.sharding.device_set) == 8, compiled.sharding
  np.testing.assert_array_equal(np.asarray(compiled)[:5], np.asarray(single)[:5])
  np.testing.assert_array_equal(np.asarray(compiled_frames)[:, :5], np.asarray(single_frames)[:, :5])
  try:
    sampler.sample(model, params, labels[:6], jax.random.key(3), plan, cfg=2.0, mesh=device_mesh)
  except sampler.SampleError as error:
    assert "not a multiple of the 8 devices" in str(error)
  else:
    raise AssertionError("a batch of 6 on 8 devices must be refused")
  print("sharded sampling equals single-device sampling")


if __name__ == "__main__":
  main()
