"""gs:// end to end against a real GCS server (gcp-storage-emulator, `conftest.gcs_server`).

Real subprocesses of `python -m fractal_jax.main` with `--workdir=gs://...`: train, kill -9, resume (equal to an
uninterrupted run), then sample, nll and a resumed fid, every output on gs://, nothing on the local disk but caches.
TensorFlow's GCS client cannot be pointed at the emulator, so the runs leave TensorBoard out
(`config.train.tensorboard=False`); everything else goes through gcsfs (etils.epath) and TensorStore (orbax).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
import tiny_models
from conftest import GCS_BUCKET, ROOT
from test_convert import PTH, fixture_cfg
from tiny_training import TINY_FLAGS, tiny_train_config

from fractal_jax import convert
from fractal_jax.evaluation import fid
from fractal_jax.io import image_files, model_checkpoint, paths, torch_pickle
from fractal_jax.model import model_config
from fractal_jax.train import metric_writers, state_checkpoint, trainer

# TINY_FLAGS name configs/tiny.py relative to the repository; the runs here start elsewhere.
FLAGS = (f"--config={ROOT / 'configs' / 'tiny.py'}", *TINY_FLAGS[1:], "--config.train.tensorboard=False")
EVAL = ("--config.eval.batch_size=20", "--config.sample.batch_size=10")


def test_checkpoint_dir_keeps_gs_urls(tmp_path, monkeypatch):
  assert str(state_checkpoint.checkpoint_dir("gs://bucket/run")) == "gs://bucket/run/checkpoints"
  monkeypatch.chdir(tmp_path)
  assert str(state_checkpoint.checkpoint_dir("run")) == str(tmp_path / "run" / "checkpoints")  # local: absolute


def test_files_round_trip_on_gs(gcs_server):
  root = paths.path(f"gs://{GCS_BUCKET}/unit")
  config = tiny_train_config()
  params = tiny_models.init_params(model_config.settings(config.model))
  model_checkpoint.save_params(root / "ckpt", params, config.model, step=4)
  assert model_checkpoint.latest_step(root / "ckpt") == 4
  loaded = model_checkpoint.load_params(str(root / "ckpt"), config.model)
  jax.tree.map(np.testing.assert_array_equal, loaded, jax.tree.map(np.asarray, params))

  fid._save_atomic(fid.shard_path(root / "fid", 0), pool=np.ones((2, 3)))
  assert fid.finished_shards(root / "fid", 2) == [0]
  np.testing.assert_array_equal(fid.read_shards(root / "fid", 1)["pool"], np.ones((2, 3)))
  assert [p.name for p in (root / "fid").iterdir()] == ["shard_00000.npz"]  # written in place: no temporary object

  image_files.save_grid(np.zeros((4, 8, 8, 3), np.uint8), root / "grid.png")
  with image_files.open_image(root / "grid.png") as picture:
    assert picture.format == "PNG" and picture.size[0] > 200  # upscaled


def test_jsonl_on_gs_is_rewritten_whole(gcs_server):
  workdir = paths.path(f"gs://{GCS_BUCKET}/jsonl")
  (workdir / "metrics.jsonl").write_text('{"step": 1, "loss": 3.0}')  # a run before this one, killed mid-line
  writer = metric_writers.make_writer(workdir, tensorboard=False)
  writer.write_scalars(2, {"loss": 2.0})
  writer.flush()
  assert [r["step"] for r in metric_writers.read_jsonl(workdir)] == [1, 2]
  writer.write_scalars(3, {"loss": 1.0})
  writer.close()
  assert [r["loss"] for r in metric_writers.read_jsonl(workdir)] == [3.0, 2.0, 1.0]


def test_tensorboard_writer_that_cannot_start_leaves_a_warning(gcs_server, monkeypatch, capsys):
  """TensorFlow's GCS client, which the TensorBoard writer uses, cannot reach the emulator: as when it has no
  credentials, the run goes on without events files."""
  from clu import metric_writers as clu_writers

  made = clu_writers.create_default_writer

  def failing(logdir=None, *, just_logging=False, **kwargs):
    if not just_logging:
      raise RuntimeError(f"Could not resolve host: www.googleapis.com when reading {logdir}")
    return made(logdir, just_logging=just_logging, **kwargs)

  monkeypatch.setattr(clu_writers, "create_default_writer", failing)
  workdir = f"gs://{GCS_BUCKET}/no_tensorboard"
  writer = metric_writers.make_writer(workdir)
  writer.write_scalars(1, {"loss": 1.0})
  writer.close()
  warning = capsys.readouterr().out
  assert warning.startswith(f"warning: no TensorBoard events: TensorFlow cannot write to {workdir} (RuntimeError")
  assert metric_writers.read_jsonl(workdir) == [{"step": 1, "loss": 1.0}]


def test_image_folder_on_gs(gcs_server):
  import io

  from PIL import Image

  from fractal_jax.data import input_pipeline

  root = f"gs://{GCS_BUCKET}/imagenet"
  rng = np.random.default_rng(0)
  for c in range(2):
    for i in range(4):
      buffer = io.BytesIO()
      Image.fromarray(rng.integers(0, 256, (12, 10, 3), dtype=np.uint8)).save(buffer, format="JPEG")
      paths.path(f"{root}/train/n0{c}/{i}.JPEG").write_bytes(buffer.getvalue())
  config = tiny_train_config()
  config.data.name, config.data.root = "imagefolder", root
  source = input_pipeline.make_source(config.data, "train")
  assert len(source) == 8 and source.num_classes == 2
  batch = next(iter(input_pipeline.eval_batches(source, image_size=8, batch_size=8)))  # (no background threads)
  assert batch["image"].shape == (8, 8, 8, 3) and batch["label"].tolist() == [0, 0, 0, 0, 1, 1, 1, 1]


def test_convert_reads_and_writes_gs(gcs_server):
  root = f"gs://{GCS_BUCKET}/convert"
  paths.path(f"{root}/tiny.pth").write_bytes(PTH.read_bytes())
  convert.import_checkpoint(f"{root}/tiny.pth", f"{root}/ckpt", fixture_cfg(), log=lambda _: None)
  convert.export_checkpoint(f"{root}/ckpt", f"{root}/back.npz", fixture_cfg(), log=lambda _: None)
  with paths.load_npz(f"{root}/back.npz") as npz:
    back = {name: npz[name] for name in npz.files}
  original = torch_pickle.read_state_dict(PTH)
  assert sorted(back) == sorted(original)
  for name, value in original.items():
    np.testing.assert_array_equal(back[name], np.asarray(value, np.float32))
  assert [p.name for p in paths.path(root).iterdir()] == ["back.npz", "ckpt", "tiny.pth"]  # no .partial left


# --- subprocesses on a gs:// workdir ----------------------------------------------------------------------------


class Sandbox:
  """Runs `fractal_jax.main` with an empty working directory and HOME, this repository first on the path."""

  def __init__(self, root, gcs_env: dict[str, str]) -> None:
    self.cwd, self.home, self.tmp = root / "cwd", root / "home", root / "tmp"
    for folder in (self.cwd, self.home, self.tmp):
      folder.mkdir()
    self.env = dict(
      os.environ,
      **gcs_env,
      JAX_PLATFORMS="cpu",
      HOME=str(self.home),
      TMPDIR=str(self.tmp),  # temporary caches may go here
      PYTHONPATH=os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p),
    )

  def start(self, *flags: str) -> subprocess.Popen:
    command = [sys.executable, "-m", "fractal_jax.main", *FLAGS, *flags]
    return subprocess.Popen(
      command, cwd=self.cwd, env=self.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )

  def run(self, *flags: str) -> subprocess.CompletedProcess:
    return self.run_together(flags)[0]

  def run_together(self, *commands: tuple[str, ...]) -> list[subprocess.CompletedProcess]:
    """Runs the commands (flag tuples) at the same time; their results in order."""
    processes = [self.start(*flags) for flags in commands]
    results = []
    for process in processes:
      out, err = process.communicate(timeout=400)
      results.append(subprocess.CompletedProcess(process.args, process.returncode, out, err))
    return results


def committed(workdir: str) -> list[int]:
  """The finished steps of a gs:// workdir (orbax marks one with commit_success.txt)."""
  directory = state_checkpoint.checkpoint_dir(workdir)
  if not directory.exists():
    return []
  steps = [p for p in directory.iterdir() if p.name.isdigit()]
  return sorted(int(p.name) for p in steps if (p / "commit_success.txt").exists())


