"""`--mode=edit` on a tiny checkpoint: outputs, kept pixels, preset masks, bad input."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image
from test_cli import run_main

from fractal_jax.model import model_config
from fractal_jax.modes import edit as edit_mode


def _write(path, array):
  Image.fromarray(array).save(path)
  return str(path)


@pytest.fixture
def picture(tmp_path):
  rng = np.random.default_rng(0)
  image = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
  return image, _write(tmp_path / "image.png", image)


def test_edit_writes_variants_that_keep_the_known_pixels(tiny_checkpoint, picture, tmp_path):
  image, image_path = picture
  regenerate = np.zeros((8, 8), bool)
  regenerate[2:7, 1:5] = True  # partly covers several 2x2 patches
  mask_path = _write(tmp_path / "mask.png", np.where(regenerate, 255, 0).astype(np.uint8))
  grid, variants, gif = tmp_path / "grid.png", tmp_path / "variants", tmp_path / "edit.gif"
  result = run_main(
    "--config=configs/tiny.py",
    "--mode=edit",
    f"--checkpoint={tiny_checkpoint}",
    f"--image={image_path}",
    f"--mask={mask_path}",
    "--edit=uncrop",  # the explicit mask wins
    "--labels=3",
    "--num_samples=3",
    "--config.sample.cfg=2.0",
    f"--output={grid}",
    f"--output_dir={variants}",
    f"--gif={gif}",
  )
  assert result.returncode == 0, result.stderr
  assert "regenerating 20 of 64 pixels (--mask" in result.stdout and "compiled in" in result.stdout
  files = sorted(variants.glob("*.png"))
  assert [f.name for f in files] == ["000000_class3.png", "000001_class3.png", "000002_class3.png"]
  outs = np.stack([np.asarray(Image.open(f)) for f in files])
  np.testing.assert_array_equal(outs[:, ~regenerate], np.broadcast_to(image[~regenerate], outs[:, ~regenerate].shape))
  assert (outs[0, regenerate] != outs[1, regenerate]).mean() > 0.5  # variants differ where regenerated
  assert Image.open(grid).size[0] >= 2 * 8
  # 9 of the 16 level-0 patches are unknown: ceil(4 * 9 / 16) = 3 steps (the held 4th frame merges into the 3rd).
  assert Image.open(gif).n_frames == 3


def test_presets_make_the_expected_masks():
  inpaint = edit_mode.preset_mask("inpaint", 8)
  assert inpaint.sum() == 16 and inpaint[2:6, 2:6].all()
  np.testing.assert_array_equal(edit_mode.preset_mask("uncrop", 8), ~inpaint)
  outpaint = edit_mode.preset_mask("outpaint", 8)
  assert outpaint[:, 4:].all() and not outpaint[:, :4].any()


def test_masked_picture_greys_the_regenerated_pixels():
  image = np.full((4, 4, 3), 7, np.uint8)
  regenerate = np.eye(4, dtype=bool)
  out = edit_mode.masked_picture(image, regenerate)
  assert (out[regenerate] == edit_mode.MASK_GRAY).all() and (out[~regenerate] == 7).all()


def _request(tmp_path, image_path, **fields):
  # The checkpoint does not exist: every error below must come before loading (and compiling).
  defaults = dict(
    checkpoint=str(tmp_path / "missing"), image=image_path, edit="inpaint", output=str(tmp_path / "g.png")
  )
  return edit_mode.EditRequest(**{**defaults, **fields})


def test_bad_edit_input(tiny_config, picture, tmp_path):
  _, image_path = picture
  wrong_size = _write(tmp_path / "big.png", np.zeros((16, 16, 3), np.uint8))
  grey_mask = _write(tmp_path / "grey.png", np.full((8, 8), 100, np.uint8))
  small_mask = _write(tmp_path / "small.png", np.zeros((4, 4), np.uint8))
  cases = [
    (dict(image_path=wrong_size), "is 16x16 but this model makes 8x8 images"),
    (dict(mask=small_mask), "must match the model's 8x8 images"),
    (dict(mask=grey_mask), "is not binary: it has values \\[100\\]"),
    (dict(labels="10"), "--labels \\[10\\] out of range: this model has classes 0..9"),
    (dict(labels="1,2", num_samples=3), "give one class or one per sample"),
    (dict(edit="sideways"), "not a preset; use one of inpaint, outpaint, uncrop"),
    (dict(edit=None), "say what to regenerate"),
    (dict(output=None), "nothing to write"),
  ]
  for fields, message in cases:
    with pytest.raises(model_config.ConfigError, match=message):
      edit_mode.run(tiny_config, _request(tmp_path, **{"image_path": image_path, **fields}))
  assert not (tmp_path / "g.png").exists()
