"""Faster CPU execution: XLA's oneDNN path and glibc malloc settings, on by default in our entry points.

oneDNN: on this project's reference CPU, XLA's default dot emitter reaches
80-110 GFLOP/s on the sampler's shapes where oneDNN (what PyTorch uses)
reaches 110-145; the SMALL MAR sampler runs about 1.3x faster with it. The
flags only affect XLA's CPU compiler. They are appended to `XLA_FLAGS`
before JAX starts, unless the user set either flag or `FRACTAL_JAX_ONEDNN=0`;
the test suite runs without them (and passes with them).

malloc: every execution of a compiled XLA CPU program allocates its
temporary buffer (1.3 GB for a SMALL AR training step at batch 16) and frees
it at the end. glibc serves such large blocks with a fresh `mmap` and
returns them with `munmap`, so every execution page-faults its whole
temporary buffer back in, and the kernel zeroes every page: about a quarter
of the CPU time of a SMALL training step went to that. `keep_freed_memory`
makes glibc keep freed memory for reuse instead (one malloc arena, no mmap,
no trimming); from the third execution on, a step reuses the same pages.
The price is that the process keeps its peak heap size. Skipped with
`FRACTAL_JAX_MALLOC_TUNING=0`, and on other C libraries.
"""

from __future__ import annotations

import ctypes
import os
import platform

ONEDNN_FLAGS = ("--xla_cpu_use_onednn=true", "--xla_cpu_experimental_onednn_custom_call=true")

# glibc mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8


def enable_fast_cpu_matmuls() -> bool:
  """Appends the oneDNN flags to XLA_FLAGS (x86-64 only), and calls `keep_freed_memory`.

  Call before JAX starts (before any JAX computation or thread exists).
  Returns whether it set the oneDNN flags.
  """
  keep_freed_memory()
  if os.environ.get("FRACTAL_JAX_ONEDNN", "1") == "0" or platform.machine().lower() not in ("x86_64", "amd64"):
    return False
  current = os.environ.get("XLA_FLAGS", "")
  if any(flag.split("=")[0] in current for flag in ONEDNN_FLAGS):
    return False
  os.environ["XLA_FLAGS"] = " ".join([current, *ONEDNN_FLAGS]).strip()
  return True


def keep_freed_memory() -> bool:
  """Makes glibc malloc reuse freed memory rather than unmap it (see the module docstring).

  Must run before threads start allocating (a thread's malloc arena is made
  on its first allocation). Returns whether the settings were applied.
  """
  if os.environ.get("FRACTAL_JAX_MALLOC_TUNING", "1") == "0" or platform.system() != "Linux":
    return False
  try:
    libc = ctypes.CDLL("libc.so.6")
    mallopt = libc.mallopt
    libc.gnu_get_libc_version  # noqa: B018  (present in glibc only)
  except (OSError, AttributeError):
    return False
  mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
  settings = ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, 2**31 - 1))
  return all(mallopt(param, value) == 1 for param, value in settings)
