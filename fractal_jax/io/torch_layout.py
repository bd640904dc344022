"""Official PyTorch checkpoint layout <-> fractal-jax parameters.

The official `FractalGen` nests one module per level: level i's generator is
`generator.` under `next_fractal.` i times, and the pixel head is
`next_fractal.` repeated once per generator level. Ours are siblings:
`levels_i/...` and `pixel_head/...`, with each level's blocks stacked under
`layers/blocks` along a leading [depth] axis (`layers/blocks_K` when
`scan_blocks` is off).

Per tensor the layouts differ only by a transpose or a rename:
  * Linear `weight` [out, in] <-> `kernel` [in, out] (transposed), `bias` as is;
  * LayerNorm / RMSNorm `weight` [D] <-> `scale`, LayerNorm `bias` as is;
  * `class_emb.weight` [C, D] <-> `class_emb/embedding`, `r_codebook.weight`
    [256, W] <-> `r_codebook`, `r_mlm.bias` [1, 256] <-> `r_mlm_bias`;
  * `fake_latent`, `mask_token`, `pos_embed_learned` keep name and shape;
  * `blocks.K.<rest>` <-> `layers/blocks/<rest>[K]`.
Fused projections keep their order ([q; k; v] along the output axis), so no
tensor is permuted and conversion is bit-exact both ways.

The expected tensors are built from `ModelSettings` alone (any number of
levels), in the official `state_dict()` order. Arrays are NumPy; dtypes pass
through unchanged.
"""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

from fractal_jax.model.layers import swiglu_hidden
from fractal_jax.model.model_config import LevelSpec, ModelSettings, PixelHeadSpec
from fractal_jax.model.pixel_head import CHANNELS, NUM_VALUES

Shape = tuple[int, ...]


class LayoutError(ValueError):
  """A state dict or parameter tree that does not match the model settings."""


@dataclasses.dataclass(frozen=True)
class TensorSpec:
  """One official tensor and where it lives in our parameters.

  Attributes:
    name: official state-dict name, e.g. `generator.blocks.3.attn.qkv.weight`.
    path: our parameter path, e.g. `("levels_0", "layers", "blocks", "attn", "qkv", "kernel")`.
    shape: official (PyTorch) shape.
    transpose: ours is the transpose (Linear weights).
    block: index K along our stacked [depth] axis, or None if not stacked.
  """

  name: str
  path: tuple[str, ...]
  shape: Shape
  transpose: bool = False
  block: int | None = None


def _linear(name: str, d_in: int, d_out: int, bias: bool = True) -> list[TensorSpec]:
  out = [TensorSpec(f"{name}.weight", (name, "kernel"), (d_out, d_in), transpose=True)]
  if bias:
    out.append(TensorSpec(f"{name}.bias", (name, "bias"), (d_out,)))
  return out


def _layer_norm(name: str, width: int) -> list[TensorSpec]:
  return [TensorSpec(f"{name}.weight", (name, "scale"), (width,)), TensorSpec(f"{name}.bias", (name, "bias"), (width,))]


def _param(name: str, shape: Shape, path: tuple[str, ...] | None = None) -> TensorSpec:
  return TensorSpec(name, path or (name,), shape)


def _under(name: str, path: tuple[str, ...], specs: Iterable[TensorSpec]) -> list[TensorSpec]:
  """Prefixes official names with `name.` and our paths with `path`."""
  return [dataclasses.replace(s, name=f"{name}.{s.name}", path=path + s.path) for s in specs]


def _timm_block(width: int) -> list[TensorSpec]:
  """MAR and pixel-head block (`norm1`, `attn`, `norm2`, `mlp`), relative names."""
  return [
    *_layer_norm("norm1", width),
    *_under("attn", ("attn",), _linear("qkv", width, 3 * width) + _linear("proj", width, width)),
    *_layer_norm("norm2", width),
    *_under("mlp", ("mlp",), _linear("fc1", width, 4 * width) + _linear("fc2", 4 * width, width)),
  ]


def _llama_block(width: int) -> list[TensorSpec]:
  """AR block: bias-free `wqkv`, `wo`, SwiGLU `w1`, `w3`, `w2`, two RMSNorms."""
  hidden = swiglu_hidden(width)
  attention = _linear("wqkv", width, 3 * width, bias=False) + _linear("wo", width, width, bias=False)
  ffn = [
    *_linear("w1", width, hidden, False),
    *_linear("w3", width, hidden, False),
    *_linear("w2", hidden, width, False),
  ]
  return [
    *_under("attention", ("attention",), attention),
    *_under("feed_forward", ("feed_forward",), ffn),
    _param("attention_norm.weight", (width,), ("attention_norm", "scale")),
    _param("ffn_norm.weight", (width,), ("ffn_norm", "scale")),
  ]


