"""Faster matrix products on x86 CPUs: XLA's oneDNN path, on by default in our entry points.

On this project's reference CPU, XLA's default dot emitter reaches 80-110
GFLOP/s on the sampler's shapes where oneDNN (what PyTorch uses) reaches
110-145; the SMALL MAR sampler runs about 1.3x faster with it. The flags
only affect XLA's CPU compiler. They are appended to `XLA_FLAGS` before JAX
starts, unless the user set either flag or `FRACTAL_JAX_ONEDNN=0`; the test
suite runs without them (and passes with them).
"""

from __future__ import annotations

import os
import platform

ONEDNN_FLAGS = ("--xla_cpu_use_onednn=true", "--xla_cpu_experimental_onednn_custom_call=true")


def enable_fast_cpu_matmuls() -> bool:
  """Appends the oneDNN flags to XLA_FLAGS (x86-64 only). Returns whether it did."""
  if os.environ.get("FRACTAL_JAX_ONEDNN", "1") == "0" or platform.machine().lower() not in ("x86_64", "amd64"):
    return False
  current = os.environ.get("XLA_FLAGS", "")
  if any(flag.split("=")[0] in current for flag in ONEDNN_FLAGS):
    return False
  os.environ["XLA_FLAGS"] = " ".join([current, *ONEDNN_FLAGS]).strip()
  return True
