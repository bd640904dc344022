"""The config files shipped in `configs/`, for telling users which one fits a checkpoint.

The repository layout is `<root>/fractal_jax` beside `<root>/configs`; an
installed package may have no `configs/`, and then every lookup here returns
nothing rather than failing.
"""

from __future__ import annotations

import pathlib

import ml_collections

from fractal_jax.config_base import load_config_file

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
