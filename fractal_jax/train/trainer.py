"""`--mode=train`: the training loop, with everything checked before compiling.

    python -m fractal_jax.main --config=configs/demo.py --workdir=/tmp/demo

`train` reads top to bottom (every input is checked before anything
compiles, and a bad one never touches the workdir):
  1. `prepare`: model config, mesh vs devices, batch divisibility, data
     sources (missing or empty directories, unbuilt TFDS datasets), the
     workdir's stored model config, `init_from`.
  2. Model, optimizer, and `state_shardings` (FSDP over `fsdp`, rules in
     `config.sharding_rules`).
  3. Workdir, checkpointer, this host's input iterator.
  4. `create_state`: the state born sharded, restored from the workdir's
     newest checkpoint (parameters, optimizer, step, data iterator), or made
     by `jit(init, out_shardings=...)` (with the weights of `init_from`).
  5. `make_step_fn`: one jitted step (donated state, batch over data x fsdp).
  6. The loop: `MetricsLogger` (clu metrics and a progress line every
     `log_every_steps`), periodic evaluation (held-out bits/dim, a sample
     grid, and for the digits demo the classifier figures), asynchronous
     checkpoints every `checkpoint_every_steps`.
SIGTERM (preemption): every host checkpoints the same step, then the run
ends; rerunning the same command resumes (`_Preemption`: with one process a
Python flag, with several JAX's preemption sync manager, which agrees on the
step even when only one host got the signal). The workdir may be local or
`gs://...`; resuming takes the newest checkpoint that restores
(`state_checkpoint`). A non-finite loss drops its step
(`train_step`), stops the run with `TrainingError`, and no checkpoint is
written after it: the newest one is the last good state.

Shapes: B images per batch (this host's part in the iterator), S the image
side; batches are uint8 images [B, S, S, 3] and int32 labels [B].
"""

from __future__ import annotations

import dataclasses
import signal
import time
from collections.abc import Callable
from typing import Any

import jax
import ml_collections
import numpy as np
import optax
from absl import logging
from etils import epath
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding

from fractal_jax.data import input_pipeline
from fractal_jax.evaluation import nll
from fractal_jax.io import image_files, model_checkpoint, paths
from fractal_jax.model import fractal, model_config
from fractal_jax.parallel import mesh as mesh_lib
from fractal_jax.parallel import sharding
from fractal_jax.sampling import from_config, loaded
from fractal_jax.train import metric_writers, optimizer, state_checkpoint, train_step


class TrainingError(RuntimeError):
  """Training cannot go on (a non-finite loss); the message says where the last good checkpoint is."""


@dataclasses.dataclass
class Plan:
  """Everything `prepare` checked and derived; no JAX computation has run."""

  config: Any
  workdir: epath.Path  # local (absolute) or gs://
  model_settings: model_config.ModelSettings
  mesh: Mesh
  train_source: Any
  eval_source: Any | None
  total_steps: int
  warmup_steps: int
  peak_lr: float
  local_batch: int
  extractor: Any = None  # Inception for the periodic FID, loaded in `prepare` when configured


