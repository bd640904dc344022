"""`--mode=aot`: TPU slice names, and compiling the tiny config for a TPU slice on this CPU-only machine (libtpu).

The compile runs as a user runs it (a subprocess of `python -m fractal_jax.main`); a batch too large for the
chip's HBM is refused with exit status 2 and one line naming the settings to change.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from conftest import ROOT

from fractal_jax.parallel import accelerators

TINY = str(ROOT / "configs" / "tiny.py")


@pytest.mark.parametrize(
  "name, topology, host_bounds",
  [
    ("v5p-8", "v5p:2x2x1", None),
    ("v5p-16", "v5p:2x2x2", None),
    ("v5p-32", "v5p:2x2x4", None),
    ("v5p-64", "v5p:2x4x4", None),
    ("v5p-128", "v5p:4x4x4", None),
    ("v5litepod-4", "v5e:2x2", (2, 2, 1)),
    ("v5litepod-8", "v5e:2x4", (2, 4, 1)),
    ("v5e-16", "v5e:4x4", None),
    ("v5litepod-32", "v5e:4x8", None),
    ("v5litepod-64", "v5e:8x8", None),
    ("v5litepod-256", "v5e:16x16", None),
    ("v6e-8", "v6e:2x4", (2, 4, 1)),
    ("V6E-16", "v6e:4x4", None),
    ("v5p:2x2x2", "v5p:2x2x2", None),
  ],
)
def test_slice_names_map_to_libtpu_topologies(name, topology, host_bounds):
  slice_ = accelerators.parse_slice(name)
  assert (slice_.topology, slice_.chips_per_host_bounds) == (topology, host_bounds)
  assert accelerators.parse_slice(slice_.accelerator_type).topology == topology  # the Cloud TPU name round-trips


@pytest.mark.parametrize(
  "name, message",
  [
    ("v4-8", "v4 is not supported"),
    ("v5p-12", "no 12-TensorCores v5p slice"),
    ("h100x8", "GPUs cannot be compiled for without one"),
    ("tpu-8", "not a TPU slice name"),
  ],
)
def test_unusable_slice_names_are_refused_with_the_reason(name, message):
  with pytest.raises(accelerators.TopologyError, match=message):
    accelerators.parse_slice(name)


def _aot(tmp_path, *flags):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  command = [sys.executable, "-m", "fractal_jax.main", f"--config={TINY}", "--mode=aot", *flags]
  return subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)


def test_tiny_config_compiles_for_a_tpu_slice(tmp_path):
  output = tmp_path / "aot.json"
  result = _aot(tmp_path, "--topology=v5litepod-4", "--config.train.global_batch=8", f"--output={output}")
  assert result.returncode == 0, result.stdout + result.stderr
  assert "v5litepod-4 (v5e:2x2): 4 chips TPU v5e" in result.stdout
  assert "kernels standard" in result.stdout  # the TPU's operations, not the CPU-tuned ones
  figures = json.loads(output.read_text())
  chip = accelerators.CHIPS["TPU v5 lite"]
  for program in ("train_step", "sampler"):
    report = figures[program]
    assert 0 < report["total_bytes"] < chip.hbm_bytes
    assert report["flops"] > 0 and report["model_flops"] > 0 and report["seconds"] > 0
    assert report["code_bytes"] > 0  # the compiled program's code, reported beside its memory
  train = figures["train_step"]
  # The step holds its parameters and AdamW moments (data parallel: each chip all of them; 46,112 float32).
  assert train["parameter_bytes"] == 46_112 * 4 and train["optimizer_bytes"] >= 2 * train["parameter_bytes"]
  assert train["flops"] > train["model_flops"] and train["hbm_bytes"] > 0
  assert result.stderr.count("\n") <= 2, result.stderr  # libtpu's start-up chatter is silenced


def test_a_batch_too_large_for_the_chip_is_refused(tmp_path):
  result = _aot(tmp_path, "--topology=v5litepod-4", "--config.train.global_batch=2097152")
  assert result.returncode == 2, result.stdout + result.stderr
  lines = result.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("error: the train step"), result.stderr
  assert "config.train.grad_accum_steps" in lines[0] and "remat_policy=full" in lines[0]
  assert "config.model.item_chunks, now ()" in lines[0]


def test_without_a_topology_it_needs_attached_chips(tmp_path):
  # No --topology: the chips attached to the machine (a TPU VM, a GPU machine); on this CPU-only one a single line
  # says what to do, before any compile.
  result = _aot(tmp_path)
  assert result.returncode == 2, result.stdout + result.stderr
  lines = result.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("error: no TPU or GPU is attached here"), result.stderr
  assert "--topology" in lines[0] and "v5p-64" in lines[0] and not result.stdout


TEMPORARIES = """
import json, sys
from fractal_jax.config import load_config_file
from fractal_jax.model import model_config
from fractal_jax.parallel import accelerators, mesh
from fractal_jax.train import aot
out = {}
for rules in ("with", "without"):
  for name in ("v5litepod-4", "v5litepod-16"):
    config = load_config_file(sys.argv[1])
    config.mesh_shape = (1, -1, 1)  # FSDP: the parameters sharded over the devices the batch is split over
    if rules == "without":
      config.sharding_rules = tuple(rule for rule in config.sharding_rules if rule[0] != "batch")
    devices = accelerators.tpu_devices(accelerators.parse_slice(name))
    settings = model_config.settings(config.model, platform="tpu")
    step, _ = aot._compile_train_step(config, settings, mesh.make_mesh(config.mesh_shape, devices), 8 * len(devices), 1)
    out[f"{rules} {name}"] = step.memory_analysis().temp_size_in_bytes
