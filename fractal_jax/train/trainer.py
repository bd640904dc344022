"""`--mode=train`: the training loop, with everything checked before compiling.

    python -m fractal_jax.main --config=configs/demo.py --workdir=/tmp/demo

Order of work (every input is checked before anything compiles, and a bad
one never touches the workdir):
  1. `prepare`: model config, mesh vs devices, batch divisibility, data
     sources (missing or empty directories, unbuilt TFDS datasets), the
     workdir's stored model config, `init_from`.
  2. State born sharded: `jit(init, out_shardings=...)` creates parameters
     and optimizer moments directly in their shards (FSDP over `fsdp`,
     rules in `config.sharding_rules`); then restored from the workdir's
     newest checkpoint (parameters, optimizer, step, data iterator), or
     loaded from `init_from`.
  3. The loop: one jitted step (donated state, batch over data x fsdp),
     clu metrics every `log_every_steps`, asynchronous checkpoints every
     `checkpoint_every_steps`, periodic evaluation (held-out bits/dim, a
     sample grid, and for the digits demo the classifier figures).
  4. SIGTERM (preemption): the current step is checkpointed, then the run
     ends; rerunning the same command resumes. A non-finite loss drops its
     step (`train_step`), stops the run with `TrainingError`, and no
     checkpoint is written after it: the newest one is the last good state.
"""

from __future__ import annotations

import dataclasses
import pathlib
import signal
import time
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding

from fractal_jax.data import pipeline as input_pipeline
from fractal_jax.evaluation import nll
from fractal_jax.io import images as image_io
from fractal_jax.io import model_checkpoint as checkpoint_io
from fractal_jax.model import fractal
from fractal_jax.model import settings as model_config
from fractal_jax.modes import sample as sample_mode
from fractal_jax.parallel import mesh as mesh_lib
from fractal_jax.parallel import sharding
from fractal_jax.sampling import sampler
from fractal_jax.train import metrics as metrics_io
from fractal_jax.train import optimizer
from fractal_jax.train import state_checkpoint as train_checkpoints
from fractal_jax.train import step as train_step


class TrainingError(RuntimeError):
  """Training cannot go on (a non-finite loss); the message says where the last good checkpoint is."""


@dataclasses.dataclass
class Plan:
  """Everything `prepare` checked and derived; no JAX computation has run."""

  config: Any
  workdir: pathlib.Path
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
    sample_mode.plan_from_config(model_settings, config.sample)  # a bad config.sample fails now, not at step N
  extractor = None
  if train_cfg.eval_fid_stats:
    from fractal_jax.evaluation import image_metrics, inception
    from fractal_jax.modes import fid as fid_mode

    if train_cfg.eval_num_samples < 2:
      raise model_config.ConfigError("config.train.eval_fid_stats needs config.train.eval_num_samples >= 2")
    try:
      image_metrics.load_reference_stats(train_cfg.eval_fid_stats, dim=inception.POOL_DIM)
    except ValueError as error:
      raise model_config.ConfigError(f"config.train.eval_fid_stats: {error}") from None
    extractor = fid_mode.Extractor(train_cfg.eval_inception or None)
  train_source = input_pipeline.make_source(config.data, config.data.train_split)
  eval_source = None
  if train_cfg.eval_every_steps > 0:
    eval_source = input_pipeline.make_source(config.data, config.data.eval_split)
  workdir_path = pathlib.Path(workdir)
  checkpoints = train_checkpoints.checkpoint_dir(workdir_path)
  if checkpoint_io.latest_step(checkpoints) is not None:
    checkpoint_io.check_model_config(checkpoint_io.stored_model_config(checkpoints), config.model, checkpoints)
  if train_cfg.init_from:
    stored = checkpoint_io.stored_model_config(checkpoint_io.resolve_directory(train_cfg.init_from))
    given = dict(checkpoint_io.model_dict(config.model), num_classes=stored.get("num_classes"))
    checkpoint_io.check_model_config(stored, given, train_cfg.init_from)
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


class _Preemption:
  """Turns SIGTERM into a flag checked after every step (the default handler would kill the run mid-save)."""

  def __init__(self) -> None:
    self.requested = False
    self._previous = signal.signal(signal.SIGTERM, self._handle)

  def _handle(self, signum: int, frame: Any) -> None:
    del signum, frame
    self.requested = True

  def restore(self) -> None:
    signal.signal(signal.SIGTERM, self._previous)


