"""PyTorch checkpoints without torch (`torch_pickle`), our checkpoints (`checkpoint_io`) and the converter CLI."""

from __future__ import annotations

import collections
import importlib.util
import io
import os
import pathlib
import pickle
import subprocess
import sys
import zipfile

import jax
import ml_dtypes
import numpy as np
import pytest
from conftest import ROOT

from fractal_jax import config as config_lib
from fractal_jax import convert
from fractal_jax.config import base_config
from fractal_jax.io import model_checkpoint, torch_layout, torch_pickle
from fractal_jax.model import model_config

HAS_TORCH = importlib.util.find_spec("torch") is not None
FIXTURES = pathlib.Path(__file__).resolve().parent / "fixtures"
PTH = FIXTURES / "tiny_mar.pth"  # written by tests/fixtures/make_torch_fixture.py with torch 2.13
# TINY_MODEL of make_torch_fixture.py.
FIXTURE_MODEL = dict(
  img_size_list=(2, 1), widths=(8, 8), depths=(1, 1), heads=(2, 2), types=("mar", "pixel"), num_conds=1, num_classes=3
)


def fixture_cfg(**overrides):
  cfg = base_config().model
  cfg.update(FIXTURE_MODEL | overrides)
  return cfg


def expected_arrays() -> dict[str, np.ndarray]:
  """`<entry>/<name>` -> the array torch saved (bfloat16 viewed as its uint16 bits)."""
  with np.load(FIXTURES / "tiny_mar_expected.npz") as npz:
    return {k: npz[k] for k in npz.files}


def assert_same(ours: np.ndarray, key: str, expected: dict[str, np.ndarray]) -> None:
  dtype = str(expected[f"dtype/{key}"])
  assert str(ours.dtype) == dtype, key
  bits = ours.view(np.uint16) if dtype == "bfloat16" else ours
  np.testing.assert_array_equal(bits, expected[key], strict=True, err_msg=key)


def random_state_dict(model_settings: model_config.ModelSettings, seed: int = 0) -> dict[str, np.ndarray]:
  rng = np.random.default_rng(seed)
  shapes = torch_layout.state_dict_shapes(model_settings)
  return {name: rng.standard_normal(shape).astype(np.float32) for name, shape in shapes.items()}


def tiny_params(model_cfg, seed: int = 0) -> dict:
  model_settings = model_config.settings(model_cfg)
  return torch_layout.state_dict_to_params(random_state_dict(model_settings, seed), model_settings)


def assert_trees_equal(a, b) -> None:
  jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y), strict=True), a, b)


def write_zip(path: pathlib.Path, records: dict[str, bytes]) -> pathlib.Path:
  with zipfile.ZipFile(path, "w") as archive:
    for name, data in records.items():
      archive.writestr(name, data)
  return path


# --- reading .pth files without torch ---------------------------------------------------------------------------------


def test_fixture_is_the_official_layout():
  expected = expected_arrays()
  found = {k[len("model/") :]: v.shape for k, v in expected.items() if k.startswith("model/")}
  assert list(found.items()) == list(torch_layout.state_dict_shapes(model_config.settings(fixture_cfg())).items())


def test_reads_torch_checkpoint_without_torch():
  checkpoint = torch_pickle.load_pth(PTH)
  expected = expected_arrays()
  assert sorted(checkpoint) == ["args", "epoch", "extras", "model", "optimizer", "scaler"]
  for key in expected:
    if key.startswith("dtype/"):
      continue
    entry, name = key.split("/", 1)
    values = checkpoint["optimizer"]["state"][0] if entry == "optimizer" else checkpoint[entry]
    assert_same(values[name], key, expected)
  assert checkpoint["epoch"] == 7
  assert checkpoint["scaler"]["scale"] == 65536.0
  assert checkpoint["optimizer"]["param_groups"][0]["betas"] == (0.9, 0.95)
  args = checkpoint["args"]  # argparse.Namespace: an inert placeholder that kept its fields
  assert isinstance(args, torch_pickle.Opaque) and (args.module, args.name) == ("argparse", "Namespace")
  assert args.state["model"] == "fractalmar_in64"
  assert checkpoint["extras"]["float16_transposed"].flags.c_contiguous
  assert "torch" not in sys.modules