def _blocks(block: list[TensorSpec], depth: int, scan: bool) -> list[TensorSpec]:
  """`blocks.K.<name>` <-> `layers/blocks/<path>[K]` (or `layers/blocks_K/<path>`)."""
  out = []
  for k in range(depth):
    if scan:
      out += [dataclasses.replace(s, block=k) for s in _under(f"blocks.{k}", ("layers", "blocks"), block)]
    else:
      out += _under(f"blocks.{k}", ("layers", f"blocks_{k}"), block)
  return out


def _pixel_head(head: PixelHeadSpec, scan: bool) -> list[TensorSpec]:
  cond_width, width, depth = head.cond_width, head.width, head.depth
  codebooks = [_param(f"{c}_codebook.weight", (NUM_VALUES, width), (f"{c}_codebook",)) for c in CHANNELS]
  biases = [_param(f"{c}_mlm.bias", (1, NUM_VALUES), (f"{c}_mlm_bias",)) for c in CHANNELS]
  return [
    *_linear("cond_proj", cond_width, width),
    *codebooks,
    *_layer_norm("ln", width),
    *_blocks(_timm_block(width), depth, scan),
    *_layer_norm("norm", width),
    *biases,
  ]


def _ar_level(spec: LevelSpec, scan: bool) -> list[TensorSpec]:
  return [
    _param("pos_embed_learned", (1, spec.seq_len + 1, spec.width)),
    *_linear("patch_emb", spec.patch_dim, spec.width),
    *_layer_norm("patch_emb_ln", spec.width),
    *_linear("cond_emb", spec.cond_width, spec.width),
    *_blocks(_llama_block(spec.width), spec.depth, scan),
    *_layer_norm("norm", spec.width),
  ]


def _mar_level(spec: LevelSpec, scan: bool) -> list[TensorSpec]:
  num_tokens = int(spec.guiding_pixel) + spec.num_conds + spec.seq_len
  out = [
    _param("mask_token", (1, 1, spec.width)),
    _param("pos_embed_learned", (1, num_tokens, spec.width)),
    *_linear("patch_emb", spec.patch_dim, spec.width),
    *_layer_norm("patch_emb_ln", spec.width),
    *_linear("cond_emb", spec.cond_width, spec.width),
  ]
  if spec.guiding_pixel:
    out += _linear("pix_proj", 3, spec.width)
  out += [*_blocks(_timm_block(spec.width), spec.depth, scan), *_layer_norm("norm", spec.width)]
  if spec.guide_head is not None:
    out += _under("guiding_pixel_loss", ("guiding_pixel_loss",), _pixel_head(spec.guide_head, scan))
  return out


def tensor_specs(model_settings: ModelSettings) -> list[TensorSpec]:
  """Every tensor of the official model, in the official `state_dict()` order."""
  s = model_settings
  specs = [
    _param("fake_latent", (1, s.class_width)),
    _param("class_emb.weight", (s.num_classes, s.class_width), ("class_emb", "embedding")),
  ]
  for spec in s.levels:
    level = _ar_level(spec, s.scan_blocks) if spec.kind == "ar" else _mar_level(spec, s.scan_blocks)
    specs += _under(".".join(["next_fractal"] * spec.index + ["generator"]), (f"levels_{spec.index}",), level)
  pixel = _pixel_head(s.pixel, s.scan_blocks)
  specs += _under(".".join(["next_fractal"] * len(s.levels)), ("pixel_head",), pixel)
  return specs


def state_dict_shapes(model_settings: ModelSettings) -> dict[str, Shape]:
  """Official name -> PyTorch shape of every tensor, in `state_dict()` order."""
  return {s.name: s.shape for s in tensor_specs(model_settings)}


def param_shapes(model_settings: ModelSettings) -> dict[str, Shape]:
  """Our `/`-joined parameter path -> shape (stacked blocks get a leading [depth] axis)."""
  groups: dict[tuple[str, ...], list[TensorSpec]] = collections.defaultdict(list)
  for spec in tensor_specs(model_settings):
    groups[spec.path].append(spec)
  shapes = {}
  for path, specs in groups.items():
    inner = specs[0].shape[::-1] if specs[0].transpose else specs[0].shape
    shapes["/".join(path)] = inner if specs[0].block is None else (len(specs),) + inner
  return shapes


