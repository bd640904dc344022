"""Training speed: images/s of one jitted train step (forward, backward, AdamW), FLOP/s, fraction of peak.

    python benchmarks/train_speed.py                     # tiny + SMALL AR and MAR, float32 and bfloat16
    python benchmarks/train_speed.py --paper             # also the paper configs (use an accelerator)
    python benchmarks/train_speed.py --demo_checkpoint=/tmp/fractal_demo   # + the demo's NLL in both precisions

SMALL models (the official CPU harness's sizes): 32x32 images, levels
32/4/1, widths 256/128/64, depths 4/2/1, heads 4/4/2, 10 classes; AR,AR
(num_conds 1) and MAR,MAR (num_conds 5); batch 16. FLOPs per step come from
XLA's cost analysis of the compiled step (2 per multiply-add; a scanned
block stack's body counts once, so deep stacks read low); the peak is
this machine's measured float32 matmul rate (a 2048^3 product; bf16 is
compared against the same float32 peak). On a chip with published
specifications (`fractal_jax.parallel.accelerators.CHIPS`: TPUs, H100, H200)
the last column is the MFU as `--mode=aot` estimates it: model FLOPs (3x the
loss's forward, every block counted) per second over the chip's bf16 peak.
Prints a table of medians.
"""

from __future__ import annotations

import argparse
import functools
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fractal_jax import cpu_tuning  # noqa: E402

cpu_tuning.apply()  # before JAX starts

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from fractal_jax.config import base_config, load_config_file  # noqa: E402
from fractal_jax.model import fractal, model_config  # noqa: E402
from fractal_jax.parallel import accelerators  # noqa: E402
from fractal_jax.train import aot, optimizer, train_step  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
SMALL = dict(img_size_list=(32, 4, 1), widths=(256, 128, 64), depths=(4, 2, 1), heads=(4, 4, 2), num_classes=10)
PAPER = ("fractalar_64", "fractalmar_64", "fractalmar_base_256", "fractalmar_large_256", "fractalmar_huge_256")


def small(kind: str):
  config = base_config()
  config.model.update(SMALL)
  config.model.types = (kind, kind, "pixel")
  config.model.num_conds = 5 if kind == "mar" else 1
  return config.model


def matmul_peak(size: int = 2048, repeats: int = 5) -> float:
  """Measured float32 matmul FLOP/s of this device."""
  a = jnp.ones((size, size), jnp.float32)
  f = jax.jit(lambda x: x @ x)
  f(a).block_until_ready()
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    f(a).block_until_ready()
    times.append(time.perf_counter() - start)
  return 2 * size**3 / statistics.median(times)


def step_settings(model_cfg, dtype: str) -> model_config.ModelSettings:
  """The model's settings computing in `dtype` (the config itself is left as it is)."""
  model_cfg = model_cfg.copy_and_resolve_references()
  model_cfg.dtype = dtype
  return model_config.settings(model_cfg)


def compiled_step(model_cfg, batch: int, dtype: str = "float32"):
  """(compiled train step, its state, uint8 images [batch, S, S, 3], labels [batch], compile seconds)."""
  settings = step_settings(model_cfg, dtype)
  model = fractal.build(settings)
  tx = optimizer.make_optimizer(optimizer.learning_rate_schedule(1e-4, 10, 1000))
  state = jax.jit(lambda k: train_step.init_state(fractal.init_params(model, k), tx))(jax.random.key(0))
  images = jnp.asarray(np.random.default_rng(0).integers(0, 256, (batch, settings.img_size, settings.img_size, 3)))
  images = images.astype(jnp.uint8)
  labels = jnp.arange(batch) % settings.num_classes
  # One device: the loss compacts the items of the whole batch as one group.
  step = jax.jit(functools.partial(train_step.train_step, model, tx, batch_shards=1), donate_argnums=(0,))
  start = time.perf_counter()
  compiled = step.lower(state, images, labels, jax.random.key(1)).compile()
  return compiled, state, images, labels, time.perf_counter() - start


