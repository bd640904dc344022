"""Configs: exact official parameter counts and clear errors for bad settings."""

from __future__ import annotations

import pytest
import tiny_models
from conftest import ROOT

from fractal_jax.config import load_config_file
from fractal_jax.model import fractal, model_config

OFFICIAL_COUNTS = {
  "fractalar_64": 442_068_224,
  "fractalmar_64": 431_995_648,
  "fractalmar_base_256": 186_300_224,
  "fractalmar_large_256": 437_000_064,
  "fractalmar_huge_256": 849_586_240,
}


@pytest.mark.parametrize("name", sorted(OFFICIAL_COUNTS))
def test_parameter_counts_equal_official(name):
  config = load_config_file(str(ROOT / "configs" / f"{name}.py"))
  params = fractal.abstract_params(model_config.settings(config.model))
  assert fractal.count_params(params) == OFFICIAL_COUNTS[name]


def test_level_layout_of_the_256_models():
  config = load_config_file(str(ROOT / "configs" / "fractalmar_large_256.py"))
  levels, pixel = model_config.validate(config.model)
  assert [(s.seq_len, s.patch_size, s.cond_width, s.guiding_pixel) for s in levels] == [
    (256, 16, 1024, False),
    (16, 4, 1024, True),
    (16, 1, 512, True),
  ]
  assert [s.next_num_conds for s in levels] == [5, 5, 1]
  assert (pixel.cond_width, pixel.width, pixel.depth, pixel.heads) == (256, 64, 1, 4)


BAD = [
  (dict(types=("ar", "gru", "pixel")), "unknown generator type 'gru' at level 1"),
  (dict(widths=(24, 16)), "inconsistent length"),
  (dict(img_size_list=(6, 4, 1)), "image sizes must divide"),
  (dict(img_size_list=(8, 4, 2)), "last image size must be 1"),
  (dict(widths=(25, 16, 8)), "width 25 is not divisible by heads 2"),
  (dict(widths=(12, 16, 8), heads=(2, 1, 2)), "not divisible by 4"),
  (dict(num_conds=0), "num_conds must be an integer in 1..5"),
  (dict(num_conds=6), "num_conds must be an integer in 1..5"),
  (dict(types=("ar", "ar", "ar")), "last entry of types must be 'pixel'"),
  (dict(remat_policy="sometimes"), "remat_policy"),
  (dict(dtype="float8"), "config.model.dtype"),
  (dict(item_chunks=(1, 8)), "item_chunks=(1, 8): give () or one positive integer per level (3)"),
  (dict(item_chunks=(1, 0, 2)), "one positive integer per level"),
]


@pytest.mark.parametrize("overrides,message", BAD)
def test_bad_configs_raise_clear_errors(overrides, message):
  with pytest.raises(model_config.ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
    tiny_models.settings("ar_ar", **overrides)


def test_mar_with_several_conditions_below_ar_is_rejected():
  with pytest.raises(model_config.ConfigError, match="level 1 is MAR with num_conds=5 below an AR level"):
    tiny_models.settings("mar_over_ar", num_conds=5)
  tiny_models.settings("mar_over_ar", num_conds=1)  # the combination the official code supports


def test_missing_config_file():
  with pytest.raises(FileNotFoundError, match="configs/tiny.py"):
    load_config_file("configs/no_such_model.py")


@pytest.mark.parametrize(
  "thin, shared",
  [
    ("fractalar_64", "fractal_64.py:ar"),
    ("fractalmar_64", "fractal_64.py:mar"),
    ("fractalmar_base_256", "fractalmar_256.py:base"),
    ("fractalmar_large_256", "fractalmar_256.py:large"),
    ("fractalmar_huge_256", "fractalmar_256.py:huge"),
  ],
)
def test_thin_config_files_equal_their_shared_definition(thin, shared):
  assert load_config_file(str(ROOT / "configs" / f"{thin}.py")) == load_config_file(str(ROOT / "configs" / shared))


def test_unknown_size_of_a_shared_definition_is_named():
  with pytest.raises(ValueError, match="use one of base, large, huge"):
    load_config_file(str(ROOT / "configs" / "fractalmar_256.py:giant"))
