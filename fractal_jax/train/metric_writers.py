"""Metric writers: clu's TensorBoard + log writers, plus `<workdir>/metrics.jsonl`.

clu's writers import TensorFlow (slow, noisy): this module imports them
only when a writer is made. Only process 0 writes; the others log nothing.
The JSON-lines file holds one `{"step": s, "<name>": value, ...}` per write
of scalars, for plotting without TensorBoard and for tests.
"""

from __future__ import annotations

import json
import os
import pathlib
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np


def make_writer(workdir: str | os.PathLike) -> Any:
  """A clu `MetricWriter`: TensorBoard summaries, log lines and metrics.jsonl (process 0), nothing elsewhere."""
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
  from clu import metric_writers

  class JsonlWriter(metric_writers.MetricWriter):
    """Scalars as JSON lines; every other summary kind is left to the TensorBoard writer."""

    def __init__(self, path: pathlib.Path) -> None:
      self._file = open(path, "a", encoding="utf-8")  # noqa: SIM115 (closed by close())

    def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
      record = {"step": int(step)} | {k: float(np.asarray(v)) for k, v in scalars.items()}
      self._file.write(json.dumps(record) + "\n")
      self._file.flush()

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
      self._file.flush()

    def close(self) -> None:
      self._file.close()

  if jax.process_index() > 0:
    return metric_writers.MultiWriter([])
  default = metric_writers.create_default_writer(workdir, asynchronous=True)
  return metric_writers.MultiWriter([default, JsonlWriter(pathlib.Path(workdir) / "metrics.jsonl")])


def read_jsonl(workdir: str | os.PathLike) -> list[dict[str, float]]:
  """The records of `<workdir>/metrics.jsonl` (empty if none)."""
  path = pathlib.Path(workdir) / "metrics.jsonl"
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
