"""Training checkpoints: `<workdir>/checkpoints/<step>/`, written by orbax.

Items of a step (a superset of `checkpoint_io`'s, so `--checkpoint=<workdir>`
works for sampling and evaluation):
  * `params`, `config`: as in `checkpoint_io` (parameters, `config.model`);
  * `opt_state`: the optax state; `ema_params` when EMA is on;
  * `data`: the grain iterator state of every host (one JSON file each), so a
    resumed run reads the next unseen batch.
The step number is the directory name; the run's randomness is
`fold_in(key(config.seed), step)`, so nothing else is needed to resume.

Saves are asynchronous (training goes on while the arrays are written);
`keep` newest steps are kept plus every `keep_every`-th. The workdir may be
local or `gs://...` (shared by every host of a pod slice).

Resuming takes the newest step that restores. Newer steps that do not
(truncated or missing files, unreadable metadata) are reported in one line
each and set aside as `<step>.unreadable` beside the others, never deleted
(orbax ignores names that are not numbers, so the run can write that step
again). If no step restores, nothing is moved and the run stops: the cause is
then more likely the config than the files.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from typing import Any

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from jax.experimental import multihost_utils

from fractal_jax.io import model_checkpoint, paths
from fractal_jax.train import train_step

CHECKPOINT_SUBDIR = "checkpoints"
ASIDE_SUFFIX = ".unreadable"


def checkpoint_dir(workdir: str | os.PathLike) -> epath.Path:
  """`<workdir>/checkpoints`, local (absolute) or gs://."""
  return paths.path(workdir) / CHECKPOINT_SUBDIR


class _IteratorSnapshot:
  """A frozen `get_state()`: saves are asynchronous while the live iterator moves on.

  grain's handler writes `get_state()` of objects other than its own
  iterators as bytes, so the snapshot holds the state as JSON bytes.
  """

  def __init__(self, state: Any) -> None:
    self._state = json.dumps(state, indent=2).encode()

  def get_state(self) -> bytes:
    return self._state


class TrainCheckpointer:
  """Save / restore of `TrainState` plus the data iterator, in `<workdir>/checkpoints`."""

  def __init__(self, workdir: str | os.PathLike, keep: int = 3, keep_every: int = 0) -> None:
    options = ocp.CheckpointManagerOptions(
      max_to_keep=keep,
      keep_period=keep_every or None,
      enable_async_checkpointing=True,
      create=True,
    )
    self.directory = checkpoint_dir(workdir)
    self._manager = ocp.CheckpointManager(self.directory, options=options)

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def save(self, state: train_step.TrainState, data_state: Any, model_cfg: Any, *, wait: bool = False) -> None:
    """Starts writing `state` as step `state.step` (returns before the bytes are on disk unless `wait`)."""
    step = int(state.step)
    items = dict(
      params=ocp.args.StandardSave(state.params),
      opt_state=ocp.args.StandardSave(state.opt_state),
      config=ocp.args.JsonSave(model_checkpoint.model_dict(model_cfg)),
    )
    if state.ema_params is not None:
      items["ema_params"] = ocp.args.StandardSave(state.ema_params)
    if data_state is not None:
      items["data"] = grain.checkpoint.CheckpointSave(_IteratorSnapshot(data_state))
    self._manager.save(step, args=ocp.args.Composite(**items), force=True)
    if wait:
      self._manager.wait_until_finished()

  def restore_newest_readable(
    self, abstract_state: train_step.TrainState, iterator: Any | None, log: Callable[[str], None] = print
  ) -> train_step.TrainState | None:
    """The newest step that restores (None if there is no step), into the shapes and shardings of `abstract_state`.

    `iterator` gets that step's data state. Newer steps that do not restore are logged (one line each) and set
    aside as `<step>.unreadable` (process 0 moves them; every host agrees on each attempt's outcome).

    Raises:
      UnreadableCheckpointError: no step restores (nothing is moved).
    """
    failed: list[model_checkpoint.UnreadableCheckpointError] = []
    for step in sorted(self._manager.all_steps(), reverse=True):
      try:
        state, error = self.restore(step, abstract_state, iterator), None
      except model_checkpoint.UnreadableCheckpointError as caught:
        state, error = None, caught
      if not _everywhere(error is None):
        failed.append(error or model_checkpoint.UnreadableCheckpointError(self.directory, step, "on another host", []))
        continue
      for bad in failed:
        aside = self._set_aside(bad.step)
        log(f"checkpoint step {bad.step} does not restore ({bad.reason}): kept as {aside}; resuming from step {step}")
      if failed:
        self._manager.reload()
      return state
    if failed:
      raise failed[0]
    return None

  def _set_aside(self, step: int) -> epath.Path:
    """Renames step `step` to `<step>.unreadable` (`-2`, `-3`... if taken) on process 0; returns the new name."""
    aside = self.directory / f"{step}{ASIDE_SUFFIX}"
    count = 1
    while aside.exists():
      count += 1
      aside = self.directory / f"{step}{ASIDE_SUFFIX}-{count}"
    if jax.process_index() == 0:
      (self.directory / str(step)).rename(aside)
    multihost_utils.sync_global_devices(f"set aside checkpoint step {step}")
    return aside

  def restore(self, step: int, abstract_state: train_step.TrainState, iterator: Any | None) -> train_step.TrainState:
    """Step `step` into the shapes and shardings of `abstract_state`; `iterator` gets its data state.

    Raises:
      UnreadableCheckpointError: the step does not restore.
    """
    items = dict(
      params=ocp.args.StandardRestore(abstract_state.params),
      opt_state=ocp.args.StandardRestore(abstract_state.opt_state),
    )
    if abstract_state.ema_params is not None:
      items["ema_params"] = ocp.args.StandardRestore(abstract_state.ema_params)
    if iterator is not None:
      items["data"] = grain.checkpoint.CheckpointRestore(iterator)
    restored = model_checkpoint.restore_step(self._manager, self.directory, step, ocp.args.Composite(**items))
    step_array = jax.device_put(jax.numpy.int32(step), abstract_state.step.sharding)
    return train_step.TrainState(
      step_array,
      restored["params"],
      restored["opt_state"],
      restored.get("ema_params") if "ema_params" in items else None,
    )

  def reached_preemption(self, step: int) -> bool:
    """Whether every host should checkpoint `step` and stop: orbax's preemption sync point (the same on all hosts)."""
    return self._manager.reached_preemption(step)

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()


def _everywhere(ok: bool) -> bool:
  """Whether `ok` holds on every process (a cheap all-reduce; just `ok` with one process)."""
  if jax.process_count() == 1:
    return ok
  return bool(np.all(multihost_utils.process_allgather(np.array([ok]))))
