"""Side by side with the official PyTorch code on this machine: the two take turns, call by call.

    python benchmarks/versus_official.py --ref_python=refvenv/bin/python \\
        --harness=../shared/tools/official_cpu_harness.py --ref_mirror=<fractalgen git dir> \\
        --kind=mar --what=train --rounds=16

Shared VMs drift in speed by up to 2x within an hour, so timing the two
implementations minutes apart compares the machine, not the code. Here two
worker processes stay alive, one running the official model (through the
official CPU harness, in a Python environment with torch) and one running
ours; each round times one call of each, back to back. Printed: the median
seconds of each, and the median over rounds of official / ours.

What is timed (the harness's SMALL models, float32):
  --what=train   one training step at batch 16: forward, backward, global-norm
                 clipping at 3.0 and AdamW (lr 1e-4, betas 0.9/0.95, wd 0.05);
                 the official step draws new masks each time, ours folds the
                 step into its key, so both see the training mask distribution.
  --what=sample  4 class-conditional images, guidance 2.0 (linear), iterations (16, 4).

For local measurement only: it needs the official code and torch, which the
project neither ships nor installs.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BATCH = 16
SAMPLES = 4
CFG = 2.0
NUM_ITER = (16, 4)


def official_worker(kind: str, what: str, harness: str) -> None:
  """Runs under the torch environment: the official model, one call per line read from stdin."""
  sys.path.insert(0, str(Path(harness).resolve().parent))
  import official_cpu_harness as h  # noqa: PLC0415
  import torch  # noqa: PLC0415

  torch.manual_seed(0)
  model = h.build(h.load(), **h.SMALL[kind])
  if what == "train":
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.05)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    images = (torch.rand(BATCH, 3, 32, 32) - mean) / std
    labels = torch.randint(0, 10, (BATCH,))
    model.train()

    def call() -> None:
      loss = model(images, labels)
      opt.zero_grad()
      loss.backward()
      torch.nn.utils.clip_grad_norm_(model.parameters(), 3.0)
      opt.step()

  else:
    model.eval()
    labels = torch.arange(SAMPLES) % 10

    def call() -> None:
      with torch.no_grad():
        emb = model.class_emb(labels)
        emb = torch.cat([emb, model.fake_latent.repeat(SAMPLES, 1)], 0)
        model.sample(
          cond_list=[emb] * h.SMALL[kind]["num_conds"], num_iter_list=list(NUM_ITER), cfg=CFG,
          cfg_schedule="linear", temperature=1.0, filter_threshold=1e-4, fractal_level=0,
        )  # fmt: skip

  _serve(call)


def ours_worker(kind: str, what: str) -> None:
  """fractal-jax's compiled train step or sampler, one call per line read from stdin."""
  sys.path.insert(0, str(ROOT))
  sys.path.insert(0, str(ROOT / "benchmarks"))
  from fractal_jax import cpu_tuning  # noqa: PLC0415

  cpu_tuning.apply()
  import jax  # noqa: PLC0415
  import jax.numpy as jnp  # noqa: PLC0415
  import train_speed  # noqa: PLC0415

  from fractal_jax.model import (
    fractal,  # noqa: PLC0415
    model_config,  # noqa: PLC0415
  )
  from fractal_jax.sampling import sampler  # noqa: PLC0415

  model_cfg = train_speed.small(kind)
  if what == "train":
    step, state, images, labels, _ = train_speed.compiled_step(model_cfg, BATCH)
    box = [state]

    def call() -> None:
      box[0], metrics = step(box[0], images, labels, jax.random.key(1))
      jax.block_until_ready(metrics)

  else:
    settings = model_config.settings(model_cfg)
    model = fractal.build(settings)
    params = jax.jit(lambda k: fractal.init_params(model, k))(jax.random.key(0))
    plan = sampler.make_plan(settings, NUM_ITER, cfg=CFG)
    labels = jnp.arange(SAMPLES) % settings.num_classes
    calls = [0]

    def call() -> None:
      calls[0] += 1
      out, _ = sampler.sample(model, params, labels, jax.random.key(calls[0]), plan, cfg=CFG)
      out.block_until_ready()

  _serve(call)


def _serve(call) -> None:  # noqa: ANN001
  call()  # warm-up (and compilation)
  print("ready", flush=True)
  for _ in sys.stdin:
    start = time.perf_counter()
    call()
    print(time.perf_counter() - start, flush=True)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--kind", choices=("ar", "mar"), default="mar")
  parser.add_argument("--what", choices=("train", "sample"), default="train")
  parser.add_argument("--rounds", type=int, default=16)
  parser.add_argument("--ref_python", help="a Python with torch (see the harness's docstring)")
  parser.add_argument("--harness", help="path of official_cpu_harness.py")
  parser.add_argument("--ref_mirror", help="the official repository's git directory (the harness's REF_MIRROR)")
  parser.add_argument("--worker", choices=("official", "ours"), help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.worker == "official":
    return official_worker(args.kind, args.what, args.harness)
  if args.worker == "ours":
    return ours_worker(args.kind, args.what)
  missing = [f"--{name}" for name in ("ref_python", "harness", "ref_mirror") if not getattr(args, name)]
  if missing:
    parser.error(f"{', '.join(missing)} required: this compares against the official code (see --help)")
  for path in (args.ref_python, args.harness, args.ref_mirror):
    if not os.path.exists(path):
      parser.error(f"{path} does not exist")
  common = [__file__, f"--kind={args.kind}", f"--what={args.what}"]
  env = dict(os.environ, REF_MIRROR=args.ref_mirror, PYTHONWARNINGS="ignore")
  workers = {
    "official": [args.ref_python, *common, "--worker=official", f"--harness={args.harness}"],
    "ours": [sys.executable, *common, "--worker=ours"],
  }
  procs = {
    name: subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
    for name, cmd in workers.items()
  }
  try:
    for name, proc in procs.items():
      while (line := proc.stdout.readline()) and line.strip() != "ready":
        pass
      if not line:
        sys.exit(f"the {name} worker exited before it was ready (its error is above)")
    times: dict[str, list[float]] = {name: [] for name in procs}
    for _ in range(args.rounds):
      for name, proc in procs.items():
        proc.stdin.write("go\n")
        proc.stdin.flush()
        times[name].append(float(proc.stdout.readline()))
  finally:
    for proc in procs.values():
      proc.stdin.close()
      proc.wait()
  ratios = [o / u for o, u in zip(times["official"], times["ours"])]
  quartiles = statistics.quantiles(ratios, n=4)
  print(f"SMALL {args.kind.upper()} {args.what}, {args.rounds} alternating rounds:")
  for name in procs:
    print(f"  {name:<9} median {statistics.median(times[name]):.3f} s  ({' '.join(f'{t:.2f}' for t in times[name])})")
  print(
    f"  official / ours: median over rounds {statistics.median(ratios):.2f}x "
    f"(quartiles {quartiles[0]:.2f}-{quartiles[2]:.2f}x), ratio of medians "
    f"{statistics.median(times['official']) / statistics.median(times['ours']):.2f}x"
  )


if __name__ == "__main__":
  main()