def _steps(train_cfg: Any, num_examples: int) -> tuple[int, int]:
  """(total, warm-up) steps: `num_steps` / `warmup_steps` if set, else epochs over the data."""
  if train_cfg.num_steps > 0:
    return int(train_cfg.num_steps), int(train_cfg.warmup_steps)
  per_epoch = max(1, num_examples // train_cfg.global_batch)
  return int(round(train_cfg.epochs * per_epoch)), int(round(train_cfg.warmup_epochs * per_epoch))


def prepare(config: Any, workdir: str) -> Plan:
  """Checks every input of a training run; raises ConfigError / DataError / MeshError / CheckpointError."""
  if not workdir:
    raise model_config.ConfigError("--workdir is required for --mode=train (checkpoints and logs go there)")
  model_settings = model_config.settings(config.model)
  train_cfg = config.train
  device_mesh = mesh_lib.make_mesh(config.mesh_shape)
  per_step = mesh_lib.batch_size_per_step(device_mesh)
  batch, accum = int(train_cfg.global_batch), int(train_cfg.grad_accum_steps)
  if accum < 1 or batch % accum:
    raise model_config.ConfigError(f"config.train.global_batch={batch} is not divisible by grad_accum_steps={accum}")
  if (batch // accum) % per_step:
    raise model_config.ConfigError(
      f"config.train.global_batch={batch} (micro-batches of {batch // accum}) is not a multiple of the {per_step} "
      f"devices of the mesh's data x fsdp axes {dict(device_mesh.shape)}; use a multiple of {per_step * accum}"
    )
  if batch % jax.process_count():
    raise model_config.ConfigError(f"config.train.global_batch={batch} is not divisible by {jax.process_count()} hosts")
  if train_cfg.eval_every_steps > 0 and train_cfg.eval_num_samples > 0:
    from_config.plan_from_config(model_settings, config.sample)  # a bad config.sample fails now, not at step N
  extractor = None
  if train_cfg.eval_fid_stats:
    from fractal_jax.evaluation import fid, image_metrics, inception

    if train_cfg.eval_num_samples < 2:
      raise model_config.ConfigError("config.train.eval_fid_stats needs config.train.eval_num_samples >= 2")
    try:
      image_metrics.load_reference_stats(train_cfg.eval_fid_stats, dim=inception.POOL_DIM)
    except ValueError as error:
      raise model_config.ConfigError(f"config.train.eval_fid_stats: {error}") from None
    extractor = fid.Extractor(train_cfg.eval_inception or None)
  train_source = input_pipeline.make_source(config.data, config.data.train_split)
  eval_source = None
  if train_cfg.eval_every_steps > 0:
    eval_source = input_pipeline.make_source(config.data, config.data.eval_split)
  workdir_path = paths.path(workdir)
  checkpoints = state_checkpoint.checkpoint_dir(workdir_path)
  stored = model_checkpoint.newest_readable_config(checkpoints)
  if stored is not None:
    model_checkpoint.check_model_config(stored, config.model, checkpoints)
  if train_cfg.init_from:
    stored = model_checkpoint.stored_model_config(model_checkpoint.resolve_directory(train_cfg.init_from))
    given = dict(model_checkpoint.model_dict(config.model), num_classes=stored.get("num_classes"))
    model_checkpoint.check_model_config(stored, given, train_cfg.init_from)
  total, warmup = _steps(train_cfg, len(train_source))
  if total < 1:
    raise model_config.ConfigError("the run has no steps: set config.train.num_steps or config.train.epochs")
  if not 0 <= warmup < total:
    raise model_config.ConfigError(
      f"warm-up of {warmup} steps does not fit in a run of {total} steps: lower config.train.warmup_steps "
      "(or warmup_epochs)"
    )
  return Plan(
    config=config,
    workdir=workdir_path,
    model_settings=model_settings,
    mesh=device_mesh,
    train_source=train_source,
    eval_source=eval_source,
    total_steps=total,
    warmup_steps=warmup,
    peak_lr=optimizer.peak_learning_rate(train_cfg.base_lr, batch),
    local_batch=batch // jax.process_count(),
    extractor=extractor,
  )


def _with_shardings(abstract: Any, shardings: Any) -> Any:
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)


def _preemption_service_running() -> bool:
  """Whether `jax.distributed` started JAX's preemption sync manager (it does unless the service is disabled)."""
  from jax._src import distributed

  return distributed.global_state.client is not None and distributed.global_state.preemption_sync_manager is not None


class _Preemption:
  """SIGTERM: `reached(step)` is True on one step, the same on every host; that step is saved and the run ends.

  One process: a Python handler turns SIGTERM into a flag checked after every step (the default action would kill
  the run mid-save). Several: the local signal must not decide (a host that got it would save and stop while the
  others train on), so `reached` asks JAX's preemption sync manager (orbax's `reached_preemption`), called after
  every step on every host: when any host is signalled, the hosts agree on a step just ahead of all of them. JAX
  catches SIGTERM in C++ for that; a Python handler would replace its handler and hide the signal, so none is
  installed. With the preemption service disabled (`jax_enable_preemption_service`), SIGTERM keeps its default
  action and the run resumes from the newest checkpoint.
  """

  def __init__(self, checkpointer: state_checkpoint.TrainCheckpointer) -> None:
    self._checkpointer = checkpointer
    self._flag = False
    self._previous = None
    self._agreed = jax.process_count() > 1
    if not self._agreed:
      self._previous = signal.signal(signal.SIGTERM, self._handle)
    elif not _preemption_service_running():
      logging.warning("JAX's preemption service is off: SIGTERM ends this host at once (no checkpoint)")

  def _handle(self, signum: int, frame: Any) -> None:
    del signum, frame
    self._flag = True

  def reached(self, step: int) -> bool:
    """Whether to checkpoint `step` and stop (call after every step, on every host)."""
    if self._agreed:
      return self._checkpointer.reached_preemption(step)
    return self._flag

  def restore(self) -> None:
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)