def test_state_dict_of_pth_converts_to_params():
  state_dict = torch_pickle.read_state_dict(PTH)
  expected = expected_arrays()
  assert len(state_dict) == 48 and state_dict["class_emb.weight"].dtype == ml_dtypes.bfloat16
  params = convert.convert_state_dict(state_dict, fixture_cfg())
  assert {leaf.dtype for leaf in jax.tree.leaves(params)} == {np.dtype(np.float32)}
  level = params["levels_0"]
  np.testing.assert_array_equal(level["patch_emb"]["kernel"], expected["model/generator.patch_emb.weight"].T)
  np.testing.assert_array_equal(level["cond_emb"]["bias"], expected["model/generator.cond_emb.bias"])
  np.testing.assert_array_equal(
    level["layers"]["blocks"]["norm1"]["scale"][0], state_dict["generator.blocks.0.norm1.weight"]
  )
  bf16 = expected["model/class_emb.weight"].view(ml_dtypes.bfloat16).astype(np.float32)
  np.testing.assert_array_equal(params["class_emb"]["embedding"], bf16)
  np.testing.assert_array_equal(params["fake_latent"], expected["model/fake_latent"].astype(np.float32))


def test_big_endian_storages(tmp_path):
  """The same checkpoint with every storage byte-swapped and `byteorder` = big reads the same."""
  itemsizes: dict[str, np.dtype] = {}

  class Recorder(torch_pickle.RestrictedUnpickler):
    def persistent_load(self, pid):
      itemsizes[pid[2]] = pid[1].dtype
      return super().persistent_load(pid)

  with zipfile.ZipFile(PTH) as archive:
    records = {name: archive.read(name) for name in archive.namelist()}
    Recorder(io.BytesIO(records["tiny_mar/data.pkl"]), archive, "tiny_mar/", "little").load()
  for key, dtype in itemsizes.items():
    if dtype.itemsize > 1:
      unit = dtype.itemsize // 2 if dtype.kind == "c" else dtype.itemsize
      records[f"tiny_mar/data/{key}"] = np.frombuffer(records[f"tiny_mar/data/{key}"], f"<u{unit}").byteswap().tobytes()
  records["tiny_mar/byteorder"] = b"big"
  swapped = torch_pickle.load_pth(write_zip(tmp_path / "big_endian.pth", records))
  original = torch_pickle.load_pth(PTH)
  for entry in ("model", "extras"):
    for name, value in original[entry].items():
      np.testing.assert_array_equal(swapped[entry][name], value, strict=True, err_msg=name)


class _Global:
  """Pickled as the global `module.name` (what torch's pickles reference), without importing it."""

  def __init__(self, module: str, name: str) -> None:
    self.module, self.name = module, name

  def __call__(self, *args):  # pickle wants a callable in a reduce tuple; never called
    raise NotImplementedError


class _FakeStorage:
  def __init__(self, key: str, data: np.ndarray) -> None:
    self.key, self.data = key, data


class _FakeTensor:
  """Pickles like a torch tensor: `_rebuild_tensor_v2(storage, offset, size, stride, False, OrderedDict())`."""

  def __init__(self, storage: _FakeStorage, offset: int, size: tuple, stride: tuple) -> None:
    self.args = (storage, offset, size, stride, False, collections.OrderedDict())

  def __reduce__(self):
    return _Global("torch._utils", "_rebuild_tensor_v2"), self.args


