"""`--mode=train` end to end: data, resume after kill -9, SIGTERM, NaN stop, init_from, two processes, bad input."""

from __future__ import annotations

import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tiny_models
from conftest import ROOT
from PIL import Image
from test_cli import run_main
from tiny_training import TINY_FLAGS, tiny_train_config

from fractal_jax.config import load_config_file
from fractal_jax.io import model_checkpoint
from fractal_jax.model import fractal, model_config
from fractal_jax.train import metric_writers, optimizer, state_checkpoint, train_step, trainer


def losses(workdir: pathlib.Path) -> dict[int, float]:
  """Step -> logged loss; a step logged twice (before a kill and after the resume) keeps the last value."""
  return {int(r["step"]): r["loss"] for r in metric_writers.read_jsonl(workdir) if "loss" in r}


def start(workdir: pathlib.Path, *flags: str, env: dict[str, str] | None = None) -> subprocess.Popen:
  command = [sys.executable, "-m", "fractal_jax.main", *TINY_FLAGS, f"--workdir={workdir}", *flags]
  env = dict(os.environ, JAX_PLATFORMS="cpu", **(env or {}))
  return subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for(condition, process: subprocess.Popen, timeout: float = 240.0) -> None:
  deadline = time.time() + timeout
  while not condition():
    if process.poll() is not None:
      raise AssertionError(f"process ended early ({process.returncode}): {process.stderr.read()[-3000:]}")
    if time.time() > deadline:
      process.kill()
      raise AssertionError("timed out")
    time.sleep(0.2)


def committed_steps(workdir: pathlib.Path) -> list[int]:
  directory = state_checkpoint.checkpoint_dir(workdir)
  if not directory.is_dir():
    return []
  return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit() and (p / "params").is_dir())


# --- in-process runs -------------------------------------------------------------------------


def test_two_steps_on_digits_write_a_checkpoint_sampling_can_read(digits_run):
  config, workdir, results = digits_run
  assert np.isfinite(results["train/loss"]) and results["train/step"] == 2
  assert 0 < results["eval/bits_per_dim"] < 10 and results["eval/num_images"] >= 16
  assert 0 <= results["eval/digits_accuracy"] <= 1 and results["eval/digits_frechet"] > 0
  assert results["eval/fid"] > 0  # the small FID against the fixture's statistics
  assert (workdir / "samples_0000002.png").is_file()
  assert committed_steps(workdir) == [2]
  records = metric_writers.read_jsonl(workdir)
  assert [r["step"] for r in records if "loss" in r] == [1, 2]
  assert any("eval/bits_per_dim" in r for r in records)
  params = model_checkpoint.load_params(workdir, config.model)  # a workdir is a checkpoint for the other modes
  assert fractal.count_params(params) > 0


def test_nll_mode_on_the_trained_checkpoint(digits_run, tmp_path):
  _, workdir, _ = digits_run
  output = tmp_path / "nll.json"
  result = run_main(
    *TINY_FLAGS,
    "--mode=nll",
    f"--checkpoint={workdir}",
    "--config.eval.nll_passes=2",
    "--config.eval.batch_size=50",
    "--config.eval.max_images=100",
    f"--output={output}",
  )
  assert result.returncode == 0, result.stderr[-3000:]
  figures = json.loads(output.read_text())
  assert 0 < figures["bits_per_dim"] < 10 and figures["num_images"] == 100
  assert f"bits/dim: {figures['bits_per_dim']:.4f}" in result.stdout


def _jpeg_tree(root: pathlib.Path, count: int = 12) -> None:
  rng = np.random.default_rng(0)
  for split in ("train", "val"):
    for c in range(2):
      folder = root / split / f"n0{c}"
      folder.mkdir(parents=True)
      for i in range(count // 2):
        size = tuple(int(x) for x in rng.integers(9, 40, 2))
        Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(folder / f"{i}.JPEG")


def test_one_step_on_an_image_folder(tmp_path):
  _jpeg_tree(tmp_path / "data")
  config = tiny_train_config()
  config.data.name = "imagefolder"
  config.data.root = str(tmp_path / "data")
  config.data.random_flip = True
  results = trainer.train(config, str(tmp_path / "run"), stop_at_step=1)
  assert np.isfinite(results["train/loss"]) and results["train/step"] == 1


def test_nan_stops_training_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
  def poisoned(peak_lr, warmup_steps, total_steps, min_lr=0.0):
    return lambda count: jnp.where(count >= 4, jnp.nan, 1e-3)  # the 5th update is NaN

  monkeypatch.setattr(optimizer, "learning_rate_schedule", poisoned)
  config = tiny_train_config(checkpoint_every_steps=2)
  with pytest.raises(trainer.TrainingError, match=r"non-finite loss at step 5.*newest checkpoint \(step 4\)"):
    trainer.train(config, str(tmp_path), stop_at_step=8)
  assert committed_steps(tmp_path) == [2, 4]
  params = model_checkpoint.load_params(tmp_path, config.model)
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(params))


