"""Bad input on the command line: one `error:` line naming the problem, exit status 2, nothing written (issue 16).

Every case is a real `python -m fractal_jax.main` (or `fractal_jax.convert`) process; they run concurrently in a
module fixture, which also checks that no case wrote anything: the case files, the outputs' directory and the
checkpoint are the same before and after.
"""

from __future__ import annotations

import concurrent.futures
import copy
import os
import pathlib
import subprocess
import sys
import time
from typing import NamedTuple

import numpy as np
import pytest
from conftest import ROOT
from PIL import Image

from fractal_jax import config as config_lib
from fractal_jax.io import path_checks
from fractal_jax.model import model_config
from fractal_jax.modes import checks

TINY = "--config=configs/tiny.py"
CHECKPOINT = "--checkpoint={ckpt}"
TRAIN = (TINY, "--workdir={out}/run")
SAMPLE = (TINY, "--mode=sample", CHECKPOINT, "--labels=1", "--output={out}/grid.png")
EDIT = (TINY, "--mode=edit", CHECKPOINT, "--image={files}/image.png", "--edit=inpaint", "--output={out}/edit.png")
FID = (TINY, "--mode=fid", CHECKPOINT, "--num_images=10", "--output_dir={out}/fid")
NLL = (TINY, "--mode=nll", CHECKPOINT, "--config.data.name=digits")
REF_STATS = (TINY, "--mode=ref_stats", "--config.data.name=digits", "--output={out}/stats.npz")
CONVERT = "fractal_jax.convert"


class Case(NamedTuple):
  name: str
  args: tuple[str, ...]
  message: str  # in stderr
  module: str = "fractal_jax.main"