class _TorchLikePickler(pickle._Pickler):
  def persistent_id(self, obj):
    if isinstance(obj, _FakeStorage):
      return ("storage", _Global("torch", "FloatStorage"), obj.key, "cpu", obj.data.size)
    return None

  def save(self, obj, save_persistent_id=True):
    if isinstance(obj, _Global):
      self.write(pickle.GLOBAL + f"{obj.module}\n{obj.name}\n".encode())
      return
    super().save(obj, save_persistent_id)


def torch_like_pth(path: pathlib.Path, obj, storages: list[_FakeStorage]) -> pathlib.Path:
  """A `.pth` as torch would write it, from `_FakeTensor`s (float32 storages), without torch."""
  buffer = io.BytesIO()
  _TorchLikePickler(buffer, protocol=2).dump(obj)
  records = {"t/data.pkl": buffer.getvalue()} | {f"t/data/{s.key}": s.data.astype("<f4").tobytes() for s in storages}
  return write_zip(path, records)


def test_torch_like_geometry_is_checked(tmp_path):
  storage = _FakeStorage("0", np.arange(12, dtype=np.float32))
  good = {"model": {"a": _FakeTensor(storage, 2, (2, 3), (1, 2)), "b": _FakeTensor(storage, 11, (), ())}}
  state_dict = torch_pickle.read_state_dict(torch_like_pth(tmp_path / "good.pth", good, [storage]))
  np.testing.assert_array_equal(state_dict["a"], np.arange(12, dtype=np.float32)[2:8].reshape(3, 2).T, strict=True)
  assert state_dict["b"].shape == () and state_dict["b"] == 11
  bad = {
    "past the end": (_FakeTensor(storage, 6, (2, 4), (4, 1)), "reads element 13 of a storage of 12"),
    "negative stride": (_FakeTensor(storage, 11, (3,), (-1,)), "invalid tensor geometry"),
    "rank mismatch": (_FakeTensor(storage, 0, (3,), (1, 1)), "invalid tensor geometry"),
  }
  for name, (tensor, message) in bad.items():
    path = torch_like_pth(tmp_path / f"{name.replace(' ', '_')}.pth", {"model": {"a": tensor}}, [storage])
    with pytest.raises(torch_pickle.PthError, match=message):
      torch_pickle.read_state_dict(path)
  path = torch_like_pth(tmp_path / "lost.pth", good, [])
  with pytest.raises(torch_pickle.PthError, match="lacks the storage record 't/data/0'"):
    torch_pickle.read_state_dict(path)


class _LegacyTorchLikePickler(_TorchLikePickler):
  def persistent_id(self, obj):
    pid = super().persistent_id(obj)
    return None if pid is None else (*pid, None)  # legacy ids end with the view metadata (None)


def torch_like_legacy_pth(path: pathlib.Path, obj, storages: list[_FakeStorage]) -> pathlib.Path:
  """The legacy (torch < 1.6) serialization of `obj`: header pickles, object, storage keys, then the storages."""
  buffer = io.BytesIO()
  for header in (torch_pickle.LEGACY_MAGIC, 1001, {"protocol_version": 1001, "little_endian": True}):
    pickle.dump(header, buffer, protocol=2)
  _LegacyTorchLikePickler(buffer, protocol=2).dump(obj)
  pickle.dump([s.key for s in storages], buffer, protocol=2)
  for s in storages:
    buffer.write(np.int64(s.data.size).astype("<i8").tobytes() + s.data.astype("<f4").tobytes())
  path.write_bytes(buffer.getvalue())
  return path


class _Evil:
  def __init__(self, command: str) -> None:
    self.command = command

  def __reduce__(self):
    return os.system, (self.command,)


