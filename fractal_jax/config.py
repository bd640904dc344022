"""Defaults shared by every config file in `configs/`.

A config file calls `base_config()` and sets the model tuples; every field
can be overridden on the command line (`--config.model.depths="(4,2,1)"`,
`--config.model.dtype=bfloat16`). Per-level tuples line up as documented in
`fractal_jax.model.model_config`.

The command lines' `--config` flag lives here too (`define_config_flag`, `parse_flags`): a config file that cannot
be loaded, an override of a field that does not exist, or a malformed value ends the run with one `error: ...` line
and exit status 2, never a traceback.
"""

from __future__ import annotations

import difflib
import pathlib
import re
import sys
from collections.abc import Sequence
from typing import Any, NoReturn

import ml_collections
from absl import flags
from ml_collections import config_dict, config_flags


def base_config() -> ml_collections.ConfigDict:
  """Every setting with its default and a comment (long on purpose: the one list of all fields, in reading order)."""
  config = ml_collections.ConfigDict()
  config.seed = 0
  config.model = ml_collections.ConfigDict(
    dict(
      img_size_list=(64, 4, 1),
      widths=(1024, 512, 128),
      depths=(32, 8, 3),
      heads=(16, 8, 4),
      types=("ar", "ar", "pixel"),
      num_conds=1,  # conditions a MAR level prepends (1..5: middle, top, right, bottom, left)
      guiding_pixel=False,  # MAR levels >= 1 model the patch's mean colour first
      num_classes=1000,
      label_drop_prob=0.1,  # classifier-free guidance: P(label -> "no class") in training
      attn_dropout=0.1,  # MAR levels only (the official AR fixes its own dropout)
      proj_dropout=0.1,
      r_weight=5.0,  # training weight of the red channel's cross-entropy
      dtype="float32",  # compute dtype; "bfloat16" for mixed precision
      param_dtype="float32",  # storage dtype of the parameters
      scan_blocks=True,  # nn.scan over the blocks of each level (False: a Python loop)
      remat_policy="none",  # "none", "full" or a jax.checkpoint_policies name
      kernels="auto",  # "auto": CPU-tuned operations on CPU, standard ones on TPU/GPU; or "cpu" / "standard"
      # () or one entry per level: that level's blocks run their items in this many sequential chunks in
      # training (activation memory / K; the same FLOPs with remat_policy="full"). See configs/fractalmar_*_256.py.
      item_chunks=(),
    )
  )
  # Sampling (--mode=sample): hyper-parameters of the official sampler.
  config.sample = ml_collections.ConfigDict(
    dict(
      num_iter=(64, 16),  # MAR steps per generator level (AR levels always take L steps)
      cfg=1.0,  # classifier-free guidance scale; 1 = none
      cfg_schedule="linear",  # "linear" ramps level 0's scale up to cfg, or "constant"
      temperature=1.0,  # MULTIPLIES the logits (official semantics: 1.1 sharpens)
      filter_threshold=1e-4,  # guidance leaves tokens below this conditional probability alone
      batch_size=16,  # images per device step (a multiple of the data x fsdp devices)
    )
  )
  # Training (--mode=train): the official recipe (REFERENCE_NOTES); paper configs set the batch.
  config.train = ml_collections.ConfigDict(
    dict(
      global_batch=256,  # images per optimisation step, over all devices and hosts
      base_lr=5e-5,  # peak lr = base_lr * global_batch / 256
      min_lr=0.0,
      epochs=800.0,
      warmup_epochs=40.0,
      num_steps=0,  # > 0: train this many steps instead of `epochs` (warm-up then in steps too)
      warmup_steps=0,  # used with num_steps
      weight_decay=0.05,
      grad_clip=3.0,
      grad_accum_steps=1,  # micro-batches per step (same update, less activation memory)
      ema_decay=0.0,  # > 0 keeps an EMA of the weights (sample/eval choose it with --weights=ema)
      init_from="",  # start from this checkpoint's weights (class table re-initialised if the classes differ)
      log_every_steps=100,
      tensorboard=True,  # TensorBoard events in the workdir (gs:// ones through TensorFlow's own GCS client)
      checkpoint_every_steps=1000,
      keep_checkpoints=3,  # the newest K ...
      keep_every_steps=0,  # ... plus every step divisible by this (0: none)
      eval_every_steps=5000,  # held-out NLL, a sample grid (and the digits quality figures) every N steps
      eval_max_images=0,  # > 0: the periodic NLL uses at most this many held-out images
      eval_num_samples=0,  # samples drawn for the periodic grid / quality figure (0: none)
      eval_fid_stats="",  # reference statistics (.npz): a small FID of those samples at every evaluation
      eval_inception="",  # Inception weight file for eval_fid_stats (default: default_1.pt when installed)
    )
  )
  # Evaluation (--mode=nll, fid, ref_stats).
  config.eval = ml_collections.ConfigDict(
    dict(
      nll_passes=10,  # evaluation masks averaged per image at MAR levels (the official NLL protocol)
      batch_size=64,  # images per step, over all devices and hosts
      max_images=0,  # > 0: evaluate at most this many held-out images
      ref_features=10000,  # ref_stats: pool features kept for precision / recall
    )
  )
  config.data = ml_collections.ConfigDict(
    dict(
      name="imagefolder",  # "imagefolder" (<root>/<split>/<class>/*.JPEG), "tfds" or "digits" (built in)
      root="",  # ImageFolder root (local or gs://)
      tfds_name="imagenet2012",
      tfds_data_dir="",
      train_split="train",
      eval_split="val",  # "validation" for tfds imagenet2012
      random_flip=True,
      worker_count=0,  # grain worker processes per host
    )
  )
  # Logical axes -> mesh axes (fractal_jax.parallel.sharding); None = replicated. Parameters name theirs where they
  # are created; "batch" is the item axis of the training step's activations at every level.
  config.sharding_rules = (
    ("batch", ("data", "fsdp")),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("qkv", "tensor"),
    ("heads", "tensor"),
    ("vocab", None),
    ("classes", None),
    ("patch", None),
    ("cond", None),
    ("seq", None),
    ("norm", None),
    ("layers", None),
  )
  config.mesh_shape = (-1, 1, 1)  # devices over ("data", "fsdp", "tensor"); -1 takes the rest
  return config


