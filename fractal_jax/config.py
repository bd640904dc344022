"""Defaults shared by every config file in `configs/`.

A config file calls `base_config()` and sets the model tuples; every field
can be overridden on the command line (`--config.model.depths="(4,2,1)"`,
`--config.model.dtype=bfloat16`). Per-level tuples line up as documented in
`fractal_jax.model.model_config`.
"""

from __future__ import annotations

import pathlib

import ml_collections


def base_config() -> ml_collections.ConfigDict:
  """Every setting with its default and a comment (long on purpose: the one list of all fields, in reading order)."""
  config = ml_collections.ConfigDict()
  config.seed = 0
  config.model = ml_collections.ConfigDict(
    dict(
      img_size_list=(64, 4, 1),
      widths=(1024, 512, 128),
      depths=(32, 8, 3),
      heads=(16, 8, 4),
      types=("ar", "ar", "pixel"),
      num_conds=1,  # conditions a MAR level prepends (1..5: middle, top, right, bottom, left)
      guiding_pixel=False,  # MAR levels >= 1 model the patch's mean colour first
      num_classes=1000,
      label_drop_prob=0.1,  # classifier-free guidance: P(label -> "no class") in training
      attn_dropout=0.1,  # MAR levels only (the official AR fixes its own dropout)
      proj_dropout=0.1,
      r_weight=5.0,  # training weight of the red channel's cross-entropy
      dtype="float32",  # compute dtype; "bfloat16" for mixed precision
      param_dtype="float32",  # storage dtype of the parameters
      scan_blocks=True,  # nn.scan over the blocks of each level (False: a Python loop)
      remat_policy="none",  # "none", "full" or a jax.checkpoint_policies name
    )
  )
  # Sampling (--mode=sample): hyper-parameters of the official sampler.
  config.sample = ml_collections.ConfigDict(
    dict(
      num_iter=(64, 16),  # MAR steps per generator level (AR levels always take L steps)
      cfg=1.0,  # classifier-free guidance scale; 1 = none
      cfg_schedule="linear",  # "linear" ramps level 0's scale up to cfg, or "constant"
      temperature=1.0,  # MULTIPLIES the logits (official semantics: 1.1 sharpens)
      filter_threshold=1e-4,  # guidance leaves tokens below this conditional probability alone
      batch_size=16,  # images per device step (a multiple of the data x fsdp devices)
    )
  )
  # Training (--mode=train): the official recipe (REFERENCE_NOTES); paper configs set the batch.
  config.train = ml_collections.ConfigDict(
    dict(
      global_batch=256,  # images per optimisation step, over all devices and hosts
      base_lr=5e-5,  # peak lr = base_lr * global_batch / 256
      min_lr=0.0,
      epochs=800.0,
      warmup_epochs=40.0,
      num_steps=0,  # > 0: train this many steps instead of `epochs` (warm-up then in steps too)
      warmup_steps=0,  # used with num_steps
      weight_decay=0.05,
      grad_clip=3.0,
      grad_accum_steps=1,  # micro-batches per step (same update, less activation memory)
      ema_decay=0.0,  # > 0 keeps an EMA of the weights (sample/eval choose it with --weights=ema)
      init_from="",  # start from this checkpoint's weights (class table re-initialised if the classes differ)
      log_every_steps=100,
      tensorboard=True,  # TensorBoard events in the workdir (gs:// ones through TensorFlow's own GCS client)
      checkpoint_every_steps=1000,
      keep_checkpoints=3,  # the newest K ...
      keep_every_steps=0,  # ... plus every step divisible by this (0: none)
      eval_every_steps=5000,  # held-out NLL, a sample grid (and the digits quality figures) every N steps
      eval_max_images=0,  # > 0: the periodic NLL uses at most this many held-out images
      eval_num_samples=0,  # samples drawn for the periodic grid / quality figure (0: none)
      eval_fid_stats="",  # reference statistics (.npz): a small FID of those samples at every evaluation
      eval_inception="",  # Inception weight file for eval_fid_stats (default: default_1.pt when installed)
    )
  )
  # Evaluation (--mode=nll, fid, ref_stats).
  config.eval = ml_collections.ConfigDict(
    dict(
      nll_passes=10,  # evaluation masks averaged per image at MAR levels (the official NLL protocol)
      batch_size=64,  # images per step, over all devices and hosts
      max_images=0,  # > 0: evaluate at most this many held-out images
      ref_features=10000,  # ref_stats: pool features kept for precision / recall
    )
  )
  config.data = ml_collections.ConfigDict(
    dict(
      name="imagefolder",  # "imagefolder" (<root>/<split>/<class>/*.JPEG), "tfds" or "digits" (built in)
      root="",  # ImageFolder root (local or gs://)
      tfds_name="imagenet2012",
      tfds_data_dir="",
      train_split="train",
      eval_split="val",  # "validation" for tfds imagenet2012
      random_flip=True,
      worker_count=0,  # grain worker processes per host
    )
  )
  # Logical parameter axes -> mesh axes (fractal_jax.parallel.sharding); None = replicated.
  config.sharding_rules = (
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("qkv", "tensor"),
    ("heads", "tensor"),
    ("vocab", None),
    ("classes", None),
    ("patch", None),
    ("cond", None),
    ("seq", None),
    ("norm", None),
    ("layers", None),
  )
  config.mesh_shape = (-1, 1, 1)  # devices over ("data", "fsdp", "tensor"); -1 takes the rest
  return config


