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

Both are for runs whose computations execute on the CPU: they are skipped
when `JAX_PLATFORMS` names another platform first, or when the machine has
an accelerator (`/dev/accel*` or `/dev/vfio/<n>`: TPU; `/dev/nvidia<n>`:
GPU) and `JAX_PLATFORMS` does not ask for the CPU. `FRACTAL_JAX_CPU_TUNING=0`
skips both; an `--xla_cpu_prefer_vector_width` already in `XLA_FLAGS` is
left alone.
"""

from __future__ import annotations

import ctypes
import os
import pathlib
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
  """Whether this process computes on the CPU and the user has not switched the tuning off."""
  if os.environ.get("FRACTAL_JAX_CPU_TUNING", "1") == "0":
    return False
  platforms = [p.strip() for p in os.environ.get("JAX_PLATFORMS", "").split(",") if p.strip()]
  if platforms:
    return platforms[0] == "cpu"
  return not accelerator_present()


def accelerator_present() -> bool:
  """A TPU or NVIDIA GPU device file exists (JAX would run on it rather than the CPU)."""
  dev = pathlib.Path("/dev")
  patterns = ("accel[0-9]*", "nvidia[0-9]*")
  if any(any(dev.glob(pattern)) for pattern in patterns):
    return True
  return any(path.name.isdigit() for path in dev.glob("vfio/*"))


def _has_avx512() -> bool:
  try:
    with open("/proc/cpuinfo") as f:
      return any(line.startswith("flags") and " avx512f" in line for line in f)
  except OSError:
    return False
