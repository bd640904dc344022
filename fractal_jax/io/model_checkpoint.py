"""fractal-jax checkpoints: parameters plus the model config that built them.

A checkpoint is a directory managed by `orbax.checkpoint.CheckpointManager`;
every step `<directory>/<step>/` holds two items:
  * `params`: the `"params"` collection (`ocp.args.StandardSave`), always in
    the scanned layout (each level's blocks stacked along a leading [depth]
    axis), whatever `scan_blocks` the writer used;
  * `config`: `config.model.to_dict()` as JSON (tuples become lists).

`load_params` reads the stored config first and refuses a model config that
would give the parameters other shapes or meanings (`SHAPE_FIELDS`), naming
each differing field and the `--config` to use; settings of the computation
only (dtype, scan, remat, dropout) may differ. Leaves come back as host NumPy
arrays in the config's `param_dtype`.

Directories may be local or `gs://...` (`fractal_jax.io.paths`). A step that
does not restore (truncated or missing files, unreadable metadata) raises
`UnreadableCheckpointError`, one line naming the step and the `--step` to
read instead; `restore_step` is the one place that turns orbax's and
TensorStore's many ways of failing into it.
"""

from __future__ import annotations

import dataclasses
import gc
import os
import sys
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from fractal_jax import config as config_lib
from fractal_jax.io import paths, torch_layout
from fractal_jax.model import block_stack, fractal, model_config

PARAMS_ITEM = "params"
EMA_ITEM = "ema_params"  # training checkpoints with EMA on
CONFIG_ITEM = "config"
# config.model fields that decide the parameters' shapes or what they mean.
SHAPE_FIELDS = (
  "img_size_list",
  "widths",
  "depths",
  "heads",
  "types",
  "num_conds",
  "guiding_pixel",
  "num_classes",
)


class CheckpointError(ValueError):
  """A checkpoint directory that is missing, empty or unreadable; the message says what to do."""


class CheckpointMismatchError(CheckpointError):
  """The checkpoint was written for another model than the given config describes."""


class UnreadableCheckpointError(CheckpointError):
  """A step whose files do not restore; the message (one line) names it and the `--step` to read instead."""

  def __init__(self, directory: str | os.PathLike, step: int, reason: str, steps: list[int]) -> None:
    older = [s for s in sorted(steps) if s < step]
    advice = f"read the step before it with --step={older[-1]}" if older else "it has no older step to read instead"
    super().__init__(f"checkpoint {directory} step {step} does not restore ({reason}); {advice}")
    self.step, self.reason = step, reason


def failure_reason(error: BaseException, limit: int = 240) -> str:
  """One short line saying why a restore failed: the innermost cause, without TensorStore's specs.

  TensorStore wraps its errors (`Exception: Encountered error while reading
  array index ... See full TensorStore details: <a 60-line spec>`) around the
  one that says what is wrong (`OUT_OF_RANGE: ... not valid for value of size 100`).
  """
  causes = [error]
  while (causes[-1].__cause__ or causes[-1].__context__) is not None and len(causes) < 10:
    causes.append(causes[-1].__cause__ or causes[-1].__context__)
  innermost = causes[-1]
  text = str(innermost).split(" [tensorstore_spec=")[0].split(" See full TensorStore details")[0]
  text = " ".join(f"{type(innermost).__name__}: {text}".split())
  return text if len(text) <= limit else f"{text[: limit // 3]} ... {text[-(limit - limit // 3) :]}"


def _is_aborted_read_noise(error: BaseException | None, obj: Any = None) -> bool:
  """The echoes of a failed orbax restore that Python prints on stderr after it was reported.

  When one array of a step fails to read, orbax stops; the other reads still
  in flight then end in coroutines nobody awaits ("Exception ignored in:
  <coroutine object _read_array_index_and_device_put>") or call back into
  the closed event loop ("RuntimeError: Event loop is closed"): hundreds of
  lines that hide the one-line report.
  """
  code = getattr(obj, "cr_code", None)
  if code is not None and "orbax" in code.co_filename:
    return True
  return isinstance(error, RuntimeError) and str(error) == "Event loop is closed"


def _quiet_aborted_reads() -> None:
  """Installs (once) hooks that drop `_is_aborted_read_noise` and pass everything else on."""
  if getattr(sys.unraisablehook, "_fractal_quiet", False):
    return
  previous_unraisable, previous_except = sys.unraisablehook, sys.excepthook

  def unraisable(info: Any) -> None:
    if not _is_aborted_read_noise(info.exc_value, info.object):
      previous_unraisable(info)

  def excepthook(kind: type, value: BaseException, traceback: Any) -> None:
    if not _is_aborted_read_noise(value):
      previous_except(kind, value, traceback)

  unraisable._fractal_quiet = True  # type: ignore[attr-defined]
  sys.unraisablehook, sys.excepthook = unraisable, excepthook