def test_init_from_converted_weights_reproduces_their_loss(tmp_path):
  """The first step of a run started from a checkpoint has the loss those weights give on its batch."""
  config = tiny_train_config()
  settings = model_config.settings(config.model)
  model = fractal.build(settings)
  weights = jax.jit(lambda k: fractal.init_params(model, k))(jax.random.key(42))
  model_checkpoint.save_params(tmp_path / "converted", weights, config.model)
  config.train.init_from = str(tmp_path / "converted")
  results = trainer.train(config, str(tmp_path / "run"), stop_at_step=1)

  _, run_key = trainer.run_keys(config.seed)
  batch = next(iter(trainer.make_train_iterator(config, settings)))
  tx = optimizer.make_optimizer(optimizer.learning_rate_schedule(1e-3, 0, 1))
  state = train_step.init_state(weights, tx)
  _, metrics = jax.jit(lambda s, x, y: train_step.train_step(model, tx, s, x, y, run_key))(
    state, jnp.asarray(batch["image"]), jnp.asarray(batch["label"])
  )
  np.testing.assert_allclose(results["train/loss"], float(metrics["loss"]), rtol=1e-5)
  other = trainer.train(tiny_train_config(), str(tmp_path / "fresh"), stop_at_step=1)
  assert abs(other["train/loss"] - results["train/loss"]) > 1e-4  # the weights were really used


def test_init_from_with_other_classes_reinitialises_the_class_table(tmp_path):
  config = tiny_train_config()
  weights = tiny_models.init_params(model_config.settings(config.model), seed=1)
  model_checkpoint.save_params(tmp_path / "converted", weights, config.model)
  config.model.num_classes = 12  # fine-tuning on other classes
  config.train.init_from = str(tmp_path / "converted")
  fresh = tiny_models.init_params(model_config.settings(config.model), seed=2)
  loaded = trainer.init_from_weights(config, fresh)
  assert loaded["class_emb"] is fresh["class_emb"]
  assert jax.tree.structure(loaded) == jax.tree.structure(fresh)
  del loaded["class_emb"], weights["class_emb"]
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, np.asarray(b)), loaded, weights)


# --- subprocess runs: kill -9, SIGTERM, two processes ------------------------------------------


@pytest.fixture(scope="module")
def interrupted_runs(tmp_path_factory):
  """A reference run, and a run killed with SIGKILL after a checkpoint then resumed and stopped by SIGTERM.

  All with --seed=5 (which overrides config.seed): the resumed run is the same run only with the same seed.
  """
  base = tmp_path_factory.mktemp("runs")
  flags = ("--config.train.checkpoint_every_steps=3", "--seed=5")
  reference, broken = base / "reference", base / "broken"
  ref_process, broken_process = start(reference, *flags), start(broken, *flags)
  wait_for(lambda: len(committed_steps(broken)) >= 1 and max(losses(broken), default=0) >= 4, broken_process)
  broken_process.send_signal(signal.SIGKILL)
  broken_process.wait()
  killed_at = max(losses(broken))
  wait_for(lambda: max(losses(reference), default=0) >= 12, ref_process)
  ref_process.kill()
  ref_process.wait()
  resumed = start(broken, *flags)
  wait_for(lambda: max(losses(broken), default=0) >= 12, resumed)
  resumed.send_signal(signal.SIGTERM)
  out, err = resumed.communicate(timeout=120)
  return dict(reference=reference, broken=broken, killed_at=killed_at, rc=resumed.returncode, out=out, err=err)


