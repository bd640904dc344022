"""Model configuration: validation and the per-level layout derived from it.

The model section of a config mirrors the official `FractalGen` constructor,
one tuple entry per level, top (whole image) to bottom (one pixel):

    img_size_list = (64, 4, 1)            # image side seen by each level
    widths        = (1024, 512, 128)      # transformer width of each level
    depths        = (32, 8, 3)            # number of blocks of each level
    heads         = (16, 8, 4)            # attention heads of each level
    types         = ("ar", "ar", "pixel")  # generator type of each level

Level i (for i < num_levels - 1) is a generator over
`seq_len = (img[i] / img[i+1])**2` patches of `img[i+1]` pixels squared; its
conditions come from level i-1 (width `widths[i-1]`; level 0 gets the class
embedding, width `widths[0]`). The last entry of every tuple configures the
pixel head, which models one pixel's R, G, B given the condition from the last
generator level. The official code writes a generator type ("ar") in the last
`types` slot and ignores it; fractal-jax requires "pixel" there, so that the
tuple says what the level is.

Errors are raised before anything is built or compiled (`ConfigError`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

GENERATOR_TYPES = ("ar", "mar")
PIXEL_TYPE = "pixel"
MAX_CONDS = 5  # middle, top, right, bottom, left
DTYPES = ("float32", "bfloat16", "float16")
KERNELS = ("auto", "standard", "cpu")
REMAT_POLICIES = (
  "none",
  "full",
  "dots_saveable",
  "dots_with_no_batch_dims_saveable",
  "nothing_saveable",
  "everything_saveable",
)


class ConfigError(ValueError):
  """A model or run configuration that cannot work; the message says how to fix it."""


@dataclasses.dataclass(frozen=True)
class PixelHeadSpec:
  """A pixel head: a causal transformer over (condition, R, G) tokens that models one pixel's R, G, B.

  The last level is one; so is the guiding-pixel head of a MAR level (`LevelSpec.guide_head`).
  """

  cond_width: int  # width of the condition it receives
  width: int
  depth: int
  heads: int
  r_weight: float  # training weight of the red channel's cross-entropy (green and blue: 1)
  item_chunks: int = 1  # its blocks run their items in this many sequential chunks (`config.model.item_chunks`)


def guiding_head(cond_width: int) -> PixelHeadSpec:
  """The guiding-pixel head of a MAR level, conditioned on its middle condition: fixed in the official code."""
  return PixelHeadSpec(cond_width=cond_width, width=128, depth=3, heads=4, r_weight=5.0)


@dataclasses.dataclass(frozen=True)
class LevelSpec:
  """Static description of one generator level (everything but the pixel head)."""

  index: int
  kind: str  # "ar" or "mar"
  img_size: int  # side of the image this level generates
  patch_size: int  # side of one patch (= next level's img_size)
  seq_len: int  # number of patches, (img_size / patch_size) ** 2
  width: int
  depth: int
  heads: int
  cond_width: int  # width of the conditions this level receives
  num_conds: int  # conditions prepended as tokens (AR always uses 1)
  next_num_conds: int  # how many of the 5 output conditions the next level reads
  guide_head: PixelHeadSpec | None  # models the patch's mean colour first (MAR, levels >= 1); else None
  item_chunks: int = 1  # its blocks run their items in this many sequential chunks (`config.model.item_chunks`)

  @property
  def guiding_pixel(self) -> bool:
    return self.guide_head is not None

  @property
  def grid_size(self) -> int:
    return self.img_size // self.patch_size

  @property
  def head_dim(self) -> int:
    return self.width // self.heads

  @property
  def patch_dim(self) -> int:
    return 3 * self.patch_size**2


def _get(cfg: Any, name: str) -> Any:
  if isinstance(cfg, Mapping):
    if name not in cfg:
      raise ConfigError(f"config.model has no field {name!r}; see configs/tiny.py for a complete example.")
    return cfg[name]
  if not hasattr(cfg, name):
    raise ConfigError(f"config.model has no field {name!r}; see configs/tiny.py for a complete example.")
  return getattr(cfg, name)


def _as_tuple(name: str, value: Any) -> tuple:
  if isinstance(value, str) or not isinstance(value, Sequence):
    raise ConfigError(f"config.model.{name} must be a tuple with one entry per level, got {value!r}.")
  return tuple(value)


def validate(model_cfg: Any) -> tuple[tuple[LevelSpec, ...], PixelHeadSpec]:
  """Checks a model config and returns the per-level specs.

  Args:
    model_cfg: the `config.model` ConfigDict (or any mapping with its fields).

  Returns:
    (levels, pixel_head): one LevelSpec per generator level, top to bottom,
    and the pixel head's spec.

  Raises:
    ConfigError: naming the field at fault and how to fix it.
  """
  fields = _per_level_fields(model_cfg)
  num_conds, guiding_pixel = _check_scalars(model_cfg, fields["types"])
  chunks = _item_chunks(model_cfg, len(fields["types"]))
  levels = tuple(
    dataclasses.replace(spec, item_chunks=k) for spec, k in zip(_level_specs(fields, num_conds, guiding_pixel), chunks)
  )
  widths, depths, heads = fields["widths"], fields["depths"], fields["heads"]
  pixel = PixelHeadSpec(
    cond_width=widths[-2],
    width=widths[-1],
    depth=depths[-1],
    heads=heads[-1],
    r_weight=float(_get(model_cfg, "r_weight")),
    item_chunks=chunks[-1],
  )
  return levels, pixel


def _item_chunks(model_cfg: Any, num_levels: int) -> tuple[int, ...]:
  """`config.model.item_chunks`, one per level (absent or () in configs and checkpoints from before it: all 1)."""
  value = model_cfg.get("item_chunks", ()) if isinstance(model_cfg, Mapping) else getattr(model_cfg, "item_chunks", ())
  chunks = _as_tuple("item_chunks", value) or (1,) * num_levels
  if len(chunks) != num_levels or not all(isinstance(k, int) and not isinstance(k, bool) and k >= 1 for k in chunks):
    raise ConfigError(
      f"config.model.item_chunks={value!r}: give () or one positive integer per level ({num_levels}), "
      "e.g. --config.model.item_chunks=" + str((1,) * (num_levels - 2) + (8, 8)).replace(" ", "") + "."
    )
  return chunks


def _per_level_fields(model_cfg: Any) -> dict[str, tuple]:
  """The per-level tuples (`img_size_list`, `widths`, `depths`, `heads`, `types`), checked."""
  img_sizes = _as_tuple("img_size_list", _get(model_cfg, "img_size_list"))
  fields = {name: _as_tuple(name, _get(model_cfg, name)) for name in ("widths", "depths", "heads", "types")}
  num_levels = len(img_sizes)
  bad = {name: len(v) for name, v in fields.items() if len(v) != num_levels}
  if bad:
    lengths = ", ".join(f"{n} has {k}" for n, k in bad.items())
    raise ConfigError(
      f"per-level tuples of inconsistent length: img_size_list has {num_levels} entries but {lengths}. "
      "Give every tuple one entry per level (the last entry configures the pixel head)."
    )
  if num_levels < 2:
    raise ConfigError("img_size_list needs at least two levels: one generator and the pixel level (size 1).")
  for name in ("img_size_list", "widths", "depths", "heads"):
    values = img_sizes if name == "img_size_list" else fields[name]
    if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in values):
      raise ConfigError(f"config.model.{name} must hold positive integers, got {values!r}.")
  if img_sizes[-1] != 1:
    raise ConfigError(f"the last image size must be 1 (the pixel level), got img_size_list={img_sizes}.")
  for i in range(num_levels - 1):
    if img_sizes[i] % img_sizes[i + 1] or img_sizes[i] == img_sizes[i + 1]:
      raise ConfigError(
        f"image sizes must divide: level {i} has size {img_sizes[i]}, which is not a multiple > 1 of "
        f"level {i + 1}'s size {img_sizes[i + 1]} (img_size_list={img_sizes})."
      )
  types = fields["types"]
  for i, kind in enumerate(types[:-1]):
    if kind not in GENERATOR_TYPES:
      raise ConfigError(f"unknown generator type {kind!r} at level {i} (types={types}); use one of {GENERATOR_TYPES}.")
  if types[-1] != PIXEL_TYPE:
    raise ConfigError(
      f"the last entry of types must be {PIXEL_TYPE!r} (the pixel head), got {types[-1]!r}. The official "
      f"code writes 'ar' there and ignores it; write {PIXEL_TYPE!r}."
    )
  widths, heads = fields["widths"], fields["heads"]
  for i in range(num_levels):
    if widths[i] % heads[i]:
      raise ConfigError(f"level {i}: width {widths[i]} is not divisible by heads {heads[i]}.")
    if i < num_levels - 1 and types[i] == "ar" and (widths[i] // heads[i]) % 4:
      raise ConfigError(
        f"level {i} is AR with head width {widths[i] // heads[i]} (= {widths[i]} / {heads[i]}), which is "
        "not divisible by 4: its 2-D rotary embedding splits each head into row and column halves of "
        "rotary pairs. Change widths or heads."
      )
  return {"img_size_list": img_sizes, **fields}


def _check_scalars(model_cfg: Any, types: tuple[str, ...]) -> tuple[int, bool]:
  """Checks the model's single-valued fields; returns (num_conds, guiding_pixel)."""
  num_conds = _get(model_cfg, "num_conds")
  if not isinstance(num_conds, int) or isinstance(num_conds, bool) or not 1 <= num_conds <= MAX_CONDS:
    raise ConfigError(f"num_conds must be an integer in 1..{MAX_CONDS}, got {num_conds!r}.")
  for i in range(1, len(types) - 1):
    if types[i] == "mar" and types[i - 1] == "ar" and num_conds > 1:
      raise ConfigError(
        f"level {i} is MAR with num_conds={num_conds} below an AR level: an AR level emits only the "
        "middle condition (the official code crashes here). Set num_conds=1 or make level "
        f"{i - 1} MAR."
      )
  guiding_pixel = bool(_get(model_cfg, "guiding_pixel"))
  for name in ("dtype", "param_dtype"):
    value = _get(model_cfg, name)
    if value not in DTYPES:
      raise ConfigError(f"config.model.{name}={value!r}; use one of {DTYPES}.")
  policy = _get(model_cfg, "remat_policy")
  if policy not in REMAT_POLICIES:
    raise ConfigError(f"config.model.remat_policy={policy!r}; use one of {REMAT_POLICIES}.")
  num_classes = _get(model_cfg, "num_classes")
  if not isinstance(num_classes, int) or num_classes < 1:
    raise ConfigError(f"config.model.num_classes must be a positive integer, got {num_classes!r}.")
  for name in ("label_drop_prob", "attn_dropout", "proj_dropout"):
    value = _get(model_cfg, name)
    if not 0.0 <= float(value) < 1.0:
      raise ConfigError(f"config.model.{name} must be in [0, 1), got {value!r}.")
  return num_conds, guiding_pixel


