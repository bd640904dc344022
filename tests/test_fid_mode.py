"""`--mode=ref_stats` and `--mode=fid` end to end on a checkpoint of the tests' training model (default_1.pt weights)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import tiny_models
from test_cli import run_main
from tiny_training import TINY_FLAGS, tiny_train_config

from fractal_jax.io import model_checkpoint
from fractal_jax.model import model_config

EVAL = ("--config.eval.batch_size=20", "--config.eval.max_images=40", "--config.sample.batch_size=10")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
  """Random parameters of the tests' training model (TINY_FLAGS), saved as a converted checkpoint (no compiling)."""
  model = tiny_train_config().model
  directory = tmp_path_factory.mktemp("fid_ckpt") / "model"
  model_checkpoint.save_params(directory, tiny_models.init_params(model_config.settings(model)), model)
  return directory


@pytest.fixture(scope="module")
def ref_stats(tmp_path_factory):
  path = tmp_path_factory.mktemp("ref") / "digits_val.npz"
  result = run_main(*TINY_FLAGS, *EVAL, "--mode=ref_stats", "--split=val", f"--output={path}")
  assert result.returncode == 0, result.stderr[-3000:]
  return path


def test_ref_stats_writes_statistics_and_features(ref_stats):
  with np.load(ref_stats) as data:
    assert data["mu"].shape == (2048,) and data["sigma"].shape == (2048, 2048)
    assert data["features"].shape == (40, 2048)
    np.testing.assert_allclose(data["mu"], data["features"].mean(0), rtol=1e-4, atol=1e-5)


def test_fid_resumes_from_finished_shards_with_the_same_result(checkpoint, ref_stats, tmp_path):
  workdir = checkpoint
  run_dir, output = tmp_path / "fid", tmp_path / "fid.json"
  flags = (*TINY_FLAGS, *EVAL, "--mode=fid", f"--checkpoint={workdir}", "--num_images=20", f"--ref_stats={ref_stats}")
  first = run_main(*flags, f"--output_dir={run_dir}", f"--output={output}")
  assert first.returncode == 0, first.stderr[-3000:]
  figures = json.loads(output.read_text())
  assert figures["num_images"] == 20 and figures["fid"] > 0
  assert 0 <= figures["precision"] <= 1 and 0 <= figures["recall"] <= 1
  assert "inception_score" not in figures and "has no logits layer" in first.stdout  # default_1.pt: FID only
  shards = sorted(p.name for p in run_dir.glob("shard_*.npz"))
  assert shards == ["shard_00000.npz", "shard_00001.npz"]

  # The state a kill -9 during shard 1 leaves (shards are written to a temporary name, then renamed): shard 0
  # done, shard 1 absent or half-written under its temporary name. The rerun samples only shard 1.
  kept = (run_dir / "shard_00000.npz").stat().st_mtime_ns
  (run_dir / "shard_00001.npz").unlink()
  (run_dir / "shard_00001.tmp.npz").write_bytes(b"PK\x03\x04 truncated")
  second = run_main(*flags, f"--output_dir={run_dir}", f"--output={output}")
  assert second.returncode == 0, second.stderr[-3000:]
  assert "1 shards already done" in second.stdout
  assert (run_dir / "shard_00000.npz").stat().st_mtime_ns == kept
  again = json.loads(output.read_text())
  assert again["fid"] == pytest.approx(figures["fid"], rel=1e-6)
  assert again["precision"] == figures["precision"] and again["recall"] == figures["recall"]


@pytest.mark.parametrize(
  "flags, message",
  [
    (("--inception=/nonexistent/pt_inception.pth",), "pt_inception"),
    (("--num_images=15",), "not a multiple of the 10 classes"),
    (("--ref_stats={bad}",), "do not fit 2048-d features"),
  ],
)
def test_bad_fid_input_is_a_clear_error_before_sampling(checkpoint, tmp_path, flags, message):
  workdir = checkpoint
  np.savez(tmp_path / "bad.npz", mu=np.zeros(64), sigma=np.eye(64))
  args = [f.format(bad=tmp_path / "bad.npz") for f in flags]
  defaults = {"--num_images": "--num_images=20"}
  extra = [v for k, v in defaults.items() if not any(a.startswith(k) for a in args)]
  result = run_main(
    *TINY_FLAGS, "--mode=fid", f"--checkpoint={workdir}", f"--output_dir={tmp_path / 'out'}", *extra, *args
  )
  assert result.returncode == 2 and message in result.stderr, result.stderr[-2000:]
  assert "Traceback" not in result.stderr
  assert not list((tmp_path / "out").glob("shard_*")) if (tmp_path / "out").exists() else True
