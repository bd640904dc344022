"""Official PyTorch state dict <-> our parameters (`fractal_jax.io.torch_layout`)."""

from __future__ import annotations

import importlib.util
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fractal_jax.config import base_config
from fractal_jax.io import torch_layout
from fractal_jax.model import fractal, model_config

CONFIG_DIR = pathlib.Path(__file__).resolve().parents[1] / "configs"

# Per type: (width of level 0, width step per level, heads); AR head widths must be divisible by 4.
_WIDTHS = {"ar": (16, 8, 2), "mar": (20, 4, 2), "pixel": (12, 0, 3)}
_DEPTHS = (2, 3, 2, 1)

TINY = {
  "ar": dict(img_size_list=(4, 1), types=("ar", "pixel")),
  "mar": dict(img_size_list=(4, 1), types=("mar", "pixel")),
  "ar_ar": dict(img_size_list=(4, 2, 1), types=("ar", "ar", "pixel")),
  "mar_mar_conds5": dict(img_size_list=(4, 2, 1), types=("mar", "mar", "pixel"), num_conds=5),
  "mar_ar_conds1": dict(img_size_list=(4, 2, 1), types=("mar", "ar", "pixel")),
  "ar_mar_conds1": dict(img_size_list=(4, 2, 1), types=("ar", "mar", "pixel")),
  "mar3_guiding": dict(
    img_size_list=(8, 4, 2, 1), types=("mar", "mar", "mar", "pixel"), num_conds=5, guiding_pixel=True
  ),
}

RELEASED = {  # config file: (official tensors, parameters), from the released checkpoints
  "fractalar_64": (348, 442_068_224),
  "fractalmar_64": (550, 431_995_648),
  "fractalmar_base_256": (552, 186_300_224),
  "fractalmar_large_256": (684, 437_000_064),
  "fractalmar_huge_256": (816, 849_586_240),
}


def tiny_settings(name: str, scan: bool = True) -> model_config.ModelSettings:
  fields = dict(TINY[name])
  cfg = base_config().model
  types = fields.pop("types")
  cfg.types = types
  cfg.widths = tuple(_WIDTHS[t][0] + _WIDTHS[t][1] * i for i, t in enumerate(types))
  cfg.heads = tuple(_WIDTHS[t][2] for t in types)
  cfg.depths = _DEPTHS[: len(types)]
  cfg.num_classes = 7
  cfg.scan_blocks = scan
  for key, value in fields.items():
    cfg[key] = value
  return model_config.settings(cfg)


def released_settings(name: str) -> model_config.ModelSettings:
  spec = importlib.util.spec_from_file_location(name, CONFIG_DIR / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return model_config.settings(module.get_config().model)


def random_state_dict(settings: model_config.ModelSettings, seed: int = 0) -> dict[str, np.ndarray]:
  rng = np.random.default_rng(seed)
  shapes = torch_layout.state_dict_shapes(settings)
  return {name: rng.standard_normal(shape).astype(np.float32) for name, shape in shapes.items()}


def model_param_shapes(settings: model_config.ModelSettings) -> dict[str, tuple[int, ...]]:
  model = fractal.build(settings)
  params = jax.eval_shape(lambda: fractal.init_params(model, jax.random.key(1)))
  flat = jax.tree_util.tree_flatten_with_path(params)[0]
  return {"/".join(k.key for k in path): tuple(leaf.shape) for path, leaf in flat}


@pytest.mark.parametrize("scan", [True, False])
@pytest.mark.parametrize("name", sorted(TINY))
def test_layout_matches_model_params(name, scan):
  settings = tiny_settings(name, scan)
  assert torch_layout.param_shapes(settings) == model_param_shapes(settings)


@pytest.mark.parametrize("name", sorted(TINY))
def test_round_trip_bit_exact(name):
  settings = tiny_settings(name)
  state_dict = random_state_dict(settings)
  params = torch_layout.state_dict_to_params(state_dict, settings)
  back = torch_layout.params_to_state_dict(params, settings)
  assert list(back) == list(state_dict)
  for key, value in state_dict.items():
    assert back[key].dtype == value.dtype and np.array_equal(back[key], value), key
  again = torch_layout.state_dict_to_params(back, settings)
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b, strict=True), params, again)


def test_round_trip_unscanned_and_jax_leaves():
  settings = tiny_settings("mar_ar_conds1", scan=False)
  state_dict = random_state_dict(settings)
  params = torch_layout.state_dict_to_params(state_dict, settings)
  assert sorted(params["levels_0"]["layers"]) == ["blocks_0", "blocks_1"]
  assert sorted(params["levels_1"]["layers"]) == ["blocks_0", "blocks_1", "blocks_2"]
  back = torch_layout.params_to_state_dict(jax.tree.map(jnp.asarray, params), settings)
  for key, value in state_dict.items():
    assert np.array_equal(back[key], value), key


