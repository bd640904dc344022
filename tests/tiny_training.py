"""The small training setup the tests share (one schedule, so every run compiles the same programs)."""

from __future__ import annotations

from conftest import ROOT

from fractal_jax.config import load_config_file

# A two-level model (8x8 digits: a MAR level over pixels, the pixel head) on the built-in digits, batch 8.
# Every run shares one schedule (1000 steps) and stops early with `stop_at_step`, so that all runs compile
# the same programs (the persistent compilation cache then serves them).
MODEL = dict(img_size_list=(8, 1), widths=(16, 8), depths=(1, 1), heads=(2, 2), types=("mar", "pixel"), num_conds=2)
TRAIN = dict(
  global_batch=8, num_steps=1000, warmup_steps=2, log_every_steps=1, eval_every_steps=0, checkpoint_every_steps=1000
)
TINY_FLAGS = (
  "--config=configs/tiny.py",
  *(f"--config.model.{k}={v!r}".replace(" ", "") for k, v in MODEL.items()),
  "--config.sample.num_iter=(4,)",
  "--config.data.name=digits",
  "--config.data.random_flip=False",
  *(f"--config.train.{k}={v}" for k, v in TRAIN.items()),
)


def tiny_train_config(**train: object):
  config = load_config_file(str(ROOT / "configs" / "tiny.py"))
  config.model.update(MODEL)
  config.sample.num_iter = (4,)
  config.data.name = "digits"
  config.data.random_flip = False
  config.train.update(TRAIN)
  config.train.update(train)
  return config