def init_from_weights(config: Any, fresh_params: Any) -> Any:
  """The weights of `config.train.init_from` (host arrays) for `config.model`.

  A class table of another size (fine-tuning on other classes) is replaced
  by `fresh_params["class_emb"]`, left as it is (e.g. already sharded).
  """
  source = checkpoint_io.resolve_directory(config.train.init_from)
  stored = checkpoint_io.stored_model_config(source)
  model_cfg = ml_collections.ConfigDict(config.model.to_dict())
  model_cfg.num_classes = stored["num_classes"]
  loaded = checkpoint_io.load_params(source, model_cfg)
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
    samples = sample_images(plan, model, params, num_samples)
    if jax.process_index() == 0:
      grid_path = plan.workdir / f"samples_{step:07d}.png"
      image_io.save_grid(samples, grid_path)
      writer.write_images(step, {"samples": image_io.grid(samples)[None]})
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
  from fractal_jax.evaluation import image_metrics, inception
  from fractal_jax.modes import fid as fid_mode

  if plan.extractor is None:
    plan.extractor = fid_mode.Extractor(plan.config.train.eval_inception or None)
  reference = image_metrics.load_reference_stats(plan.config.train.eval_fid_stats, dim=inception.POOL_DIM)
  pool = np.asarray(plan.extractor(jax.numpy.asarray(samples))["pool"])
  return image_metrics.frechet_distance_to_features(pool, *reference)