CASES = [
  # The config file and its overrides (parsed before any mode runs).
  Case("config without get_config", ("--config={files}/no_get_config.py", "--mode=summary"), "has no get_config()"),
  Case("config with a syntax error", ("--config={files}/syntax_error.py",), "line 2: syntax error"),
  Case("get_config raises", ("--config={files}/raises.py",), "get_config() raised ZeroDivisionError"),
  Case("get_config returns None", ("--config={files}/returns_none.py",), "returned NoneType"),
  Case("config not built on base_config", ("--config={files}/partial.py", "--mode=summary"), "base_config()"),
  Case("config file missing", ("--config={files}/nope.py",), "not found"),
  Case("config argument not taken", ("--config=configs/tiny.py:large", "--mode=summary"), "takes no argument"),
  Case("config argument unknown", ("--config=configs/fractalmar_256.py:giant", "--mode=summary"), "use one of base"),
  Case("no --config", ("--mode=summary",), "--config is required"),
  Case("override of a missing field", (TINY, "--mode=summary", "--config.model.depth=3"), "did you mean depths?"),
  Case("override of a missing section", (TINY, "--config.modle.depths=(1,1,1)"), "did you mean model?"),
  Case("malformed integer override", (*TRAIN, "--config.train.global_batch=abc"), "global_batch=abc"),
  Case("malformed tuple override", (TINY, "--mode=summary", "--config.model.depths=abc"), "tuple of integers"),
  Case("malformed bool override", (TINY, "--mode=summary", "--config.model.guiding_pixel=maybe"), "guiding_pixel"),
  Case("unknown flag", (TINY, "--mode=summary", "--labelz=1"), "labelz"),
  Case("positional argument", (TINY, "--mode=summary", "sample"), "unexpected arguments: sample"),
  # Flags the mode does not read; --seed where nothing is random.
  Case("flag not read by summary", (TINY, "--mode=summary", "--labels=xyz"), "--labels is not read by --mode=summary"),
  Case("seed in summary", (TINY, "--mode=summary", "--seed=1"), "--seed: --mode=summary draws no random numbers"),
  Case("seed in ref_stats", (*REF_STATS, "--seed=3"), "--mode=ref_stats draws no random numbers"),
  Case("checkpoint in train", (*TRAIN, CHECKPOINT), "--checkpoint is not read by --mode=train"),
  Case("num_images in nll", (*NLL, "--num_images=10"), "config.eval.max_images"),
  Case("seed and config.seed disagree", (*SAMPLE, "--seed=1", "--config.seed=2"), "disagree"),
  # Config values out of range.
  Case("zero global batch", (*TRAIN, "--config.train.global_batch=0"), "config.train.global_batch must be >= 1"),
  Case("negative global batch", (*TRAIN, "--config.train.global_batch=-64"), "global_batch must be >= 1"),
  Case("negative learning rate", (*TRAIN, "--config.train.base_lr=-0.1"), "config.train.base_lr must be >= 0"),
  Case(
    "warm-up as long as the run", (*TRAIN, "--config.train.num_steps=10", "--config.train.warmup_steps=10"), "warm-up"
  ),
  Case("checkpoint every 0 steps", (*TRAIN, "--config.train.checkpoint_every_steps=0"), "checkpoint_every_steps"),
  Case("EMA decay 1", (*TRAIN, "--config.train.ema_decay=1.0"), "config.train.ema_decay must be in [0, 1)"),
  Case("negative stop_at_step", (*TRAIN, "--stop_at_step=-1"), "--stop_at_step must be >= 0"),
  Case("dropout 1", (TINY, "--mode=summary", "--config.model.attn_dropout=1.0"), "attn_dropout must be in [0, 1)"),
  Case("temperature 0", (*SAMPLE, "--config.sample.temperature=0"), "temperature must be > 0"),
  Case("filter threshold 1", (*SAMPLE, "--config.sample.filter_threshold=1.0"), "filter_threshold must be in [0, 1)"),
  Case("zero MAR steps", (*SAMPLE, "--config.sample.num_iter=(0,4)"), "num_iter entries must be >= 1"),
  Case("zero sampling batch", (*SAMPLE, "--config.sample.batch_size=0"), "config.sample.batch_size must be >= 1"),
  Case("zero NLL passes", (*NLL, "--config.eval.nll_passes=0"), "config.eval.nll_passes must be >= 1"),
  Case("negative eval batch", (*REF_STATS, "--config.eval.batch_size=-1"), "config.eval.batch_size must be >= 1"),
  Case("mesh larger than the devices", (*SAMPLE, "--config.mesh_shape=(2,1,1)"), "has 2 devices but 1 are available"),
  Case("negative num_images", (*SAMPLE[:-2], "--num_images=-10", "--output={out}/g.png"), "--num_images must be >= 1"),
  # Output paths: the extension of what the mode writes, a directory that can hold it.
  Case("grid not a png", (*SAMPLE[:-1], "--output={out}/grid.jpg"), "name it *.png"),
  Case("gif not a gif", (*SAMPLE, "--gif={out}/generation.png"), "name it *.gif"),
  Case("nll output not json", (*NLL, "--output={out}/nll.txt"), "name it *.json"),
  Case("ref_stats output not npz", (*REF_STATS[:-1], "--output={out}/stats.json"), "name it *.npz"),
  Case("adm_npz not npz", (*FID, "--ref_stats={files}/stats.npz", "--adm_npz={out}/batch.txt"), "name it *.npz"),
  Case("output under a file", (*SAMPLE[:-1], "--output={files}/plain_file/grid.png"), "is a file, so nothing"),
  Case("output is a directory", (*SAMPLE[:-1], "--output={files}/folder.png"), "is a directory"),
  Case("workdir is a file", (TINY, "--workdir={files}/plain_file"), "exists and is not a directory"),
  Case("output_dir is a file", (*EDIT, "--output_dir={files}/plain_file"), "exists and is not a directory"),
  # Input files.
  Case("image not a picture", (*EDIT[:3], "--image={files}/text.png", *EDIT[4:]), "is not a picture"),
  Case("image is a directory", (*EDIT[:3], "--image={files}/folder.png", *EDIT[4:]), "--image={files}/folder.png is a"),
  Case("image missing", (*EDIT[:3], "--image={files}/missing.png", *EDIT[4:]), "--image={files}/missing.png: no such"),
  Case("mask not a picture", (*EDIT, "--mask={files}/text.png"), "--mask={files}/text.png is not a picture"),
  Case("image of another size", (*EDIT[:3], "--image={files}/big.png", *EDIT[4:]), "is 16x16 but this model"),
  Case("mask not binary", (*EDIT, "--mask={files}/grey.png"), "is not binary"),
  Case("ref_stats not an npz", (*FID, "--ref_stats={files}/text.npz"), "is not an .npz of reference statistics"),
  Case("ref_stats a .npy", (*FID, "--ref_stats={files}/array.npy"), "is not an .npz of reference statistics"),
  Case("ref_stats of another extractor", (*FID, "--ref_stats={files}/stats_64.npz"), "do not fit 2048-d features"),
  Case("fid computes nothing", FID, "--mode=fid would compute nothing"),
  Case("fid: Inception file without logits", (*FID, "--inception={default_1}"), "has no logits"),
  Case("sample writes nothing", SAMPLE[:-1], "nothing to write"),
  Case("inception is a directory", (*FID, "--inception={files}/folder.png"), "--inception={files}/folder.png is a"),
  Case("checkpoint missing", (*SAMPLE[:2], "--checkpoint={files}/missing", *SAMPLE[3:]), "no such directory"),
  Case("step the checkpoint lacks", (*NLL, "--step=7"), "--step=7: {ckpt} has no such step"),
  Case("negative step", (*SAMPLE, "--step=-1"), "--step must be >= 0"),
  Case("step in train", (*TRAIN, "--step=1"), "--step is not read by --mode=train"),
  # The converter.
  Case("convert: config without get_config", ("--config={files}/no_get_config.py",), "has no get_config()", CONVERT),
  Case("convert: override typo", (TINY, "--config.model.depth=3"), "did you mean depths?", CONVERT),
  Case("convert: --seed", (TINY, "--seed=1"), "Unknown command line flag 'seed'", CONVERT),
  Case(
    "convert: output not npz",
    (TINY, "--to_torch", CHECKPOINT, "--output={out}/w.txt"),
    "name it *.npz",
    CONVERT,
  ),
  Case(
    "convert: output under a file",
    (TINY, "--to_torch", CHECKPOINT, "--output={files}/plain_file/w.npz"),
    "is a file, so nothing",
    CONVERT,
  ),
  Case(
    "convert: not a torch file",
    (TINY, "--torch_checkpoint={files}/text.png", "--output_dir={out}/imported"),
    "text.png",
    CONVERT,
  ),
]
if os.geteuid() != 0:  # root may write anywhere
  CASES.append(Case("output in a read-only directory", (*SAMPLE[:-1], "--output={files}/locked/g.png"), "permission"))


