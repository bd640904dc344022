"""The one device-mesh helper of the project.

Axes: `data` (batch), `fsdp` (batch, and parameter shards when training),
`tensor` (model parallel). A `-1` entry takes the remaining devices. Axis
types are `Auto`: JAX now defaults to Explicit axes, which Linen's logical
constraints reject.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")


class MeshError(ValueError):
  """A mesh shape that does not match the devices."""


def resolve_shape(shape: Sequence[int], num_devices: int) -> tuple[int, ...]:
  """Replaces one -1 by what fills `num_devices`; checks the product."""
  shape = tuple(int(s) for s in shape)
  if len(shape) != len(AXES):
    raise MeshError(f"mesh shape {shape} needs {len(AXES)} entries, for the axes {AXES}")
  if shape.count(-1) > 1 or any(s == 0 or s < -1 for s in shape):
    raise MeshError(f"mesh shape {shape}: use positive sizes and at most one -1")
  known = math.prod(s for s in shape if s != -1)
  if -1 in shape:
    if num_devices % known:
      raise MeshError(
        f"mesh shape {shape} cannot fill {num_devices} devices: {num_devices} is not a multiple of {known}"
      )
    shape = tuple(num_devices // known if s == -1 else s for s in shape)
  if math.prod(shape) != num_devices:
    raise MeshError(
      f"mesh shape {shape} has {math.prod(shape)} devices but {num_devices} are available; "
      "use -1 for one axis to take the rest"
    )
  return shape


def make_mesh(shape: Sequence[int] = (-1, 1, 1), devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A mesh over `devices` (default: all) with axes ("data", "fsdp", "tensor")."""
  devices = list(devices) if devices is not None else jax.devices()
  resolved = resolve_shape(shape, len(devices))
  return jax.make_mesh(resolved, AXES, axis_types=(AxisType.Auto,) * len(AXES), devices=devices)


def batch_spec() -> PartitionSpec:
  """Leading (batch) axis split over data x fsdp."""
  return PartitionSpec(BATCH_AXES)


def batch_size_per_step(mesh: Mesh) -> int:
  """How many devices share a batch: a global batch must be a multiple of this."""
  return mesh.shape["data"] * mesh.shape["fsdp"]


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())
