"""Shared test set-up: fast compilation, a persistent compilation cache and small model builders.

The tests' programs are tiny and compiling them dominates the suite, so XLA's
backend (LLVM) optimisation is turned down to level 0 here: about a quarter
less compile time, for code that runs a little slower. Subprocesses that the
tests start inherit the setting (and the cache directory). Users' runs are
not affected.
"""

from __future__ import annotations

import importlib.util
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


GCS_BUCKET = "fractal-test"


@pytest.fixture(scope="session")
def gcs_server():
  """A real GCS server for the session: gcp-storage-emulator, in memory, on a free port of 127.0.0.1.

  Returns the environment that points clients at it (gcsfs through etils.epath, TensorStore through orbax; both
  read it when they first connect): it is set in this process and is what subprocesses need. TensorFlow's own
  GCS client (clu's TensorBoard writer) cannot be pointed at it: runs here set config.train.tensorboard=False.
  `tests/gcs_emulator.py` starts it with one fix (GCS's generation header). It answers 501 to gcsfs's move (a rename then copies and deletes, ~33 s an object) and ignores
  listing offsets: the code under test must neither rename on gs:// nor list with offsets.
  """
  import socket
  import subprocess
  import sys
  import time
  import urllib.request

  if importlib.util.find_spec("gcp_storage_emulator") is None:
    pytest.skip("gcp-storage-emulator is not installed (pip install -e '.[test]')")
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  emulator = str(ROOT / "tests" / "gcs_emulator.py")  # the emulator with GCS's generation header (see there)
  command = [sys.executable, emulator, "start", "--host=127.0.0.1", f"--port={port}"]
  command += ["--in-memory", f"--default-bucket={GCS_BUCKET}"]
  server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  url = f"http://127.0.0.1:{port}"
  deadline = time.time() + 60
  while True:
    try:
      with urllib.request.urlopen(f"{url}/storage/v1/b/{GCS_BUCKET}", timeout=2):
        break
    except OSError:
      if server.poll() is not None or time.time() > deadline:
        server.kill()
        raise RuntimeError(f"gcp-storage-emulator did not start on {url}") from None
      time.sleep(0.1)
  env = {
    "STORAGE_EMULATOR_HOST": url,
    "TENSORSTORE_GCS_HTTP_URL": url,
    "FSSPEC_GCS_TOKEN": "anon",
    "NO_GCE_CHECK": "true",
    "GOOGLE_AUTH_TOKEN_FOR_TESTING": "dummy",
    "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",  # else gcsfs spends a minute per bucket probing
    "EPATH_USE_TF": "false",  # with TensorFlow installed epath would use tf.io.gfile, which cannot be redirected
  }
  saved = {k: os.environ.get(k) for k in env}
  os.environ.update(env)
  # This process may have read fsspec's environment already: give gcsfs its anonymous token directly (without it
  # gcsfs would look for credentials, the GCE metadata server included) and drop instances made before.
  import fsspec
  import gcsfs

  saved_conf = {proto: dict(fsspec.config.conf.get(proto, {})) for proto in ("gs", "gcs")}
  for proto in saved_conf:
    fsspec.config.conf.setdefault(proto, {})["token"] = "anon"
  gcsfs.GCSFileSystem.clear_instance_cache()
  yield env
  gcsfs.GCSFileSystem.clear_instance_cache()
  fsspec.config.conf.update(saved_conf)
  for key, value in saved.items():
    if value is None:
      os.environ.pop(key, None)
    else:
      os.environ[key] = value
  server.terminate()
  server.wait(timeout=30)
