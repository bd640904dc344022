"""Accelerators by the names users give them: TPU slices for ahead-of-time compilation, and chip specifications.

`--mode=aot --topology=<slice>` compiles for a TPU slice without owning one:
libtpu describes the slice's chips (`jax.experimental.topologies`) and XLA
compiles for them on the host CPU. libtpu names slices `<generation>:<AxBxC>`
(`v5p:2x2x2`); users name them as Cloud TPU does:

* `v5p-N`, `v4-N`: N counts TensorCores, two per chip: v5p-16 is 8 chips,
  `v5p:2x2x2`;
* `v5litepod-N` (also `v5e-N`) and `v6e-N`: N counts chips: v5litepod-16 is
  `v5e:4x4`, with 4 chips per host from 16 chips up (8 on one host below).

Both spellings are accepted. v4 is refused: libtpu describes each of a v4
chip's two TensorCores as a device, while the runtime fuses them into one
device per chip (megacore), so neither the mesh nor the memory figures would
be those of a real run.

No API reports a chip's memory or speed, so `CHIPS` holds the published
specifications (Cloud TPU and NVIDIA data sheets): HBM per chip, peak dense
bfloat16 FLOP/s (what float32 matrix products also run at with JAX's default
precision on TPU) and HBM bandwidth. Estimates built on them are labelled as
estimates wherever they are printed.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Sequence
from typing import Any


class TopologyError(ValueError):
  """A slice name that libtpu cannot describe; the message lists what works."""


@dataclasses.dataclass(frozen=True)
class ChipSpec:
  """Published figures of one accelerator chip (one JAX device)."""

  name: str
  hbm_bytes: float  # memory per chip
  peak_flops: float  # dense bfloat16 FLOP/s per chip
  hbm_bandwidth: float  # bytes/s per chip


GIB = 2**30
# Keyed by `device_kind` as JAX reports it.
CHIPS: dict[str, ChipSpec] = {
  "TPU v5": ChipSpec("TPU v5p", 95 * GIB, 459e12, 2765e9),
  "TPU v5 lite": ChipSpec("TPU v5e", 16 * GIB, 197e12, 819e9),
  "TPU v6 lite": ChipSpec("TPU v6e (Trillium)", 32 * GIB, 918e12, 1640e9),
  "TPU v4": ChipSpec("TPU v4", 32 * GIB, 275e12, 1228e9),
  "NVIDIA H100 80GB HBM3": ChipSpec("NVIDIA H100 SXM", 80 * GIB, 989e12, 3350e9),
  "NVIDIA H200": ChipSpec("NVIDIA H200", 141 * GIB, 989e12, 4800e9),
}

# v5p / v4 TensorCores -> chip grid (Cloud TPU's documented shapes of the power-of-two slices).
_CUBES = {
  8: (2, 2, 1),
  16: (2, 2, 2),
  32: (2, 2, 4),
  64: (2, 4, 4),
  128: (4, 4, 4),
  256: (4, 4, 8),
  512: (4, 8, 8),
  1024: (8, 8, 8),
  2048: (8, 8, 16),
  4096: (8, 16, 16),
}
# v5e / v6e chips -> chip grid.
_PLANES = {1: (1, 1), 4: (2, 2), 8: (2, 4), 16: (4, 4), 32: (4, 8), 64: (8, 8), 128: (8, 16), 256: (16, 16)}
_GENERATIONS = {"v5p": "v5p", "v5litepod": "v5e", "v5e": "v5e", "v6e": "v6e", "v4": "v4"}
EXAMPLES = "v5p-8, v5p-64, v5litepod-16, v6e-8, or a libtpu topology such as v5p:2x2x2"


@dataclasses.dataclass(frozen=True)
class Slice:
  """A TPU slice: the libtpu topology string and the extra arguments `get_topology_desc` needs."""

  name: str  # as the user gave it
  topology: str  # e.g. "v5p:2x2x2"
  chips_per_host_bounds: tuple[int, int, int] | None = None

  @property
  def accelerator_type(self) -> str:
    """The Cloud TPU name of the slice (`v5p-16`, `v5litepod-4`, `v6e-8`)."""
    generation = self.topology.split(":")[0]
    if generation == "v5p":
      return f"v5p-{2 * self.num_chips}"
    return f"{'v5litepod' if generation == 'v5e' else generation}-{self.num_chips}"

  @property
  def num_chips(self) -> int:
    dims = [int(d) for d in self.topology.split(":")[1].split("x")]
    count = 1
    for dim in dims:
      count *= dim
    return count


def parse_slice(name: str) -> Slice:
  """`v5p-16` / `v5litepod-8` / `v6e-4` / `v5p:2x2x2` -> Slice; TopologyError naming what works otherwise."""
  text = name.strip().lower()
  if re.match(r"(h100|h200|a100|b200|gpu)", text):
    raise TopologyError(
      f"--topology={name}: GPUs cannot be compiled for without one: JAX's CUDA plugin (jax 0.10.2) cannot describe "
      "a GPU that is not attached (get_topology_desc: 'topology not implemented for cuda'); on the GPU machine itself, "
      "run --mode=aot without --topology to compile for its GPUs"
    )
  if text.startswith("v4"):
    raise TopologyError(
      f"--topology={name}: v4 is not supported: libtpu describes each v4 TensorCore as a device while a real "
      "run uses one device per chip (megacore), so the figures would not be a real run's; use v5p, v5e or v6e"
    )
  colon = re.fullmatch(r"(v5p|v5e|v6e):(\d+(?:x\d+){1,2})", text)
  if colon:
    generation, dims = colon.groups()
    if len(dims.split("x")) != (3 if generation == "v5p" else 2):
      raise TopologyError(f"--topology={name}: {generation} grids have {3 if generation == 'v5p' else 2} dimensions")
    return Slice(name, text, _host_bounds(generation, dims))
  dash = re.fullmatch(r"(v5p|v5litepod|v5e|v6e)-(\d+)", text)
  if not dash:
    raise TopologyError(f"--topology={name} is not a TPU slice name; use e.g. {EXAMPLES}")
  generation, count = _GENERATIONS[dash.group(1)], int(dash.group(2))
  table, unit = (_CUBES, "TensorCores") if generation == "v5p" else (_PLANES, "chips")
  if count not in table:
    sizes = ", ".join(f"{dash.group(1)}-{n}" for n in table)
    raise TopologyError(f"--topology={name}: no {count}-{unit} {generation} slice is known here; use one of {sizes}")
  dims = "x".join(str(d) for d in table[count])
  return Slice(name, f"{generation}:{dims}", _host_bounds(generation, dims))


def _host_bounds(generation: str, dims: str) -> tuple[int, int, int] | None:
  """v5e / v6e slices of up to 8 chips sit on one host (libtpu assumes 4 chips per host otherwise)."""
  grid = [int(d) for d in dims.split("x")]
  if generation in ("v5e", "v6e") and grid[0] * grid[1] <= 8:
    return (grid[0], grid[1], 1)
  return None


def tpu_devices(slice_: Slice) -> list[Any]:
  """The slice's devices as libtpu describes them (abstract: they compile, they do not run)."""
  # What a TPU VM's metadata server would say: libtpu asks for it (and logs warnings) when it starts.
  os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
  os.environ.setdefault("TPU_ACCELERATOR_TYPE", slice_.accelerator_type)
  os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
  # Nothing runs on a TPU here: two compiles at once (or one beside a run on a TPU VM) need not exclude each other.
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  from jax.experimental import topologies

  kwargs: dict[str, Any] = {}
  if slice_.chips_per_host_bounds is not None:
    kwargs["chips_per_host_bounds"] = list(slice_.chips_per_host_bounds)
  try:
    description = topologies.get_topology_desc(platform="tpu", topology_name=slice_.topology, **kwargs)
  except Exception as error:  # libtpu missing or the topology unknown to it: say which
    if "not installed" in str(error):
      raise TopologyError('compiling for TPU needs libtpu: pip install -c constraints.txt -e ".[tpu]"') from None
    raise TopologyError(f"--topology={slice_.name} ({slice_.topology}): libtpu cannot describe it: {error}") from None
  return list(description.devices)


def attached_devices() -> list[Any]:
  """The TPU or GPU chips of this machine (of every host, in a multi-host run); TopologyError on a CPU-only one."""
  import jax

  devices = jax.devices()
  if devices[0].platform == "cpu":
    raise TopologyError(
      f"no TPU or GPU is attached here: name a TPU slice to compile for with --topology (e.g. {EXAMPLES}), or run "
      "--mode=aot without it on a TPU VM or a GPU machine to compile for its chips"
    )
  return devices


def chip_spec(devices: Sequence[Any]) -> ChipSpec:
  """The published specification of the devices' chip kind; TopologyError if the table lacks it."""
  kind = devices[0].device_kind
  if kind not in CHIPS:
    raise TopologyError(f"no published specification of {kind!r} in fractal_jax.parallel.accelerators.CHIPS")
  return CHIPS[kind]