def measure(model_cfg, batch: int, dtype: str, repeats: int) -> dict:
  compiled, state, images, labels, compile_s = compiled_step(model_cfg, batch, dtype)
  cost = compiled.cost_analysis()
  flops = float((cost[0] if isinstance(cost, (list, tuple)) else cost)["flops"])
  state, metrics = compiled(state, images, labels, jax.random.key(1))
  jax.block_until_ready(metrics)
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    state, metrics = compiled(state, images, labels, jax.random.key(1))
    jax.block_until_ready(metrics)
    times.append(time.perf_counter() - start)
  seconds = statistics.median(times)
  model_flops = aot.training_model_flops(step_settings(model_cfg, dtype), batch)
  return dict(seconds=seconds, images_per_s=batch / seconds, flops=flops, model_flops=model_flops, compile_s=compile_s)


def demo_nll(checkpoint: str, max_images: int) -> None:
  """Held-out bits/dim of a demo checkpoint, computed in float32 and in bfloat16."""
  from fractal_jax.data import sources
  from fractal_jax.evaluation import nll
  from fractal_jax.io import model_checkpoint

  config = load_config_file(str(ROOT / "configs" / "demo.py"))
  params = model_checkpoint.load_params(checkpoint, config.model)
  images, _ = sources.digits_arrays("val")
  images = jnp.asarray(images[:max_images])
  ids = jnp.arange(images.shape[0], dtype=jnp.int32)
  for dtype in ("float32", "bfloat16"):
    model_cfg = config.model.copy_and_resolve_references()
    model_cfg.dtype = dtype
    model = fractal.build(model_config.settings(model_cfg))
    out = jax.jit(lambda p, x, i, m=model: nll.per_image_losses(m, p, x, jax.random.key(1), i))(params, images, ids)
    bits = np.asarray(out["bits_per_dim"])
    print(
      f"demo NLL, {dtype:<9}: {bits.mean():.4f} bits/dim (+- {bits.std() / np.sqrt(bits.size):.4f}, {bits.size} images)"
    )


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--batch", type=int, default=16)
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--paper", action="store_true", help="also the five paper configs")
  parser.add_argument("--only", default="", help="comma-separated subset: tiny,small_ar,small_mar,<paper config>")
  parser.add_argument("--dtypes", default="float32,bfloat16")
  parser.add_argument("--remat_policy", default="", help="every model's config.model.remat_policy (default: its own)")
  parser.add_argument("--demo_checkpoint", default="", help="a configs/demo.py workdir: print its NLL in both dtypes")
  parser.add_argument("--demo_images", type=int, default=300)
  args = parser.parse_args()
  cases = {
    "tiny": load_config_file(str(ROOT / "configs" / "tiny.py")).model,
    "small_ar": small("ar"),
    "small_mar": small("mar"),
  }
  if args.paper:
    for name in PAPER:
      cases[name] = load_config_file(str(ROOT / "configs" / f"{name}.py")).model
  if args.only:
    cases = {k: v for k, v in cases.items() if k in args.only.split(",")}
  if args.remat_policy:
    for model_cfg in cases.values():
      model_cfg.remat_policy = args.remat_policy
  peak = matmul_peak()
  chip = accelerators.CHIPS.get(jax.devices()[0].device_kind)
  print(f"devices: {jax.devices()}")
  print(f"measured float32 matmul peak: {peak / 1e9:.0f} GFLOP/s")
  if chip:
    print(f"published specification: {chip.name}, {chip.peak_flops / 1e12:.0f} TFLOP/s bf16 (the MFU column)")
  print(
    f"{'model':<22}{'dtype':>10}{'batch':>6}{'s/step':>9}{'images/s':>10}{'GFLOP/step':>12}{'GFLOP/s':>9}"
    f"{'of peak':>9}{'compile s':>11}{'MFU':>7}"
  )
  for name, model_cfg in cases.items():
    for dtype in args.dtypes.split(","):
      r = measure(model_cfg, args.batch, dtype, args.repeats)
      rate = r["flops"] / r["seconds"]
      print(
        f"{name:<22}{dtype:>10}{args.batch:>6}{r['seconds']:>9.3f}{r['images_per_s']:>10.2f}"
        f"{r['flops'] / 1e9:>12.1f}{rate / 1e9:>9.1f}{rate / peak:>9.2f}{r['compile_s']:>11.1f}"
        f"{format(r['model_flops'] / r['seconds'] / chip.peak_flops, '.1%') if chip else '-':>7}",
        flush=True,
      )
  if args.demo_checkpoint:
    demo_nll(args.demo_checkpoint, args.demo_images)


if __name__ == "__main__":
  main()