class ConfigFileError(Exception):
  """A config file, or its `--config.*` overrides, that give no usable config; the message says what and where.

  The file is missing or broken, has no `get_config`, ...; an override names no field; a field is missing or of the
  wrong type (`check_fields`).

  Not a ValueError on purpose: absl turns a ValueError raised while parsing `--config` into a "flag --config=..."
  error of its own; this one reaches `parse_flags` as it is.
  """


def _exec_config_module(file: pathlib.Path) -> Any:
  """The config file run as a module (not put in sys.modules)."""
  import importlib.util

  spec = importlib.util.spec_from_file_location(f"fractal_config_{file.stem}", file)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def load_config_file(path: str) -> ml_collections.ConfigDict:
  """`get_config()` of a config file, as `--config=<path>` does; `<file>.py:<arg>` calls `get_config(<arg>)`.

  Errors of the file itself (syntax, an exception in `get_config`) come out as they are; the command line uses
  `load_config_checked`, which turns every one into a `ConfigFileError`.
  """
  name, _, arg = str(path).partition(":")
  file = pathlib.Path(name)
  if not file.is_file():
    raise FileNotFoundError(_not_found(name))
  module = _exec_config_module(file)
  return module.get_config(arg) if arg else module.get_config()


def _not_found(name: str) -> str:
  return f"config file {name!r} not found; the configs live in configs/ (e.g. configs/tiny.py)."


def _where(error: BaseException, file: pathlib.Path) -> str:
  """`, line N` of the innermost frame of `error`'s traceback that is in `file` ("" when none is)."""
  import traceback

  frames = traceback.extract_tb(error.__traceback__)
  lines = [frame.lineno for frame in frames if pathlib.Path(frame.filename).resolve() == file]
  return f", line {lines[-1]}" if lines else ""