def load_config_file(path: str) -> ml_collections.ConfigDict:
  """`get_config()` of a config file, as `--config=<path>` does; `<file>.py:<arg>` calls `get_config(<arg>)`."""
  import importlib.util

  name, _, arg = str(path).partition(":")
  file = pathlib.Path(name)
  if not file.is_file():
    raise FileNotFoundError(f"config file {name!r} not found; the configs live in configs/ (e.g. configs/tiny.py).")
  spec = importlib.util.spec_from_file_location(f"fractal_config_{file.stem}", file)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg) if arg else module.get_config()


def config_path_from_argv(argv: list[str]) -> str | None:
  """The value of --config in a command line (`--config=F` or `--config F`), before absl parses it."""
  for i, arg in enumerate(argv):
    if arg.startswith("--config="):
      return arg.split("=", 1)[1]
    if arg == "--config" and i + 1 < len(argv):
      return argv[i + 1]
  return None


def exit_if_config_file_missing(argv: list[str]) -> None:
  """A clear error instead of ml_collections' traceback when --config names no file."""
  import pathlib
  import sys

  path = config_path_from_argv(argv)
  if path is not None and not pathlib.Path(path.split(":", 1)[0]).is_file():
    print(
      f"error: config file {path!r} not found; the configs live in configs/ (e.g. configs/tiny.py).", file=sys.stderr
    )
    sys.exit(2)


# The config files shipped in `configs/`, for telling users which one fits a checkpoint. The repository layout
# is `<root>/fractal_jax` beside `<root>/configs`; an installed package may have no `configs/`, and then every
# lookup returns nothing rather than failing.

# The released official models, in the order the README lists them.
OFFICIAL_CONFIGS = (
  "fractalar_64.py",
  "fractalmar_64.py",
  "fractalmar_base_256.py",
  "fractalmar_large_256.py",
  "fractalmar_huge_256.py",
)


def config_dir() -> pathlib.Path | None:
  """`<root>/configs` next to the package, or None when it is not there."""
  path = pathlib.Path(__file__).resolve().parent.parent / "configs"
  return path if path.is_dir() else None


def official_configs() -> dict[str, ml_collections.ConfigDict]:
  """`"configs/<file>"` -> its config, for the official models whose files exist."""
  directory = config_dir()
  if directory is None:
    return {}
  out = {}
  for name in OFFICIAL_CONFIGS:
    if (directory / name).is_file():
      out[f"configs/{name}"] = load_config_file(str(directory / name))
  return out
