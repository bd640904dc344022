"""`depth` transformer blocks applied in turn: scanned, looped over stacked parameters, or unscanned.

Dimension letters: B batch, L sequence, D width, Q query positions.

`BlockStack` is called like one block (`blocks` module docstring) and
applies `depth` of them. Its parameters come in two layouts:
  * scanned (`scan=True`): created by `nn.scan`, one `blocks` subtree whose
    leaves have a leading `[depth]` axis. Stacks up to `loop_depth` deep
    apply these stacked parameters in a Python loop instead of a scan (the
    same function). With CPU kernels `loop_depth` is `LOOP_MAX_DEPTH`: on
    CPU a scan's gradient keeps every layer's activations in `[depth, ...]`
    buffers that a loop does not need. Otherwise it is 0: every stack is
    scanned, whose program and compile time do not grow with depth.
  * unscanned (`scan=False`): `blocks_0 .. blocks_{depth-1}`, applied in a
    Python loop.
`stack_block_params` / `unstack_block_params` move parameters between the
two layouts, and both compute the same function. Blocks may be wrapped in
`nn.remat` with a `jax.checkpoint_policies` policy chosen by name.

Item chunks (`item_chunks` K > 1): each block runs its B items in K chunks,
one after the other (an `nn.scan` over chunks that shares the block's
parameters), each chunk under the block's remat. The lower levels of the
256x256 models run ~1e5-1e6 items per chip, and a block's forward and
backward working set (its MLP's [B, L, 4D] hidden activations, attention
logits, their gradients) grows with B: chunks bound it to B / K items, with
the same FLOPs when every block is rematerialised (`remat="full"`: a chunk
keeps only its input, which the stack keeps anyway). Chunk k holds the items
k, k + K, k + 2K, ... so that a batch sharded in contiguous blocks stays
where it is. Every pass over whole sequences chunks (training, evaluation,
a MAR level's sampling steps); cached decoding and `queries` do not.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from typing import Any, Protocol

import flax.linen as nn
import jax
import jax.numpy as jnp

from fractal_jax.model import layers
from fractal_jax.model.blocks import KVCache

# With CPU kernels, scanned stacks up to this depth run as a Python loop over their (still stacked) parameters.
LOOP_MAX_DEPTH = 8


def remat_policy(name: str) -> Any:
  """Maps a config name to a `jax.checkpoint_policies` policy ("full" saves nothing)."""
  if name == "full":
    return jax.checkpoint_policies.nothing_saveable
  return getattr(jax.checkpoint_policies, name)


class LevelSettings(Protocol):
  """What a level or head module holds that its blocks share (`ARLevel`, `MARLevel`, `PixelHead`)."""

  dtype: Any
  param_dtype: Any
  scan: bool
  remat: str
  cpu_kernels: bool


def level_blocks(
  owner: LevelSettings, block_cls: type[nn.Module], depth: int, item_chunks: int, **block_kwargs: Any
) -> BlockStack:
  """The `depth` blocks of a level or head, with its dtypes, kernels, scan and remat settings.

  `block_kwargs` are the block's own (width, heads, causal, dropout); CPU
  kernels also apply stacks up to `LOOP_MAX_DEPTH` deep as a loop.
  """
  kwargs = dict(block_kwargs, dtype=owner.dtype, param_dtype=owner.param_dtype, cpu_kernels=owner.cpu_kernels)
  loop_depth = LOOP_MAX_DEPTH if owner.cpu_kernels else 0
  return BlockStack(block_cls, kwargs, depth, owner.scan, owner.remat, loop_depth=loop_depth, item_chunks=item_chunks)


class BlockStack(nn.Module):
  """`depth` blocks of `block_cls(**block_kwargs)`, scanned or looped (module docstring)."""

  block_cls: type[nn.Module]
  block_kwargs: Mapping[str, Any]
  depth: int
  scan: bool = True
  remat: str = "none"
  loop_depth: int = 0  # scanned stacks up to this depth apply their stacked parameters in a loop
  item_chunks: int = 1  # K: each block runs its items in K sequential chunks (module docstring)

  @nn.compact
  def __call__(
    self,
    x: jax.Array,
    *,
    rotary: jax.Array | None = None,
    position: jax.Array | None = None,
    cache: KVCache | None = None,
    queries: jax.Array | None = None,
    deterministic: bool = True,
  ) -> tuple[jax.Array, KVCache | None]:
    """x [B, L, D] through every block -> (x [B, L, D] or [B, Q, D], cache).

    Args:
      x: [B, L, D] tokens.
      rotary, position: passed unchanged to every block.
      cache: None, or every layer's cache stacked, [depth, B, S, N, H] leaves:
        block i gets slice i, and the returned cache stacks their updates.
      queries: int [B, Q] (`TimmBlock` stacks): only the outputs at these
        positions, [B, Q, D]; the last block computes just those (deep
        scanned stacks compute all and gather).
      deterministic: no dropout (it becomes each block's attribute).
    """
    block_cls = self.block_cls
    kwargs = dict(self.block_kwargs, deterministic=deterministic)
    # Parameters are created by nn.scan (stacked layout) but, up to `loop_depth`, applied in a loop.
    loop_scanned = self.scan and self.depth <= self.loop_depth and not self.is_initializing()
    if self.remat != "none":
      # prevent_cse is only needed outside scan (scan already prevents CSE across steps).
      uses_scan = self.scan and not loop_scanned
      block_cls = nn.remat(block_cls, policy=remat_policy(self.remat), prevent_cse=not uses_scan)
    whole_sequences = cache is None and queries is None and not self.is_initializing()
    chunks = item_chunks(x.shape[0], self.item_chunks) if whole_sequences else 1
    if loop_scanned:
      # The scanned parameters, sliced per layer and applied by a Python loop.
      looped = nn.map_variables(_BlockLoop, "params", trans_in_fn=functools.partial(_slice_layers, depth=self.depth))
      return looped(block_cls, kwargs, self.depth, chunks, name="blocks")(
        x, rotary=rotary, position=position, cache=cache, queries=queries
      )
    if self.scan:
      stack = nn.scan(
        functools.partial(_scan_step, chunks=chunks),
        variable_axes={"params": 0},
        split_rngs={"params": True, "dropout": True},
        in_axes=(0, nn.broadcast, nn.broadcast),  # cache: sliced per layer; rotary, position: the same for all
        length=self.depth,
        metadata_params={nn.PARTITION_NAME: "layers"},
      )
      x, cache = stack(block_cls(**kwargs, name="blocks"), x, cache, rotary, position)
      if queries is not None:  # every layer scanned over all positions: gather at the end
        x = jnp.take_along_axis(x, queries[:, :, None], axis=1)
      return x, cache
    make_block = lambda i: block_cls(**kwargs, name=f"blocks_{i}")  # noqa: E731
    return _apply_in_turn(make_block, self.depth, x, rotary, position, cache, queries, chunks)


def item_chunks(items: int, wanted: int) -> int:
  """K for `items` items: the largest divisor of `items` up to `wanted` (the chunks are equal)."""
  return max(k for k in range(1, max(wanted, 1) + 1) if items % k == 0)


def _scan_step(
  block: nn.Module,
  x: jax.Array,
  cache: KVCache | None,
  rotary: jax.Array | None,
  position: jax.Array | None,
  chunks: int = 1,
) -> tuple[jax.Array, KVCache | None]:
  """One scanned layer: `nn.scan` passes positional arguments, blocks take keywords; x stays along "batch"."""
  x, cache = _apply_block(block, layers.along_batch(x), rotary, position, cache, None, chunks)
  return layers.along_batch(x), cache


def _apply_block(
  block: nn.Module,
  x: jax.Array,
  rotary: jax.Array | None,
  position: jax.Array | None,
  cache: KVCache | None,
  queries: jax.Array | None,
  chunks: int,
) -> tuple[jax.Array, KVCache | None]:
  """`block` on x [B, L, D], at once or (whole sequences only) in `chunks` sequential chunks of its items.

  The chunk loop is an `nn.scan` that broadcasts the block's parameters (no
  new scope: the same parameter tree) and splits its dropout rng.
  """
  if chunks == 1:
    return block(x, rotary=rotary, position=position, cache=cache, queries=queries)
  batch = x.shape[0]
  xs = jnp.swapaxes(x.reshape(batch // chunks, chunks, *x.shape[1:]), 0, 1)  # [K, B / K, L, D]: items k, k + K, ..
  run = nn.scan(
    _chunk_step,
    variable_broadcast="params",
    split_rngs={"params": False, "dropout": True},
    in_axes=(0, nn.broadcast, nn.broadcast),
    length=chunks,
  )
  _, ys = run(block, None, xs, rotary, position)
  return jnp.swapaxes(ys, 0, 1).reshape(batch, *ys.shape[2:]), None


def _chunk_step(
  block: nn.Module, carry: None, x: jax.Array, rotary: jax.Array | None, position: jax.Array | None
) -> tuple[None, jax.Array]:
  """One chunk of items [B / K, L, D] through `block`, kept along "batch"."""
  y, _ = block(layers.along_batch(x), rotary=rotary, position=position)
  return carry, layers.along_batch(y)


def _slice_layers(collections: Mapping[str, Any], depth: int) -> dict[str, Any]:
  """{collection: stacked block variables ([depth, ...] leaves)} -> {collection: {`blocks_i`: slice i}}."""
  return {
    name: {f"blocks_{i}": jax.tree.map(lambda a, i=i: a[i], dict(tree)) for i in range(depth)}
    for name, tree in collections.items()
  }


class _BlockLoop(nn.Module):
  """`depth` blocks `blocks_0 ..` applied in a Python loop; arguments as `BlockStack`."""

  block_cls: Any
  block_kwargs: Mapping[str, Any]
  depth: int
  chunks: int = 1

  @nn.compact
  def __call__(
    self,
    x: jax.Array,
    *,
    rotary: jax.Array | None,
    position: jax.Array | None,
    cache: KVCache | None,
    queries: jax.Array | None,
  ) -> tuple[jax.Array, KVCache | None]:
    make_block = lambda i: self.block_cls(**self.block_kwargs, name=f"blocks_{i}")  # noqa: E731
    return _apply_in_turn(make_block, self.depth, x, rotary, position, cache, queries, self.chunks)


def _apply_in_turn(
  make_block: Callable[[int], nn.Module],
  depth: int,
  x: jax.Array,
  rotary: jax.Array | None,
  position: jax.Array | None,
  cache: KVCache | None,
  queries: jax.Array | None,
  chunks: int = 1,
) -> tuple[jax.Array, KVCache | None]:
  """Blocks `make_block(0) .. make_block(depth - 1)` one after the other; arguments as `BlockStack`."""
  updates = []
  for i in range(depth):
    layer_cache = None if cache is None else jax.tree.map(lambda a, i=i: a[i], cache)
    last = i == depth - 1
    x, update = _apply_block(
      make_block(i), layers.along_batch(x), rotary, position, layer_cache, queries if last else None, chunks
    )
    updates.append(update)
  return layers.along_batch(x), None if cache is None else jax.tree.map(lambda *a: jnp.stack(a), *updates)


def unstack_block_params(params: Mapping[str, Any]) -> dict[str, Any]:
  """Scanned layout (`blocks` with a leading [depth] axis) -> `blocks_0 ..`, recursively."""
  out: dict[str, Any] = {}
  for key, value in params.items():
    if key == "blocks" and isinstance(value, Mapping):
      depth = jax.tree.leaves(value)[0].shape[0]
      for i in range(depth):
        out[f"blocks_{i}"] = jax.tree.map(lambda a, i=i: a[i], dict(value))
    elif isinstance(value, Mapping):
      out[key] = unstack_block_params(value)
    else:
      out[key] = value
  return out


def stack_block_params(params: Mapping[str, Any]) -> dict[str, Any]:
  """Inverse of `unstack_block_params`."""
  out: dict[str, Any] = {}
  per_block = sorted((k for k in params if k.startswith("blocks_")), key=lambda k: int(k.split("_")[1]))
  if per_block:
    out["blocks"] = jax.tree.map(lambda *xs: jnp.stack(xs), *[dict(params[k]) for k in per_block])
  for key, value in params.items():
    if key in per_block:
      continue
    out[key] = stack_block_params(value) if isinstance(value, Mapping) else value
  return out