def load_config_checked(path: str) -> ml_collections.ConfigDict:
  """`load_config_file` for the command line: every way a config file can fail is one `ConfigFileError` line.

  What the file prints while it loads is shown only when it loads (a failure prints nothing but the error).

  Raises:
    ConfigFileError: no such file, a syntax error, no `get_config`, an argument after `:` that `get_config` does not
      take, an exception while running the file, or a result that is not a ConfigDict.
  """
  import contextlib
  import inspect
  import io
  import sys

  name, colon, arg = str(path).partition(":")
  file = pathlib.Path(name)
  if not file.is_file():
    raise ConfigFileError(_not_found(name))
  output = io.StringIO()
  stage = "running it"
  try:
    with contextlib.redirect_stdout(output), contextlib.redirect_stderr(output):
      module = _exec_config_module(file)
      get_config = getattr(module, "get_config", None)
      if not callable(get_config):
        raise ConfigFileError(
          f"config file {name} has no get_config() function; a config file defines get_config() returning an "
          "ml_collections.ConfigDict (see configs/tiny.py)"
        )
      if colon and not _takes_an_argument(get_config, inspect):
        raise ConfigFileError(f"--config={path}: the get_config() of {name} takes no argument; drop ':{arg}'")
      stage = "get_config()"
      config = get_config(arg) if colon else get_config()
  except ConfigFileError:
    raise
  except SyntaxError as error:
    raise ConfigFileError(f"config file {name}, line {error.lineno}: syntax error: {error.msg}") from None
  except Exception as error:  # noqa: BLE001  (whatever the user's file raises becomes one line)
    raise ConfigFileError(
      f"config file {path}{_where(error, file.resolve())}: {stage} raised {type(error).__name__}: "
      + " ".join(str(error).split())
    ) from None
  if not isinstance(config, ml_collections.ConfigDict):
    raise ConfigFileError(
      f"config file {path}: get_config() returned {type(config).__name__}, not an ml_collections.ConfigDict "
      "(start from fractal_jax.config.base_config(), as configs/tiny.py does)"
    )
  sys.stdout.write(output.getvalue())
  return config


def _takes_an_argument(function: Any, inspect: Any) -> bool:
  try:
    parameters = inspect.signature(function).parameters.values()
  except (TypeError, ValueError):
    return True
  return any(p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.VAR_POSITIONAL) for p in parameters)


def check_fields(config: Any) -> None:
  """Checks that `config` has every field of `base_config()`, each with a value of the default's type.

  Catches a config file not built from `base_config()` and an override that parsed into the wrong kind of value
  (`--config.model.depths=abc` is the tuple `('abc',)`). Fields beyond the defaults are allowed; ranges are checked
  by the modes (`fractal_jax.modes.checks`).

  Raises:
    ConfigFileError: naming the first missing field (and how many more) or the field of the wrong type.
  """
  missing: list[str] = []
  _check_section(config, base_config(), "config", missing)
  if missing:
    more = f" (and {len(missing) - 1} more fields)" if len(missing) > 1 else ""
    raise ConfigFileError(
      f"the config has no {missing[0]}{more}: build it from fractal_jax.config.base_config(), as configs/tiny.py does"
    )


def _check_section(config: Any, reference: ml_collections.ConfigDict, where: str, missing: list) -> None:
  if not isinstance(config, (ml_collections.ConfigDict, dict)):
    raise ConfigFileError(f"{where} must be a section (ConfigDict) of fields, got {config!r}")
  for key, default in reference.items():
    name = f"{where}.{key}"
    if key not in config:
      missing.append(name)
      continue
    value = config[key]
    if isinstance(default, ml_collections.ConfigDict):
      _check_section(value, default, name, missing)
    elif not _same_kind(value, default):
      raise ConfigFileError(f"{name} must be {_kind(default)}, got {value!r}")


def _is_int(value: Any) -> bool:
  return isinstance(value, int) and not isinstance(value, bool)