print(json.dumps(out))
"""


def test_activations_stay_sharded_as_the_slice_grows(tmp_path):
  # 8 images per chip on 4 and on 16 chips: the same work per chip, so about the same temporaries, as long as
  # every level's activations stay split along "batch" (config.sharding_rules). Without that rule the
  # partitioner gathers the lower levels' activations onto every chip, and they grow with the slice.
  env = dict(os.environ, JAX_PLATFORMS="cpu", TPU_SKIP_MDS_QUERY="1")
  result = subprocess.run(
    [sys.executable, "-c", TEMPORARIES, TINY], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600
  )
  assert result.returncode == 0, result.stderr[-3000:]
  temps = json.loads(result.stdout.strip().splitlines()[-1])
  assert temps["with v5litepod-16"] <= 1.5 * temps["with v5litepod-4"], temps
  # Without it they grow with the slice (11.7 -> 129.4 MiB before short-sequence attention kept its items last,
  # 13.2 -> 22.1 MiB since: the gathered activations are smaller, not gone).
  assert temps["without v5litepod-16"] > 1.3 * temps["without v5litepod-4"], temps


def test_step_cost_from_shallow_stacks_equals_the_unrolled_count():
  # `step_cost` extrapolates FLOPs and bytes from copies of the step with every stack one or two blocks deep;
  # compiled whole and unrolled (what it replaces, too big to compile for FractalMAR-256) the count must agree.
  import dataclasses

  import jax

  from fractal_jax.config import load_config_file
  from fractal_jax.model import model_config
  from fractal_jax.parallel import mesh
  from fractal_jax.train import aot

  config = load_config_file(TINY)
  config.model.depths, config.model.kernels, config.model.remat_policy = (3, 1, 2), "standard", "full"
  settings = model_config.settings(config.model)
  assert aot._stack_depths(settings) == (3, 1, 0, 0, 2)  # the levels', their guiding-pixel heads', the pixel head's
  paper = model_config.settings(load_config_file(str(ROOT / "configs" / "fractalmar_base_256.py")).model)
  assert aot._stack_depths(paper) == (24, 6, 3, 0, 3, 3, 1)  # levels 1 and 2 have a guiding-pixel head
  cut = aot._with_stack_depths(paper, (1, 2, 1, 0, 2, 1, 1))
  assert aot._stack_depths(cut) == (1, 2, 1, 0, 2, 1, 1) and not cut.scan_blocks
  assert aot._item_chunks(paper) == (1, 1, 8, 8) and aot._item_chunks(cut) == (1, 1, 1, 1)
  device = jax.devices()[0]
  unrolled = dataclasses.replace(settings, scan_blocks=False)
  whole, _ = aot._compile_train_step(config, unrolled, mesh.make_mesh((1, 1, 1), [device]), 4, 1)
  config.model.item_chunks = (2, 2, 2)  # blocks over chunks of their items: a loop, the same FLOPs
  chunked = model_config.settings(config.model)
  np.testing.assert_allclose(aot.step_cost(config, chunked, device, 4), aot._cost(whole), rtol=1e-3)
