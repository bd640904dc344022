"""glibc malloc settings for faster CPU execution, on by default in our entry points.

Every execution of a compiled XLA CPU program allocates its
temporary buffer (1.3 GB for a SMALL AR training step at batch 16) and frees
it at the end. glibc serves such large blocks with a fresh `mmap` and
returns them with `munmap`, so every execution page-faults its whole
temporary buffer back in, and the kernel zeroes every page: about a quarter
of the CPU time of a SMALL training step went to that. `keep_freed_memory`
makes glibc keep freed memory for reuse instead (one malloc arena, no mmap,
no trimming); from the third execution on, a step reuses the same pages.
The price is that the process keeps its peak heap size. Skipped with
`FRACTAL_JAX_MALLOC_TUNING=0`, and on other C libraries.

(Matrix products: XLA's CPU compiler in jax 0.10 emits them as YNNPACK
fusions. The oneDNN flags this project used to set produced no oneDNN
calls there and no change in speed, so they are gone.)
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