def _same_kind(value: Any, default: Any) -> bool:
  if isinstance(default, bool):
    return isinstance(value, bool)
  if _is_int(default):
    return _is_int(value)
  if isinstance(default, float):
    return isinstance(value, (int, float)) and not isinstance(value, bool)
  if isinstance(default, str):
    return isinstance(value, str)
  if isinstance(default, tuple):
    if not isinstance(value, (tuple, list)):
      return False
    if default and all(_is_int(x) for x in default):
      return all(_is_int(x) for x in value)
    if default and all(isinstance(x, str) for x in default):
      return all(isinstance(x, str) for x in value)
  return True


def _kind(default: Any) -> str:
  if isinstance(default, bool):
    return "true or false"
  if _is_int(default):
    return "an integer"
  if isinstance(default, float):
    return "a number"
  if isinstance(default, str):
    return "a string"
  example = tuple(default)
  if default and all(_is_int(x) for x in default):
    return f"a tuple of integers, e.g. {example}"
  if default and all(isinstance(x, str) for x in default):
    return f"a tuple of strings, e.g. {example}"
  return f"a tuple like {example}"


def config_path_from_argv(argv: list[str]) -> str | None:
  """The value of --config in a command line (`--config=F` or `--config F`), before absl parses it."""
  for i, arg in enumerate(argv):
    if arg.startswith("--config="):
      return arg.split("=", 1)[1]
    if arg == "--config" and i + 1 < len(argv):
      return argv[i + 1]
  return None


def exit_if_config_file_missing(argv: list[str]) -> None:
  """A clear error instead of ml_collections' traceback when --config names no file."""
  import pathlib
  import sys

  path = config_path_from_argv(argv)
  if path is not None and not pathlib.Path(path.split(":", 1)[0]).is_file():
    print(
      f"error: config file {path!r} not found; the configs live in configs/ (e.g. configs/tiny.py).", file=sys.stderr
    )
    sys.exit(2)


# --- the command line: the --config flag and flag parsing (`fractal_jax.main`, `fractal_jax.convert`) ---------------
#
# Both entry points define `--config` with `define_config_flag` and start with `app.run(main, flags_parser=
# parse_flags)`. Every problem of the command line itself then ends the run with one `error: ...` line on stderr and
# exit status 2 (`fail`), as the later checks do, never a traceback: the config file (`load_config_checked`); an
# override of a field that does not exist (`--config.model.depth=3`: the nearest names are suggested), checked before
# ml_collections defines the override flags; what absl and ml_collections refuse (an unknown flag, a malformed value
# such as `--config.train.global_batch=abc`, no `--config`). `--config=<file>.py:<arg>` and `--config.<field>=<value>`
# work as with `config_flags.DEFINE_config_file`, which still defines the flag: only the loading of the file is ours.

EXIT_BAD_INPUT = 2


def fail(message: str) -> NoReturn:
  """Ends the run: `error: <message>` on stderr, exit status 2."""
  print(f"error: {message}", file=sys.stderr)
  sys.exit(EXIT_BAD_INPUT)


# --- the --config flag -----------------------------------------------------------------------------------------------


class _ConfigFileParser(flags.ArgumentParser):
  """The parser of `--config` (what ml_collections' own does: `get_config()`, locked), with one-line errors.

  It loads with `load_config_checked` and then checks the names of the overrides, which ml_collections applies
  after the file is loaded.
  """

  def __init__(self, name: str) -> None:
    self.name = name

  def parse(self, argument: str) -> Any:
    config = load_config_checked(argument)
    check_override_names(config, _command_line(), self.name)
    config.lock()
    return config

  def flag_type(self) -> str:
    return "config object"


def define_config_flag(help_string: str, name: str = "config") -> flags.FlagHolder:
  """`config_flags.DEFINE_config_file(name)` (a locked config, overrides as usual) whose file problems are one line.

  ml_collections' flag keeps doing everything but loading the file: its parser is replaced by ours.
  """
  holder = config_flags.DEFINE_config_file(name, None, help_string, lock_config=True)
  flags.FLAGS[name].parser = _ConfigFileParser(name)
  return holder


