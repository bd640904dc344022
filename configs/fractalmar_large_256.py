"""FractalMAR-Large, ImageNet 256x256 (official `fractalmar_large_in256`): 437,000,064 parameters."""

from fractal_jax.config import base_config


def get_config():
  config = base_config()
  config.model.img_size_list = (256, 16, 4, 1)
  config.model.widths = (1024, 512, 256, 64)
  config.model.depths = (32, 8, 4, 1)
  config.model.heads = (16, 8, 4, 4)
  config.model.types = ("mar", "mar", "mar", "pixel")
  config.model.num_conds = 5
  config.model.guiding_pixel = True
  # Training as the official recipe: ImageNet 256x256 (ImageFolder, ADM center crop, random flip),
  # global batch 1024, lr 5e-5 * 1024 / 256, 800 epochs with 40 of warm-up.
  config.train.global_batch = 1024
  config.data.name = "imagefolder"  # --config.data.root=/path/to/imagenet (train/ and val/ inside)
  # Sampling as the paper's FID runs.
  config.sample.num_iter = (64, 16, 16)
  config.sample.cfg = 21.0
  config.sample.temperature = 1.1
  return config
