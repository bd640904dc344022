"""Ahead-of-time compilation of the training step and the sampler for any devices, with memory and cost figures.

`--mode=aot` compiles both programs for a TPU slice that this machine does
not have (`parallel.accelerators`): the same jitted functions, shardings and
batch sizes as a real run, so the compiler's memory analysis is the run's.

Figures per chip (one device), per program:
  * memory, from the compiler: the state's parameter and optimizer bytes
    (from their shardings), the other arguments, temporaries and the total
    the program needs (arguments + outputs - donated + temporaries);
  * work: FLOPs and HBM bytes per call. XLA's cost analysis counts a loop's
    body once, or as often as it unrolled it, whatever the trip count
    (every block stack of a level is a scan with standard kernels, and
    gradient accumulation is another; on a mesh the partitioner also turns
    matrix products with sharded operands into loops of partial products),
    so the training step's figures come from compilations of the same step
    on one chip with its stacks unrolled and cut to one or two blocks, at
    that chip's share of one micro-batch, extrapolated to the stacks' depths
    (`step_cost`), times the accumulation steps;
    the collectives' traffic is not in them.
    The sampler's loops run a number of times known only from the plan, so
    its FLOPs are counted per level from each level's forward pass and the
    number of passes sampling makes; its HBM traffic is not estimated;
  * estimates, labelled as such: step time = max(FLOPs / peak FLOP/s, bytes /
    HBM bandwidth) with the chip's published figures; MFU = model FLOPs
    (3x the forward pass of the loss at the items the step runs: forward and
    backward, without rematerialisation) / (step time x peak).
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding

from fractal_jax.model import block_stack, costs, fractal
from fractal_jax.model.model_config import LevelSpec, ModelSettings, items_per_image
from fractal_jax.parallel import mesh as mesh_lib
from fractal_jax.parallel.accelerators import ChipSpec
from fractal_jax.sampling import from_config, sampler
from fractal_jax.train import compaction, optimizer, train_step, trainer


@dataclasses.dataclass(frozen=True)
class ProgramReport:
  """One compiled program's figures, per device (chip); bytes and FLOPs as counted above (module docstring)."""

  name: str
  compile_seconds: float
  parameter_bytes: int  # the parameters (and their EMA) held by one chip
  optimizer_bytes: int  # the optimizer moments held by one chip (0 for the sampler)
  argument_bytes: int  # every input the program holds, the above included
  output_bytes: int
  donated_bytes: int  # outputs written in place of donated inputs
  temp_bytes: int  # the compiler's temporaries (activations, gathered parameters, ...)
  code_bytes: int  # the compiled program's code (not in `total_bytes`)
  flops: float  # executed FLOPs per call (scans corrected); NaN when not counted
  model_flops: float  # 3x forward (train) or the forward passes sampling needs; NaN when not counted
  hbm_bytes: float  # HBM traffic per call (scans corrected); NaN when not estimated
  images: int  # images per call, over all chips

  @property
  def total_bytes(self) -> int:
    """What the program needs on a chip: arguments + outputs - donated + temporaries."""
    return self.argument_bytes + self.output_bytes - self.donated_bytes + self.temp_bytes

  def seconds(self, chip: ChipSpec) -> float:
    """Estimated time per call: the roofline max(FLOPs / peak, bytes / bandwidth) (bytes ignored when NaN)."""
    compute = self.flops / chip.peak_flops
    return compute if math.isnan(self.hbm_bytes) else max(compute, self.hbm_bytes / chip.hbm_bandwidth)

  def mfu(self, chip: ChipSpec) -> float:
    """Estimated model FLOPs utilisation: model FLOPs / (estimated time x peak)."""
    return self.model_flops / (self.seconds(chip) * chip.peak_flops)


def _bytes_per_device(tree: Any) -> int:
  """Bytes of one device's shard of every `ShapeDtypeStruct` (with sharding) in `tree`."""
  total = 0
  for leaf in jax.tree.leaves(tree):
    shape = leaf.sharding.shard_shape(leaf.shape) if leaf.sharding is not None else leaf.shape
    total += math.prod(shape) * jnp.dtype(leaf.dtype).itemsize
  return total


