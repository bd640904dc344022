"""Below a MAR level: run only the items that carry loss (exactly, with static shapes).

`CompactedItems` is the training step's `fractal.ItemArrangement`. The
official MAR passes only its masked patches to the level below, so that
level's batch size varies from step to step (about 80% of the patches per
MAR level in training). Under `jax.jit` shapes are static. Running every
patch through the levels below with weight 0 costs up to 1.56x the necessary
work at the pixel head of a two-MAR-level model. Instead the loss

1. sorts each level's items so that those with weight > 0 come first
   (`compact`: a stable sort, raster order is kept among them), then
2. runs the first C items of the sorted list directly (the *main* part, C a
   static capacity), and the rest (the *overflow*) in K equal chunks, one
   after the other, each inside a `lax.cond` that skips it unless some item
   there has weight (`skippable`). The overflow stores no activations for the
   backward pass: a chunk that runs computes its forward twice.

The result equals the padded computation: items of weight 0 contribute
nothing to the loss nor to the gradient, and no item of weight > 0 is ever
dropped. C is chosen on the host (`capacity`) to minimise the expected work,
from simulated draws of the official training masks. Evaluation masks
(uniform counts) leave little to skip: evaluation sends every item down.

The chunks bound what the overflow adds to a chip's memory to one chunk's
working set (K = `OVERFLOW_CHUNKS`: the pixel head of FractalMAR-256 runs
~1.2M main and ~0.9M overflow pixel items per 32 images, which one
`lax.cond` would hold at once), and let C sit lower, near the mean count:
the first chunks run when the count exceeds C, the last ones almost never.
The loop over chunks is in `skippable`'s custom VJP, forward and backward,
so that no chunk's activations are stacked for the backward pass (a
differentiated `lax.scan` would stack them). XLA's cost analysis counts the
loop's body once: one chunk of each overflow, as though it ran.

Groups: items are split into G equal contiguous groups, each sorted and cut
on its own. With G = the number of batch shards every group lives on one
device, so the sorts and gathers stay local (batched over G).

Dimension letters: G groups, M items per group, C main items per group, K
overflow chunks of R = (M - C) / K items per group.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from fractal_jax.model import masking
from fractal_jax.model.fractal import FractalModel, Items, LevelFn
from fractal_jax.model.model_config import LevelSpec

SIMULATED_STEPS = 2000
EXACT_SUMS = 4096  # sums of more per-item counts than this are drawn from their normal approximation
RECOMPUTE_COST = 4.0 / 3.0  # an overflow that runs costs forward twice + backward, vs forward + backward
# The overflow doubles a level's compile time: compact only levels with many items and a sizeable saving.
MIN_ITEMS = 1024  # per group
MIN_SAVING = 0.1  # of the level's expected work
OVERFLOW_CHUNKS = 8  # K: the overflow runs in this many equal chunks (fewer where its size has no such divisor)


def count_pmf(seq_len: int) -> np.ndarray:
  """P(an item hides k of its L patches), k = 0..L, under the official training mask (float64).

  k = ceil(L * ratio) with ratio = 1 + 0.25 z, z normal truncated to [-4, 0] (`masking.training_mask`).
  """

  def cdf(x: float) -> float:  # of the truncated z
    phi = lambda t: 0.5 * (1.0 + math.erf(t / math.sqrt(2.0)))  # noqa: E731
    return (phi(x) - phi(-4.0)) / (phi(0.0) - phi(-4.0))

  z_at = lambda k: (k / seq_len - masking.RATIO_MEAN) / masking.RATIO_STD  # noqa: E731  ratio = k / L
  pmf = np.array([0.0] + [cdf(min(z_at(k), 0.0)) - cdf(max(z_at(k - 1), -4.0)) for k in range(1, seq_len + 1)])
  return pmf / pmf.sum()


def _hidden_totals(rng: np.random.Generator, items: np.ndarray, seq_len: int) -> np.ndarray:
  """For each entry n of `items`, a draw of the patches hidden in total by n items."""
  pmf = count_pmf(seq_len)
  values = np.arange(seq_len + 1)
  mean = float(pmf @ values)
  std = math.sqrt(float(pmf @ values**2) - mean**2)
  totals = []
  for n in items.tolist():
    if n <= EXACT_SUMS:
      totals.append(int(rng.choice(values, size=n, p=pmf).sum()))
    else:
      totals.append(int(round(rng.normal(n * mean, math.sqrt(n) * std))))
  return np.clip(np.array(totals, np.int64), 0, items * seq_len)


def overflow_chunks(rest: int) -> int:
  """K for an overflow of `rest` items per group: the largest divisor of `rest` up to `OVERFLOW_CHUNKS`."""
  return max(k for k in range(1, OVERFLOW_CHUNKS + 1) if rest % k == 0)


@functools.cache
def capacity(items_per_group: int, kinds: tuple[str, ...], seq_lens: tuple[int, ...]) -> int:
  """Main capacity C for the items below the levels `kinds` (top first, each with `seq_lens` patches).

  `items_per_group` is the number of top-level items (images) per group. C
  minimises the expected work `C + RECOMPUTE_COST * R * sum_k P(count > C + k R)`
  (K chunks of R items) over simulated training steps (a fixed seed: the same
  C every time), among the C that leave an overflow of `OVERFLOW_CHUNKS`
  equal chunks. C = M (no compaction) when M < MIN_ITEMS or the saving is
  under MIN_SAVING.
  """
  total = items_per_group * math.prod(seq_lens)
  if total < MIN_ITEMS:
    return total
  rng = np.random.default_rng(0)
  counts = np.full(SIMULATED_STEPS, items_per_group, np.int64)
  for kind, seq_len in zip(kinds, seq_lens):
    counts = _hidden_totals(rng, counts, seq_len) if kind == "mar" else counts * seq_len
  step = max(1, total // 4096)  # candidate capacities, rounded up to leave whole chunks
  rests = np.unique((total - np.clip(np.arange(0, total + step, step), 1, total)) // OVERFLOW_CHUNKS)
  candidates = total - rests * OVERFLOW_CHUNKS

  def expected_work(main: int, chunk: int) -> float:
    runs = sum(np.mean(counts > main + k * chunk) for k in range(OVERFLOW_CHUNKS))
    return main + RECOMPUTE_COST * chunk * runs

  cost = [expected_work(int(c), int(r)) for c, r in zip(candidates, rests)]
  best = int(np.argmin(cost))
  return int(candidates[best]) if cost[best] <= (1.0 - MIN_SAVING) * total else total


def compact(weights: jax.Array, groups: int) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Per group, the positions of the items with weight > 0 first, then the others (stable).

  Args:
    weights: [G * M] float, >= 0.
    groups: G.

  Returns:
    (order [G, M] int32 positions within each group, rank [G, M] int32 its inverse permutation,
    counts [G] int32 items with weight).
  """
  keep = weights.reshape(groups, -1) > 0
  counts = jnp.sum(keep, axis=1, dtype=jnp.int32)
  # Where each item goes: kept items in raster order, then the others (the inverse of a stable sort on ~keep).
  kept_before = jnp.cumsum(keep, axis=1, dtype=jnp.int32) - 1
  dropped_before = jnp.cumsum(~keep, axis=1, dtype=jnp.int32) - 1
  rank = jnp.where(keep, kept_before, counts[:, None] + dropped_before)
  order = jnp.argsort(rank, axis=1).astype(jnp.int32)
  return order, rank, counts