def test_malicious_pickles_run_nothing(tmp_path):
  marker = tmp_path / "pwned"
  command = f"touch {marker}"
  errors = {}
  for name, obj in {"top": _Evil(command), "model_entry": {"model": {"fake_latent": _Evil(command)}}}.items():
    with pytest.raises(torch_pickle.PthError) as info:
      torch_pickle.read_state_dict(
        write_zip(tmp_path / f"{name}.pth", {"evil/data.pkl": pickle.dumps(obj, protocol=2)})
      )
    errors[name] = str(info.value)
  system = f"<opaque {os.system.__module__}.system>"
  assert f"holds {system}, not a state dict" in errors["top"]
  assert f"'fake_latent' ({system})" in errors["model_entry"]
  # A payload beside the weights (here in `args`) stays inert and the weights still load.
  storage = _FakeStorage("0", np.arange(3, dtype=np.float32))
  obj = {"model": {"w": _FakeTensor(storage, 0, (3,), (1,))}, "args": _Evil(command)}
  state_dict = torch_pickle.read_state_dict(torch_like_pth(tmp_path / "args.pth", obj, [storage]))
  np.testing.assert_array_equal(state_dict["w"], storage.data)
  # numpy arrays pickled by numpy are not allowed either (its reconstruct functions are not tensor rebuilders).
  with pytest.raises(torch_pickle.PthError, match="'w' \\(<opaque numpy"):
    torch_pickle.read_state_dict(
      write_zip(tmp_path / "np.pth", {"n/data.pkl": pickle.dumps({"model": {"w": np.zeros(2)}})})
    )
  assert not marker.exists()
  # BUILD (set attributes) on what the unpickler hands out is refused: a file cannot rewrite the readers.
  for raw in (
    b"ctorch\nFloatStorage\n}Vdtype\nI1\nsb.",
    b"ctorch._utils\n_rebuild_tensor_v2\nN}V__code__\nI1\ns\x86b.",
  ):
    with pytest.raises(torch_pickle.PthError, match="tries to modify"):
      torch_pickle.load_pth(write_zip(tmp_path / "build.pth", {"b/data.pkl": b"\x80\x02" + raw}))
  raw = b"cbuiltins\nexec\n(Vopen(%r, 'w').write('x')\ntR." % str(marker).encode()
  obj = torch_pickle.load_pth(write_zip(tmp_path / "exec.pth", {"a/data.pkl": raw}))
  assert isinstance(obj, torch_pickle.Opaque) and obj.name == "exec" and not marker.exists()


def test_legacy_format_reads_as_the_zip_format_and_runs_nothing(tmp_path):
  marker = tmp_path / "pwned"
  storage = _FakeStorage("0", np.arange(12, dtype=np.float32))
  tensors = {"a": _FakeTensor(storage, 2, (2, 3), (1, 2)), "b": _FakeTensor(storage, 11, (), ())}
  obj = {"model": tensors, "args": _Evil(f"touch {marker}")}
  legacy = torch_pickle.read_state_dict(torch_like_legacy_pth(tmp_path / "legacy.pth", obj, [storage]))
  zipped = torch_pickle.read_state_dict(torch_like_pth(tmp_path / "zip.pth", obj, [storage]))
  assert list(legacy) == list(zipped) == ["a", "b"]
  for name in legacy:
    np.testing.assert_array_equal(legacy[name], zipped[name], strict=True)
  assert not marker.exists()
  raw = torch_like_legacy_pth(tmp_path / "cut.pth", obj, [storage]).read_bytes()
  with pytest.raises(torch_pickle.PthError, match="holds .* elements, expected 12|truncated"):
    torch_pickle.load_legacy_pth(raw[:-4], "cut.pth")
  evil_header = pickle.dumps(_Evil(f"touch {marker}"), protocol=2)
  with pytest.raises(torch_pickle.PthError, match="unexpected global .* in a header pickle"):
    torch_pickle.load_legacy_pth(evil_header, "evil.pth")
  assert not marker.exists()