def _check(found: Mapping[str, Shape], expected: Mapping[str, Shape], what: str, hint: str = "") -> None:
  """Raises LayoutError naming every missing, unexpected and mis-shaped entry."""
  missing = [k for k in expected if k not in found]
  unexpected = [k for k in found if k not in expected]
  misshaped = [k for k in expected if k in found and tuple(found[k]) != tuple(expected[k])]
  if not (missing or unexpected or misshaped):
    return
  lines = [
    f"{what} does not match the model settings: {len(missing)} missing, {len(unexpected)} unexpected, "
    f"{len(misshaped)} mis-shaped tensor(s).{hint}"
  ]
  lines += [f"  missing: {k} {list(expected[k])}" for k in missing]
  lines += [f"  unexpected: {k} {list(found[k])}" for k in unexpected]
  lines += [f"  mis-shaped: {k} expected {list(expected[k])}, got {list(found[k])}" for k in misshaped]
  raise LayoutError("\n".join(lines))


def _flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
  flat = {}
  for key, value in tree.items():
    if isinstance(value, Mapping):
      flat.update(_flatten(value, f"{prefix}{key}/"))
    else:
      flat[f"{prefix}{key}"] = value
  return flat


def params_to_state_dict(params: Mapping[str, Any], model_settings: ModelSettings) -> dict[str, np.ndarray]:
  """Our parameters -> the official state dict.

  Args:
    params: our parameter tree (the `"params"` collection; JAX or NumPy
      leaves), e.g. `levels_0/layers/blocks/attn/qkv/kernel` [depth, D, 3D].
    model_settings: the settings the parameters were built with.

  Returns:
    Official name -> NumPy array in PyTorch layout (e.g.
    `generator.blocks.K.attn.qkv.weight` [3D, D]), in `state_dict()` order;
    `torch.from_numpy` each value to load it with `load_state_dict`.

  Raises:
    LayoutError: naming every missing, unexpected and mis-shaped parameter.
  """
  flat = _flatten(params)
  _check({k: np.shape(v) for k, v in flat.items()}, param_shapes(model_settings), "parameter tree")
  arrays = {k: np.asarray(v) for k, v in flat.items()}
  out = {}
  for spec in tensor_specs(model_settings):
    value = arrays["/".join(spec.path)]
    if spec.block is not None:
      value = value[spec.block]
    out[spec.name] = np.ascontiguousarray(value.T if spec.transpose else value)
  return out


def state_dict_to_params(state_dict: Mapping[str, Any], model_settings: ModelSettings) -> dict[str, Any]:
  """The official state dict -> our parameters.

  Args:
    state_dict: official name -> array in PyTorch layout (NumPy arrays, or
      anything `np.asarray` takes, e.g. CPU tensors): `checkpoint["model"]`.
    model_settings: settings of the model to load into (levels, widths,
      depths, `num_conds`, `guiding_pixel`, `scan_blocks` must match the
      checkpoint).

  Returns:
    Nested dict of NumPy arrays in our layout (the `"params"` collection),
    block tensors stacked along a leading [depth] axis.

  Raises:
    LayoutError: naming every missing, unexpected and mis-shaped tensor,
      with the expected and found shapes, in one message.
  """
  hint = ""
  if "model" in state_dict and isinstance(state_dict["model"], Mapping):
    hint = ' (This looks like a whole checkpoint: pass checkpoint["model"].)'
  specs = tensor_specs(model_settings)
  found = {k: np.shape(v) for k, v in state_dict.items()}
  _check(found, {s.name: s.shape for s in specs}, "state dict", hint)
  flat: dict[str, Any] = {}
  stacks: dict[str, list[np.ndarray]] = collections.defaultdict(list)
  for spec in specs:
    value = np.asarray(state_dict[spec.name])
    value = value.T if spec.transpose else value
    if spec.block is None:
      flat["/".join(spec.path)] = np.ascontiguousarray(value)
    else:
      stacks["/".join(spec.path)].append(value)  # specs list blocks in order K = 0, 1, ...
  flat.update({path: np.stack(values) for path, values in stacks.items()})
  params: dict[str, Any] = {}
  for path, value in flat.items():
    *parents, leaf = path.split("/")
    node = params
    for key in parents:
      node = node.setdefault(key, {})
    node[leaf] = value
  return params


def check_param_shapes(params: Mapping[str, Any], model_settings: ModelSettings) -> None:
  """Raises LayoutError naming every missing, unexpected and mis-shaped leaf of a parameter tree."""
  flat = _flatten(params)
  _check({k: np.shape(v) for k, v in flat.items()}, param_shapes(model_settings), "parameter tree")
