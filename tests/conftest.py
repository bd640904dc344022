"""Shared test set-up: fast compilation, a persistent compilation cache and small model builders.

The tests' programs are tiny and compiling them dominates the suite, so XLA's
backend (LLVM) optimisation is turned down to level 0 here: about a quarter
less compile time, for code that runs a little slower. Subprocesses that the
tests start inherit the setting (and the cache directory). Users' runs are
not affected.
"""

from __future__ import annotations

import os
import pathlib

os.environ["XLA_FLAGS"] = " ".join([os.environ.get("XLA_FLAGS", ""), "--xla_backend_optimization_level=0"]).strip()

import jax  # noqa: E402

_CACHE = pathlib.Path(__file__).resolve().parent.parent / ".jax_cache"
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", str(_CACHE))  # for subprocesses too
jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)

import pytest  # noqa: E402

from fractal_jax.config import load_config_file  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def tiny_config():
  return load_config_file(str(ROOT / "configs" / "tiny.py"))


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory, tiny_config):
  """configs/tiny.py with random parameters, saved as a converted checkpoint: its directory."""
  import tiny_models

  from fractal_jax.io import model_checkpoint
  from fractal_jax.model import model_config

  params = tiny_models.init_params(model_config.settings(tiny_config.model))
  directory = tmp_path_factory.mktemp("ckpt") / "tiny"
  model_checkpoint.save_params(directory, params, tiny_config.model)
  return directory


@pytest.fixture(scope="session")
def digits_run(tmp_path_factory):
  """Two training steps of the shared tiny setup on the digits, with a periodic evaluation: (config, workdir, results)."""
  import numpy as np
  from tiny_training import tiny_train_config

  from fractal_jax.train import trainer

  workdir = tmp_path_factory.mktemp("digits_run")
  stats = workdir.parent / "unit_gaussian_stats.npz"  # any statistics do for checking the periodic FID runs
  np.savez(stats, mu=np.zeros(2048), sigma=np.eye(2048))
  config = tiny_train_config(eval_every_steps=2, eval_num_samples=10, eval_max_images=16, eval_fid_stats=str(stats))
  return config, workdir, trainer.train(config, str(workdir), stop_at_step=2)