def test_ar_tensors_land_in_place():
  settings = tiny_settings("ar_ar")
  sd = random_state_dict(settings)
  p = torch_layout.state_dict_to_params(sd, settings)
  blocks = p["levels_0"]["layers"]["blocks"]
  for k in range(2):
    name = f"generator.blocks.{k}"
    np.testing.assert_array_equal(blocks["attention"]["wqkv"]["kernel"][k], sd[f"{name}.attention.wqkv.weight"].T)
    np.testing.assert_array_equal(blocks["attention"]["wo"]["kernel"][k], sd[f"{name}.attention.wo.weight"].T)
    np.testing.assert_array_equal(blocks["feed_forward"]["w1"]["kernel"][k], sd[f"{name}.feed_forward.w1.weight"].T)
    np.testing.assert_array_equal(blocks["feed_forward"]["w3"]["kernel"][k], sd[f"{name}.feed_forward.w3.weight"].T)
    np.testing.assert_array_equal(blocks["feed_forward"]["w2"]["kernel"][k], sd[f"{name}.feed_forward.w2.weight"].T)
    np.testing.assert_array_equal(blocks["attention_norm"]["scale"][k], sd[f"{name}.attention_norm.weight"])
    np.testing.assert_array_equal(blocks["ffn_norm"]["scale"][k], sd[f"{name}.ffn_norm.weight"])
  # SwiGLU hidden width: int(2 * 4 * 16 / 3) = 42, rounded up to a multiple of 256.
  assert blocks["feed_forward"]["w1"]["kernel"].shape == (2, 16, 256)
  level1 = p["levels_1"]
  np.testing.assert_array_equal(level1["pos_embed_learned"], sd["next_fractal.generator.pos_embed_learned"])
  assert level1["pos_embed_learned"].shape == (1, 4 + 1, 24)
  np.testing.assert_array_equal(level1["patch_emb"]["kernel"], sd["next_fractal.generator.patch_emb.weight"].T)
  np.testing.assert_array_equal(level1["cond_emb"]["kernel"], sd["next_fractal.generator.cond_emb.weight"].T)
  np.testing.assert_array_equal(
    level1["layers"]["blocks"]["attention"]["wqkv"]["kernel"][2],
    sd["next_fractal.generator.blocks.2.attention.wqkv.weight"].T,
  )
  np.testing.assert_array_equal(p["class_emb"]["embedding"], sd["class_emb.weight"])
  np.testing.assert_array_equal(p["fake_latent"], sd["fake_latent"])
  np.testing.assert_array_equal(p["pixel_head"]["r_codebook"], sd["next_fractal.next_fractal.r_codebook.weight"])
  np.testing.assert_array_equal(p["pixel_head"]["b_mlm_bias"], sd["next_fractal.next_fractal.b_mlm.bias"])


def test_mar_tensors_land_in_place():
  settings = tiny_settings("mar_mar_conds5")
  sd = random_state_dict(settings)
  p = torch_layout.state_dict_to_params(sd, settings)
  level0 = p["levels_0"]
  assert level0["pos_embed_learned"].shape == (1, 5 + 4, 20)
  np.testing.assert_array_equal(level0["pos_embed_learned"], sd["generator.pos_embed_learned"])
  np.testing.assert_array_equal(level0["mask_token"], sd["generator.mask_token"])
  blocks = level0["layers"]["blocks"]
  for k in range(2):
    name = f"generator.blocks.{k}"
    np.testing.assert_array_equal(blocks["attn"]["qkv"]["kernel"][k], sd[f"{name}.attn.qkv.weight"].T)
    np.testing.assert_array_equal(blocks["attn"]["qkv"]["bias"][k], sd[f"{name}.attn.qkv.bias"])
    np.testing.assert_array_equal(blocks["attn"]["proj"]["kernel"][k], sd[f"{name}.attn.proj.weight"].T)
    np.testing.assert_array_equal(blocks["mlp"]["fc1"]["kernel"][k], sd[f"{name}.mlp.fc1.weight"].T)
    np.testing.assert_array_equal(blocks["mlp"]["fc2"]["bias"][k], sd[f"{name}.mlp.fc2.bias"])
    np.testing.assert_array_equal(blocks["norm1"]["scale"][k], sd[f"{name}.norm1.weight"])
    np.testing.assert_array_equal(blocks["norm2"]["bias"][k], sd[f"{name}.norm2.bias"])
  np.testing.assert_array_equal(level0["norm"]["scale"], sd["generator.norm.weight"])
  np.testing.assert_array_equal(level0["patch_emb_ln"]["bias"], sd["generator.patch_emb_ln.bias"])
  np.testing.assert_array_equal(p["levels_1"]["cond_emb"]["kernel"], sd["next_fractal.generator.cond_emb.weight"].T)
  head = p["pixel_head"]
  for c in "rgb":
    np.testing.assert_array_equal(head[f"{c}_codebook"], sd[f"next_fractal.next_fractal.{c}_codebook.weight"])
    np.testing.assert_array_equal(head[f"{c}_mlm_bias"], sd[f"next_fractal.next_fractal.{c}_mlm.bias"])
  np.testing.assert_array_equal(head["cond_proj"]["kernel"], sd["next_fractal.next_fractal.cond_proj.weight"].T)
  np.testing.assert_array_equal(head["ln"]["scale"], sd["next_fractal.next_fractal.ln.weight"])
  np.testing.assert_array_equal(
    head["layers"]["blocks"]["attn"]["qkv"]["kernel"][1], sd["next_fractal.next_fractal.blocks.1.attn.qkv.weight"].T
  )


