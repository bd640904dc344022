"""The paper's training recipes on a TPU slice, compiled ahead of time on this machine (no TPU needed).

For each paper config: the paper's global batch (2048 at 64x64, 1024 at 256x256) on a v5p-64 slice (32
chips, as the official recipe's 32 GPUs), bfloat16 compute and `remat_policy=full`; the smallest gradient
accumulation that fits the chip's HBM, from `--accum` (1) up. Prints one table row per config (per-chip memory, estimated
step time, images/s and MFU, all from `--mode=aot`'s figures: estimates from published chip specifications)
and writes every report to `--output` (JSON).

    python benchmarks/aot_paper_recipes.py --output=aot_paper_recipes.json [--configs=fractalmar_64,...]

Each compile of a paper-size step takes minutes on a 2-core machine: the program, then shallow copies of it on
one chip for its FLOPs and HBM traffic (`aot.step_cost`: one per block stack deeper than 1, about 10 minutes
each for the 256x256 configs). `--flops_only` counts FLOPs in the lowered step instead (seconds) and leaves the
traffic out: the step time is then a compute-bound lower bound (printed `>=`). `--configs` picks some. Needs
libtpu (`pip install -e ".[tpu]"`). Not part of the test suite.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import jax  # noqa: E402

from fractal_jax.config import load_config_file  # noqa: E402
from fractal_jax.model import model_config  # noqa: E402
from fractal_jax.parallel import accelerators  # noqa: E402
from fractal_jax.parallel import mesh as mesh_lib  # noqa: E402
from fractal_jax.train import aot  # noqa: E402

PAPER = ("fractalar_64", "fractalmar_64", "fractalmar_base_256", "fractalmar_large_256", "fractalmar_huge_256")
GIB = 2**30


def recipe(name: str, topology: str, accum: int, remat: str, dtype: str, traffic: bool) -> dict:
  """Compiles the config's training step (paper batch) for the slice; its report as a dict, or the error."""
  config = load_config_file(str(ROOT / "configs" / f"{name}.py"))
  config.model.remat_policy, config.model.dtype = remat, dtype
  config.train.grad_accum_steps = accum
  config.mesh_shape = (1, -1, 1)  # FSDP over every chip
  devices = accelerators.tpu_devices(accelerators.parse_slice(topology))
  chip = accelerators.chip_spec(devices)
  mesh = mesh_lib.make_mesh(config.mesh_shape, devices)
  settings = model_config.settings(config.model, platform="tpu")
  row = dict(config=name, topology=topology, chips=len(devices), global_batch=int(config.train.global_batch))
  row.update(images_per_chip=row["global_batch"] / len(devices), accum=accum, remat=remat, dtype=dtype)
  start = time.perf_counter()
  try:
    report = aot.train_step_report(config, settings, mesh, chip.hbm_bytes, traffic)
  except jax.errors.JaxRuntimeError as error:
    row.update(fits=False, error=str(error).splitlines()[0][:300], seconds_to_compile=time.perf_counter() - start)
    return row
  row.update(aot.as_dict(report, chip), fits=report.total_bytes <= chip.hbm_bytes, traffic_counted=traffic)
  print(aot.format_report(report, chip), flush=True)
  return row


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--configs", default=",".join(PAPER))
  parser.add_argument("--topology", default="v5p-64")
  parser.add_argument("--remat", default="full")
  parser.add_argument("--dtype", default="bfloat16")
  parser.add_argument("--accum", type=int, default=1, help="the first accumulation to try")
  parser.add_argument("--max_accum", type=int, default=8)
  parser.add_argument("--output", default="aot_paper_recipes.json")
  parser.add_argument(
    "--flops_only",
    action="store_true",
    help="count FLOPs in the lowered step, not HBM traffic (minutes instead of hours for the 256x256 configs)",
  )
  args = parser.parse_args()
  rows = []
  print("| config | slice | images/chip | accum | remat | memory/chip | est. step | est. images/s | est. MFU |")
  print("|---|---|---|---|---|---|---|---|---|")
  for name in args.configs.split(","):
    accum = args.accum
    while True:
      row = recipe(name, args.topology, accum, args.remat, args.dtype, not args.flops_only)
      rows.append(row)
      pathlib.Path(args.output).write_text(json.dumps(rows, indent=2) + "\n")
      if row["fits"] or accum >= args.max_accum:
        break
      why = row.get("error") or f"{row['total_bytes'] / GIB:.1f} GiB per chip"
      print(f"{name}: grad_accum_steps={accum} does not fit ({why}); doubling", flush=True)
      accum *= 2
    if row["fits"]:
      at_least, at_most = ("", "") if row["traffic_counted"] else (">= ", "<= ")  # compute-bound only
      print(
        f"| {name} | {row['topology']} | {row['images_per_chip']:g} | {accum} | {row['remat']} | "
        f"{row['total_bytes'] / GIB:.1f} GiB | {at_least}{row['seconds']:.2f} s | "
        f"{at_most}{row['images_per_second']:.0f} | {at_most}{100 * row['mfu']:.1f}% |",
        flush=True,
      )
    else:
      print(f"| {name} | {row['topology']} | {row['images_per_chip']:g} | > {args.max_accum} | does not fit |")


if __name__ == "__main__":
  main()