def test_not_a_checkpoint(tmp_path):
  (tmp_path / "text.pth").write_text("hello")
  (tmp_path / "plain.pth").write_bytes(pickle.dumps({"a": 1}, protocol=2))
  write_zip(tmp_path / "other.zip", {"a.txt": b"x"})
  with pytest.raises(torch_pickle.PthError, match="not a PyTorch checkpoint"):
    torch_pickle.read_state_dict(tmp_path / "text.pth")
  with pytest.raises(torch_pickle.PthError, match="legacy format"):
    torch_pickle.read_state_dict(tmp_path / "plain.pth")
  with pytest.raises(torch_pickle.PthError, match="no single <name>/data.pkl"):
    torch_pickle.read_state_dict(tmp_path / "other.zip")
  with pytest.raises(FileNotFoundError):
    torch_pickle.read_state_dict(tmp_path / "absent.pth")


def test_npz_round_trip(tmp_path):
  state_dict = {"a.weight": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.ones(3, ml_dtypes.bfloat16)}
  torch_pickle.save_npz(state_dict, tmp_path / "w.npz")
  back = torch_pickle.read_state_dict(tmp_path / "w.npz")
  assert list(back) == ["a.weight", "b"] and back["b"].dtype == np.float32  # NumPy has no bfloat16
  np.testing.assert_array_equal(back["a.weight"], state_dict["a.weight"], strict=True)


@pytest.mark.skipif(HAS_TORCH, reason="torch is installed")
def test_save_pth_needs_torch(tmp_path):
  with pytest.raises(ImportError, match=r"\.npz"):
    torch_pickle.save_pth({"a": np.zeros(2, np.float32)}, tmp_path / "w.pth")
  assert not list(tmp_path.iterdir())


# --- our checkpoints -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("scan", [True, False])
def test_checkpoint_round_trip(tmp_path, scan):
  cfg = fixture_cfg(
    img_size_list=(4, 2, 1), widths=(16, 8, 8), heads=(2, 2, 2), types=("mar", "ar", "pixel"), depths=(2, 2, 1)
  )
  params = tiny_params(cfg)
  model_checkpoint.save_params(tmp_path / "ckpt", params, cfg, step=3)
  assert (
    model_checkpoint.latest_step(tmp_path / "ckpt") == 3 and model_checkpoint.latest_step(tmp_path / "none") is None
  )
  assert model_checkpoint.stored_model_config(tmp_path / "ckpt")["widths"] == [16, 8, 8]
  # Checkpoints store the scanned layout; a config with scan_blocks off gets blocks_K (and the reverse works).
  loaded = model_checkpoint.load_params(tmp_path / "ckpt", fixture_cfg(**(cfg.to_dict() | {"scan_blocks": scan})))
  assert sorted(loaded["levels_1"]["layers"]) == (["blocks"] if scan else ["blocks_0", "blocks_1"])
  model_settings = model_config.settings(cfg)
  unscanned = model_config.settings(fixture_cfg(**(cfg.to_dict() | {"scan_blocks": False})))
  back = torch_layout.params_to_state_dict(loaded, model_settings if scan else unscanned)
  for name, value in torch_layout.params_to_state_dict(params, model_settings).items():
    np.testing.assert_array_equal(back[name], value, strict=True)


def test_checkpoint_mismatch_names_fields(tmp_path):
  cfg = fixture_cfg()
  model_checkpoint.save_params(tmp_path / "ckpt", tiny_params(cfg), cfg)
  other = fixture_cfg(widths=(16, 8), num_classes=5, dtype="bfloat16", proj_dropout=0.0, scan_blocks=False)
  with pytest.raises(model_checkpoint.CheckpointMismatchError) as info:
    model_checkpoint.load_params(tmp_path / "ckpt", other)
  message = str(info.value)
  assert "widths: checkpoint (8,8), config (16,8)" in message
  assert "num_classes: checkpoint 3, config 5" in message
  assert "dtype" not in message and "dropout" not in message and "scan" not in message
  assert '--config.model.widths="(8,8)" --config.model.num_classes="3"' in message
  # A stored config of an official model points at its file.
  official = config_lib.official_configs()["configs/fractalmar_64.py"].model
  with pytest.raises(model_checkpoint.CheckpointMismatchError, match=r"Use --config=configs/fractalmar_64\.py"):
    model_checkpoint.check_model_config(model_checkpoint.model_dict(official), cfg, "ckpt")
  # Compute-only settings may differ.
  loaded = model_checkpoint.load_params(tmp_path / "ckpt", fixture_cfg(param_dtype="bfloat16", scan_blocks=False))
  assert {leaf.dtype for leaf in jax.tree.leaves(loaded)} == {np.dtype(ml_dtypes.bfloat16)}


