"""`python -m fractal_jax.convert`: official PyTorch weights <-> fractal-jax checkpoints, without torch.

Import a released (or official-training) checkpoint:

  python -m fractal_jax.convert --config=configs/fractalmar_64.py \\
    --torch_checkpoint=checkpoint-last.pth --output_dir=checkpoints/fractalmar_64

reads `checkpoint["model"]` (or a bare state dict, or an `.npz` of official
names), checks every tensor against the config's layout, and writes an orbax
checkpoint (float32 parameters plus the model config) that every mode loads
with `--checkpoint=<dir>`. Export goes back to official names:

  python -m fractal_jax.convert --config=configs/fractalmar_64.py --to_torch \\
    --checkpoint=checkpoints/fractalmar_64 --output=fractalmar_64.npz   # or .pth, if torch is installed

Everything is checked before anything is written; a bad input ends the run
with `error: ...` and exit status 2, and leaves no output behind. Every path
may be local or `gs://...` (`fractal_jax.io.paths`).
"""

from __future__ import annotations

import importlib.util
import shutil
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import numpy as np
from absl import app, flags, logging
from etils import epath

from fractal_jax import config as config_lib
from fractal_jax.io import model_checkpoint, path_checks, paths, torch_layout, torch_pickle
from fractal_jax.model import fractal, model_config

_CONFIG = config_lib.define_config_flag("Config file of the model, e.g. configs/fractalmar_64.py (see configs/).")
_TORCH_CHECKPOINT = flags.DEFINE_string(
  "torch_checkpoint", None, "Import: official .pth (or .npz of official tensor names) to read."
)
_OUTPUT_DIR = flags.DEFINE_string("output_dir", None, "Import: new checkpoint directory to write (must be empty).")
_TO_TORCH = flags.DEFINE_bool("to_torch", False, "Export a fractal-jax checkpoint to official tensor names.")
_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "Export: fractal-jax checkpoint directory to read.")
_STEP = flags.DEFINE_integer("step", None, "Export: checkpoint step to read (default: the newest).")
_OUTPUT = flags.DEFINE_string("output", None, "Export: file to write, .npz (always) or .pth (needs torch).")
flags.mark_flags_as_required(["config"])

EXPORT_SUFFIXES = (".npz", ".pth")


class ConvertError(ValueError):
  """Bad converter arguments; the message says how to fix them."""


def matching_configs(shapes: Mapping[str, Sequence[int]]) -> list[str]:
  """The official config files (`configs/<name>.py`) whose layout has exactly these tensor names and shapes."""
  found = {name: tuple(shape) for name, shape in shapes.items()}
  matches = []
  for name, config in config_lib.official_configs().items():
    try:
      expected = torch_layout.state_dict_shapes(model_config.settings(config.model))
    except model_config.ConfigError:
      continue
    if expected == found:
      matches.append(name)
  return matches


def _layout_hint(state_dict: Mapping[str, Any]) -> str:
  if config_lib.config_dir() is None:
    return ""
  matches = matching_configs({k: np.shape(v) for k, v in state_dict.items()})
  if matches:
    return f"This file matches {matches[0]}: convert it with --config={matches[0]}."
  return "It matches none of the official configs in configs/ either."


def convert_state_dict(state_dict: Mapping[str, Any], model_cfg: Any) -> dict[str, Any]:
  """Official state dict (name -> array, e.g. `checkpoint["model"]`) -> our parameters, float32 NumPy.

  Args:
    state_dict: official tensor name -> array in PyTorch layout (any float dtype).
    model_cfg: `config.model` of the model to load into.

  Returns:
    The `"params"` collection in the layout of `model_cfg` (blocks stacked
    along [depth] unless `scan_blocks` is off), float32.

  Raises:
    ConfigError: `model_cfg` is invalid.
    LayoutError: naming every missing, unexpected and mis-shaped tensor, and
      which official config the state dict matches, if any.
  """
  model_settings = model_config.settings(model_cfg)
  try:
    params = torch_layout.state_dict_to_params(state_dict, model_settings)
  except torch_layout.LayoutError as error:
    hint = _layout_hint(state_dict)
    raise torch_layout.LayoutError(f"{error}\n{hint}" if hint else str(error)) from None
  return jax.tree.map(lambda a: np.asarray(a, np.float32), params)


def _check_new_dir(path: epath.Path, flag: str, given: str) -> None:
  if path.exists() and (not path.is_dir() or any(path.iterdir())):
    raise ConvertError(f"--{flag}={given} exists and is not an empty directory; choose a new one")


def _remove_tree(path: epath.Path) -> None:
  if paths.is_remote(path):
    path.rmtree(missing_ok=True)
  else:
    shutil.rmtree(path, ignore_errors=True)


