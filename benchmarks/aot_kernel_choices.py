"""What each CPU-tuned operation would do to a TPU training step, compiled ahead of time (no TPU needed).

`config.model.kernels="auto"` runs the CPU-tuned forms of a few operations
on CPU only (`model_config.resolve_kernels`). This script shows why, piece by
piece: it compiles one training step for a TPU slice with the standard
operations, then with exactly one piece switched to its CPU form, then with
all of them (`kernels="cpu"`), and prints per chip the compiler's
temporaries and program code, and the step's FLOPs and HBM bytes (counted on
one chip with the stacks unrolled, as `--mode=aot` does). The pieces:

  dense       the flattened `Dense` (`layers.Dense`) instead of `nn.Dense`
  layer_norm  `layers.LayerNorm` (written-out gradient) instead of `nn.LayerNorm`
  gelu        the erf form of GELU
  attention   short-sequence attention and dropout attention's written-out gradient
  dropout     the unrolled Threefry dropout bits (`dropout.bernoulli`)
  loops       stacks of up to 8 blocks applied as Python loops over their stacked parameters

A piece is switched on by wrapping the library's constructor so that it
always receives `cpu_kernels=True` (or `loop_depth=LOOP_MAX_DEPTH`): a
what-if for this script only, the library has no per-piece setting.

    python benchmarks/aot_kernel_choices.py [--config=configs/fractalmar_64.py] [--topology=v5p-8]
        [--images_per_chip=8] [--widths=64,32,16] [--heads=2,2,2] [--depths=8,4,2] [--pieces=dense,loops]
        [--output=kernels.json]

By default FractalMAR-64's three levels (MAR, MAR, pixel head; dropout
attention, guiding conditions) narrowed to widths 64/32/16 and depths
8/4/2 (every stack short enough for the CPU's loops), so that the 8
programs and their cost twins compile in minutes on 2 cores; `--widths=`
and `--depths=` (empty) keep the paper's. Needs libtpu
(`pip install -e ".[tpu]"`). Not part of the test suite.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import pathlib
import sys
import time
from collections.abc import Iterator

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from fractal_jax.config import load_config_file  # noqa: E402
from fractal_jax.model import ar_level, attention, block_stack, blocks, mar_level, model_config, pixel_head  # noqa: E402
from fractal_jax.parallel import accelerators  # noqa: E402
from fractal_jax.parallel import mesh as mesh_lib  # noqa: E402
from fractal_jax.train import aot  # noqa: E402

LEVEL_MODULES = (blocks, ar_level, mar_level, pixel_head)
PIECES = ("dense", "layer_norm", "gelu", "attention", "dropout", "loops")


def _forcing(constructor, **forced):
  """`constructor` with `forced` keyword arguments overriding whatever its caller passes."""

  @functools.wraps(constructor)
  def wrapped(*args, **kwargs):
    return constructor(*args, **{**kwargs, **forced})

  return wrapped


def _patches(piece: str) -> list[tuple[object, str, object]]:
  """(module, attribute, replacement) that switch `piece` to its CPU form while the rest stays standard."""
  if piece in ("dense", "layer_norm"):
    return [(m, piece, _forcing(getattr(m, piece), cpu_kernels=True)) for m in LEVEL_MODULES if hasattr(m, piece)]
  if piece == "gelu":
    return [(blocks, "gelu", _forcing(blocks.gelu, cpu_kernels=True))]
  if piece == "attention":
    return [(attention, "dot_product_attention", _forcing(attention.dot_product_attention, cpu_kernels=True))]
  if piece == "dropout":
    return [(blocks, "Dropout", _forcing(blocks.Dropout, cpu_kernels=True))]
  if piece == "loops":
    return [(block_stack, "BlockStack", _forcing(block_stack.BlockStack, loop_depth=block_stack.LOOP_MAX_DEPTH))]
  raise ValueError(f"unknown piece {piece!r}; use some of {', '.join(PIECES)}")


@contextlib.contextmanager
def _switched_on(piece: str | None) -> Iterator[None]:
  patches = [] if piece is None else _patches(piece)
  saved = [(module, name, getattr(module, name)) for module, name, _ in patches]
  try:
    for module, name, replacement in patches:
      setattr(module, name, replacement)
    yield
  finally:
    for module, name, original in saved:
      setattr(module, name, original)


def measure(args: argparse.Namespace, kernels: str, piece: str | None) -> dict:
  """Compiles the step with `kernels` (and `piece` switched to its CPU form) and returns its figures."""
  config = load_config_file(args.config)
  if args.widths:
    config.model.widths = tuple(int(w) for w in args.widths.split(","))
    config.model.heads = tuple(int(h) for h in args.heads.split(","))
  if args.depths:
    config.model.depths = tuple(int(d) for d in args.depths.split(","))
  config.model.kernels, config.model.remat_policy, config.model.dtype = kernels, args.remat, args.dtype
  config.mesh_shape = (1, -1, 1)
  devices = accelerators.tpu_devices(accelerators.parse_slice(args.topology))
  config.train.global_batch, config.train.grad_accum_steps = args.images_per_chip * len(devices), 1
  chip = accelerators.chip_spec(devices)
  settings = model_config.settings(config.model, platform="tpu")
  start = time.perf_counter()
  with _switched_on(piece):
    report = aot.train_step_report(config, settings, mesh_lib.make_mesh(config.mesh_shape, devices))
  row = dict(variant=piece or kernels, seconds_to_measure=time.perf_counter() - start)
  row.update(aot.as_dict(report, chip))
  return row


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--config", default=str(ROOT / "configs" / "fractalmar_64.py"))
  parser.add_argument("--topology", default="v5p-8")
  parser.add_argument("--images_per_chip", type=int, default=8)
  parser.add_argument("--widths", default="64,32,16")
  parser.add_argument("--heads", default="2,2,2")
  parser.add_argument("--depths", default="8,4,2")
  parser.add_argument("--remat", default="full")
  parser.add_argument("--dtype", default="bfloat16")
  parser.add_argument("--pieces", default=",".join(PIECES))
  parser.add_argument("--output", default="aot_kernel_choices.json")
  args = parser.parse_args()
  variants = [("standard", None)] + [("standard", p) for p in args.pieces.split(",") if p] + [("cpu", None)]
  rows = []
  print("| variant | temporaries/chip | code | GFLOP/step/chip | HBM GB/step/chip | compile |")
  print("|---|---|---|---|---|---|")
  for kernels, piece in variants:
    row = measure(args, kernels, piece)
    rows.append(row)
    pathlib.Path(args.output).write_text(json.dumps(rows, indent=2) + "\n")
    print(
      f"| {row['variant']} | {row['temp_bytes'] / 2**20:,.1f} MiB | {row['code_bytes'] / 2**20:,.1f} MiB | "
      f"{row['flops'] / 1e9:.4g} | {row['hbm_bytes'] / 1e9:.4g} | {row['compile_seconds']:.0f} s |",
      flush=True,
    )


if __name__ == "__main__":
  main()
