"""How a MAR level sends the patches of one sampling step to the level below: calls of a few static sizes.

A step predicts `count` patches per item (known on the host for plain
sampling, the same for every item). Shapes must be static, so the level
below is called on chunks whose sizes come from a small set `sizes`
(ascending), chosen per level on the host. While patches remain, the next
call takes the smallest size that holds all that remain, else the largest:
counts (1, 2, 3, 5, 6) with sizes (3, 6) make calls of 3, 3, 3, 6, 6. Each
size is one traced copy of the levels below (compile time grows with their
number, so there are at most `MAX_SIZES`); one call per step where possible
matters because every call of a lower level costs a fixed time on top of
its per-patch work (many small operations, each with its own overhead).
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Sequence

import jax
import jax.numpy as jnp

MAX_SIZES = 2
MIN_SAVING = 0.1


def split(count: int, sizes: Sequence[int]) -> list[int]:
  """The call sizes that cover `count` patches (host mirror of `next_size`)."""
  calls = []
  while count > 0:
    size = next((s for s in sizes if s >= count), sizes[-1])
    calls.append(size)
    count -= size
  return calls


def next_size(remaining: jax.Array, sizes: Sequence[int]) -> jax.Array:
  """Index into `sizes` of the next call for `remaining` > 0 patches: the smallest >= remaining, else the largest."""
  return jnp.minimum(jnp.sum(jnp.asarray(sizes) < remaining), len(sizes) - 1)


def span(most: int, sizes: Sequence[int]) -> int:
  """Patch slots the calls of any count 1..most reach: the static length of a step's position list."""
  return max(sum(split(count, sizes)) for count in range(1, most + 1))


@functools.cache
def chunk_sizes(counts: tuple[int, ...], overhead: float, max_sizes: int = MAX_SIZES) -> tuple[int, ...]:
  """Sizes (ascending) minimising the padded patches plus `overhead` patches per call.

  Each size beyond the first adds a compiled copy of the levels below, so
  it must lower that cost by `MIN_SAVING`, and levels that predict at most
  3 patches a step (which padding wastes little of) get one size. E.g.
  counts (2, 3, 5, 6) (L=16, T=4) with overhead 4: (3, 6), calls 3, 3, 6, 6,
  cost 18 + 4 * 4 = 34, against 40 for (6,); with overhead 16: (6,) (a
  saving of 6 in 88 is too little).
  """
  if max(counts) <= 3:
    max_sizes = 1
  best: tuple[float, tuple[int, ...]] | None = None
  for number in range(1, max_sizes + 1):
    found = None
    for sizes in itertools.combinations(range(1, max(counts) + 1), number):
      calls = [size for count in counts for size in split(count, sizes)]
      cost = sum(calls) + overhead * len(calls)
      if found is None or (cost, sizes) < found:
        found = (cost, sizes)
    assert found is not None
    if best is None or found[0] <= (1.0 - MIN_SAVING) * best[0]:
      best = found
  assert best is not None
  return best[1]