def _with_shardings(abstract: Any, shardings: Any) -> Any:
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)


def _memory(compiled: jax.stages.Compiled) -> dict[str, int]:
  stats = compiled.memory_analysis()
  return dict(
    argument_bytes=int(stats.argument_size_in_bytes),
    output_bytes=int(stats.output_size_in_bytes),
    donated_bytes=int(stats.alias_size_in_bytes),
    temp_bytes=int(stats.temp_size_in_bytes),
    code_bytes=int(stats.generated_code_size_in_bytes),
  )


def _cost(program: jax.stages.Compiled | jax.stages.Lowered) -> tuple[float, float]:
  """(FLOPs, bytes accessed) of a compiled (or lowered) program, per device."""
  cost = program.cost_analysis()
  if isinstance(cost, (list, tuple)):
    cost = cost[0]
  return float(cost.get("flops", 0.0)), float(cost.get("bytes accessed", 0.0))


# --- the training step ---------------------------------------------------------------------------------------------


def _items_below(levels: Sequence[LevelSpec], index: int, items_per_device: int) -> int:
  """Items the training step runs level `index` on, per device: every item, or the compacted main part."""
  above = levels[:index]
  if not any(spec.kind == "mar" for spec in above):
    return items_per_device * items_per_image(levels, index)
  kinds, seq_lens = compaction.level_kinds(above)
  return compaction.capacity(items_per_device, kinds, seq_lens)


def training_model_flops(model_settings: ModelSettings, items_per_device: int) -> float:
  """3x the forward FLOPs of the loss at the items the step runs, per device (forward + backward, no remat)."""
  total = 0.0
  for spec in model_settings.levels:
    total += costs.level_flops(spec, model_settings, _items_below(model_settings.levels, spec.index, items_per_device))
  pixels = _items_below(model_settings.levels, len(model_settings.levels), items_per_device)
  total += costs.pixel_head_flops(model_settings.pixel, model_settings, pixels)
  return 3.0 * total


def _compile_train_step(config: Any, model_settings: ModelSettings, mesh: Mesh, batch: int, accum: int) -> Any:
  """(compiled step, abstract state with shardings) for `batch` images in `accum` micro-batches on `mesh`."""
  lowered, state = _lower_train_step(config, model_settings, mesh, batch, accum)
  return lowered.compile(), state


def _lower_train_step(config: Any, model_settings: ModelSettings, mesh: Mesh, batch: int, accum: int) -> Any:
  """(lowered step, abstract state with shardings) for `batch` images in `accum` micro-batches on `mesh`."""
  train_cfg = config.train.copy_and_resolve_references()
  train_cfg.global_batch, train_cfg.grad_accum_steps = batch, accum
  model = fractal.build(model_settings)
  schedule = optimizer.learning_rate_schedule(1e-4, 1, 2)  # values do not change the program's shape
  tx = optimizer.make_optimizer(schedule, train_cfg.weight_decay, train_cfg.grad_clip)
  ema = train_cfg.ema_decay > 0
  shardings = trainer.state_shardings(model, tx, mesh, config.sharding_rules, ema=ema)
  abstract = jax.eval_shape(
    lambda k: train_step.init_state(fractal.init_params(model, k), tx, ema=ema), jax.random.key(0)
  )
  state = _with_shardings(abstract, shardings)
  batch_sharding = NamedSharding(mesh, mesh_lib.batch_spec())
  side = model_settings.img_size
  images = jax.ShapeDtypeStruct((batch, side, side, 3), jnp.uint8, sharding=batch_sharding)
  labels = jax.ShapeDtypeStruct((batch,), jnp.int32, sharding=batch_sharding)
  step_fn = trainer.make_step_fn(
    model, tx, shardings, batch_sharding, jax.random.key(0), train_cfg, axis_rules=config.sharding_rules
  )
  with jax.set_mesh(mesh):
    return step_fn.lower(state, images, labels), state


