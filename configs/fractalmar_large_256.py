"""FractalMAR-Large, ImageNet 256x256 (official `fractalmar_large_in256`): `configs/fractalmar_256.py:large` under the name users know."""

import pathlib

from fractal_jax.config import load_config_file


def get_config():
  return load_config_file(f"{pathlib.Path(__file__).with_name('fractalmar_256.py')}:large")
