"""What the command lines share: the `--config` flag, flag parsing that ends bad input with one line, path checks.

Both entry points (`fractal_jax.main`, `fractal_jax.convert`) define `--config` with `define_config_flag` and
start with `app.run(main, flags_parser=parse_flags)`. Every problem of the command line itself then ends the run
with one `error: ...` line on stderr and exit status 2 (`fail`), as the later checks do, and never a traceback:

* the config file (`fractal_jax.config.load_config_checked`: missing, a syntax error, no `get_config`, an
  exception in it, ...; what the file prints is shown only when it loads);
* an override of a field that does not exist (`--config.model.depth=3`: the nearest names are suggested), checked
  before ml_collections defines the override flags;
* what absl and ml_collections refuse: an unknown flag, a malformed value (`--config.train.global_batch=abc`), a
  missing `--config`.

`--config=<file>.py:<arg>` (an argument to `get_config`) and `--config.<field>=<value>` work as with
`config_flags.DEFINE_config_file`, which still defines the flag: only the loading of the file is ours.

The path checks (`check_output_file`, `check_output_dir`, `check_input_file`, `check_input_dir`) look without
writing: an output's directory must exist and be writable or be creatable, and nothing is created yet. Paths with a
scheme (`gs://...`) are only checked for their extension.
"""

from __future__ import annotations

import difflib
import os
import pathlib
import re
import sys
from collections.abc import Sequence
from typing import Any, NoReturn

from absl import flags
from ml_collections import config_dict, config_flags

from fractal_jax import config as config_lib
from fractal_jax.model.model_config import ConfigError

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
    config = config_lib.load_config_checked(argument)
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
        raise config_lib.ConfigFileError(f"--{name}.{path}: {where} is a value, not a section with a field {key!r}")
      if key not in node:
        raise config_lib.ConfigFileError(f"--{name}.{path}: {where} has no field {key!r}; {_nearest(key, node)}")
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
  except config_lib.ConfigFileError as error:
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


# --- paths -----------------------------------------------------------------------------------------------------------


def is_remote(path: str) -> bool:
  """A path with a scheme (`gs://bucket/x`): not checked on the local file system."""
  return "://" in str(path)


def check_output_file(flag: str, path: str | None, suffixes: Sequence[str], what: str) -> None:
  """`<flag>=<path>` (flag: `--output`, or a config field) names a file with one of `suffixes` whose directory exists writable or can be made."""
  if not path:
    return
  suffix = pathlib.PurePath(path).suffix.lower()
  if suffix not in suffixes:
    names = " or ".join(f"*{s}" for s in suffixes)
    raise ConfigError(f"{flag}={path}: name it {names} ({what}, written as {suffixes[0][1:].upper()})")
  if is_remote(path):
    return
  file = pathlib.Path(path)
  if file.is_dir():
    raise ConfigError(f"{flag}={path} is a directory; give a file name (*{suffixes[0]}) for {what}")
  _check_creatable(flag, path, file.parent)


def check_output_dir(flag: str, path: str | None) -> None:
  """`<flag>=<path>` is a writable directory or can be made (nothing is created here)."""
  if not path or is_remote(path):
    return
  directory = pathlib.Path(path)
  if directory.exists() and not directory.is_dir():
    raise ConfigError(f"{flag}={path} exists and is not a directory")
  _check_creatable(flag, path, directory)


def _check_creatable(flag: str, path: str, directory: pathlib.Path) -> None:
  existing = directory
  while not existing.exists() and existing != existing.parent:
    existing = existing.parent
  if not existing.is_dir():
    raise ConfigError(f"{flag}={path}: {existing} is a file, so nothing can be written under it")
  if not os.access(existing, os.W_OK | os.X_OK):
    raise ConfigError(f"{flag}={path}: cannot write in {existing} (permission denied); choose another place")


def check_input_file(flag: str, path: str | None, what: str) -> None:
  """`<flag>=<path>` is a readable file."""
  if not path or is_remote(path):
    return
  file = pathlib.Path(path)
  if not file.exists():
    raise ConfigError(f"{flag}={path}: no such file ({what})")
  if file.is_dir():
    raise ConfigError(f"{flag}={path} is a directory; give {what}")
  if not os.access(file, os.R_OK):
    raise ConfigError(f"{flag}={path}: cannot read it (permission denied)")


def check_input_dir(flag: str, path: str | None, what: str) -> None:
  """`<flag>=<path>` is an existing directory."""
  if not path or is_remote(path):
    return
  directory = pathlib.Path(path)
  if not directory.exists():
    raise ConfigError(f"{flag}={path}: no such directory ({what})")
  if not directory.is_dir():
    raise ConfigError(f"{flag}={path} is a file, not a directory ({what})")