def losses(workdir) -> dict[int, float]:
  return {int(r["step"]): r["loss"] for r in metric_writers.read_jsonl(workdir) if "loss" in r}


@pytest.fixture(scope="module")
def gs_runs(gcs_server, tmp_path_factory):
  """Training on gs://: killed with SIGKILL after a checkpoint, resumed to 3 steps past it; plus a local reference."""
  sandbox = Sandbox(tmp_path_factory.mktemp("sandbox"), gcs_server)
  workdir = f"gs://{GCS_BUCKET}/run"
  flags = (f"--workdir={workdir}", "--config.train.checkpoint_every_steps=3")
  killed = sandbox.start(*flags)
  deadline = time.time() + 300
  while not committed(workdir):
    assert killed.poll() is None, killed.communicate()[1][-3000:]
    assert time.time() < deadline, "no checkpoint on gs:// in 300 s"
    time.sleep(0.2)
  killed.send_signal(signal.SIGKILL)
  killed.communicate()
  at_kill = committed(workdir)[-1]
  end = at_kill + 3
  resuming = sandbox.start(*flags, f"--stop_at_step={end}")
  reference = tmp_path_factory.mktemp("reference")  # trained here meanwhile
  trainer.train(tiny_train_config(checkpoint_every_steps=3), str(reference), stop_at_step=end)
  out, err = resuming.communicate(timeout=400)
  resumed = subprocess.CompletedProcess(resuming.args, resuming.returncode, out, err)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  return dict(sandbox=sandbox, workdir=workdir, reference=reference, at_kill=at_kill, end=end, resumed=resumed)