def test_resumed_after_kill_equals_uninterrupted(interrupted_runs):
  runs = interrupted_runs
  assert "resumed from" in runs["out"], runs["err"][-3000:]
  reference, resumed = losses(runs["reference"]), losses(runs["broken"])
  steps = [s for s in range(1, 13)]
  np.testing.assert_allclose([resumed[s] for s in steps], [reference[s] for s in steps], rtol=1e-6)


def test_seed_flag_changes_the_run(interrupted_runs, digits_run):
  """The runs with --seed=5 differ from the same training with config.seed 0 (the digits run) from the first step."""
  _, seed_0_workdir, _ = digits_run
  assert abs(losses(interrupted_runs["reference"])[1] - losses(seed_0_workdir)[1]) > 1e-3


def test_sigterm_checkpoints_the_current_step(interrupted_runs):
  runs = interrupted_runs
  assert runs["rc"] == 0, runs["err"][-3000:]
  line = [x for x in runs["out"].splitlines() if x.startswith("SIGTERM: checkpointed step")]
  assert line, runs["out"]
  step = int(line[0].split()[3])
  assert step >= 12 and step in committed_steps(runs["broken"])


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def test_two_processes_train_together(tmp_path):
  port = _free_port()
  processes = [
    start(
      tmp_path,
      "--stop_at_step=2",
      env=dict(JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES="2", JAX_PROCESS_ID=str(i)),
    )
    for i in range(2)
  ]
  outputs = [p.communicate(timeout=300) for p in processes]
  for process, (_, err) in zip(processes, outputs):
    assert process.returncode == 0, err[-3000:]
  finals = [[x.split(": ", 1)[1] for x in out.splitlines() if x.startswith("process ")] for out, _ in outputs]
  assert finals[0] and finals[0] == finals[1], finals  # the same step and loss on both hosts
  assert "2 host(s)" in outputs[0][0]
  data = state_checkpoint.checkpoint_dir(tmp_path) / "2" / "data"
  assert sorted(p.name for p in data.glob("process_*")) == ["process_0-of-2.json", "process_1-of-2.json"]


# --- bad input: clear errors before compiling, nothing written ------------------------------------


@pytest.mark.parametrize(
  "flags, message",
  [
    (("--config.data.name=imagefolder", "--config.data.root=/nonexistent/imagenet"), "/nonexistent/imagenet"),
    (("--config.data.name=tfds", "--config.data.tfds_data_dir={tmp}/tfds"), "tfds build"),
    (("--config.train.grad_accum_steps=3",), "not divisible by grad_accum_steps=3"),
    (("--config.mesh_shape=(2,1,1)",), "has 2 devices but 1 are available"),
    (("--config.train.warmup_steps=50", "--config.train.num_steps=10"), "warm-up of 50 steps"),
  ],
)
def test_bad_input_is_a_clear_error_and_writes_nothing(tmp_path, flags, message):
  workdir = tmp_path / "run"
  result = run_main(*TINY_FLAGS, f"--workdir={workdir}", "--stop_at_step=1", *[f.format(tmp=tmp_path) for f in flags])
  assert result.returncode == 2, result.stderr[-2000:]
  assert message in result.stderr and "Traceback" not in result.stderr, result.stderr[-2000:]
  assert not workdir.exists()


def test_workdir_of_another_model_is_refused(tmp_path):
  other = load_config_file(str(ROOT / "configs" / "tiny.py")).model
  other.widths = (16, 16, 16)
  model = fractal.build(model_config.settings(other))
  params = jax.jit(lambda k: fractal.init_params(model, k))(jax.random.key(0))
  model_checkpoint.save_params(state_checkpoint.checkpoint_dir(tmp_path), params, other)
  before = sorted(p.name for p in state_checkpoint.checkpoint_dir(tmp_path).iterdir())
  result = run_main(*TINY_FLAGS, f"--workdir={tmp_path}", "--stop_at_step=1")
  assert result.returncode == 2 and "widths" in result.stderr, result.stderr[-2000:]
  assert sorted(p.name for p in state_checkpoint.checkpoint_dir(tmp_path).iterdir()) == before


def test_batch_not_divisible_by_the_devices_is_a_clear_error(tmp_path):
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=3")
  command = [sys.executable, "-m", "fractal_jax.main", *TINY_FLAGS, f"--workdir={tmp_path / 'run'}"]
  result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert result.returncode == 2 and "not a multiple of the 3 devices" in result.stderr, result.stderr[-2000:]
  assert not (tmp_path / "run").exists()
