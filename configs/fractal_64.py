"""FractalAR and FractalMAR, ImageNet 64x64 (official `fractalar_in64`, `fractalmar_in64`): one definition.

    --config=configs/fractal_64.py:mar      (or the thin files fractalar_64.py / fractalmar_64.py)

Three levels (64 -> 4 -> 1 pixels): two generators of the given kind, then the pixel head.
"""

from fractal_jax.config import base_config

# generator kind: (conditions of a level, cfg and temperature of the paper's FID run); 442,068,224 / 431,995,648 parameters
KINDS = {
  "ar": (1, 11.0, 1.03),
  "mar": (5, 6.5, 1.02),
}


def get_config(kind: str = "mar"):
  if kind not in KINDS:
    raise ValueError(f"unknown generator kind {kind!r}; use one of {', '.join(KINDS)} (e.g. fractal_64.py:mar)")
  num_conds, cfg, temperature = KINDS[kind]
  config = base_config()
  config.model.img_size_list = (64, 4, 1)
  config.model.widths = (1024, 512, 128)
  config.model.depths = (32, 8, 3)
  config.model.heads = (16, 8, 4)
  config.model.types = (kind, kind, "pixel")
  config.model.num_conds = num_conds
  # Training as the official recipe: ImageNet 64x64 (ImageFolder, ADM center crop, random flip),
  # global batch 2048, lr 5e-5 * 2048 / 256, 800 epochs with 40 of warm-up.
  config.train.global_batch = 2048
  config.data.name = "imagefolder"  # --config.data.root=/path/to/imagenet (train/ and val/ inside)
  # Sampling as the paper's FID runs.
  config.sample.num_iter = (64, 16)
  config.sample.cfg = cfg
  config.sample.temperature = temperature
  return config
