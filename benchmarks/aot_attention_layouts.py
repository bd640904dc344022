"""Attention of the lower levels on one TPU chip, compiled ahead of time: standard layout vs items last.

TPUs store an array's two minor dimensions in tiles of 8 x 128. The lower
levels of a fractal model attend over a few positions in very many items, so
[B, N, T, S] logits with T, S ~ 3-22 are stored several times (up to ~57x)
their size. `fractal_jax.model.attention` computes those cases with the item
axis B last. This script compiles forward + backward of one attention call
for one v5p chip, at the shapes one chip trains in FractalMAR-Base-256 at 32
images per chip, in both forms, and prints the compiler's temporaries and
HBM bytes (XLA's cost analysis; no TPU needed, no TPU used).

    python benchmarks/aot_attention_layouts.py

Needs libtpu (`pip install -e ".[tpu]"`). Not part of the test suite; about a minute on 2 cores.
"""

from __future__ import annotations

import os
import pathlib
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax.sharding import SingleDeviceSharding  # noqa: E402

from fractal_jax.model import attention  # noqa: E402
from fractal_jax.parallel import accelerators  # noqa: E402

KEEP_PROB = 0.9
# (what, [B, T, N, H] per chip, with dropout): the pixel head's main part (1,248,256 of the chip's 2,097,152
# pixel items; the rest is the compaction overflow) and level 2's main part (92,992 of 131,072 items).
CASES = (
  ("pixel head, 3 tokens", (1_248_256, 3, 4, 16), False),
  ("level 2, 22 tokens, dropout", (92_992, 22, 3, 64), True),
)


def _standard(query, key, value, keep):
  if keep is None:
    return jax.nn.dot_product_attention(query, key, value)
  return attention._dropped_softmax_attention_items_first(query, key, value, keep, False, KEEP_PROB)


def _items_last(query, key, value, keep):
  return attention.dot_product_attention(query, key, value, causal=False, dropout_keep=keep, keep_prob=KEEP_PROB)


def measure(attend, shape: tuple[int, ...], dropout: bool, device) -> tuple[float, float]:
  """(temporaries GiB, HBM GB) of forward + backward of `attend` at bfloat16 [B, T, N, H] on `device`."""
  batch, length, heads, _ = shape
  sharding = SingleDeviceSharding(device)
  qkv = jax.ShapeDtypeStruct(shape, jnp.bfloat16, sharding=sharding)
  cotangent = jax.ShapeDtypeStruct(shape, jnp.float32, sharding=sharding)
  keep = jax.ShapeDtypeStruct((batch, heads, length, length), jnp.bool_, sharding=sharding) if dropout else None

  def loss(q, k, v, mask, g):
    return jnp.sum(attend(q, k, v, mask).astype(jnp.float32) * g)

  compiled = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(qkv, qkv, qkv, keep, cotangent).compile()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return compiled.memory_analysis().temp_size_in_bytes / 2**30, float(cost.get("bytes accessed", 0.0)) / 1e9


def main() -> None:
  device = accelerators.tpu_devices(accelerators.parse_slice("v5p-8"))[0]
  print("| attention (forward + backward, one v5p chip) | layout | temporaries | HBM traffic |")
  print("|---|---|---|---|")
  for what, shape, dropout in CASES:
    for layout, attend in (("[B, N, T, S]", _standard), ("items last", _items_last)):
      temp, traffic = measure(attend, shape, dropout, device)
      print(f"| {what}, B = {shape[0]:,} | {layout} | {temp:.1f} GiB | {traffic:.0f} GB |", flush=True)


if __name__ == "__main__":
  main()