def _write_files(files: pathlib.Path) -> None:
  """The inputs the cases name."""
  files.mkdir()
  (files / "no_get_config.py").write_text('print("config side effect")\nX = 1\n')
  (files / "syntax_error.py").write_text('print("config side effect")\ndef get_config(:\n  pass\n')
  (files / "raises.py").write_text("def get_config():\n  return 1 / 0\n")
  (files / "returns_none.py").write_text('def get_config():\n  print("config side effect")\n')
  (files / "partial.py").write_text(
    "import ml_collections\n\ndef get_config():\n  return ml_collections.ConfigDict()\n"
  )
  (files / "plain_file").write_text("a file\n")
  (files / "text.png").write_text("not a picture\n")
  (files / "text.npz").write_text("not statistics\n")
  (files / "folder.png").mkdir()
  rng = np.random.default_rng(0)
  Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(files / "image.png")
  Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(files / "big.png")
  Image.fromarray(np.full((8, 8), 100, np.uint8)).save(files / "grey.png")
  np.save(files / "array.npy", np.zeros(3))
  np.savez(files / "stats_64.npz", mu=np.zeros(64), sigma=np.eye(64))
  np.savez(files / "stats.npz", mu=np.zeros(2048), sigma=np.eye(2048, dtype=np.float32))
  (files / "locked").mkdir(mode=0o500)


def _tree(path: pathlib.Path) -> dict[str, tuple[int, int]]:
  """Every file and directory under `path`: (size, mtime_ns)."""
  return {str(p.relative_to(path)): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(path.rglob("*"))}


def _run(case: Case, paths: dict[str, str]) -> subprocess.CompletedProcess:
  args = [a.format(**paths) for a in case.args]
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  command = [sys.executable, "-m", case.module, *args]
  return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def results(tmp_path_factory, tiny_checkpoint):
  """Every case run (concurrently): name -> (the completed process, the paths its arguments used)."""
  base = tmp_path_factory.mktemp("bad_input")
  files, out = base / "files", base / "out"
  _write_files(files)
  from fractal_jax.evaluation import inception_weights

  default_1 = str(inception_weights.default_1_path())
  paths = {"files": str(files), "out": str(out), "ckpt": str(tiny_checkpoint), "default_1": default_1}
  before = (_tree(files), _tree(tiny_checkpoint))
  start = time.perf_counter()
  with concurrent.futures.ThreadPoolExecutor(max_workers=max(2, os.cpu_count() or 2)) as pool:
    done = dict(zip([c.name for c in CASES], pool.map(lambda c: _run(c, paths), CASES)))
  print(f"\n{len(CASES)} bad-input processes in {time.perf_counter() - start:.1f} s")
  (files / "locked").chmod(0o700)
  assert not out.exists(), sorted(str(p) for p in out.rglob("*"))
  assert (_tree(files), _tree(tiny_checkpoint)) == before
  return done, paths


def test_there_are_enough_cases():
  assert len(CASES) >= 30 and len({c.name for c in CASES}) == len(CASES)
  assert {a.split("=")[1] for c in CASES for a in c.args if a.startswith("--mode=")} >= {
    "summary",
    "sample",
    "edit",
    "nll",
    "fid",
    "ref_stats",
  }


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_input_is_one_line_and_exit_status_2(results, case):
  done, paths = results
  result = done[case.name]
  stderr = result.stderr.strip()
  assert result.returncode == 2, f"exit {result.returncode}\n{result.stdout[-2000:]}\n{stderr[-3000:]}"
  assert "Traceback" not in stderr and len(stderr.splitlines()) <= 3, stderr[-3000:]
  assert stderr.startswith("error: ") or "\nerror: " in stderr, stderr
  assert case.message.format(**paths) in stderr, stderr
  assert "config side effect" not in result.stdout + stderr  # a failing config file's prints are not shown
  assert "allow_pickle" not in stderr


