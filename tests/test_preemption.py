"""SIGTERM to one host of a two-process run (127.0.0.1): every host saves the same step and exits 0; the resumed run
equals an uninterrupted one."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time

import jax
import numpy as np
import pytest
from conftest import ROOT
from tiny_training import TINY_FLAGS, tiny_train_config

from fractal_jax.io import model_checkpoint
from fractal_jax.train import metric_writers

MAX_STEPS = 500  # the preempted run would stop here; the signal stops it within seconds, a few steps in


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


class Pair:
  """Two processes of `fractal_jax.main` training one workdir together; stderr goes to files (it can be long)."""

  def __init__(self, workdir, logs, *flags: str) -> None:
    port = _free_port()
    self.processes, self.stderr = [], []
    for i in range(2):
      env = dict(
        os.environ,
        JAX_PLATFORMS="cpu",
        JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
        JAX_NUM_PROCESSES="2",
        JAX_PROCESS_ID=str(i),
      )
      command = [sys.executable, "-m", "fractal_jax.main", *TINY_FLAGS, f"--workdir={workdir}", *flags]
      err = open(logs / f"{workdir.name}_{i}_{time.time_ns()}.err", "w+")  # noqa: SIM115 (closed in finish)
      self.stderr.append(err)
      self.processes.append(subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=err, text=True))
    self.lines: list[list[str]] = [[], []]
    self._readers = [threading.Thread(target=self._read, args=(i,), daemon=True) for i in range(2)]
    for reader in self._readers:
      reader.start()

  def _read(self, i: int) -> None:
    for line in self.processes[i].stdout:
      self.lines[i].append(line.rstrip("\n"))

  def wait_for_line(self, i: int, prefix: str, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while not any(line.startswith(prefix) for line in self.lines[i]):
      if self.processes[i].poll() is not None or time.time() > deadline:
        raise AssertionError(f"process {i} printed no {prefix!r} line: {self.finish()}")
      time.sleep(0.05)

  def finish(self, timeout: float = 300) -> list[tuple[int, list[str], str]]:
    """(exit status, stdout lines, stderr tail) of each process, once both ended."""
    out = []
    for process, reader, err in zip(self.processes, self._readers, self.stderr):
      try:
        process.wait(timeout=timeout)
      except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
      reader.join(timeout=10)
      err.seek(0)
      out.append((process.returncode, self.lines[len(out)], err.read()[-3000:]))
      err.close()
    return out


def losses(workdir) -> dict[int, float]:
  return {int(r["step"]): r["loss"] for r in metric_writers.read_jsonl(workdir) if "loss" in r}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """A two-process run whose process 1 alone gets SIGTERM at step 3; then, together, that run resumed and an
  uninterrupted one, both to 2 steps past the preempted one's checkpoint."""
  base = tmp_path_factory.mktemp("preemption")
  reference, preempted = base / "reference", base / "preempted"
  pair = Pair(preempted, base, f"--stop_at_step={MAX_STEPS}")
  pair.wait_for_line(0, "step 3/")
  pair.processes[1].send_signal(signal.SIGTERM)
  stopped = pair.finish()
  saved = [[line for line in lines if line.startswith("SIGTERM: checkpointed step")] for _, lines, _ in stopped]
  assert saved[0] and saved[1], f"no SIGTERM checkpoint: {stopped}"
  steps = [int(lines[0].split()[3]) for lines in saved]
  end = max(steps) + 2
  resuming, uninterrupted = (
    Pair(preempted, base, f"--stop_at_step={end}"),
    Pair(reference, base, f"--stop_at_step={end}"),
  )
  resumed, finished = resuming.finish(), uninterrupted.finish()
  return dict(
    reference=reference, preempted=preempted, stopped=stopped, steps=steps, end=end, resumed=resumed, finished=finished
  )


def test_only_one_host_signalled_both_save_the_same_step_and_exit_0(runs):
  for rc, _, err in runs["stopped"]:
    assert rc == 0, err
  steps = runs["steps"]
  assert steps[0] == steps[1] < MAX_STEPS
  assert steps[0] in model_checkpoint.all_steps(runs["preempted"] / "checkpoints")  # (and the resumed run's end)
  data = runs["preempted"] / "checkpoints" / str(steps[0]) / "data"
  assert sorted(p.name for p in data.glob("process_*")) == ["process_0-of-2.json", "process_1-of-2.json"]


def test_resumed_after_preemption_equals_uninterrupted(runs):
  end = runs["end"]
  for rc, _, err in runs["resumed"] + runs["finished"]:
    assert rc == 0, err
  assert any(line.startswith("resumed from") for line in runs["resumed"][0][1])
  finals = [
    [line.split(": ", 1)[1] for line in lines if line.startswith("process ")] for _, lines, _ in runs["resumed"]
  ]
  reference = [
    [line.split(": ", 1)[1] for line in lines if line.startswith("process ")] for _, lines, _ in runs["finished"]
  ]
  assert finals[0] == finals[1] == reference[0] == reference[1] == [reference[0][0]], (finals, reference)
  model = tiny_train_config().model
  ours = model_checkpoint.load_params(runs["preempted"], model)
  theirs = model_checkpoint.load_params(runs["reference"], model)
  jax.tree.map(np.testing.assert_array_equal, ours, theirs)
  ours_losses, reference_losses = losses(runs["preempted"]), losses(runs["reference"])
  assert sorted(ours_losses) == sorted(reference_losses) == list(range(1, end + 1))
  np.testing.assert_array_equal(
    [ours_losses[s] for s in range(1, end + 1)], [reference_losses[s] for s in range(1, end + 1)]
  )
