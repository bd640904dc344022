"""FractalMAR, ImageNet 256x256 (official `fractalmar_{base,large,huge}_in256`): one definition, three sizes.

    --config=configs/fractalmar_256.py:large      (or the thin files fractalmar_<size>_256.py)

Four levels (256 -> 16 -> 4 -> 1 pixels), three MAR generators with five
neighbour conditions and a guiding pixel at levels 1 and 2, then the pixel head.
"""

from fractal_jax.config import base_config

# size: (widths, depths, heads, cfg of the paper's FID run); 186,300,224 / 437,000,064 / 849,586,240 parameters
SIZES = {
  "base": ((768, 384, 192, 64), (24, 6, 3, 1), (12, 6, 3, 4), 29.0),
  "large": ((1024, 512, 256, 64), (32, 8, 4, 1), (16, 8, 4, 4), 21.0),
  "huge": ((1280, 640, 320, 64), (40, 10, 5, 1), (16, 8, 4, 4), 19.0),
}


def get_config(size: str = "large"):
  if size not in SIZES:
    raise ValueError(
      f"unknown FractalMAR-256 size {size!r}; use one of {', '.join(SIZES)} (e.g. fractalmar_256.py:large)"
    )
  widths, depths, heads, cfg = SIZES[size]
  config = base_config()
  config.model.img_size_list = (256, 16, 4, 1)
  config.model.widths = widths
  config.model.depths = depths
  config.model.heads = heads
  config.model.types = ("mar", "mar", "mar", "pixel")
  config.model.num_conds = 5
  config.model.guiding_pixel = True
  # In training, levels 2 and 3 (the pixel head) run ~1e5 and ~1e6 items per chip at 32 images: their blocks
  # take them in 8 sequential chunks (the same FLOPs with remat_policy="full"; FractalMAR-Large at 32 images
  # per chip on v5p-64: 77.4 -> 36.5 GiB, README).
  config.model.item_chunks = (1, 1, 8, 8)
  # Training as the official recipe: ImageNet 256x256 (ImageFolder, ADM center crop, random flip),
  # global batch 1024, lr 5e-5 * 1024 / 256, 800 epochs with 40 of warm-up.
  config.train.global_batch = 1024
  config.data.name = "imagefolder"  # --config.data.root=/path/to/imagenet (train/ and val/ inside)
  # Sampling as the paper's FID runs.
  config.sample.num_iter = (64, 16, 16)
  config.sample.cfg = cfg
  config.sample.temperature = 1.1
  return config