def sample_images(plan: Plan, model: fractal.FractalModel, params: Any, num_images: int) -> np.ndarray:
  """`num_images` class-balanced samples (image i of class i mod C) with `config.sample`, uint8 [N, S, S, 3]."""
  sample_cfg = plan.config.sample
  per_step = mesh_lib.batch_size_per_step(plan.mesh)
  batch = -(-min(int(sample_cfg.batch_size), num_images) // per_step) * per_step
  sample_plan = sample_mode.plan_from_config(plan.model_settings, sample_cfg)
  labels = (np.arange(num_images + batch) % plan.model_settings.num_classes).astype(np.int32)
  key = jax.random.key(plan.config.seed + 2)
  out = []
  for first in range(0, num_images, batch):
    images, _ = sampler.sample(
      model,
      params,
      labels[first : first + batch],
      key,
      sample_plan,
      cfg=float(sample_cfg.cfg),
      temperature=float(sample_cfg.temperature),
      filter_threshold=float(sample_cfg.filter_threshold),
      image_ids=np.arange(first, first + batch, dtype=np.int32),
      mesh=plan.mesh,
    )
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


def train(config: Any, workdir: str, stop_at_step: int = 0) -> dict[str, float]:
  """Trains (or resumes) in `workdir`.

  `stop_at_step` > 0 ends this run at that step (checkpointed and evaluated
  like the last one) without changing the schedule: a later run resumes.

  Returns:
    The last logged training metrics (`train/<name>`, `train/step`) and the
    last evaluation's figures (`eval/<name>`; none if no evaluation ran).
  """
  plan = prepare(config, workdir)
  train_cfg = config.train
  model = fractal.build(plan.model_settings)
  schedule = optimizer.learning_rate_schedule(plan.peak_lr, plan.warmup_steps, plan.total_steps, train_cfg.min_lr)
  tx = optimizer.make_optimizer(schedule, train_cfg.weight_decay, train_cfg.grad_clip)
  use_ema = train_cfg.ema_decay > 0

  params_shardings = sharding.param_shardings(model, plan.mesh, config.sharding_rules)
  abstract_params = jax.eval_shape(lambda: fractal.init_params(model, jax.random.key(0)))
  replicated = mesh_lib.replicated(plan.mesh)
  state_shardings = train_step.TrainState(
    replicated,
    params_shardings,
    sharding.opt_state_shardings(tx, params_shardings, abstract_params, plan.mesh),
    params_shardings if use_ema else None,
  )
  for name in sharding.undivided(model, plan.mesh, config.sharding_rules):
    logging.info("replicated (mesh axis does not divide it): %s", name)

  plan.workdir.mkdir(parents=True, exist_ok=True)
  checkpointer = train_checkpoints.TrainCheckpointer(
    plan.workdir, keep=train_cfg.keep_checkpoints, keep_every=train_cfg.keep_every_steps
  )
  iterator = iter(make_train_iterator(config, plan.model_settings, plan.train_source))
  init_key, run_key = run_keys(config.seed)

  def init_fn(k: jax.Array) -> train_step.TrainState:
    return train_step.init_state(fractal.init_params(model, k), tx, ema=use_ema)

  start = time.perf_counter()
  with jax.set_mesh(plan.mesh):
    state = jax.jit(init_fn, out_shardings=state_shardings)(init_key)
  resumed_from = checkpointer.latest_step()
  if resumed_from is not None:
    abstract = _with_shardings(jax.eval_shape(init_fn, init_key), state_shardings)
    state = checkpointer.restore(abstract, iterator)
    print(f"resumed from {checkpointer.directory}/{resumed_from}")
  elif train_cfg.init_from:
    params = jax.device_put(init_from_weights(config, state.params), params_shardings)
    with jax.set_mesh(plan.mesh):
      state = jax.jit(
        lambda p: train_step.init_state(p, tx, ema=use_ema),
        in_shardings=(params_shardings,),
        out_shardings=state_shardings,
      )(params)
    print(f"initialised from {train_cfg.init_from}")
  first_step = int(state.step)
  end_step = min(plan.total_steps, stop_at_step) if stop_at_step > 0 else plan.total_steps

  batch_sharding = NamedSharding(plan.mesh, mesh_lib.batch_spec())
  step_fn = jax.jit(
    lambda s, x, y: train_step.train_step(
      model,
      tx,
      s,
      x,
      y,
      run_key,
      accum_steps=train_cfg.grad_accum_steps,
      ema_decay=train_cfg.ema_decay or 0.9999,
      # The loss compacts the items below MAR levels per batch shard, so that its sorts and gathers stay on-device.
      batch_shards=mesh_lib.batch_size_per_step(plan.mesh),
    ),
    in_shardings=(state_shardings, batch_sharding, batch_sharding),
    out_shardings=(state_shardings, replicated),
    donate_argnums=(0,),
  )
  num_params = fractal.count_params(abstract_params)
  print(
    f"training {num_params:,} parameters on {plan.mesh.size} device(s) {dict(plan.mesh.shape)}, "
    f"{jax.process_count()} host(s); global batch {train_cfg.global_batch}, steps {first_step} -> {end_step} "
    f"of {plan.total_steps} "
    f"(warm-up {plan.warmup_steps}), peak lr {plan.peak_lr:.3g}; workdir {plan.workdir}"
  )

  writer = metrics_io.make_writer(plan.workdir)
  if first_step == 0:
    writer.write_hparams(metrics_io.flat_hparams(config))
  from clu import periodic_actions

  progress_every = max(1, int(train_cfg.log_every_steps))
  progress = periodic_actions.ReportProgress(
    num_train_steps=plan.total_steps, writer=writer, every_steps=progress_every, every_secs=None
  )
  preemption = _Preemption()
  pending: list[tuple[int, dict[str, jax.Array]]] = []
  last_saved = first_step
  results: dict[str, float] = {}
  last_train: dict[str, float] = {}
  last_log = [first_step, time.perf_counter()]  # (step, time) of the previous log line

  def flush_metrics(step: int) -> None:
    """Checks every pending step's finiteness, then logs the mean of their metrics."""
    if not pending:
      return
    fetched = jax.device_get([m for _, m in pending])
    for (done, _), metrics in zip(pending, fetched):
      if not bool(metrics["finite"]):
        raise TrainingError(
          f"non-finite loss at step {done + 1}: training stopped; the step was dropped and nothing was saved "
          f"after it. The newest checkpoint (step {checkpointer.latest_step()}) is the last good state: lower "
          "config.train.base_lr, check the data, or try config.model.dtype=float32."
        )
    scalars = {k: float(np.mean([m[k] for m in fetched])) for k in fetched[-1] if k != "finite"}
    scalars["learning_rate"] = float(schedule(step - 1))
    writer.write_scalars(step, scalars)
    now = time.perf_counter()
    rate = (step - last_log[0]) / max(now - last_log[1], 1e-9)
    last_log[:] = [step, now]
    if jax.process_index() == 0:
      eta = (end_step - step) / max(rate, 1e-9)
      print(
        f"step {step}/{end_step}: loss {scalars['loss']:.4f}, grad norm {scalars['grad_norm']:.3f}, "
        f"lr {scalars['learning_rate']:.3g}, {rate:.2f} steps/s ({rate * train_cfg.global_batch:.0f} images/s), "
        f"ETA {eta / 60:.1f} min",
        flush=True,
      )
    last_train.update({f"train/{k}": v for k, v in scalars.items()} | {"train/step": float(step)})
    pending.clear()

  try:
    step = first_step
    while step < end_step:
      batch = next(iterator)
      images, labels = _global_batch(batch, batch_sharding)
      with jax.set_mesh(plan.mesh):
        state, metrics = step_fn(state, images, labels)
      pending.append((step, metrics))
      step += 1
      if step == first_step + 1:
        jax.block_until_ready(metrics)
        print(f"first step (compile included) took {time.perf_counter() - start:.1f} s", flush=True)
        last_log[:] = [step, time.perf_counter()]
      progress(step)
      last = step == end_step
      # Multi-host: orbax's preemption sync point makes every host agree on the step to save.
      preempted = preemption.requested or checkpointer.manager.reached_preemption(step)
      should_save = last or preempted or step % train_cfg.checkpoint_every_steps == 0
      if step % progress_every == 0 or should_save:
        flush_metrics(step)
      if train_cfg.eval_every_steps > 0 and (step % train_cfg.eval_every_steps == 0 or last):
        results = evaluate(plan, state.ema_params if use_ema else state.params, model, step, writer)
        print(f"step {step}: " + ", ".join(f"{k.split('/')[-1]} {v:.4g}" for k, v in results.items()))
      if should_save and step != last_saved:
        checkpointer.save(state, iterator.get_state(), config.model, wait=preempted)
        last_saved = step
      if preempted:
        print(f"SIGTERM: checkpointed step {step} in {checkpointer.directory}; rerun the same command to resume")
        break
  finally:
    preemption.restore()
    checkpointer.close()
    writer.close()
  return last_train | results