def test_gs_training_resumed_after_kill_equals_uninterrupted(gs_runs):
  workdir, end = gs_runs["workdir"], gs_runs["end"]
  assert f"resumed from {workdir}/checkpoints/{gs_runs['at_kill']}" in gs_runs["resumed"].stdout
  assert end in committed(workdir)
  config = tiny_train_config()
  ours = model_checkpoint.load_params(workdir, config.model)
  theirs = model_checkpoint.load_params(gs_runs["reference"], config.model)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7), ours, theirs)
  resumed, reference = losses(workdir), losses(gs_runs["reference"])
  steps = range(1, end + 1)
  np.testing.assert_allclose([resumed[s] for s in steps], [reference[s] for s in steps], rtol=1e-6)


def test_gs_sample_nll_fid_and_a_bad_newest_step(gs_runs):
  sandbox, workdir, out = gs_runs["sandbox"], gs_runs["workdir"], f"gs://{GCS_BUCKET}/out"
  rng = np.random.default_rng(0)
  paths.save_npz(f"{out}/ref.npz", mu=np.zeros(2048), sigma=np.eye(2048), features=rng.normal(size=(40, 2048)))
  nll_flags = (
    "--mode=nll",
    f"--checkpoint={workdir}",
    "--config.eval.nll_passes=1",
    "--config.eval.batch_size=50",
    "--config.eval.max_images=50",
    f"--output={out}/nll.json",
  )
  fid_flags = (
    *EVAL,
    "--mode=fid",
    f"--checkpoint={workdir}",
    "--num_images=20",
    f"--ref_stats={out}/ref.npz",
    f"--output_dir={out}/fid",
    f"--output={out}/fid.json",
  )
  nll, first = sandbox.run_together(nll_flags, fid_flags)
  assert nll.returncode == 0, nll.stderr[-3000:]
  assert json.loads(paths.path(f"{out}/nll.json").read_text())["num_images"] == 50
  assert first.returncode == 0, first.stderr[-3000:]
  figures = json.loads(paths.path(f"{out}/fid.json").read_text())
  assert figures["num_images"] == 20 and figures["fid"] > 0 and 0 <= figures["precision"] <= 1
  assert sorted(p.name for p in paths.path(f"{out}/fid").iterdir()) == ["shard_00000.npz", "shard_00001.npz"]
  paths.path(f"{out}/fid/shard_00001.npz").unlink()  # as if killed during shard 1
  second = sandbox.run(*fid_flags)
  assert second.returncode == 0 and "1 shards already done" in second.stdout, second.stderr[-3000:]
  assert json.loads(paths.path(f"{out}/fid.json").read_text())["fid"] == pytest.approx(figures["fid"], rel=1e-6)

  # The newest step damaged (every params data file truncated: which files hold which arrays varies from run to
  # run, so cutting a few may leave every array readable): sample names it and the --step to use instead; with
  # that --step it samples.
  newest, older = committed(workdir)[-1], committed(workdir)[-2]
  data = paths.path(f"{workdir}/checkpoints/{newest}/params/ocdbt.process_0/d")
  for path in list(data.iterdir()):
    path.write_bytes(path.read_bytes()[:20])
  sample_flags = ("--mode=sample", f"--checkpoint={workdir}", "--labels=1,2,3")
  outputs = (f"--output={out}/grid.png", f"--output_dir={out}/images", f"--gif={out}/gen.gif")
  bad, sample = sandbox.run_together(
    (*sample_flags, f"--output={out}/bad.png"), (*sample_flags, f"--step={older}", *outputs)
  )
  assert bad.returncode == 2, bad.stderr[-3000:]
  error = [line for line in bad.stderr.splitlines() if line.startswith("error:")]
  assert len(error) == 1 and f"step {newest} does not restore" in error[0] and f"--step={older}" in error[0]
  assert "Traceback" not in bad.stderr and len(bad.stderr.splitlines()) < 20, bad.stderr[-3000:]
  assert not paths.path(f"{out}/bad.png").exists()
  assert sample.returncode == 0, sample.stderr[-3000:]
  names = sorted(p.name for p in paths.path(f"{out}/images").iterdir())
  assert names == ["000000_class1.png", "000001_class2.png", "000002_class3.png"]
  with image_files.open_image(f"{out}/gen.gif") as gif:
    assert gif.format == "GIF" and gif.n_frames > 1
  with image_files.open_image(f"{out}/grid.png") as grid:
    assert grid.format == "PNG"

  # Nothing went to the local disk but temporary caches: the working directory is still empty, and so is HOME but
  # for Keras's default settings file, which TensorFlow writes when it is imported (clu's writers import it).
  assert not list(sandbox.cwd.iterdir()), list(sandbox.cwd.rglob("*"))
  assert {str(p.relative_to(sandbox.home)) for p in sandbox.home.rglob("*")} <= {".keras", ".keras/keras.json"}