def _level_specs(fields: dict[str, tuple], num_conds: int, guiding_pixel: bool) -> tuple[LevelSpec, ...]:
  """One `LevelSpec` per generator level, from checked per-level tuples."""
  img_sizes, widths, depths, heads, types = (
    fields[name] for name in ("img_size_list", "widths", "depths", "heads", "types")
  )
  levels = []
  for i in range(len(img_sizes) - 1):
    kind = types[i]
    cond_width = widths[i - 1] if i > 0 else widths[0]
    levels.append(
      LevelSpec(
        index=i,
        kind=kind,
        img_size=img_sizes[i],
        patch_size=img_sizes[i + 1],
        seq_len=(img_sizes[i] // img_sizes[i + 1]) ** 2,
        width=widths[i],
        depth=depths[i],
        heads=heads[i],
        cond_width=cond_width,
        num_conds=num_conds if kind == "mar" else 1,
        next_num_conds=num_conds if types[i + 1] == "mar" else 1,  # AR levels and the pixel head read one
        guide_head=guiding_head(cond_width) if guiding_pixel and kind == "mar" and i > 0 else None,
      )
    )
  return tuple(levels)


def items_per_image(levels: Sequence[LevelSpec], level_index: int) -> int:
  """How many items (patches of patches ...) level `level_index` sees per image."""
  count = 1
  for spec in levels[:level_index]:
    count *= spec.seq_len
  return count


@dataclasses.dataclass(frozen=True)
class ModelSettings:
  """Everything the Flax model needs, hashable (a validated `config.model`)."""

  levels: tuple[LevelSpec, ...]
  pixel: PixelHeadSpec
  num_classes: int
  label_drop_prob: float
  attn_dropout: float
  proj_dropout: float
  dtype: str
  param_dtype: str
  scan_blocks: bool
  remat_policy: str
  kernels: str = "standard"  # "cpu" or "standard" (`resolve_kernels`): how the modules compute

  @property
  def img_size(self) -> int:
    return self.levels[0].img_size

  @property
  def class_width(self) -> int:
    return self.levels[0].cond_width


def resolve_kernels(name: str, platform: str | None = None) -> str:
  """`config.model.kernels` -> "cpu" or "standard" for computations on `platform` (default: JAX's backend).

  Some operations have CPU-tuned forms (the flattened Dense, LayerNorm's and
  dropout attention's written-out gradients, short-sequence attention,
  unrolled dropout hashes, SwiGLU's fused product, block stacks of up to 8
  applied as loops): each was measured faster with XLA's CPU backend and
  computes the same function as the standard operation it replaces
  (`tests/test_kernels.py`). "auto" takes them on CPU only; TPU and GPU run
  the standard Flax/JAX operations, which their compilers fuse themselves
  (attention over short sequences there keeps the item axis last, against
  TPU tile padding: `attention` module docstring).
  """
  if name not in KERNELS:
    raise ConfigError(f"config.model.kernels={name!r}; use one of {KERNELS}.")
  if name != "auto":
    return name
  if platform is None:
    import jax

    platform = jax.default_backend()
  return "cpu" if platform == "cpu" else "standard"


def settings(model_cfg: Any, platform: str | None = None) -> ModelSettings:
  """Validates `config.model` and freezes it into `ModelSettings`.

  `platform` ("cpu", "tpu", "gpu") decides `kernels="auto"` (`resolve_kernels`); default: JAX's backend.
  """
  levels, pixel = validate(model_cfg)
  kernels = (
    model_cfg.get("kernels", "auto") if isinstance(model_cfg, Mapping) else getattr(model_cfg, "kernels", "auto")
  )
  return ModelSettings(
    levels=levels,
    pixel=pixel,
    num_classes=int(_get(model_cfg, "num_classes")),
    label_drop_prob=float(_get(model_cfg, "label_drop_prob")),
    attn_dropout=float(_get(model_cfg, "attn_dropout")),
    proj_dropout=float(_get(model_cfg, "proj_dropout")),
    dtype=str(_get(model_cfg, "dtype")),
    param_dtype=str(_get(model_cfg, "param_dtype")),
    scan_blocks=bool(_get(model_cfg, "scan_blocks")),
    remat_policy=str(_get(model_cfg, "remat_policy")),
    kernels=resolve_kernels(str(kernels), platform),
  )