def _has_loops(model_settings: ModelSettings) -> bool:
  """Whether the step's program has loops whose trip count the cost analysis ignores: scanned block stacks
  (deeper than 1) or blocks that run their items in chunks."""
  loop_depth = block_stack.LOOP_MAX_DEPTH if model_settings.kernels == "cpu" else 0
  scanned = model_settings.scan_blocks and any(depth > max(loop_depth, 1) for depth in _stack_depths(model_settings))
  return scanned or any(chunks > 1 for chunks in _item_chunks(model_settings))


def _item_chunks(model_settings: ModelSettings) -> tuple[int, ...]:
  return (*(spec.item_chunks for spec in model_settings.levels), model_settings.pixel.item_chunks)


def _unrolled(model_settings: ModelSettings) -> ModelSettings:
  """`model_settings` without loops the cost analysis would count once: stacks unscanned, items in one chunk.

  One chunk computes the same FLOPs (a chunk's remat recomputes what the
  block's would); only the working set differs.
  """
  levels = tuple(dataclasses.replace(spec, item_chunks=1) for spec in model_settings.levels)
  pixel = dataclasses.replace(model_settings.pixel, item_chunks=1)
  return dataclasses.replace(model_settings, levels=levels, pixel=pixel, scan_blocks=False)


def _stack_depths(model_settings: ModelSettings) -> tuple[int, ...]:
  """Every block stack's depth: the levels', their guiding-pixel heads' (0 where none), the pixel head's."""
  levels = model_settings.levels
  guides = (0 if spec.guide_head is None else spec.guide_head.depth for spec in levels)
  return (*(spec.depth for spec in levels), *guides, model_settings.pixel.depth)


def _with_stack_depths(model_settings: ModelSettings, depths: Sequence[int]) -> ModelSettings:
  """`model_settings` with its block stacks (in `_stack_depths` order) `depths` deep, `_unrolled`."""
  model_settings = _unrolled(model_settings)
  count = len(model_settings.levels)
  levels = []
  for i, spec in enumerate(model_settings.levels):
    guide = None if spec.guide_head is None else dataclasses.replace(spec.guide_head, depth=depths[count + i])
    levels.append(dataclasses.replace(spec, depth=depths[i], guide_head=guide))
  pixel = dataclasses.replace(model_settings.pixel, depth=depths[-1])
  return dataclasses.replace(model_settings, levels=tuple(levels), pixel=pixel)


def step_cost(
  config: Any, model_settings: ModelSettings, device: jax.Device, images: int, traffic: bool = True
) -> tuple[float, float]:
  """(FLOPs, HBM bytes) of one training step of `images` images on one `device`, every block counted.

  A step's cost is affine in each stack's depth (the blocks of a stack are
  alike), so it is measured on shallow copies: one compile with every stack
  one block deep, and one per deeper stack with that stack two deep; then
  cost = cost(ones) + sum over stacks of (depth - 1) x (cost(that stack at 2)
  - cost(ones)). The stacks are unrolled (`scan_blocks=False`), so XLA counts
  every block; compiling the whole unrolled step instead needed more than 24
  GiB of compiler memory for FractalMAR-256 (`tests/test_aot.py` checks the
  two counts agree on a small model).

  traffic=False: FLOPs only, counted in the whole unrolled step as lowered
  (before XLA optimises it: no compile, seconds instead of one compile per
  stack, ~10 minutes each for FractalMAR-256 on 2 cores); bytes NaN (before
  fusion every operation's operands would count as traffic).
  """
  if not traffic:  # lowered for a CPU device: libtpu's deviceless client has no cost analysis of lowered programs
    unrolled = _unrolled(model_settings)
    host = mesh_lib.make_mesh((1, 1, 1), jax.devices("cpu")[:1])
    return _cost(_lower_train_step(config, unrolled, host, images, 1)[0])[0], float("nan")
  one_chip = mesh_lib.make_mesh((1, 1, 1), [device])
  depths = _stack_depths(model_settings)
  ones = tuple(min(depth, 1) for depth in depths)

  def cost(stack_depths: Sequence[int]) -> np.ndarray:
    settings = _with_stack_depths(model_settings, stack_depths)
    return np.array(_cost(_compile_train_step(config, settings, one_chip, images, 1)[0]))

  base = cost(ones)
  total = base.copy()
  for i, depth in enumerate(depths):
    if depth > 1:
      total += (depth - 1) * (cost(ones[:i] + (2,) + ones[i + 1 :]) - base)
  return float(total[0]), float(total[1])


