"""`--mode=aot --topology=<slice>`: compile the training step and the sampler for a TPU slice, without one.

    python -m fractal_jax.main --config=configs/fractalmar_64.py --mode=aot --topology=v5p-64 \
      --config.model.remat_policy=full --config.model.dtype=bfloat16

Without `--topology` it compiles for the chips attached to the machine (a
TPU VM, a GPU machine; on a CPU-only one that is a one-line error), for
setting a run's estimate beside what the same chips measure.

Prints, per chip and per program, the memory the compiler needs against the
chip's HBM, the work per call and estimated speed (`fractal_jax.train.aot`);
`--output` writes the figures as JSON. A program that does not fit ends the
run with exit status 2 and the settings that change its size. The model uses
the standard (non-CPU) kernels, as it would on the TPU.
"""

from __future__ import annotations

import json
import math
from typing import Any

from fractal_jax.model import model_config
from fractal_jax.parallel import accelerators
from fractal_jax.parallel import mesh as mesh_lib

GIB = 2**30


def _levers(config: Any, program: str) -> str:
  """The settings that change a program's memory, with their current values."""
  model, train = config.model, config.train
  if program == "sampler":
    return f"lower config.sample.batch_size (now {config.sample.batch_size}) or compute in bfloat16"
  levers = [
    f"images per chip (config.train.global_batch, now {train.global_batch})",
    f"config.train.grad_accum_steps (now {train.grad_accum_steps})",
  ]
  if model.remat_policy != "full":
    levers.append(f"config.model.remat_policy=full (now {model.remat_policy})")
  if model.dtype != "bfloat16":
    levers.append(f"config.model.dtype=bfloat16 (now {model.dtype})")
  chunks = tuple(model.get("item_chunks", ())) or "()"
  levers.append(f"more item chunks at the levels with many items (config.model.item_chunks, now {chunks})")
  levers.append(f"more devices on fsdp (config.mesh_shape, now {tuple(config.mesh_shape)})")
  return "change " + ", ".join(levers)


def _check_fits(report: Any, chip: accelerators.ChipSpec, config: Any, program: str) -> None:
  if report.total_bytes > chip.hbm_bytes:
    raise model_config.ConfigError(
      f"the {program} needs {report.total_bytes / GIB:.1f} GiB per chip but a {chip.name} has "
      f"{chip.hbm_bytes / GIB:.0f} GiB: {_levers(config, program)}"
    )


def _compile(fn: Any, config: Any, chip: accelerators.ChipSpec, program: str) -> Any:
  """fn() -> report; the compiler's own out-of-memory refusal becomes the same one-line error."""
  import jax

  try:
    return fn()
  except jax.errors.JaxRuntimeError as error:
    if "RESOURCE_EXHAUSTED" not in str(error):
      raise
    first = str(error).splitlines()[0]
    raise model_config.ConfigError(
      f"the {program} does not fit a {chip.name}: {first[:200]}; {_levers(config, program)}"
    ) from None


def run(config: Any, topology: str | None, output: str | None) -> dict[str, Any]:
  """Checks, compiles both programs for the slice, prints their figures; returns them."""
  if topology:
    slice_ = accelerators.parse_slice(topology)
    devices = accelerators.tpu_devices(slice_)
    target, where = slice_.topology, f"{slice_.name} ({slice_.topology})"
  else:
    devices = accelerators.attached_devices()
    target, where = "attached", f"attached to this machine ({devices[0].platform})"
  model_settings = model_config.settings(config.model, platform=devices[0].platform)
  batch, accum = int(config.train.global_batch), int(config.train.grad_accum_steps)
  chip = accelerators.chip_spec(devices)
  mesh = mesh_lib.make_mesh(config.mesh_shape, devices)
  per_step = mesh_lib.batch_size_per_step(mesh)
  if batch < 1 or accum < 1 or batch % (accum * per_step):
    raise model_config.ConfigError(
      f"config.train.global_batch={batch} with grad_accum_steps={accum} does not split over the {per_step} devices "
      f"of the mesh's data x fsdp axes {dict(mesh.shape)}: use a multiple of {accum * per_step}"
    )
  from fractal_jax.train import aot

  print(
    f"{where}: {len(devices)} chips {chip.name}, {chip.hbm_bytes / GIB:.0f} GiB HBM, "
    f"{chip.peak_flops / 1e12:.0f} TFLOP/s bf16, {chip.hbm_bandwidth / 1e12:.2f} TB/s (published specifications)\n"
    f"mesh {dict(mesh.shape)}; training: global batch {batch} ({batch / len(devices):g} images per chip), "
    f"grad_accum_steps {accum}, remat {model_settings.remat_policy}, dtype {model_settings.dtype}, "
    f"kernels {model_settings.kernels}",
    flush=True,
  )
  figures: dict[str, Any] = {"topology": target, "chips": len(devices), "chip": chip.name}
  reports = {
    "train_step": lambda: aot.train_step_report(config, model_settings, mesh, chip.hbm_bytes),
    "sampler": lambda: aot.sampler_report(config, model_settings, mesh),
  }
  for name, make in reports.items():
    program = name.replace("_", " ")
    report = _compile(make, config, chip, program)
    print(aot.format_report(report, chip), flush=True)
    figures[name] = aot.as_dict(report, chip)
    if output:
      _write(output, figures)
    _check_fits(report, chip, config, program)
  return figures


def _write(output: str, figures: dict[str, Any]) -> None:
  from etils import epath

  path = epath.Path(output)
  path.parent.mkdir(parents=True, exist_ok=True)
  clean = json.loads(json.dumps(figures, default=lambda v: None if isinstance(v, float) and math.isnan(v) else v))
  path.write_text(json.dumps(clean, indent=2) + "\n")