def restore_step(manager: ocp.CheckpointManager, directory: str | os.PathLike, step: int, args: Any) -> Any:
  """`manager.restore(step, args=args)`; any failure becomes `UnreadableCheckpointError` (one line, no echoes).

  Catches every `Exception`: a damaged step fails as ValueError, JSONDecodeError, OSError, FileNotFoundError or
  TensorStore's bare Exception depending on which file is damaged and how.
  """
  _quiet_aborted_reads()
  try:
    return manager.restore(step, args=args)
  except Exception as error:  # noqa: BLE001 (see the docstring)
    reason = failure_reason(error)
  gc.collect()  # the aborted reads' coroutines, now, while the hooks drop them
  raise UnreadableCheckpointError(directory, step, reason, list(manager.all_steps()))


def _plain(value: Any) -> Any:
  """Tuples -> lists, recursively (what JSON stores and gives back)."""
  if isinstance(value, Mapping):
    return {k: _plain(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [_plain(v) for v in value]
  return value


def model_dict(model_cfg: Any) -> dict[str, Any]:
  """`config.model` (ConfigDict or mapping) as a JSON-ready dict."""
  return _plain(model_cfg.to_dict() if hasattr(model_cfg, "to_dict") else dict(model_cfg))


def _manager(directory: str | os.PathLike, read_only: bool) -> ocp.CheckpointManager:
  # For reading, `create=False` writes nothing (`read_only=True` would also, but logs warnings on every open).
  options = ocp.CheckpointManagerOptions(create=not read_only, enable_async_checkpointing=False)
  return ocp.CheckpointManager(paths.path(directory), options=options)


def save_params(directory: str | os.PathLike, params: Any, model_cfg: Any, step: int = 0) -> epath.Path:
  """Writes `params` and `model_cfg` as step `step` of the checkpoint `directory` (created if needed).

  Args:
    directory: checkpoint directory (local or gs://).
    params: the `"params"` collection of the model `model_cfg` describes
      (JAX or NumPy leaves; unscanned blocks if `model_cfg.scan_blocks` is off).
    model_cfg: `config.model`.
    step: the step number to write; it must not exist yet.

  Returns:
    The step's directory.

  Raises:
    ConfigError: `model_cfg` is invalid.
    LayoutError: `params` do not fit `model_cfg`, naming every bad leaf.
    CheckpointError: the step exists already.
  """
  model_settings = model_config.settings(model_cfg)
  if not model_settings.scan_blocks:
    params = block_stack.stack_block_params(params)
  torch_layout.check_param_shapes(params, dataclasses.replace(model_settings, scan_blocks=True))
  manager = _manager(directory, read_only=False)
  try:
    if step in manager.all_steps():
      raise CheckpointError(f"checkpoint {directory} already has step {step}; write to a new directory or step")
    items = dict(params=ocp.args.StandardSave(params), config=ocp.args.JsonSave(model_dict(model_cfg)))
    manager.save(step, args=ocp.args.Composite(**items), force=True)
    manager.wait_until_finished()
  finally:
    manager.close()
  return paths.path(directory) / str(step)


def resolve_directory(path: str | os.PathLike) -> epath.Path:
  """A training workdir means its `checkpoints/` subdirectory; any other path is the checkpoint directory."""
  path = paths.path(path)
  return path / "checkpoints" if (path / "checkpoints").is_dir() else path


def all_steps(directory: str | os.PathLike) -> list[int]:
  """The steps of a checkpoint directory, oldest first (none if it does not exist)."""
  if not paths.path(directory).is_dir():
    return []
  manager = _manager(directory, read_only=True)
  try:
    return sorted(manager.all_steps())
  finally:
    manager.close()


def latest_step(directory: str | os.PathLike) -> int | None:
  """The newest step of a checkpoint directory, or None if it has none (or does not exist)."""
  if not paths.path(directory).is_dir():
    return None
  manager = _manager(directory, read_only=True)
  try:
    return manager.latest_step()
  finally:
    manager.close()


def _resolve_step(manager: ocp.CheckpointManager, directory: str | os.PathLike, step: int | None) -> int:
  steps = manager.all_steps()
  if not steps:
    raise CheckpointError(
      f"{directory} holds no checkpoint; write one with `python -m fractal_jax.convert --torch_checkpoint=...` "
      "or by training"
    )
  if step is None:
    return max(steps)
  if step not in steps:
    raise CheckpointError(f"{directory} has no step {step}; its steps: {sorted(steps)}")
  return step


def stored_model_config(directory: str | os.PathLike, step: int | None = None) -> dict[str, Any]:
  """The `config.model` dict stored with a checkpoint step (the newest if `step` is None).

  Raises:
    CheckpointError: no such directory, no checkpoint in it, or no such step.
    UnreadableCheckpointError: the step's config does not read.
  """
  if not paths.path(directory).is_dir():
    raise CheckpointError(f"checkpoint directory {directory} not found")
  directory = resolve_directory(directory)
  manager = _manager(directory, read_only=True)
  try:
    step = _resolve_step(manager, directory, step)
    restored = restore_step(manager, directory, step, ocp.args.Composite(config=ocp.args.JsonRestore()))
    return dict(restored[CONFIG_ITEM])
  finally:
    manager.close()


def newest_readable_config(directory: str | os.PathLike) -> dict[str, Any] | None:
  """The stored `config.model` of the newest step whose config reads (None: no step, or none reads)."""
  for step in reversed(all_steps(directory)):
    try:
      return stored_model_config(directory, step)
    except UnreadableCheckpointError:
      continue
  return None


def _format(value: Any) -> str:
  if isinstance(value, list):
    return "(" + ",".join(_format(v) if not isinstance(v, str) else repr(v) for v in value) + ")"
  return repr(value)


def _config_advice(stored: Mapping[str, Any], differing: list[str]) -> str:
  """Which `--config` matches the stored model, or the overrides that make the given one match."""
  matches = [
    name
    for name, config in config_lib.official_configs().items()
    if all(_plain(config.model.get(f)) == stored.get(f) for f in SHAPE_FIELDS)
  ]
  if matches:
    return f"Use --config={matches[0]}, which matches the checkpoint."
  overrides = " ".join(f'--config.model.{f}="{_format(stored[f])}"' for f in differing if f in stored)
  return f"No file in configs/ matches it; keep your config and add {overrides}."


def check_model_config(stored: Mapping[str, Any], model_cfg: Any, directory: str | os.PathLike) -> None:
  """Raises CheckpointMismatchError naming every `SHAPE_FIELDS` entry where `model_cfg` differs from `stored`."""
  given = model_dict(model_cfg)
  missing = object()
  differing = [f for f in SHAPE_FIELDS if stored.get(f, missing) != given.get(f, missing)]
  if not differing:
    return
  lines = [f"checkpoint {directory} was written for another model than the config describes:"]
  for field in differing:
    lines.append(
      f"  {field}: checkpoint {_format(stored.get(field, '<absent>'))}, config {_format(given.get(field, '<absent>'))}"
    )
  lines.append(_config_advice(stored, differing))
  raise CheckpointMismatchError("\n".join(lines))


def load_params(
  directory: str | os.PathLike, model_cfg: Any, step: int | None = None, weights: str = "raw"
) -> dict[str, Any]:
  """Restores the parameters of a checkpoint step (the newest if `step` is None) for `model_cfg`.

  Args:
    directory: checkpoint directory (`save_params`, `python -m fractal_jax.convert`)
      or a training workdir (its `checkpoints/`).
    model_cfg: `config.model`; must agree with the stored config on `SHAPE_FIELDS`.
    step: which step; None for the newest (`--step`).
    weights: "raw", or "ema" for the moving average a training run with
      `config.train.ema_decay > 0` keeps.

  Returns:
    The `"params"` collection as NumPy arrays of `model_cfg.param_dtype`,
    blocks stacked along [depth] (or `blocks_K` if `scan_blocks` is off).

  Raises:
    ConfigError: `model_cfg` is invalid.
    CheckpointError: no such directory, step or checkpoint.
    UnreadableCheckpointError: the step does not restore (naming it and the `--step` to read instead).
    CheckpointMismatchError: naming every differing field and the `--config` to use.
  """
  model_settings = model_config.settings(model_cfg)
  directory = resolve_directory(directory)
  stored = stored_model_config(directory, step)
  check_model_config(stored, model_cfg, directory)
  # NumPy targets: restored on the host whatever devices (or hosts) wrote the step; np.empty commits no memory.
  abstract = fractal.abstract_params(dataclasses.replace(model_settings, scan_blocks=True))
  target = jax.tree.map(lambda leaf: np.empty(leaf.shape, leaf.dtype), abstract)
  item = {"raw": PARAMS_ITEM, "ema": EMA_ITEM}[weights]
  manager = _manager(directory, read_only=True)
  try:
    step = _resolve_step(manager, directory, step)
    if not (directory / str(step) / item).is_dir():
      raise CheckpointError(
        f"{directory} step {step} has no {weights} weights ({item}); EMA weights exist only when training ran "
        "with config.train.ema_decay > 0: use --weights=raw"
      )
    restored = restore_step(manager, directory, step, ocp.args.Composite(**{item: ocp.args.StandardRestore(target)}))
  finally:
    manager.close()
  params = restored[item]
  # orbax restores the stored shape even where the target's differs: check.
  torch_layout.check_param_shapes(params, dataclasses.replace(model_settings, scan_blocks=True))
  params = jax.tree.map(np.asarray, params)
  return params if model_settings.scan_blocks else block_stack.unstack_block_params(params)
