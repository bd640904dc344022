"""`python -m fractal_jax.main`: summary output and input errors."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
from conftest import ROOT
from test_config import OFFICIAL_COUNTS


def run_main(*args: str) -> subprocess.CompletedProcess:
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  return subprocess.run(
    [sys.executable, "-m", "fractal_jax.main", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
  )


@pytest.mark.parametrize("name", sorted(OFFICIAL_COUNTS))
def test_summary_prints_official_counts(name):
  result = run_main(f"--config=configs/{name}.py", "--mode=summary", "--no_flops")
  assert result.returncode == 0, result.stderr
  assert f"parameters: {OFFICIAL_COUNTS[name]:,}" in result.stdout


def test_summary_table_with_flops():
  result = run_main("--config=configs/tiny.py", "--mode=summary")
  assert result.returncode == 0, result.stderr
  rows = {line.split()[0] + line.split()[1]: line for line in result.stdout.splitlines() if line.startswith("level")}
  assert set(rows) == {"leveltype", "level0", "level1", "level2"}
  assert " mar " in rows["level0"] and " ar " in rows["level1"] and " pixel " in rows["level2"]
  total = [line for line in result.stdout.splitlines() if line.startswith("total")][0]
  gflops = float(total.split()[-1])
  assert 0 < gflops < 1
  level_flops = [float(rows[k].split()[-1]) for k in ("level0", "level1", "level2")]
  assert abs(sum(level_flops) - gflops) < 0.02


def test_config_override_changes_the_model():
  result = run_main("--config=configs/tiny.py", "--mode=summary", "--no_flops", "--config.model.depths=(2,1,1)")
  assert result.returncode == 0, result.stderr
  count = int(re.search(r"parameters: ([\d,]+)", result.stdout).group(1).replace(",", ""))
  base = int(
    re.search(r"parameters: ([\d,]+)", run_main("--config=configs/tiny.py", "--mode=summary", "--no_flops").stdout)
    .group(1)
    .replace(",", "")
  )
  assert count > base


def test_bad_config_value_is_a_clear_error():
  result = run_main("--config=configs/tiny.py", "--config.model.num_conds=7")
  assert result.returncode == 2
  assert "error: num_conds must be an integer in 1..5" in result.stderr
  assert "Traceback" not in result.stderr


def test_missing_config_file_is_a_clear_error():
  result = run_main("--config=configs/nope.py")
  assert result.returncode == 2
  assert "error: config file 'configs/nope.py' not found" in result.stderr
  assert "Traceback" not in result.stderr
