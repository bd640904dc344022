"""`--mode=sample` end to end on a tiny checkpoint: PNG grid, per-image PNGs, GIF, errors."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image
from test_cli import run_main


def test_sample_writes_grid_images_and_gif(tiny_checkpoint, tmp_path):
  grid, images, gif = tmp_path / "grid.png", tmp_path / "images", tmp_path / "gen.gif"
  result = run_main(
    "--config=configs/tiny.py",
    "--mode=sample",
    f"--checkpoint={tiny_checkpoint}",
    "--num_images=20",
    "--config.sample.batch_size=8",
    "--config.sample.cfg=2.0",
    f"--output={grid}",
    f"--output_dir={images}",
    f"--gif={gif}",
  )
  assert result.returncode == 0, result.stderr
  assert "images/s" in result.stdout and "compiled in" in result.stdout
  files = sorted(images.glob("*.png"))
  assert len(files) == 20
  assert files[0].name == "000000_class0.png" and files[-1].name == "000019_class9.png"
  first = np.asarray(Image.open(files[0]))
  assert first.shape == (8, 8, 3) and first.dtype == np.uint8
  assert Image.open(grid).size[0] >= 8 * 5
  animation = Image.open(gif)
  assert animation.n_frames == 4  # one frame per level-0 step (num_iter 4)


@pytest.mark.parametrize(
  "args,message",
  [
    (["--labels=3,12"], "--labels [12] out of range: this model has classes 0..9"),
    (["--num_images=15"], "not a multiple of the 10 classes"),
    (["--labels=1", "--config.sample.num_iter=(4,)"], "num_iter has 1 entries but the model has 2"),
    (["--labels=1", "--config.sample.cfg=0.5"], "cfg must be >= 1"),
    (["--labels=1", "--config.sample.temperature=0"], "temperature must be > 0"),
    (["--labels=1", "--config.model.depths=(2,1,1)"], "depths"),
  ],
)
def test_sample_bad_input(tiny_checkpoint, tmp_path, args, message):
  result = run_main(
    "--config=configs/tiny.py", "--mode=sample", f"--checkpoint={tiny_checkpoint}", f"--output={tmp_path}/g.png", *args
  )
  assert result.returncode == 2, result.stdout + result.stderr
  assert message in result.stderr
  assert "Traceback" not in result.stderr
  assert not (tmp_path / "g.png").exists()
