"""Sampling speed: images/s after compilation, and compile seconds.

    python benchmarks/sample_speed.py                  # tiny + SMALL AR and MAR (CPU-sized)
    python benchmarks/sample_speed.py --paper          # also the paper configs (use an accelerator)

SMALL models (the official CPU harness's sizes): 32x32 images, levels
32/4/1, widths 256/128/64, depths 4/2/1, heads 4/4/2, 10 classes; AR,AR
and MAR,MAR with num_conds 5 and iterations (16, 4). Batch 4, guidance 2.0,
linear schedule. Random weights: speed does not depend on them. Prints a
table; the median of `--repeats` timed calls after one warm-up call.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fractal_jax import cpu_tuning  # noqa: E402

cpu_tuning.apply()  # before JAX starts

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from fractal_jax.config import base_config, load_config_file  # noqa: E402
from fractal_jax.model import fractal, model_config  # noqa: E402
from fractal_jax.sampling import sampler  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
SMALL = dict(img_size_list=(32, 4, 1), widths=(256, 128, 64), depths=(4, 2, 1), heads=(4, 4, 2), num_classes=10)


def small(kind: str):
  config = base_config()
  config.model.update(SMALL)
  config.model.types = (kind, kind, "pixel")
  config.model.num_conds = 5 if kind == "mar" else 1
  return config.model, (16, 4)


def paper(name: str):
  config = load_config_file(str(ROOT / "configs" / f"{name}.py"))
  num_iter = (64, 16) if name.endswith("_64") else (64, 16, 16)
  return config.model, num_iter


def measure(name: str, model_cfg, num_iter, batch: int, cfg: float, repeats: int) -> dict:
  settings = model_config.settings(model_cfg)
  model = fractal.build(settings)
  params = jax.jit(lambda key: fractal.init_params(model, key))(jax.random.key(0))
  plan = sampler.make_plan(settings, num_iter, cfg=cfg)
  labels = jnp.arange(batch) % settings.num_classes
  start = time.perf_counter()
  images, _ = sampler.sample(model, params, labels, jax.random.key(0), plan, cfg=cfg)
  images.block_until_ready()
  first = time.perf_counter() - start
  times = []
  for seed in range(repeats):
    start = time.perf_counter()
    images, _ = sampler.sample(model, params, labels, jax.random.key(seed + 1), plan, cfg=cfg)
    images.block_until_ready()
    times.append(time.perf_counter() - start)
  median = statistics.median(times)
  return dict(
    name=name,
    batch=batch,
    num_iter=num_iter,
    seconds=median,
    images_per_s=batch / median,
    compile_s=first - median,
  )


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--batch", type=int, default=4)
  parser.add_argument("--cfg", type=float, default=2.0)
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--paper", action="store_true", help="also the five paper configs")
  parser.add_argument("--only", default="", help="comma-separated subset: tiny,small_ar,small_mar,<paper config>")
  args = parser.parse_args()
  cases = {
    "tiny": (load_config_file(str(ROOT / "configs" / "tiny.py")).model, (4, 4)),
    "small_ar": small("ar"),
    "small_mar": small("mar"),
  }
  if args.paper:
    for name in ("fractalar_64", "fractalmar_64", "fractalmar_base_256", "fractalmar_large_256", "fractalmar_huge_256"):
      cases[name] = paper(name)
  if args.only:
    cases = {k: v for k, v in cases.items() if k in args.only.split(",")}
  print(f"devices: {jax.devices()}")
  print(f"{'model':<22}{'batch':>6}{'iterations':>14}{'s/batch':>10}{'images/s':>10}{'compile s':>11}")
  for name, (model_cfg, num_iter) in cases.items():
    r = measure(name, model_cfg, num_iter, args.batch, args.cfg, args.repeats)
    print(
      f"{r['name']:<22}{r['batch']:>6}{str(r['num_iter']):>14}{r['seconds']:>10.2f}"
      f"{r['images_per_s']:>10.3f}{r['compile_s']:>11.1f}",
      flush=True,
    )


if __name__ == "__main__":
  main()