def _print_on_process_0(line: str) -> None:
  if jax.process_index() == 0:
    print(line, flush=True)


def init_from_weights(config: Any, fresh_params: Any) -> Any:
  """The weights of `config.train.init_from` (host arrays) for `config.model`.

  A class table of another size (fine-tuning on other classes) is replaced
  by `fresh_params["class_emb"]`, left as it is (e.g. already sharded).
  """
  source = model_checkpoint.resolve_directory(config.train.init_from)
  stored = model_checkpoint.stored_model_config(source)
  model_cfg = ml_collections.ConfigDict(config.model.to_dict())
  model_cfg.num_classes = stored["num_classes"]
  loaded = model_checkpoint.load_params(source, model_cfg)
  if stored["num_classes"] != config.model.num_classes:
    logging.warning(
      "init_from: %d classes in the checkpoint, %d in the config: class table re-initialised",
      stored["num_classes"],
      config.model.num_classes,
    )
    loaded["class_emb"] = fresh_params["class_emb"]
  return loaded


def _global_batch(batch: dict[str, np.ndarray], batch_sharding: NamedSharding) -> tuple[jax.Array, jax.Array]:
  def put(x: np.ndarray) -> jax.Array:
    return jax.make_array_from_process_local_data(batch_sharding, np.asarray(x))

  return put(batch["image"]), put(batch["label"].astype(np.int32))


def evaluate(plan: Plan, params: Any, model: fractal.FractalModel, step: int, writer: Any) -> dict[str, float]:
  """Held-out bits/dim; a sample grid; the digits classifier figures (demo data). Writes and returns them."""
  config, results = plan.config, {}
  if plan.eval_source is not None:
    batches = input_pipeline.eval_batches(
      plan.eval_source, image_size=plan.model_settings.img_size, batch_size=plan.local_batch
    )
    figures = nll.evaluate(
      plan.model_settings,
      params,
      batches,
      plan.mesh,
      jax.random.key(config.seed + 1),
      max_images=int(config.train.eval_max_images),
    )
    results.update({f"eval/{k}": v for k, v in figures.items()})
  num_samples = int(config.train.eval_num_samples)
  if num_samples > 0:
    samples = sample_images(plan, params, num_samples)
    if jax.process_index() == 0:
      grid_path = plan.workdir / f"samples_{step:07d}.png"  # local or gs://
      image_files.save_grid(samples, grid_path)
      writer.write_images(step, {"samples": image_files.grid(samples)[None]})
      logging.info("sample grid: %s", grid_path)
    if config.data.name == "digits" and plan.model_settings.img_size % 8 == 0:
      from fractal_jax.evaluation import digits_quality

      labels = np.arange(num_samples) % plan.model_settings.num_classes
      quality = digits_quality.evaluate_samples(samples, labels)
      results["eval/digits_accuracy"] = quality["accuracy"]
      results["eval/digits_frechet"] = quality["frechet_distance"]
      results["eval/digits_real_frechet"] = quality["real_frechet_distance"]
    if config.train.eval_fid_stats:
      results["eval/fid"] = small_fid(plan, samples)
  writer.write_scalars(step, results)
  return results


def small_fid(plan: Plan, samples: np.ndarray) -> float:
  """FID of the periodic evaluation's samples against `config.train.eval_fid_stats` (few samples: biased up)."""
  from fractal_jax.evaluation import fid, image_metrics, inception

  if plan.extractor is None:
    plan.extractor = fid.Extractor(plan.config.train.eval_inception or None)
  reference = image_metrics.load_reference_stats(plan.config.train.eval_fid_stats, dim=inception.POOL_DIM)
  pool = np.asarray(plan.extractor(jax.numpy.asarray(samples))["pool"])
  return image_metrics.frechet_distance_to_features(pool, *reference)


def sample_images(plan: Plan, params: Any, num_images: int) -> np.ndarray:
  """`num_images` class-balanced samples (image i of class i mod C) with `config.sample`, uint8 [N, S, S, 3]."""
  sample_cfg = plan.config.sample
  batch_size = min(int(sample_cfg.batch_size), num_images)
  sampler = loaded.from_params(plan.model_settings, sample_cfg, params, plan.mesh, batch_size)
  batch = sampler.batch_size
  labels = (np.arange(num_images + batch) % plan.model_settings.num_classes).astype(np.int32)
  key = jax.random.key(plan.config.seed + 2)
  out = []
  for first in range(0, num_images, batch):
    images, _ = sampler(labels[first : first + batch], first, key)
    out.append(np.asarray(multihost_utils.process_allgather(images, tiled=True)))
  return np.concatenate(out)[:num_images]