def train_step_report(
  config: Any, model_settings: ModelSettings, mesh: Mesh, chip_memory: float = math.inf, traffic: bool = True
) -> ProgramReport:
  """Compiles the training step of `config` for `mesh` (its devices need not be attached) and measures it.

  Memory comes from the program a run compiles. Its cost analysis counts a
  loop's body once (scanned stacks, accumulation, and the partitioner's loops
  over the shards of a sharded matrix product), so FLOPs and bytes come from
  `step_cost`: one chip, every block counted, at the chip's share of one
  micro-batch, times the accumulation steps. That is skipped when the step
  runs on one device without scanned stacks or accumulation, and when it
  needs more than `chip_memory` bytes per chip (its work is then NaN: a
  program that does not fit is not worth more compiles). `traffic`: as in
  `step_cost`.

  Raises:
    jax.errors.JaxRuntimeError: the compiler refused the program (e.g. RESOURCE_EXHAUSTED: more HBM than a chip has).
  """
  batch, accum = int(config.train.global_batch), int(config.train.grad_accum_steps)
  start = time.perf_counter()
  compiled, state = _compile_train_step(config, model_settings, mesh, batch, accum)
  seconds = time.perf_counter() - start
  micro_per_device = batch // accum // mesh_lib.batch_size_per_step(mesh)
  report = ProgramReport(
    name="train step",
    compile_seconds=seconds,
    parameter_bytes=_bytes_per_device(state.params) + _bytes_per_device(state.ema_params),
    optimizer_bytes=_bytes_per_device(state.opt_state),
    **_memory(compiled),
    flops=float("nan"),
    model_flops=accum * training_model_flops(model_settings, micro_per_device),
    hbm_bytes=float("nan"),
    images=batch,
  )
  if report.total_bytes > chip_memory:
    return report
  if _has_loops(model_settings) or accum > 1 or mesh.size > 1:
    flops, hbm_traffic = step_cost(config, model_settings, mesh.devices.flat[0], micro_per_device, traffic)
  else:
    flops, hbm_traffic = _cost(compiled)
  return dataclasses.replace(report, flops=accum * flops, hbm_bytes=accum * hbm_traffic)


# --- the sampler ---------------------------------------------------------------------------------------------------


def _sampling_passes(model_settings: ModelSettings, plan: sampler.SamplePlan) -> list[tuple[Any, int, float]]:
  """(level spec or pixel head spec, items per image, forward passes per item) of sampling one image.

  A MAR level runs its forward once per step on all its patches (T passes);
  an AR level's cached decoding and the pixel head's three cached steps
  cost about one teacher-forced forward. Each patch of a level is one item
  of the level below (padding of the chunked calls not counted).
  """
  out: list[tuple[Any, int, float]] = []
  for spec, schedule in zip(model_settings.levels, plan.schedules):
    items = items_per_image(model_settings.levels, spec.index)
    out.append((spec, items, 1.0 if schedule is None else float(schedule.num_iter)))
  out.append((model_settings.pixel, items_per_image(model_settings.levels, len(model_settings.levels)), 1.0))
  return out


def _sampling_flops(model_settings: ModelSettings, plan: sampler.SamplePlan, images_per_device: int) -> float:
  """Forward FLOPs of sampling `images_per_device` images (x2 with guidance), counted per level."""
  total = 0.0
  for spec, items, passes in _sampling_passes(model_settings, plan):
    if isinstance(spec, LevelSpec):
      per_item = costs.level_flops(spec, model_settings, 1)
    else:
      per_item = costs.pixel_head_flops(spec, model_settings, 1)
    total += per_item * items * passes
  return total * images_per_device * (2.0 if plan.guided else 1.0)


