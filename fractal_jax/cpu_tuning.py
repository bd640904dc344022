"""Process settings for faster CPU execution, applied by our entry points before JAX starts (`apply`).

1. glibc malloc keeps freed memory (`keep_freed_memory`). Every execution
   of a compiled XLA CPU program allocates its temporary buffer (1.3 GB for
   a SMALL AR training step at batch 16) and frees it at the end. glibc
   serves such large blocks with a fresh `mmap` and returns them with
   `munmap`, so every execution page-faults its whole temporary buffer back
   in, and the kernel zeroes every page: about a quarter of the CPU time of
   a SMALL training step went to that. Here glibc keeps freed memory for
   reuse instead (one malloc arena, no mmap, no trimming); from the third
   execution on, a step reuses the same pages. The price is that the
   process keeps its peak heap size.
2. 512-bit vectors in XLA's generated loops on AVX-512 CPUs
   (`prefer_wide_vectors`: `--xla_cpu_prefer_vector_width=512`; XLA's
   default is 256, chosen for older chips that slow their clock for wide
   vectors). The elementwise work (LayerNorm, GELU, softmax, dropout
   masks) is about a third of a SMALL MAR training step; the step ran ~7%
   faster with it (alternating A/B on this project's CPU). Matrix products
   go to YNNPACK either way; results are the same up to summation order.

`FRACTAL_JAX_CPU_TUNING=0` skips both; an `--xla_cpu_prefer_vector_width`
already in `XLA_FLAGS` is left alone. Accelerator runs are unaffected
(both concern the host CPU's own computations only).
"""

from __future__ import annotations

import ctypes
import os
import platform

# glibc mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8


def keep_freed_memory() -> bool:
  """Makes glibc malloc reuse freed memory rather than unmap it (see the module docstring).

  Must run before threads start allocating (a thread's malloc arena is made
  on its first allocation). Returns whether the settings were applied.
  """
  if not _enabled() or platform.system() != "Linux":
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


def prefer_wide_vectors() -> bool:
  """Adds `--xla_cpu_prefer_vector_width=512` to `XLA_FLAGS` on AVX-512 CPUs; returns whether it did.

  Must run before JAX creates its CPU client (flags are read then).
  """
  flags = os.environ.get("XLA_FLAGS", "")
  if not _enabled() or "--xla_cpu_prefer_vector_width" in flags or not _has_avx512():
    return False
  os.environ["XLA_FLAGS"] = f"{flags} --xla_cpu_prefer_vector_width=512".strip()
  return True


def apply() -> None:
  """Both settings; call first thing, before importing jax."""
  keep_freed_memory()
  prefer_wide_vectors()


def _enabled() -> bool:
  return os.environ.get("FRACTAL_JAX_CPU_TUNING", "1") != "0"


def _has_avx512() -> bool:
  try:
    with open("/proc/cpuinfo") as f:
      return any(line.startswith("flags") and " avx512f" in line for line in f)
  except OSError:
    return False