def _command_line() -> list[str]:
  """The arguments ml_collections takes its overrides from: sys.argv with `--flagfile`s expanded."""
  return flags.FLAGS.read_flags_from_files(sys.argv, force_gnu=False)


def override_paths(argv: Sequence[str], name: str = "config") -> list[str]:
  """The dotted field paths of the `--<name>.<path>[=value]` (or `--no<name>.<path>`) arguments, in order."""
  pattern = re.compile(rf"^--?(?:no)?{re.escape(name)}\.([^=]+)")
  return [match.group(1) for arg in argv if (match := pattern.match(arg))]


def check_override_names(config: Any, argv: Sequence[str], name: str = "config") -> None:
  """Every `--config.<path>` override names an existing field (else the nearest names in one line).

  Raises:
    ConfigFileError: the first override of a field that does not exist.
  """
  for path in override_paths(argv, name):
    node, where = config, name
    for part in path.split("."):
      key = part.split("[", 1)[0]  # `field[0]`: the field's own name is checked
      if not isinstance(node, (config_dict.ConfigDict, dict)):
        raise ConfigFileError(f"--{name}.{path}: {where} is a value, not a section with a field {key!r}")
      if key not in node:
        raise ConfigFileError(f"--{name}.{path}: {where} has no field {key!r}; {_nearest(key, node)}")
      node, where = node[key], f"{where}.{key}"


def _nearest(key: str, section: Any) -> str:
  names = sorted(str(k) for k in section.keys())
  close = difflib.get_close_matches(key, names, n=3, cutoff=0.6)
  if close:
    return f"did you mean {' or '.join(close)}?"
  return f"its fields are {', '.join(names)}"


# --- parsing ---------------------------------------------------------------------------------------------------------


def parse_flags(argv: Sequence[str]) -> list[str]:
  """`app.run`'s flags_parser: absl's parsing, with every error one `error:` line and exit status 2."""
  try:
    return flags.FLAGS(list(argv))
  except ConfigFileError as error:
    fail(str(error))
  except flags.Error as error:
    fail(_flag_error_message(str(error)))


def _flag_error_message(message: str) -> str:
  """absl's wording, in our form: `--flag=value: why` on one line, with the type a config field holds."""
  message = message.strip().splitlines()[0] if message.strip() else "bad command line"
  required = re.match(r"flag --(\w+)=None: Flag --\w+ must have a value other than None", message)
  if required:
    example = " (e.g. --config=configs/tiny.py)" if required.group(1) == "config" else ""
    return f"--{required.group(1)} is required{example}"
  message = re.sub(r"^flag (--)", r"\1", message)
  field = re.match(r"--config\.([\w.]+)=", message)
  if field and "config" in flags.FLAGS:
    try:
      value = flags.FLAGS["config"].value
      for part in field.group(1).split("."):
        value = value[part]
    except (KeyError, TypeError, AttributeError):
      return message
    return f"{message} (config.{field.group(1)} holds {type(value).__name__} values, e.g. {value!r})"
  return message


# The config files shipped in `configs/`, for telling users which one fits a checkpoint. The repository layout
# is `<root>/fractal_jax` beside `<root>/configs`; an installed package may have no `configs/`, and then every
# lookup returns nothing rather than failing.

# The released official models, in the order the README lists them.
OFFICIAL_CONFIGS = (
  "fractalar_64.py",
  "fractalmar_64.py",
  "fractalmar_base_256.py",
  "fractalmar_large_256.py",
  "fractalmar_huge_256.py",
)


def config_dir() -> pathlib.Path | None:
  """`<root>/configs` next to the package, or None when it is not there."""
  path = pathlib.Path(__file__).resolve().parent.parent / "configs"
  return path if path.is_dir() else None


def official_configs() -> dict[str, ml_collections.ConfigDict]:
  """`"configs/<file>"` -> its config, for the official models whose files exist."""
  directory = config_dir()
  if directory is None:
    return {}
  out = {}
  for name in OFFICIAL_CONFIGS:
    if (directory / name).is_file():
      out[f"configs/{name}"] = load_config_file(str(directory / name))
  return out