def test_missing_checkpoint_is_a_clear_error(tmp_path):
  with pytest.raises(model_checkpoint.CheckpointError, match="not found"):
    model_checkpoint.load_params(tmp_path / "absent", fixture_cfg())
  (tmp_path / "empty").mkdir()
  with pytest.raises(model_checkpoint.CheckpointError, match="holds no checkpoint"):
    model_checkpoint.load_params(tmp_path / "empty", fixture_cfg())
  assert not list((tmp_path / "empty").iterdir())


# --- the converter -----------------------------------------------------------------------------------------------------


def test_layout_error_names_the_matching_official_config():
  official = config_lib.official_configs()["configs/fractalmar_64.py"].model
  shapes = torch_layout.state_dict_shapes(model_config.settings(official))
  zeros = {name: np.broadcast_to(np.float32(0), shape) for name, shape in shapes.items()}  # no memory
  assert convert.matching_configs(shapes) == ["configs/fractalmar_64.py"]
  with pytest.raises(torch_layout.LayoutError) as info:
    convert.convert_state_dict(zeros, fixture_cfg())
  assert "This file matches configs/fractalmar_64.py: convert it with --config=configs/fractalmar_64.py" in str(
    info.value
  )
  with pytest.raises(torch_layout.LayoutError, match="matches none of the official configs"):
    convert.convert_state_dict(torch_pickle.read_state_dict(PTH), fixture_cfg(widths=(8, 16)))


def test_import_fixture(tmp_path):
  lines = []
  convert.import_checkpoint(str(PTH), str(tmp_path / "out"), fixture_cfg(), log=lines.append)
  assert lines[0].startswith(f"read 48 tensors ({sum(v.size for v in torch_pickle.read_state_dict(PTH).values()):,}")
  assert f"--checkpoint={tmp_path / 'out'}" in lines[-1]
  expected = convert.convert_state_dict(torch_pickle.read_state_dict(PTH), fixture_cfg())
  assert_trees_equal(model_checkpoint.load_params(tmp_path / "out", fixture_cfg()), expected)


def _import_cases(tmp_path: pathlib.Path) -> dict[str, tuple[str, str, object, type, str]]:
  (tmp_path / "text.pth").write_text("not a checkpoint")
  (tmp_path / "plain.pth").write_bytes(pickle.dumps({"model": {}}, protocol=2))
  (tmp_path / "full").mkdir()
  (tmp_path / "full" / "keep.txt").write_text("x")
  (tmp_path / "file").write_text("x")
  out = str(tmp_path / "out")
  return {  # name: (input, output_dir, config, error, message)
    "missing input": (str(tmp_path / "absent.pth"), out, fixture_cfg(), FileNotFoundError, "not found"),
    "not a zip": (str(tmp_path / "text.pth"), out, fixture_cfg(), torch_pickle.PthError, "not a PyTorch"),
    "plain pickle": (str(tmp_path / "plain.pth"), out, fixture_cfg(), torch_pickle.PthError, "legacy"),
    "wrong config": (
      str(PTH),
      out,
      fixture_cfg(depths=(2, 1)),
      torch_layout.LayoutError,
      "missing: generator.blocks.1",
    ),
    "bad config": (str(PTH), out, fixture_cfg(num_conds=9), model_config.ConfigError, "num_conds"),
    "non-empty output": (str(PTH), str(tmp_path / "full"), fixture_cfg(), convert.ConvertError, "not an empty"),
    "output is a file": (str(PTH), str(tmp_path / "file"), fixture_cfg(), convert.ConvertError, "not an empty"),
  }