def sampler_report(config: Any, model_settings: ModelSettings, mesh: Mesh) -> ProgramReport:
  """Compiles the sampler of `config.sample` for `mesh` at `config.sample.batch_size` and measures it."""
  plan = from_config.plan_from_config(model_settings, config.sample)
  per_step = mesh_lib.batch_size_per_step(mesh)
  batch = -(-int(config.sample.batch_size) // per_step) * per_step
  replicated = mesh_lib.replicated(mesh)
  params = jax.eval_shape(lambda k: fractal.init_params(fractal.build(model_settings), k), jax.random.key(0))
  params = _with_shardings(params, jax.tree.map(lambda _: replicated, params))
  start = time.perf_counter()
  compiled = sampler.lower_sample(model_settings, plan, params, batch, mesh).compile()
  seconds = time.perf_counter() - start
  flops = _sampling_flops(model_settings, plan, batch // per_step)
  return ProgramReport(
    name=f"sampler (batch {batch})",
    compile_seconds=seconds,
    parameter_bytes=_bytes_per_device(params),
    optimizer_bytes=0,
    **_memory(compiled),
    flops=flops,
    model_flops=flops,
    hbm_bytes=float("nan"),
    images=batch,
  )


def _size(num_bytes: float) -> str:
  """Bytes in GiB, or MiB below 1 GiB."""
  return f"{num_bytes / 2**30:.2f} GiB" if num_bytes >= 2**30 else f"{num_bytes / 2**20:.1f} MiB"


def format_report(report: ProgramReport, chip: ChipSpec) -> str:
  """A few lines: memory per chip against the chip's HBM, work per call, and the labelled estimates."""
  seconds = report.seconds(chip)
  lines = [
    f"{report.name} (compiled in {report.compile_seconds:.0f} s), per chip:",
    f"  memory: parameters {_size(report.parameter_bytes)}, optimizer {_size(report.optimizer_bytes)}, "
    f"all arguments {_size(report.argument_bytes)}, temporaries {_size(report.temp_bytes)}; "
    f"program code {_size(report.code_bytes)}; total {_size(report.total_bytes)} of {_size(chip.hbm_bytes)} ({100 * report.total_bytes / chip.hbm_bytes:.1f}%)",
  ]
  if math.isnan(report.flops):
    lines.append("  work per call: not counted (the program does not fit the chip)")
    return "\n".join(lines)
  traffic = (
    "HBM traffic not estimated" if math.isnan(report.hbm_bytes) else f"{report.hbm_bytes / 1e9:.4g} GB of HBM traffic"
  )
  lines.append(
    f"  work per call: {report.flops / 1e9:.4g} GFLOP executed, {report.model_flops / 1e9:.4g} GFLOP of model "
    f"work, {traffic}"
  )
  bound = "compute-bound lower bound" if math.isnan(report.hbm_bytes) else "roofline"
  per_image = f"{report.images / seconds:.1f} images/s" if seconds > 0 else "n/a"
  lines.append(
    f"  estimate ({bound}, published peak figures): {seconds:.3g} s per call, {per_image}, "
    f"MFU {100 * report.mfu(chip):.1f}%"
  )
  return "\n".join(lines)


def as_dict(report: ProgramReport, chip: ChipSpec) -> dict[str, float]:
  """The report's figures and estimates as JSON-ready numbers."""
  out = {k: float(v) for k, v in dataclasses.asdict(report).items() if k != "name"}
  out.update(total_bytes=float(report.total_bytes), seconds=report.seconds(chip), mfu=report.mfu(chip))
  out["images_per_second"] = report.images / out["seconds"] if out["seconds"] > 0 else float("nan")
  return {k: (None if isinstance(v, float) and np.isnan(v) else v) for k, v in out.items()}
