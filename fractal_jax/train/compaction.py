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
   static capacity), and the rest (the *overflow*) inside a `lax.cond` that
   skips it unless some item there has weight (`skippable`). The overflow
   stores no activations for the backward pass: when it runs, its forward is
   computed twice.

The result equals the padded computation: items of weight 0 contribute
nothing to the loss nor to the gradient, and no item of weight > 0 is ever
dropped. C is chosen on the host (`capacity`) to minimise the expected work,
from simulated draws of the official training masks. Evaluation masks
(uniform counts) leave little to skip: evaluation sends every item down.

The overflow is one `lax.cond`, not a loop over chunks of items that skips
the empty ones: a `lax.scan` over chunks stacks every chunk's activations
for the backward pass.

Groups: items are split into G equal contiguous groups, each sorted and cut
on its own. With G = the number of batch shards every group lives on one
device, so the sorts and gathers stay local (batched over G).

Dimension letters: G groups, M items per group, C main items per group.
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


@functools.cache
def capacity(items_per_group: int, kinds: tuple[str, ...], seq_lens: tuple[int, ...]) -> int:
  """Main capacity C for the items below the levels `kinds` (top first, each with `seq_lens` patches).

  `items_per_group` is the number of top-level items (images) per group. C
  minimises the expected work `C + P(count > C) * (M - C) * RECOMPUTE_COST`
  over simulated training steps (a fixed seed: the same C every time). C = M
  (no compaction) when M < MIN_ITEMS or the saving is under MIN_SAVING.
  """
  total = items_per_group * math.prod(seq_lens)
  if total < MIN_ITEMS:
    return total
  rng = np.random.default_rng(0)
  counts = np.full(SIMULATED_STEPS, items_per_group, np.int64)
  for kind, seq_len in zip(kinds, seq_lens):
    counts = _hidden_totals(rng, counts, seq_len) if kind == "mar" else counts * seq_len
  step = max(1, total // 4096)  # candidate capacities
  candidates = np.unique(np.clip(np.arange(0, total + step, step), 1, total))
  cost = [c + np.mean(counts > c) * (total - c) * RECOMPUTE_COST for c in candidates]
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


def skippable(fn: Callable[..., Any], run: jax.Array, params: Any, inputs: Any, key: jax.Array) -> Any:
  """`fn(params, inputs, key)` if `run`, else zeros of its output; differentiable in params and inputs.

  Nothing is stored for the backward pass: it recomputes `fn` under `jax.vjp`
  when `run`, and returns zero cotangents otherwise (a custom VJP, so that
  each pass traces `fn` once: `jax.checkpoint` around a `lax.cond` compiles
  several more copies).
  """
  shapes = jax.eval_shape(fn, params, inputs, key)

  def zeros(tree: Any) -> Any:
    return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), tree)

  @jax.custom_vjp
  def call(run: jax.Array, params: Any, inputs: Any, key: jax.Array) -> Any:
    return jax.lax.cond(run, fn, lambda *_: zeros(shapes), params, inputs, key)

  def call_fwd(run: jax.Array, params: Any, inputs: Any, key: jax.Array) -> tuple[Any, Any]:
    return call(run, params, inputs, key), (run, params, inputs, key)

  def call_bwd(residuals: Any, cotangent: Any) -> tuple[None, Any, Any, None]:
    run, params, inputs, key = residuals
    leaves, treedef = jax.tree.flatten(inputs)
    floating = [jnp.issubdtype(x.dtype, jnp.inexact) for x in leaves]

    def with_floats(floats: list[jax.Array]) -> Any:  # inputs with its float leaves replaced
      it = iter(floats)
      return jax.tree.unflatten(treedef, [next(it) if f else x for x, f in zip(leaves, floating)])

    def backward(params: Any, floats: list[jax.Array], cotangent: Any) -> tuple[Any, Any]:
      _, vjp = jax.vjp(lambda p, xs: fn(p, with_floats(xs), key), params, floats)
      return vjp(cotangent)

    def nothing(params: Any, floats: list[jax.Array], cotangent: Any) -> tuple[Any, Any]:
      return zeros(params), zeros(floats)

    floats = [x for x, f in zip(leaves, floating) if f]
    param_grads, float_grads = jax.lax.cond(run, backward, nothing, params, floats, cotangent)
    # Integer and bool inputs (masks, ids) get the symbolic zero cotangent, float0.
    it = iter(float_grads)
    input_grads = [next(it) if f else np.zeros(x.shape, jax.dtypes.float0) for x, f in zip(leaves, floating)]
    return None, param_grads, jax.tree.unflatten(treedef, input_grads), None

  call.defvjp(call_fwd, call_bwd)
  return call(run, params, inputs, key)


def level_kinds(levels: Sequence[Any]) -> tuple[tuple[str, ...], tuple[int, ...]]:
  """(kinds, seq_lens) of `LevelSpec`s, for `capacity`."""
  return tuple(spec.kind for spec in levels), tuple(spec.seq_len for spec in levels)


@dataclasses.dataclass(frozen=True)
class CompactedItems:
  """The training step's `fractal.ItemArrangement`: below a MAR level, weighted items first, overflow skippable.

  Per group of items (`groups` = the batch shards of the mesh), the items
  with weight come first (`compact`); a level runs on the first `capacity`
  items of each group directly and on the rest only when one of them has
  weight (`skippable`). Exact: the same loss and gradients as sending every
  item down.
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
    if jax.tree.leaves(rest)[0].shape[0] == 0:
      return out
    unbound = module.clone(parent=None)

    def run(params: Any, x: dict[str, Any], key: jax.Array) -> Any:
      return unbound.apply({"params": params}, x, method=fn, rngs={"dropout": key})

    # Without a "dropout" rng (evaluation) the levels are deterministic and ignore the key.
    key = model.make_rng("dropout") if model.has_rng("dropout") else jax.random.key(0)
    overflow = skippable(run, jnp.any(counts > main), module.variables["params"], rest, key)
    return join(out, overflow, self.groups)
