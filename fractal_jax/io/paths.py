"""Every file the project reads or writes, local or `gs://...`, through `etils.epath`.

`path(p)` turns a flag value into an `epath.Path`: a local path (made
absolute, as `pathlib` would) or a URL-like one (`gs://bucket/run`), which
must never go through `pathlib` (it would read `gs:/bucket/run` as a local
folder). epath reaches `gs://` through gcsfs (the `etils[epath-gcs]` extra):
`fractal_jax/__init__.py` sets `EPATH_USE_TF=false` unless the environment
says otherwise, so that TensorFlow's GCS client (which epath would otherwise
prefer when TensorFlow is installed) serves no file but clu's TensorBoard
events (`train.metric_writers`).

Object stores have no rename (a "rename" copies and deletes every object),
but writing one object is atomic there; so `atomic_writer` writes local
files to a temporary name and renames them, and remote ones as one upload.
They also have no append: `train.metric_writers` rewrites `metrics.jsonl`
whole. gcsfs's listing cache is turned off (below): the hosts of a pod slice,
and reruns, must see what the others wrote.

Config files (`--config`) stay local: ml_collections imports them as Python.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from typing import IO, Any

import fsspec
import numpy as np
from etils import epath

_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")

# gcsfs caches directory listings per process; with several hosts sharing a gs:// workdir, a listing must show what
# the others wrote since (e.g. a checkpoint step set aside by process 0). Off unless fsspec's config says otherwise.
fsspec.config.conf.setdefault("gs", {}).setdefault("use_listings_cache", False)


def is_remote(p: str | os.PathLike) -> bool:
  """Whether `p` is a URL-like path (`gs://...`) rather than a local one."""
  return bool(_URL.match(os.fspath(p)))


def path(p: str | os.PathLike) -> epath.Path:
  """`p` as an `epath.Path`; a local path is made absolute (never `resolve()` a remote one: it becomes local)."""
  out = epath.Path(p)
  return out if is_remote(p) else out.absolute()


def make_dir(p: str | os.PathLike) -> None:
  """Creates a local folder and its parents; nothing for a remote one (object stores have no folders)."""
  if not is_remote(p):
    path(p).mkdir(parents=True, exist_ok=True)


def make_parent(p: epath.Path) -> None:
  """Creates the folder a file is about to be written to (object stores need none)."""
  if not is_remote(p):
    p.parent.mkdir(parents=True, exist_ok=True)


SPOOL_BYTES = 256 << 20  # atomic_writer: a remote file's bytes wait in memory up to this size, then in a temporary file


@contextlib.contextmanager
def atomic_writer(p: str | os.PathLike) -> Iterator[IO[bytes]]:
  """A binary file to write `p` through: `p` appears whole when the block ends, never half-written.

  Local: `<name>.partial` beside `p`, renamed over it at the end (left behind
  if the block fails). Remote: the bytes are spooled (memory, then a
  temporary file past `SPOOL_BYTES`) and uploaded at the end as one object,
  which appears whole or not at all (renames on object stores are copies).
  """
  p = path(p)
  make_parent(p)
  if is_remote(p):
    with tempfile.SpooledTemporaryFile(max_size=SPOOL_BYTES) as spool:
      yield spool
      spool.seek(0)
      with p.open("wb") as out:
        shutil.copyfileobj(spool, out, 16 << 20)
    return
  partial = p.with_name(p.name + ".partial")
  with partial.open("wb") as file:
    yield file
  os.replace(partial, p)


def npz_bytes(**arrays: np.ndarray) -> bytes:
  """`np.savez` of `arrays`, in memory."""
  buffer = io.BytesIO()
  np.savez(buffer, **arrays)
  return buffer.getvalue()


def save_npz(p: str | os.PathLike, **arrays: np.ndarray) -> None:
  """`np.savez(p, **arrays)` for any path, `.npz` appended as NumPy does."""
  p = path(p)
  if not p.name.endswith(".npz"):
    p = p.with_name(p.name + ".npz")
  make_parent(p)
  p.write_bytes(npz_bytes(**arrays))


def load_npz(p: str | os.PathLike) -> Any:
  """`np.load` of an `.npz` at any path (a context manager, like `np.load`'s `NpzFile`)."""
  return np.load(io.BytesIO(path(p).read_bytes()))


def open_binary(p: str | os.PathLike) -> IO[bytes]:
  """A seekable binary reader of `p` (a local file, or a gcsfs file that reads ranges on demand)."""
  return path(p).open("rb")


def write_text(p: str | os.PathLike, text: str) -> None:
  """Writes a text file, making its folder if needed."""
  p = path(p)
  make_parent(p)
  p.write_text(text)
