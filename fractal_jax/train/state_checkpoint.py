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
`keep` newest steps are kept plus every `keep_every`-th.
"""

from __future__ import annotations

import json
import os
import pathlib
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp

from fractal_jax.io import model_checkpoint
from fractal_jax.train import train_step

CHECKPOINT_SUBDIR = "checkpoints"


def checkpoint_dir(workdir: str | os.PathLike) -> pathlib.Path:
  return pathlib.Path(workdir).absolute() / CHECKPOINT_SUBDIR


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

  def restore(self, abstract_state: train_step.TrainState, iterator: Any | None) -> train_step.TrainState:
    """The newest step into the shapes and shardings of `abstract_state`; `iterator` gets its data state."""
    step = self._manager.latest_step()
    items = dict(
      params=ocp.args.StandardRestore(abstract_state.params),
      opt_state=ocp.args.StandardRestore(abstract_state.opt_state),
    )
    if abstract_state.ema_params is not None:
      items["ema_params"] = ocp.args.StandardRestore(abstract_state.ema_params)
    if iterator is not None:
      items["data"] = grain.checkpoint.CheckpointRestore(iterator)
    restored = self._manager.restore(step, args=ocp.args.Composite(**items))
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