def test_import_errors_write_nothing(tmp_path):
  cases = _import_cases(tmp_path)
  before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
  for name, (source, output_dir, cfg, error, message) in cases.items():
    with pytest.raises(error, match=message):
      convert.import_checkpoint(source, output_dir, cfg, log=lambda _: None)
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before, name


def test_export_errors_write_nothing(tmp_path):
  cfg = fixture_cfg()
  model_checkpoint.save_params(tmp_path / "ckpt", tiny_params(cfg), cfg)
  (tmp_path / "exists.npz").write_text("x")
  (tmp_path / "empty").mkdir()
  cases = {
    "suffix": (tmp_path / "ckpt", tmp_path / "w.safetensors", cfg, convert.ConvertError, r"\*\.npz"),
    "existing output": (tmp_path / "ckpt", tmp_path / "exists.npz", cfg, convert.ConvertError, "exists"),
    "missing checkpoint": (tmp_path / "absent", tmp_path / "w.npz", cfg, model_checkpoint.CheckpointError, "not found"),
    "empty checkpoint": (
      tmp_path / "empty",
      tmp_path / "w.npz",
      cfg,
      model_checkpoint.CheckpointError,
      "no checkpoint",
    ),
    "mismatch": (
      tmp_path / "ckpt",
      tmp_path / "w.npz",
      fixture_cfg(num_classes=4),
      model_checkpoint.CheckpointError,
      "num_",
    ),
  }
  if not HAS_TORCH:
    cases["pth without torch"] = (tmp_path / "ckpt", tmp_path / "w.pth", cfg, convert.ConvertError, "needs torch")
  before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
  for name, (checkpoint, output, model_cfg, error, message) in cases.items():
    with pytest.raises(error, match=message):
      convert.export_checkpoint(str(checkpoint), str(output), model_cfg, log=lambda _: None)
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before, name


def run_convert(*args: str) -> subprocess.CompletedProcess:
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  command = [sys.executable, "-m", "fractal_jax.convert", "--config=configs/tiny.py", *args]
  return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def test_cli_export_then_import_is_bit_exact(tmp_path, tiny_config):
  params = tiny_params(tiny_config.model, seed=3)
  model_checkpoint.save_params(tmp_path / "ckpt", params, tiny_config.model)
  result = run_convert("--to_torch", f"--checkpoint={tmp_path / 'ckpt'}", f"--output={tmp_path / 'w.npz'}")
  assert result.returncode == 0, result.stderr
  assert f"to {tmp_path / 'w.npz'}" in result.stdout and "I1" not in result.stderr  # no orbax INFO logs
  result = run_convert(f"--torch_checkpoint={tmp_path / 'w.npz'}", f"--output_dir={tmp_path / 'back'}")
  assert result.returncode == 0, result.stderr
  num_tensors = len(torch_layout.state_dict_shapes(model_config.settings(tiny_config.model)))
  assert f"read {num_tensors} tensors" in result.stdout and f"--checkpoint={tmp_path / 'back'}" in result.stdout
  assert_trees_equal(model_checkpoint.load_params(tmp_path / "back", tiny_config.model), params)


def test_cli_error_exit_status(tmp_path):
  output = tmp_path / ("w.bin" if HAS_TORCH else "w.pth")
  result = run_convert("--to_torch", f"--checkpoint={tmp_path}", f"--output={output}")
  assert result.returncode == 2
  assert result.stderr.startswith("error: --output=") and "Traceback" not in result.stderr
  result = run_convert(f"--torch_checkpoint={PTH}", f"--checkpoint={tmp_path}")
  assert result.returncode == 2 and "missing --output_dir; unused --checkpoint" in result.stderr
  assert not list(tmp_path.iterdir())
