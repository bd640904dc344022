"""FractalAR, ImageNet 64x64 (official `fractalar_in64`): `configs/fractal_64.py:ar` under the name users know."""

import pathlib

from fractal_jax.config import load_config_file


def get_config():
  return load_config_file(f"{pathlib.Path(__file__).with_name('fractal_64.py')}:ar")
