"""FractalMAR, ImageNet 64x64 (official `fractalmar_in64`): 431,995,648 parameters."""

from fractal_jax.config import base_config


def get_config():
  config = base_config()
  config.model.img_size_list = (64, 4, 1)
  config.model.widths = (1024, 512, 128)
  config.model.depths = (32, 8, 3)
  config.model.heads = (16, 8, 4)
  config.model.types = ("mar", "mar", "pixel")
  config.model.num_conds = 5
  # Training as the official recipe: ImageNet 64x64 (ImageFolder, ADM center crop, random flip),
  # global batch 2048, lr 5e-5 * 2048 / 256, 800 epochs with 40 of warm-up.
  config.train.global_batch = 2048
  config.data.name = "imagefolder"  # --config.data.root=/path/to/imagenet (train/ and val/ inside)
  # Sampling as the paper's FID runs.
  config.sample.num_iter = (64, 16)
  config.sample.cfg = 6.5
  config.sample.temperature = 1.02
  return config
