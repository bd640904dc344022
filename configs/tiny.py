"""A CPU smoke-test model: 8x8 images, a MAR level over 2x2 patches, an AR level, the pixel head."""

from fractal_jax.config import base_config


def get_config():
  config = base_config()
  config.model.img_size_list = (8, 2, 1)
  config.model.widths = (32, 16, 16)
  config.model.depths = (1, 1, 1)
  config.model.heads = (2, 2, 2)
  config.model.types = ("mar", "ar", "pixel")
  config.model.num_conds = 5
  config.model.num_classes = 10
  config.sample.num_iter = (4, 4)
  config.sample.batch_size = 8
  return config
