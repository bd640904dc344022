"""The built-in demo: a class-conditional fractal model of scikit-learn's digits, trained on a laptop CPU.

8x8 images (1497 training / 300 held-out digits, bundled with scikit-learn:
nothing to download): an AR level over 4x4 patches of 2x2 pixels, an AR
level over the 4 pixels of each patch, and the pixel head.

    python -m fractal_jax.main --config=configs/demo.py --workdir=/tmp/fractal_demo
"""

from fractal_jax.config import base_config


def get_config():
  config = base_config()
  config.model.img_size_list = (8, 2, 1)
  config.model.widths = (128, 64, 32)
  config.model.depths = (4, 2, 1)
  config.model.heads = (4, 4, 2)
  config.model.types = ("ar", "ar", "pixel")
  config.model.num_classes = 10
  config.data.name = "digits"
  config.data.random_flip = False  # a mirrored digit is another shape
  config.train.global_batch = 64
  config.train.base_lr = 4e-3  # peak lr 1e-3 at batch 64
  config.train.num_steps = 600  # ~0.5-0.7 s per step on 2 CPU cores: under 10 minutes with compilation and evaluation
  config.train.warmup_steps = 50
  config.train.log_every_steps = 50
  config.train.checkpoint_every_steps = 300
  config.train.eval_every_steps = 600  # at the end: held-out bits/dim, 200 samples, digits classifier figures
  config.train.eval_num_samples = 200
  config.sample.num_iter = (16, 4)
  config.sample.cfg = 2.0
  config.sample.cfg_schedule = "constant"
  config.sample.batch_size = 100
  return config
