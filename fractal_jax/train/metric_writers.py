"""Metric writers: clu's TensorBoard + log writers, plus `<workdir>/metrics.jsonl`.

clu's writers import TensorFlow (slow, noisy): this module imports them
only when a writer is made. Only process 0 writes; the others log nothing.
The JSON-lines file holds one `{"step": s, "<name>": value, ...}` per write
of scalars, for plotting without TensorBoard and for tests.

A `gs://` workdir: object stores cannot append, so `metrics.jsonl` is kept
in memory and written whole, at most every `REMOTE_WRITE_SECONDS` and at
every `flush` (the trainer flushes before each checkpoint) and `close`.
TensorBoard's event files are written by TensorFlow's own GCS client (clu's
writer uses `tf.io.gfile`; the rest of the project uses gcsfs through
`etils.epath`); `tensorboard=False` (`config.train.tensorboard`) leaves
them out, and so does a writer TensorFlow cannot make (one warning line:
the run goes on with the log and `metrics.jsonl`).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np

from fractal_jax.io import paths

JSONL = "metrics.jsonl"
REMOTE_WRITE_SECONDS = 30.0  # a GCS object takes about one write per second; metrics.jsonl is rewritten whole


class _LocalLines:
  """Appends lines to a local file, flushed after each."""

  def __init__(self, path: Any) -> None:
    self._file = open(path, "a", encoding="utf-8")  # noqa: SIM115 (closed by close())

  def add(self, line: str) -> None:
    self._file.write(line)
    self._file.flush()

  def flush(self) -> None:
    self._file.flush()

  def close(self) -> None:
    self._file.close()


class _RemoteLines:
  """The lines of an object (which cannot be appended to): kept in memory, the object rewritten whole.

  Written when `min_seconds` passed since the last write, at `flush` and at `close`.
  """

  def __init__(self, path: Any, min_seconds: float = REMOTE_WRITE_SECONDS) -> None:
    self._path, self._min_seconds = path, min_seconds
    self._text = path.read_text() if path.exists() else ""
    if self._text and not self._text.endswith("\n"):
      self._text += "\n"
    self._written, self._dirty = time.monotonic(), False

  def add(self, line: str) -> None:
    self._text += line
    self._dirty = True
    if time.monotonic() - self._written >= self._min_seconds:
      self.flush()

  def flush(self) -> None:
    if self._dirty:
      self._path.write_text(self._text)
      self._written, self._dirty = time.monotonic(), False

  def close(self) -> None:
    self.flush()


def make_writer(workdir: str | os.PathLike, tensorboard: bool = True) -> Any:
  """A clu `MetricWriter`: TensorBoard summaries (if `tensorboard`), log lines and metrics.jsonl (process 0),
  nothing elsewhere."""
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
  from clu import metric_writers

  class JsonlWriter(metric_writers.MetricWriter):
    """Scalars as JSON lines; every other summary kind is left to the TensorBoard writer."""

    def __init__(self, path: Any) -> None:
      self._lines = _RemoteLines(path) if paths.is_remote(path) else _LocalLines(path)

    def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
      record = {"step": int(step)} | {k: float(np.asarray(v)) for k, v in scalars.items()}
      self._lines.add(json.dumps(record) + "\n")

    def write_summaries(self, step, values, metadata=None):  # noqa: ANN001
      pass

    def write_images(self, step, images):  # noqa: ANN001
      pass

    def write_videos(self, step, videos):  # noqa: ANN001
      pass

    def write_audios(self, step, audios, *, sample_rate):  # noqa: ANN001
      pass

    def write_texts(self, step, texts):  # noqa: ANN001
      pass

    def write_histograms(self, step, arrays, num_buckets=None):  # noqa: ANN001
      pass

    def write_hparams(self, hparams):  # noqa: ANN001
      pass

    def flush(self) -> None:
      self._lines.flush()

    def close(self) -> None:
      self._lines.close()

  if jax.process_index() > 0:
    return metric_writers.MultiWriter([])
  try:
    default = metric_writers.create_default_writer(str(workdir), just_logging=not tensorboard, asynchronous=True)
  except Exception as error:  # noqa: BLE001 (TensorFlow's errors: no credentials or network for its GCS client...)
    reason = " ".join(str(error).split())[:300]
    print(
      f"warning: no TensorBoard events: TensorFlow cannot write to {workdir} ({type(error).__name__}: {reason}); "
      f"{JSONL} and the log still get every figure (--config.train.tensorboard=False skips this)",
      flush=True,
    )
    default = metric_writers.create_default_writer(just_logging=True, asynchronous=True)
  return metric_writers.MultiWriter([default, JsonlWriter(paths.path(workdir) / JSONL)])


def read_jsonl(workdir: str | os.PathLike) -> list[dict[str, float]]:
  """The records of `<workdir>/metrics.jsonl` (empty if none)."""
  path = paths.path(workdir) / JSONL
  if not path.exists():
    return []
  return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def flat_hparams(config: Any) -> dict[str, Any]:
  """A ConfigDict as {"a.b": scalar-or-str} for `write_hparams`."""
  out: dict[str, Any] = {}

  def visit(prefix: str, value: Any) -> None:
    if hasattr(value, "items"):
      for k, v in value.items():
        visit(f"{prefix}{k}.", v)
    elif isinstance(value, (bool, int, float, str)):
      out[prefix[:-1]] = value
    else:
      out[prefix[:-1]] = str(value)

  visit("", config)
  return out