def run_keys(seed: int) -> tuple[jax.Array, jax.Array]:
  """(parameter initialisation key, the key whose `fold_in(., step)` drives step `step`)."""
  init_key, run_key = jax.random.split(jax.random.key(seed))
  return init_key, run_key


def make_train_iterator(config: Any, model_settings: model_config.ModelSettings, source: Any = None) -> Any:
  """The run's training batches (this host's part): a grain dataset; `iter()` it."""
  if source is None:
    source = input_pipeline.make_source(config.data, config.data.train_split)
  return input_pipeline.train_dataset(
    source,
    image_size=model_settings.img_size,
    global_batch=config.train.global_batch,
    seed=config.seed,
    random_flip=config.data.random_flip,
    worker_count=config.data.worker_count,
  )


# --- the pieces of the loop: sharded state, jitted step, metrics ---------------------------------------------------


def state_shardings(
  model: fractal.FractalModel, tx: optax.GradientTransformation, mesh: Mesh, rules: Any, *, ema: bool
) -> train_step.TrainState:
  """The `NamedSharding` of every leaf of the train state, as a `TrainState` of shardings.

  Parameters, their EMA and the optimizer moments follow `rules` (FSDP over `fsdp`); the step counter is replicated.
  A parameter that a mesh axis does not divide stays replicated (logged at INFO).
  """
  params_shardings = sharding.param_shardings(model, mesh, rules)
  abstract_params = jax.eval_shape(lambda: fractal.init_params(model, jax.random.key(0)))
  for name in sharding.undivided(model, mesh, rules):
    logging.info("replicated (mesh axis does not divide it): %s", name)
  return train_step.TrainState(
    mesh_lib.replicated(mesh),
    params_shardings,
    sharding.opt_state_shardings(tx, params_shardings, abstract_params, mesh),
    params_shardings if ema else None,
  )


def create_state(
  plan: Plan,
  model: fractal.FractalModel,
  tx: optax.GradientTransformation,
  shardings: train_step.TrainState,
  init_key: jax.Array,
  checkpointer: state_checkpoint.TrainCheckpointer,
  iterator: Any,
) -> train_step.TrainState:
  """The run's first state, born sharded as `shardings` (never whole on one device).

  The workdir's newest checkpoint if there is one (restored into an abstract target that carries the shardings; it
  also sets `iterator` to its data state); else fresh parameters (`jit(init, out_shardings=...)`) and optimizer
  moments, the parameters taken from `config.train.init_from` when set.
  """
  ema = shardings.ema_params is not None

  def init_fn(key: jax.Array) -> train_step.TrainState:
    return train_step.init_state(fractal.init_params(model, key), tx, ema=ema)

  abstract = _with_shardings(jax.eval_shape(init_fn, init_key), shardings)
  state = checkpointer.restore_newest_readable(abstract, iterator, log=_print_on_process_0)
  if state is not None:
    print(f"resumed from {checkpointer.directory}/{int(state.step)}")
    return state
  with jax.set_mesh(plan.mesh):
    state = jax.jit(init_fn, out_shardings=shardings)(init_key)
  init_from = plan.config.train.init_from
  if init_from:
    params = jax.device_put(init_from_weights(plan.config, state.params), shardings.params)
    with jax.set_mesh(plan.mesh):
      state = jax.jit(
        lambda p: train_step.init_state(p, tx, ema=ema), in_shardings=(shardings.params,), out_shardings=shardings
      )(params)
    print(f"initialised from {init_from}")
  return state


