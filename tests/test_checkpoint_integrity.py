"""A newest checkpoint that does not restore: one line, training resumes from the step before, reading modes name it."""

from __future__ import annotations

import shutil

import jax
import numpy as np
import pytest
from tiny_training import tiny_train_config

from fractal_jax.io import model_checkpoint
from fractal_jax.train import metric_writers, trainer


def files(step_dir) -> dict[str, int]:
  return {str(p.relative_to(step_dir)): p.stat().st_size for p in sorted(step_dir.rglob("*")) if p.is_file()}


def truncate_data_files(step_dir) -> None:
  """Cuts every array data file of a step to a fifth (what a full disk or a killed copy leaves).

  Every file, not the few largest: how OCDBT spreads a step's arrays over its data files varies from run to
  run, so the largest files of a step may all belong to one item (the optimizer state) and leave the
  parameters readable.
  """
  for path in step_dir.rglob("*"):
    if path.is_file() and path.parent.name == "d":
      path.write_bytes(path.read_bytes()[: path.stat().st_size // 5])


@pytest.fixture(scope="module")
def six_steps(tmp_path_factory):
  """Six steps of the tests' training setup, checkpointed at steps 3 and 6."""
  workdir = tmp_path_factory.mktemp("six_steps") / "run"
  trainer.train(tiny_train_config(checkpoint_every_steps=3), str(workdir), stop_at_step=6)
  return workdir


def test_resume_sets_a_truncated_newest_step_aside_and_equals_a_resume_from_the_step_before(
  six_steps, tmp_path, capsys
):
  damaged, clean = tmp_path / "damaged", tmp_path / "clean"
  shutil.copytree(six_steps, damaged)
  shutil.copytree(six_steps, clean)
  shutil.rmtree(clean / "checkpoints" / "6")  # the run that step 3 resumes normally
  truncate_data_files(damaged / "checkpoints" / "6")
  kept = files(damaged / "checkpoints" / "6")
  config = tiny_train_config(checkpoint_every_steps=3)
  capsys.readouterr()

  ours = trainer.train(config, str(damaged), stop_at_step=8)
  out = capsys.readouterr().out
  reports = [line for line in out.splitlines() if "does not restore" in line]
  assert len(reports) == 1, out
  assert reports[0].startswith("checkpoint step 6 does not restore (") and reports[0].endswith("resuming from step 3")
  assert f"kept as {damaged / 'checkpoints' / '6.unreadable'}" in reports[0]
  assert f"resumed from {damaged / 'checkpoints' / '3'}" in out
  assert files(damaged / "checkpoints" / "6.unreadable") == kept  # set aside as it was, not deleted or repaired

  theirs = trainer.train(config, str(clean), stop_at_step=8)
  assert ours["train/loss"] == theirs["train/loss"]
  ours_params = model_checkpoint.load_params(damaged, config.model)
  theirs_params = model_checkpoint.load_params(clean, config.model)
  jax.tree.map(np.testing.assert_array_equal, ours_params, theirs_params)
  logged = lambda run: {r["step"]: r["loss"] for r in metric_writers.read_jsonl(run) if "loss" in r}  # noqa: E731
  assert logged(damaged) == logged(clean)
  assert model_checkpoint.all_steps(damaged / "checkpoints") == [3, 6, 8]  # step 6 written again, from step 3


def test_reading_modes_name_the_unreadable_step_and_the_step_to_use(six_steps, tmp_path):
  damaged = tmp_path / "damaged"
  shutil.copytree(six_steps, damaged)
  truncate_data_files(damaged / "checkpoints" / "6")
  model = tiny_train_config().model
  with pytest.raises(model_checkpoint.UnreadableCheckpointError) as info:
    model_checkpoint.load_params(damaged, model)
  message = str(info.value)
  assert message.startswith(f"checkpoint {damaged / 'checkpoints'} step 6 does not restore (")
  assert message.endswith("read the step before it with --step=3") and "\n" not in message
  assert "tensorstore_spec" not in message and "See full TensorStore details" not in message and len(message) < 500
  assert model_checkpoint.load_params(damaged, model, step=3)  # --step
  assert sorted(p.name for p in (damaged / "checkpoints").iterdir()) == ["3", "6"]  # reading moves nothing


def test_no_step_restores_stops_the_run_and_moves_nothing(six_steps, tmp_path):
  damaged = tmp_path / "damaged"
  shutil.copytree(six_steps, damaged)
  for step in ("3", "6"):
    truncate_data_files(damaged / "checkpoints" / step)
  before = files(damaged / "checkpoints")
  with pytest.raises(model_checkpoint.UnreadableCheckpointError, match="step 6 does not restore"):
    trainer.train(tiny_train_config(checkpoint_every_steps=3), str(damaged), stop_at_step=8)
  assert files(damaged / "checkpoints") == before


def test_failure_reason_is_the_innermost_cause_on_one_short_line():
  try:
    try:
      raise ValueError("OUT_OF_RANGE: Error reading \"x/0.0\": not valid for value of size 100 [tensorstore_spec='{}']")
    except ValueError as inner:
      raise Exception(
        "Encountered error while reading array index. See full TensorStore details: <60 lines>"
      ) from inner
  except Exception as error:  # noqa: BLE001
    reason = model_checkpoint.failure_reason(error)
  assert reason == 'ValueError: OUT_OF_RANGE: Error reading "x/0.0": not valid for value of size 100'
  long = model_checkpoint.failure_reason(OSError("a" * 1000 + "\nthe end"))
  assert len(long) < 260 and long.startswith("OSError: aaa") and long.endswith("the end") and "\n" not in long