def import_checkpoint(
  torch_checkpoint: str, output_dir: str, model_cfg: Any, log: Callable[[str], None] = print
) -> epath.Path:
  """Official `.pth` / `.npz` -> a new fractal-jax checkpoint directory (step 0); nothing written on error."""
  model_config.settings(model_cfg)
  out = paths.path(output_dir)
  _check_new_dir(out, "output_dir", output_dir)
  path_checks.check_output_dir("--output_dir", output_dir)
  state_dict = torch_pickle.read_state_dict(torch_checkpoint)
  log(f"read {len(state_dict)} tensors ({fractal.count_params(state_dict):,} values) from {torch_checkpoint}")
  params = convert_state_dict(state_dict, model_cfg)
  del state_dict
  existed = out.exists()
  try:
    step_dir = model_checkpoint.save_params(out, params, model_cfg, step=0)
  except BaseException:
    _remove_tree(out)  # it was empty or absent: leave it as it was
    if existed and not paths.is_remote(out):
      out.mkdir()
    raise
  log(f"wrote {fractal.count_params(params):,} parameters to {step_dir}; load them with --checkpoint={output_dir}")
  return out


def export_checkpoint(
  checkpoint: str, output: str, model_cfg: Any, step: int | None = None, log: Callable[[str], None] = print
) -> epath.Path:
  """A fractal-jax checkpoint -> official tensor names in `.npz` (or `.pth` with torch); nothing written on error."""
  model_settings = model_config.settings(model_cfg)
  out = paths.path(output)
  if out.suffix not in EXPORT_SUFFIXES:
    raise ConvertError(f"--output={output}: name it *.npz (or *.pth, with torch installed)")
  if out.exists():
    raise ConvertError(f"--output={output} exists; choose a new file name")
  path_checks.check_output_file("--output", output, EXPORT_SUFFIXES, "the official state dict")
  if out.suffix == ".pth" and importlib.util.find_spec("torch") is None:
    raise ConvertError(
      f"--output={output}: writing a .pth needs torch, which is not installed; write an .npz instead (same "
      "tensor names; load it with {k: torch.from_numpy(v) for k, v in np.load(path).items()})"
    )
  params = model_checkpoint.load_params(checkpoint, model_cfg, step)
  log(f"read {fractal.count_params(params):,} parameters from {checkpoint}")
  state_dict = torch_layout.params_to_state_dict(params, model_settings)
  (torch_pickle.save_pth if out.suffix == ".pth" else torch_pickle.save_npz)(state_dict, out)  # makes the folder
  log(f"wrote {len(state_dict)} tensors in the official layout to {output}")
  return out


ERRORS = (
  ConvertError,
  config_lib.ConfigFileError,
  FileNotFoundError,
  model_config.ConfigError,
  torch_pickle.PthError,
  torch_layout.LayoutError,
  model_checkpoint.CheckpointError,
)


def _arguments() -> None:
  """Checks that the flags name exactly one direction."""
  given = {name: f.value for name, f in (("torch_checkpoint", _TORCH_CHECKPOINT), ("output_dir", _OUTPUT_DIR))}
  export = {name: f.value for name, f in (("checkpoint", _CHECKPOINT), ("output", _OUTPUT))}
  if _TO_TORCH.value:
    wrong, needed = given, export
    usage = "--to_torch --checkpoint=<dir> --output=<file.npz|file.pth>"
  else:
    wrong, needed = export | ({"step": _STEP.value} if _STEP.value is not None else {}), given
    usage = "--torch_checkpoint=<file.pth|file.npz> --output_dir=<new dir> (or --to_torch to export)"
  extra = [f"--{k}" for k, v in wrong.items() if v is not None]
  missing = [f"--{k}" for k, v in needed.items() if not v]
  if extra or missing:
    parts = ([f"missing {', '.join(missing)}"] if missing else []) + ([f"unused {', '.join(extra)}"] if extra else [])
    raise ConvertError(f"{'; '.join(parts)}. Usage: {usage}")


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    config_lib.fail(f"unexpected arguments: {' '.join(argv[1:])} (flags are written --name=value)")
  config = _CONFIG.value
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # orbax logs every step of a save at INFO
  try:
    _arguments()
    config_lib.check_fields(config)
    if _TO_TORCH.value:
      export_checkpoint(_CHECKPOINT.value, _OUTPUT.value, config.model, _STEP.value)
    else:
      import_checkpoint(_TORCH_CHECKPOINT.value, _OUTPUT_DIR.value, config.model)
  except ERRORS as error:
    print(f"error: {error}", file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
  config_lib.exit_if_config_file_missing(sys.argv)
  app.run(main, flags_parser=config_lib.parse_flags)