def make_step_fn(
  model: fractal.FractalModel,
  tx: optax.GradientTransformation,
  shardings: train_step.TrainState,
  batch_sharding: NamedSharding,
  run_key: jax.Array,
  train_cfg: Any,
  axis_rules: Any = (),
) -> Callable[[train_step.TrainState, jax.Array, jax.Array], tuple[train_step.TrainState, dict[str, jax.Array]]]:
  """The jitted step `(state, images, labels) -> (state, metrics)` of `train_step.train_step`.

  The state keeps `shardings` and is donated (updated in place); images uint8 [B, S, S, 3] and labels int32 [B] are
  split over the mesh's data x fsdp axes (`batch_sharding`); the metrics (float32 scalars, `finite` bool) come back
  replicated. The EMA decay is passed only when the state has EMA parameters. The loss compacts the items below MAR
  levels per batch shard (`batch_shards`), so that its sorts and gathers stay on-device.
  """
  ema_decay = float(train_cfg.ema_decay) if shardings.ema_params is not None else None
  batch_shards = mesh_lib.batch_size_per_step(batch_sharding.mesh)

  def step_fn(
    state: train_step.TrainState, images: jax.Array, labels: jax.Array
  ) -> tuple[train_step.TrainState, dict[str, jax.Array]]:
    return train_step.train_step(
      model,
      tx,
      state,
      images,
      labels,
      run_key,
      accum_steps=train_cfg.grad_accum_steps,
      ema_decay=ema_decay,
      batch_shards=batch_shards,
      axis_rules=axis_rules,
    )

  return jax.jit(
    step_fn,
    in_shardings=(shardings, batch_sharding, batch_sharding),
    out_shardings=(shardings, mesh_lib.replicated(batch_sharding.mesh)),
    donate_argnums=(0,),
  )


class MetricsLogger:
  """The loop's training metrics: kept on device after each step (no host sync) until `flush` logs them.

  `flush` checks that every kept step was finite, writes the mean of their metrics (and the learning rate) to the
  metric writer, prints the progress line on process 0, and keeps the figures in `last`. clu's `ReportProgress`
  (steps/s in the writer) runs after every step.

  Attributes:
    every_steps: log every this many steps (`config.train.log_every_steps`, at least 1) and when saving.
    last: the last flushed figures, `train/<metric>` (floats) and `train/step`; empty before the first flush.
  """

  def __init__(
    self,
    plan: Plan,
    writer: Any,
    schedule: Callable[[int], Any],
    steps: tuple[int, int],
    started: float,
    newest_checkpoint: Callable[[], int | None],
  ) -> None:
    """`steps`: (first, end) step of this run; `started`: `time.perf_counter()` before the state was made."""
    from clu import periodic_actions

    first_step, end_step = steps
    self.every_steps = max(1, int(plan.config.train.log_every_steps))
    self.last: dict[str, float] = {}
    self._writer, self._schedule, self._newest_checkpoint = writer, schedule, newest_checkpoint
    self._first_step, self._end_step, self._started = first_step, end_step, started
    self._global_batch = int(plan.config.train.global_batch)
    self._progress = periodic_actions.ReportProgress(
      num_train_steps=plan.total_steps, writer=writer, every_steps=self.every_steps, every_secs=None
    )
    self._pending: list[tuple[int, dict[str, jax.Array]]] = []
    self._clock = (first_step, time.perf_counter())  # (step, time) of the previous progress line

  def add(self, step: int, metrics: dict[str, jax.Array]) -> None:
    """Keeps the metrics of the step that made the state's step `step`; times the first one (with its compilation)."""
    self._pending.append((step, metrics))
    if step == self._first_step + 1:
      jax.block_until_ready(metrics)
      print(f"first step (compile included) took {time.perf_counter() - self._started:.1f} s", flush=True)
      self._clock = (step, time.perf_counter())  # the rate excludes the compilation
    self._progress(step)

  def flush(self, step: int) -> None:
    """Checks every kept step's finiteness, then logs the mean of their metrics at `step`.

    Raises:
      TrainingError: a kept step was not finite (`train_step` dropped it; no checkpoint was written after it).
    """
    if not self._pending:
      return
    fetched = jax.device_get([m for _, m in self._pending])
    for (done, _), metrics in zip(self._pending, fetched):
      if not bool(metrics["finite"]):
        raise TrainingError(
          f"non-finite loss at step {done}: training stopped; the step was dropped and nothing was saved "
          f"after it. The newest checkpoint (step {self._newest_checkpoint()}) is the last good state: lower "
          "config.train.base_lr, check the data, or try config.model.dtype=float32."
        )
    self._pending.clear()
    scalars = {k: float(np.mean([m[k] for m in fetched])) for k in fetched[-1] if k != "finite"}
    scalars["learning_rate"] = float(self._schedule(step - 1))
    self._writer.write_scalars(step, scalars)
    now = time.perf_counter()
    rate = (step - self._clock[0]) / max(now - self._clock[1], 1e-9)
    self._clock = (step, now)
    if jax.process_index() == 0:
      eta = (self._end_step - step) / max(rate, 1e-9)
      print(
        f"step {step}/{self._end_step}: loss {scalars['loss']:.4f}, grad norm {scalars['grad_norm']:.3f}, "
        f"lr {scalars['learning_rate']:.3g}, {rate:.2f} steps/s ({rate * self._global_batch:.0f} images/s), "
        f"ETA {eta / 60:.1f} min",
        flush=True,
      )
    self.last = {f"train/{k}": v for k, v in scalars.items()} | {"train/step": float(step)}