# --- the pieces, in process ----------------------------------------------------------------------------------------


def test_every_flag_of_main_is_in_the_table_and_the_help_says_what_seed_does():
  """`checks.READS` covers every top-level flag of fractal_jax.main (a new flag must say which modes read it)."""
  code = (
    "from absl import flags; import fractal_jax.main; "
    "print(' '.join(f.name for f in flags.FLAGS.get_flags_for_module('fractal_jax.main'))); "
    "print(' '.join(flags.FLAGS['mode'].parser.enum_values))"
  )
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  listed = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
  assert listed.returncode == 0, listed.stderr
  flag_names, modes = listed.stdout.splitlines()
  assert set(flag_names.split()) - {"config", "mode"} == set(checks.CHECKED_FLAGS)
  assert set(modes.split()) == set(checks.READS) == set(checks.MODE_CHECKS) | {"summary"}
  helped = subprocess.run(
    [sys.executable, "-m", "fractal_jax.main", "--help"], cwd=ROOT, env=env, capture_output=True, text=True
  )
  text = " ".join((helped.stdout + helped.stderr).split())
  assert "overriding config.seed" in text and "Refused by summary and ref_stats" in text
  assert "A flag that the mode does not read is such an error" in text


def test_seed_becomes_config_seed_in_the_random_modes(tiny_config):
  assert set(checks.RANDOM_MODES) == {"train", "nll", "sample", "edit", "fid"}
  for mode in checks.RANDOM_MODES:
    config = copy.deepcopy(tiny_config)
    checks.apply_seed(config, mode, 7, config_seed_given=False)
    assert config.seed == 7
  config = copy.deepcopy(tiny_config)
  checks.apply_seed(config, "train", None, config_seed_given=False)  # no --seed: config.seed stays
  assert config.seed == tiny_config.seed
  config.seed = 3
  checks.apply_seed(config, "train", 3, config_seed_given=True)  # the same value twice is fine
  with pytest.raises(model_config.ConfigError, match="--seed=4 and --config.seed=3 disagree"):
    checks.apply_seed(config, "nll", 4, config_seed_given=True)


def test_override_names_are_checked_with_suggestions(tiny_config):
  argv = ["prog", "--config=x.py", "--config.train.global_batch=8", "--noconfig.model.guiding_pixel"]
  config_lib.check_override_names(tiny_config, argv)
  with pytest.raises(config_lib.ConfigFileError, match="config.train has no field 'lr'; its fields are base_lr,"):
    config_lib.check_override_names(tiny_config, [*argv, "--config.train.lr=1"])
  with pytest.raises(config_lib.ConfigFileError, match="config.seed is a value, not a section"):
    config_lib.check_override_names(tiny_config, ["--config.seed.x=1"])


def test_config_files_load_with_their_arguments_and_prints(tmp_path, capsys):
  (tmp_path / "sized.py").write_text(
    "from fractal_jax.config import base_config\n\n"
    "def get_config(size='small'):\n  print('building', size)\n  config = base_config()\n"
    "  config.train.global_batch = {'small': 8, 'big': 64}[size]\n  return config\n"
  )
  assert config_lib.load_config_checked(f"{tmp_path}/sized.py:big").train.global_batch == 64
  assert "building big" in capsys.readouterr().out  # shown: the file loaded
  with pytest.raises(config_lib.ConfigFileError, match=r"sized.py:huge, line 6: get_config\(\) raised KeyError"):
    config_lib.load_config_checked(f"{tmp_path}/sized.py:huge")
  assert capsys.readouterr().out == ""  # not shown: the file failed
  config_lib.check_fields(config_lib.load_config_checked("configs/fractalmar_256.py:large"))


def test_output_paths_are_checked_without_writing(tmp_path):
  path_checks.check_output_file("--output", str(tmp_path / "new" / "deeper" / "grid.png"), (".png",), "the grid")
  path_checks.check_output_dir("--workdir", str(tmp_path / "new" / "run"))
  path_checks.check_output_file("--output", "gs://bucket/grid.png", (".png",), "the grid")  # remote: suffix only
  with pytest.raises(model_config.ConfigError, match=r"name it \*.png"):
    path_checks.check_output_file("--output", "gs://bucket/grid.jpeg", (".png",), "the grid")
  assert not list(tmp_path.iterdir())
