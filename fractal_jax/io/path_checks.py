"""Checks of the files a run reads and writes, made before it starts and writing nothing.

An output's directory must exist and be writable, or be creatable (its nearest existing ancestor is a writable
directory); nothing is created here. An input must exist and be readable. `<flag>` in the messages is what the user
wrote: `--output`, or a config field such as `config.train.init_from`. Paths with a scheme (`gs://...`) are only
checked for their extension.
"""

from __future__ import annotations

import os
import pathlib
from collections.abc import Sequence

from fractal_jax.io.paths import is_remote
from fractal_jax.model.model_config import ConfigError


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