def train(config: Any, workdir: str, stop_at_step: int = 0) -> dict[str, float]:
  """Trains (or resumes) in `workdir`.

  `stop_at_step` > 0 ends this run at that step (checkpointed and evaluated
  like the last one) without changing the schedule: a later run resumes.

  Returns:
    The last logged training metrics (`train/<name>`, `train/step`) and the
    last evaluation's figures (`eval/<name>`; none if no evaluation ran).
  """
  plan = prepare(config, workdir)  # mesh and every input checked; nothing compiled or written yet
  train_cfg = config.train
  end_step = min(plan.total_steps, stop_at_step) if stop_at_step > 0 else plan.total_steps

  model = fractal.build(plan.model_settings)
  schedule = optimizer.learning_rate_schedule(plan.peak_lr, plan.warmup_steps, plan.total_steps, train_cfg.min_lr)
  tx = optimizer.make_optimizer(schedule, train_cfg.weight_decay, train_cfg.grad_clip)
  shardings = state_shardings(model, tx, plan.mesh, config.sharding_rules, ema=train_cfg.ema_decay > 0)

  paths.make_dir(plan.workdir)
  checkpointer = state_checkpoint.TrainCheckpointer(
    plan.workdir, keep=train_cfg.keep_checkpoints, keep_every=train_cfg.keep_every_steps
  )
  iterator = iter(make_train_iterator(config, plan.model_settings, plan.train_source))
  batch_sharding = NamedSharding(plan.mesh, mesh_lib.batch_spec())

  init_key, run_key = run_keys(config.seed)
  started = time.perf_counter()
  state = create_state(plan, model, tx, shardings, init_key, checkpointer, iterator)
  step_fn = make_step_fn(model, tx, shardings, batch_sharding, run_key, train_cfg, axis_rules=config.sharding_rules)
  first_step = int(state.step)
  print(
    f"training {fractal.count_params(state.params):,} parameters on {plan.mesh.size} device(s) "
    f"{dict(plan.mesh.shape)}, {jax.process_count()} host(s); global batch {train_cfg.global_batch}, steps "
    f"{first_step} -> {end_step} of {plan.total_steps} (warm-up {plan.warmup_steps}), peak lr {plan.peak_lr:.3g}; "
    f"workdir {plan.workdir}"
  )

  writer = metric_writers.make_writer(plan.workdir, tensorboard=bool(train_cfg.tensorboard))
  if first_step == 0:
    writer.write_hparams(metric_writers.flat_hparams(config))
  logger = MetricsLogger(plan, writer, schedule, (first_step, end_step), started, checkpointer.latest_step)
  preemption = _Preemption(checkpointer)
  results: dict[str, float] = {}
  try:
    for step in range(first_step + 1, end_step + 1):
      images, labels = _global_batch(next(iterator), batch_sharding)
      with jax.set_mesh(plan.mesh):
        state, metrics = step_fn(state, images, labels)
      logger.add(step, metrics)
      last = step == end_step
      preempted = preemption.reached(step)
      should_save = last or preempted or step % train_cfg.checkpoint_every_steps == 0
      if step % logger.every_steps == 0 or should_save:
        logger.flush(step)  # before saving: a non-finite step stops the run with no checkpoint after it
      if train_cfg.eval_every_steps > 0 and (step % train_cfg.eval_every_steps == 0 or last):
        params = state.params if state.ema_params is None else state.ema_params
        results = evaluate(plan, params, model, step, writer)
        print(f"step {step}: " + ", ".join(f"{k.split('/')[-1]} {v:.4g}" for k, v in results.items()))
      if should_save:
        writer.flush()  # metrics.jsonl holds every step a checkpoint holds (on gs:// it is written in bulk)
        checkpointer.save(state, iterator.get_state(), config.model, wait=preempted)
      if preempted:
        print(f"SIGTERM: checkpointed step {step} in {checkpointer.directory}; rerun the same command to resume")
        break
  finally:
    preemption.restore()
    checkpointer.close()
    writer.close()
  return logger.last | results