def test_guiding_pixel_tensors_land_in_place():
  settings = tiny_settings("mar3_guiding")
  sd = random_state_dict(settings)
  p = torch_layout.state_dict_to_params(sd, settings)
  assert "pix_proj" not in p["levels_0"] and "guiding_pixel_loss" not in p["levels_0"]
  for i in (1, 2):
    prefix = "next_fractal." * i + "generator"
    level = p[f"levels_{i}"]
    assert level["pos_embed_learned"].shape[1] == 1 + 5 + 4
    np.testing.assert_array_equal(level["pix_proj"]["kernel"], sd[f"{prefix}.pix_proj.weight"].T)
    guide = level["guiding_pixel_loss"]
    np.testing.assert_array_equal(guide["g_codebook"], sd[f"{prefix}.guiding_pixel_loss.g_codebook.weight"])
    np.testing.assert_array_equal(guide["r_mlm_bias"], sd[f"{prefix}.guiding_pixel_loss.r_mlm.bias"])
    np.testing.assert_array_equal(guide["cond_proj"]["kernel"], sd[f"{prefix}.guiding_pixel_loss.cond_proj.weight"].T)
    np.testing.assert_array_equal(
      guide["layers"]["blocks"]["mlp"]["fc2"]["kernel"][2], sd[f"{prefix}.guiding_pixel_loss.blocks.2.mlp.fc2.weight"].T
    )
  np.testing.assert_array_equal(p["pixel_head"]["g_mlm_bias"], sd["next_fractal.next_fractal.next_fractal.g_mlm.bias"])


def test_errors_name_every_bad_tensor():
  settings = tiny_settings("mar_mar_conds5")
  sd = random_state_dict(settings)
  del sd["generator.blocks.1.attn.qkv.bias"]
  del sd["next_fractal.next_fractal.g_codebook.weight"]
  sd["generator.blocks.2.attn.qkv.bias"] = np.zeros((60,), np.float32)
  sd["generator.mask_token"] = np.zeros((1, 1, 16), np.float32)
  sd["next_fractal.generator.blocks.0.mlp.fc1.weight"] = np.zeros((24, 96), np.float32)
  with pytest.raises(torch_layout.LayoutError) as info:
    torch_layout.state_dict_to_params(sd, settings)
  message = str(info.value)
  assert "2 missing, 1 unexpected, 2 mis-shaped" in message
  assert "missing: generator.blocks.1.attn.qkv.bias [60]" in message
  assert "missing: next_fractal.next_fractal.g_codebook.weight [256, 12]" in message
  assert "unexpected: generator.blocks.2.attn.qkv.bias [60]" in message
  assert "mis-shaped: generator.mask_token expected [1, 1, 20], got [1, 1, 16]" in message
  assert "mis-shaped: next_fractal.generator.blocks.0.mlp.fc1.weight expected [96, 24], got [24, 96]" in message


def test_error_hints_at_whole_checkpoint():
  settings = tiny_settings("ar")
  with pytest.raises(torch_layout.LayoutError, match=r'checkpoint\["model"\]'):
    torch_layout.state_dict_to_params({"model": random_state_dict(settings), "epoch": 3}, settings)


def test_params_errors_name_every_bad_leaf():
  settings = tiny_settings("ar_ar")
  params = torch_layout.state_dict_to_params(random_state_dict(settings), settings)
  del params["levels_1"]["norm"]["bias"]
  params["levels_0"]["layers"]["blocks"]["attention"]["wo"]["kernel"] = np.zeros((1, 16, 16), np.float32)
  params["levels_0"]["extra"] = np.zeros((3,), np.float32)
  with pytest.raises(torch_layout.LayoutError) as info:
    torch_layout.params_to_state_dict(params, settings)
  message = str(info.value)
  assert "missing: levels_1/norm/bias [24]" in message
  assert "unexpected: levels_0/extra [3]" in message
  assert "mis-shaped: levels_0/layers/blocks/attention/wo/kernel expected [2, 16, 16], got [1, 16, 16]" in message


@pytest.mark.parametrize("name", sorted(RELEASED))
def test_released_models_match_official_counts(name):
  num_tensors, num_params = RELEASED[name]
  shapes = torch_layout.state_dict_shapes(released_settings(name))
  assert len(shapes) == num_tensors
  assert sum(int(np.prod(s)) for s in shapes.values()) == num_params
  assert list(shapes)[:2] == ["fake_latent", "class_emb.weight"]