@jax.custom_vjp
def _permute(x: jax.Array, order: jax.Array, rank: jax.Array) -> jax.Array:
  return jax.vmap(lambda xg, og: xg[og])(x, order)


def _permute_fwd(x: jax.Array, order: jax.Array, rank: jax.Array) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
  return _permute(x, order, rank), (order, rank)


def _permute_bwd(residuals: tuple[jax.Array, jax.Array], g: jax.Array) -> tuple[jax.Array, None, None]:
  order, rank = residuals
  # The transpose of a permutation is its inverse: a gather, not the scatter-add autodiff would emit.
  return _permute(g, rank, order), None, None


_permute.defvjp(_permute_fwd, _permute_bwd)


def gather(x: jax.Array, order: jax.Array, rank: jax.Array) -> jax.Array:
  """x [G * M, ...] reordered by the permutations `order` [G, M] (inverse `rank`) within each group.

  Batched over G (vmap), so that the SPMD partitioner keeps each group on its device.
  """
  groups = order.shape[0]
  return _permute(x.reshape(groups, -1, *x.shape[1:]), order, rank).reshape(x.shape)


def split(tree: Any, groups: int, main: int) -> tuple[Any, Any]:
  """Each [G * M, ...] leaf -> (first `main` items of each group [G * main, ...], the rest [G * (M - main), ...])."""

  def parts(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    grouped = x.reshape(groups, x.shape[0] // groups, *x.shape[1:])
    head, rest = grouped[:, :main], grouped[:, main:]
    return head.reshape(groups * head.shape[1], *x.shape[1:]), rest.reshape(groups * rest.shape[1], *x.shape[1:])

  pairs = jax.tree.map(parts, tree)
  is_pair = lambda p: isinstance(p, tuple)  # noqa: E731
  return jax.tree.map(lambda p: p[0], pairs, is_leaf=is_pair), jax.tree.map(lambda p: p[1], pairs, is_leaf=is_pair)


def join(main: Any, rest: Any, groups: int) -> Any:
  """Inverse of `split`."""

  def cat(a: jax.Array, b: jax.Array) -> jax.Array:
    grouped = [x.reshape(groups, x.shape[0] // groups, *x.shape[1:]) for x in (a, b)]
    joined = jnp.concatenate(grouped, axis=1)
    return joined.reshape(groups * joined.shape[1], *a.shape[1:])

  return jax.tree.map(cat, main, rest)


def skippable(fn: Callable[..., Any], runs: jax.Array, params: Any, chunks: Any, keys: jax.Array) -> Any:
  """`fn(params, chunk k, keys[k])` for each chunk k where `runs[k]`, zeros elsewhere; differentiable in params and chunks.

  Args:
    fn: (params, inputs, key) -> outputs, for one chunk's inputs.
    runs: bool [K].
    params: the parameters `fn` reads.
    chunks: inputs with a leading chunk axis [K, ...].
    keys: [K] random keys, one per chunk.

  Returns:
    `fn`'s outputs stacked along a leading [K] axis.

  The chunks run one after the other, in a loop, forward and backward: one
  chunk's working set at a time. Nothing is stored for the backward pass: it
  recomputes `fn` under `jax.vjp` for the chunks that ran and gives zero
  cotangents for the others (a custom VJP, so that each pass traces `fn`
  once: `jax.checkpoint` around a `lax.cond` compiles several more copies).
  """
  shapes = jax.eval_shape(fn, params, jax.tree.map(lambda x: x[0], chunks), keys[0])

  def zeros(tree: Any) -> Any:
    return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), tree)

  @jax.custom_vjp
  def call(runs: jax.Array, params: Any, chunks: Any, keys: jax.Array) -> Any:
    def one(args: tuple[jax.Array, Any, jax.Array]) -> Any:
      run, chunk, key = args
      return jax.lax.cond(run, fn, lambda *_: zeros(shapes), params, chunk, key)

    return jax.lax.map(one, (runs, chunks, keys))

  def call_fwd(runs: jax.Array, params: Any, chunks: Any, keys: jax.Array) -> tuple[Any, Any]:
    return call(runs, params, chunks, keys), (runs, params, chunks, keys)

  def call_bwd(residuals: Any, cotangent: Any) -> tuple[None, Any, Any, None]:
    runs, params, chunks, keys = residuals
    leaves, treedef = jax.tree.flatten(chunks)
    floating = [jnp.issubdtype(x.dtype, jnp.inexact) for x in leaves]

    def backward(params: Any, chunk: list[jax.Array], key: jax.Array, cotangent: Any) -> tuple[Any, Any]:
      def with_floats(p: Any, floats: list[jax.Array]) -> Any:  # fn with the chunk's float leaves as arguments
        it = iter(floats)
        return fn(p, jax.tree.unflatten(treedef, [next(it) if f else x for x, f in zip(chunk, floating)]), key)

      _, vjp = jax.vjp(with_floats, params, [x for x, f in zip(chunk, floating) if f])
      return vjp(cotangent)

    def nothing(params: Any, chunk: list[jax.Array], key: jax.Array, cotangent: Any) -> tuple[Any, Any]:
      return zeros(params), [jnp.zeros_like(x) for x, f in zip(chunk, floating) if f]

    def step(param_grads: Any, args: tuple[jax.Array, list[jax.Array], jax.Array, Any]) -> tuple[Any, Any]:
      run, chunk, key, chunk_cotangent = args
      grads, float_grads = jax.lax.cond(run, backward, nothing, params, chunk, key, chunk_cotangent)
      return jax.tree.map(jnp.add, param_grads, grads), float_grads

    param_grads, float_grads = jax.lax.scan(step, zeros(params), (runs, leaves, keys, cotangent))
    # Integer and bool inputs (masks, ids) get the symbolic zero cotangent, float0.
    it = iter(float_grads)
    input_grads = [next(it) if f else np.zeros(x.shape, jax.dtypes.float0) for x, f in zip(leaves, floating)]
    return None, param_grads, jax.tree.unflatten(treedef, input_grads), None

  call.defvjp(call_fwd, call_bwd)
  return call(runs, params, chunks, keys)


def as_chunks(tree: Any, groups: int, chunks: int) -> Any:
  """Each [G * R * K, ...] leaf (K consecutive chunks per group) -> [K, G * R, ...]: chunk k of every group."""

  def cut(x: jax.Array) -> jax.Array:
    grouped = x.reshape(groups, chunks, x.shape[0] // (groups * chunks), *x.shape[1:])
    return jnp.swapaxes(grouped, 0, 1).reshape(chunks, -1, *x.shape[1:])

  return jax.tree.map(cut, tree)


def from_chunks(tree: Any, groups: int) -> Any:
  """Inverse of `as_chunks`."""

  def glue(x: jax.Array) -> jax.Array:
    chunks = x.shape[0]
    grouped = x.reshape(chunks, groups, x.shape[1] // groups, *x.shape[2:])
    return jnp.swapaxes(grouped, 0, 1).reshape(-1, *x.shape[2:])

  return jax.tree.map(glue, tree)


def level_kinds(levels: Sequence[Any]) -> tuple[tuple[str, ...], tuple[int, ...]]:
  """(kinds, seq_lens) of `LevelSpec`s, for `capacity`."""
  return tuple(spec.kind for spec in levels), tuple(spec.seq_len for spec in levels)


@dataclasses.dataclass(frozen=True)
class CompactedItems:
  """The training step's `fractal.ItemArrangement`: below a MAR level, weighted items first, overflow skippable.

  Per group of items (`groups` = the batch shards of the mesh), the items
  with weight come first (`compact`); a level runs on the first `capacity`
  items of each group directly and on the rest in `overflow_chunks` chunks,
  each only when one of its items has weight (`skippable`). Exact: the same
  loss and gradients as sending every item down.
  """

  groups: int = 1

  def arrange(self, model: FractalModel, items: Items, levels_above: Sequence[LevelSpec]) -> Items:
    """`items` [G * M] sorted weighted-first within each group, with layout (counts [G], main capacity C).

    Unchanged (layout None) at initialisation (the overflow reads existing
    parameters), above every MAR level (all items carry weight), and where
    the capacity is every item (not worth it at this level).
    """
    if model.is_initializing() or not any(spec.kind == "mar" for spec in levels_above):
      return items
    kinds, seq_lens = level_kinds(levels_above)
    num_items = items.weights.shape[0]
    batch = num_items // math.prod(seq_lens)
    main = capacity(batch // self.groups, kinds, seq_lens)
    if main * self.groups == num_items:
      return items
    order, rank, counts = compact(items.weights, self.groups)
    take = functools.partial(gather, order=order, rank=rank)
    images = take(items.images)
    conds = [take(c) for c in items.conds]
    return Items(images, conds, take(items.weights), take(items.ids), layout=(counts, main))

  def run(
    self, model: FractalModel, module: nn.Module, fn: LevelFn, inputs: dict[str, Any], items: Items
  ) -> dict[str, jax.Array]:
    """`fn(module, inputs)` on compacted items: the main part directly, the overflow only when needed.

    The overflow applies an unbound copy of `module` to its parameters (read
    from the bound module), so that gradients reach them as usual.
    """
    if items.layout is None:
      return fn(module, inputs)
    counts, main = items.layout
    head, rest = split(inputs, self.groups, main)
    out = fn(module, head)
    rest_per_group = jax.tree.leaves(rest)[0].shape[0] // self.groups
    if rest_per_group == 0:
      return out
    unbound = module.clone(parent=None)

    def run(params: Any, x: dict[str, Any], key: jax.Array) -> Any:
      return unbound.apply({"params": params}, x, method=fn, rngs={"dropout": key})

    chunks = overflow_chunks(rest_per_group)
    chunk = rest_per_group // chunks
    # Chunk k holds the sorted positions main + k * chunk ... of every group: it runs if some group has more weight.
    runs = jnp.any(counts[None, :] > main + chunk * jnp.arange(chunks)[:, None], axis=1)
    # Without a "dropout" rng (evaluation) the levels are deterministic and ignore the keys.
    key = model.make_rng("dropout") if model.has_rng("dropout") else jax.random.key(0)
    params = module.variables["params"]
    overflow = skippable(run, runs, params, as_chunks(rest, self.groups, chunks), jax.random.split(key, chunks))
    return join(out, from_chunks(overflow, self.groups), self.groups)
