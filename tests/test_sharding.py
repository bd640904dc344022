"""The mesh helper, and sampling sharded over 8 simulated devices (in a subprocess)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from conftest import ROOT

from fractal_jax.parallel import mesh


def test_resolve_shape():
  assert mesh.resolve_shape((-1, 1, 1), 8) == (8, 1, 1)
  assert mesh.resolve_shape((2, -1, 1), 8) == (2, 4, 1)
  with pytest.raises(mesh.MeshError, match="has 4 devices but 8 are available"):
    mesh.resolve_shape((2, 2, 1), 8)
  with pytest.raises(mesh.MeshError, match="cannot fill 8 devices"):
    mesh.resolve_shape((3, -1, 1), 8)
  with pytest.raises(mesh.MeshError, match="at most one -1"):
    mesh.resolve_shape((-1, -1, 1), 8)


def _run_on_8_devices(script: str, *args: str) -> subprocess.CompletedProcess:
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  command = [sys.executable, str(ROOT / "tests" / script), *args]
  return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def test_sharded_sampling_equals_single_device():
  result = _run_on_8_devices("sharded_sampling_check.py")
  assert result.returncode == 0, result.stdout + result.stderr
  assert "sharded sampling equals single-device sampling" in result.stdout


def test_data_parallel_train_step_equals_single_device():
  result = _run_on_8_devices("sharded_train_check.py")
  assert result.returncode == 0, result.stdout + result.stderr
  assert "sharded train step equals single-device step" in result.stdout
