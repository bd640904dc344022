"""Parameter and train-state shardings: logical axis names -> mesh axes.

Every parameter carries logical axis names, given where it is created
(`nn.with_logical_partitioning` in the modules; scanned blocks add "layers"):

  embed    the residual width of a level (and of the class table)
  mlp      MLP hidden units          qkv    fused query/key/value outputs
  heads    attention output inputs   vocab  the 256 pixel values
  classes  class-table rows          patch  pixels of a patch (3 * P * P)
  cond     width of the level above  seq    positions
  norm     LayerNorm / RMSNorm       layers scanned blocks

`config.sharding_rules` maps them to the mesh axes ("data", "fsdp",
"tensor") of `fractal_jax.parallel.mesh`. The default shards "embed" over `fsdp`
(FSDP: every parameter matrix and its optimizer moments are split over the
fsdp devices and gathered just in time by XLA) and the MLP / attention
inner dimensions over `tensor`. A dimension that the mesh axis does not
divide stays replicated (tiny models on many devices), reported by
`undivided`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from fractal_jax.model import fractal

Rules = Sequence[tuple[str, str | tuple[str, ...] | None]]


def default_rules() -> Rules:
  """The rules of `config_base` (FSDP over "embed", tensor parallel inside MLP and attention)."""
  from fractal_jax.config import base_config

  return tuple(base_config().sharding_rules)


def logical_specs(model: fractal.FractalModel) -> Any:
  """A tree shaped like the params: PartitionSpec of logical axis names per parameter."""
  boxed = jax.eval_shape(lambda: fractal.boxed_params(model, jax.random.key(0)))
  return nn.get_partition_spec(boxed)


def _axis_size(mesh: Mesh, entry: str | tuple[str, ...] | None) -> int:
  if entry is None:
    return 1
  names = (entry,) if isinstance(entry, str) else entry
  return math.prod(mesh.shape[n] for n in names)


def _divisible(spec: PartitionSpec, shape: Sequence[int], mesh: Mesh) -> PartitionSpec:
  """`spec` with every entry that does not divide its dimension replaced by None."""
  entries = list(spec) + [None] * (len(shape) - len(spec))
  return PartitionSpec(*(e if dim % _axis_size(mesh, e) == 0 else None for e, dim in zip(entries, shape)))


def param_shardings(model: fractal.FractalModel, mesh: Mesh, rules: Rules | None = None) -> Any:
  """NamedSharding per parameter of `model` on `mesh` under `rules`."""
  abstract = jax.eval_shape(lambda: fractal.init_params(model, jax.random.key(0)))
  mesh_specs = nn.logical_to_mesh(logical_specs(model), [tuple(r) for r in (rules or default_rules())])
  return jax.tree.map(
    lambda spec, leaf: NamedSharding(mesh, _divisible(spec, leaf.shape, mesh)),
    mesh_specs,
    abstract,
    is_leaf=lambda x: isinstance(x, PartitionSpec),
  )


def undivided(model: fractal.FractalModel, mesh: Mesh, rules: Rules | None = None) -> list[str]:
  """Parameters whose rule asked for a sharding that the mesh does not divide (kept replicated there)."""
  abstract = jax.eval_shape(lambda: fractal.init_params(model, jax.random.key(0)))
  mesh_specs = nn.logical_to_mesh(logical_specs(model), [tuple(r) for r in (rules or default_rules())])
  out = []
  flat_specs = jax.tree_util.tree_leaves_with_path(mesh_specs, is_leaf=lambda x: isinstance(x, PartitionSpec))
  for (path, spec), leaf in zip(flat_specs, jax.tree.leaves(abstract)):
    if _divisible(spec, leaf.shape, mesh) != PartitionSpec(*spec, *[None] * (leaf.ndim - len(spec))):
      out.append(f"{jax.tree_util.keystr(path)} {tuple(leaf.shape)} {spec}")
  return out


def opt_state_shardings(
  optimizer: optax.GradientTransformation, params_shardings: Any, abstract_params: Any, mesh: Mesh
) -> Any:
  """Optimizer state shardings: moments like their parameters, the rest (counts) replicated."""
  abstract_state = jax.eval_shape(optimizer.init, abstract_params)
  replicated = NamedSharding(mesh, PartitionSpec())
  return optax.tree.map_params(
    optimizer,
    lambda _, sharding: sharding,
    abstract_state,
    params_shardings,
    transform_non_params=lambda _: replicated,
  )


def bytes_per_device(tree: Any) -> dict[Any, int]:
  """Bytes of `tree`'s arrays held by each device (addressable shards)."""
  out: dict[Any, int] = {}
  for leaf in jax.tree.leaves(tree):
    for shard in leaf.addressable_shards:
      out[shard.device] = out.get(shard.device, 0) + shard.data.nbytes
  return out
