"""notebooks/demo.ipynb: runs headless (FAST: no install, a few training steps of a tiny model) and makes its pictures;
its stored outputs are the demo's; its install cell picks the JAX build of the runtime; its badge and repository URL
come from setup.py's REPO_URL."""

from __future__ import annotations

import ast
import base64
import fnmatch
import glob
import importlib.util
import io
import os
import re
import shutil
import subprocess
import types

import nbformat
import pytest
from conftest import ROOT
from nbclient import NotebookClient
from PIL import Image

NOTEBOOK = ROOT / "notebooks" / "demo.ipynb"


def _set_repo_url():
  spec = importlib.util.spec_from_file_location("set_repo_url", ROOT / "launch" / "set_repo_url.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _text(notebook):
  return "".join(o.get("text", "") for cell in notebook.cells for o in cell.get("outputs", []))


def _pictures(notebook, mime="image/png"):
  return [o["data"][mime] for cell in notebook.cells for o in cell.get("outputs", []) if mime in o.get("data", {})]


@pytest.fixture
def _notebook_env(tmp_path, monkeypatch):
  monkeypatch.setenv("FRACTAL_DEMO_FAST", "1")
  monkeypatch.setenv("FRACTAL_DEMO_WORKDIR", str(tmp_path / "work"))
  monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))


def _host_runtime():
  """What the install cell should find here (the suite runs on CPU machines)."""
  if shutil.which("nvidia-smi") and subprocess.run(["nvidia-smi", "-L"], capture_output=True).returncode == 0:
    return "GPU"
  tpu = glob.glob("/dev/accel*") + glob.glob("/dev/vfio/[0-9]*")
  return "TPU" if tpu or os.environ.get("COLAB_TPU_ADDR") or os.environ.get("TPU_NAME") else "CPU"


@pytest.mark.usefixtures("_notebook_env")
def test_demo_notebook_runs(tmp_path):
  notebook = nbformat.read(NOTEBOOK, as_version=4)
  NotebookClient(
    notebook, timeout=900, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
  ).execute()
  work = tmp_path / "work"
  assert Image.open(work / "generation.gif").n_frames > 1
  assert len(list((work / "samples").glob("*.png"))) == 10
  assert len(list((work / "inpainted").glob("*.png"))) == 4
  # The sample grid, the generation frame by frame and the inpainting grid as PNG; the animation as GIF.
  assert len(_pictures(notebook)) >= 3 and len(_pictures(notebook, "image/gif")) == 1
  text = _text(notebook)
  assert "step 3: loss" in text and "regenerating 16 of 64 pixels" in text
  # The install cell found this machine's runtime and installed nothing: fractal-jax is importable here.
  assert f"runtime: {_host_runtime()}; fractal-jax is importable: nothing installed" in text
  assert "runs on CPU" in text or _host_runtime() != "CPU"


def test_stored_outputs_are_the_demos():
  """The notebook is stored with the outputs of a full demo run (GitHub shows them), and stays small."""
  assert NOTEBOOK.stat().st_size < 2_000_000
  notebook = nbformat.read(NOTEBOOK, as_version=4)
  nbformat.validate(notebook)
  code = [cell for cell in notebook.cells if cell.cell_type == "code"]
  running = [c for c in code if re.search(r"^\s*(fractal\(|RUNTIME = detect_runtime\(\))", c.source, re.MULTILINE)]
  assert len(running) == 4 and all(cell.get("outputs") for cell in running), "install, train, sample, edit"
  text = _text(notebook)
  assert "nothing installed" in text and "Traceback" not in text
  assert "--config.train.num_steps=3" not in text, "stored from a FAST run: run it fully (see the README)"
  assert "final evaluation: bits_per_dim" in text and "regenerating 16 of 64 pixels" in text
  pictures = _pictures(notebook)
  assert len(pictures) >= 3 and len(_pictures(notebook, "image/gif")) == 1
  for picture in pictures:
    assert Image.open(io.BytesIO(base64.b64decode(picture))).format == "PNG"


def test_repository_url_has_one_home():
  """The badge and the notebook's REPO_URL default are those of setup.py's REPO_URL (launch/set_repo_url.py)."""
  tool = _set_repo_url()
  url = tool.repo_url()
  link = tool.colab_link(url)
  assert link.startswith("https://colab.research.google.com/github/") and link.endswith(
    "/blob/main/notebooks/demo.ipynb"
  )
  notebook = nbformat.read(NOTEBOOK, as_version=4)
  first, parameters = notebook.cells[0].source, notebook.cells[1].source
  assert first.startswith(f"[![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)]({link})")
  assert f'REPO_URL = os.environ.get("FRACTAL_JAX_REPO", "{url}")' in parameters
  assert "REPO_URL" in first and "setup.py" in first  # the one line to set, and its home
  for path in tool.files():  # every copy (notebook, README, docs) agrees: `set_repo_url.py --check`
    text = path.read_text(encoding="utf-8")
    assert tool.synced(text, url) == text, f"{path}: run python launch/set_repo_url.py"
  # launch/tpu_vm.sh clones the same by default.
  shown = subprocess.run(["bash", ROOT / "launch" / "tpu_vm.sh", "install", "--help"], capture_output=True, text=True)
  assert f"now {url}" in shown.stdout


def test_set_repo_url_rewrites_every_copy():
  tool = _set_repo_url()
  notebook = NOTEBOOK.read_text(encoding="utf-8")
  new = tool.synced(notebook, "https://github.com/someone/fractal-jax.git")
  assert "YOUR_GITHUB_USER/fractal-jax" not in new
  assert "https://colab.research.google.com/github/someone/fractal-jax/blob/main/notebooks/demo.ipynb" in new
  assert 'os.environ.get(\\"FRACTAL_JAX_REPO\\", \\"https://github.com/someone/fractal-jax.git\\")' in new
  nbformat.validate(nbformat.reads(new, as_version=4))
  with pytest.raises(SystemExit, match="not https://github.com/OWNER/NAME"):
    tool.colab_link("https://gitlab.com/someone/fractal-jax")


def _install_functions():
  """detect_runtime, install_command and JAX_BUILD of the notebook's install cell (its definitions only)."""
  cell = next(c for c in nbformat.read(NOTEBOOK, as_version=4).cells if "def detect_runtime" in c.source)
  tree = ast.parse(cell.source)

  def wanted(node):
    if isinstance(node, ast.Import):
      return not any(alias.name.startswith("fractal_jax") for alias in node.names)
    if isinstance(node, ast.Assign):
      return [getattr(t, "id", None) for t in node.targets] == ["JAX_BUILD"]
    return isinstance(node, ast.FunctionDef)

  tree.body = [node for node in tree.body if wanted(node)]
  namespace = {"os": os}
  exec(compile(tree, "install cell", "exec"), namespace)
  return namespace


@pytest.mark.parametrize(
  ("smi", "devices", "env", "expected", "build"),
  [
    (0, [], {}, "gpu", ["jax[cuda12]"]),  # nvidia-smi lists a GPU
    (9, [], {}, "cpu", []),  # nvidia-smi present but no GPU (driver only)
    (None, ["/dev/accel0"], {}, "tpu", ["jax[tpu]"]),  # TPU v4
    (None, ["/dev/vfio/0"], {}, "tpu", ["jax[tpu]"]),  # TPU v5e / v6e
    (None, [], {"COLAB_TPU_ADDR": "10.0.0.2:8470"}, "tpu", ["jax[tpu]"]),
    (None, [], {"TPU_NAME": "local"}, "tpu", ["jax[tpu]"]),
    (None, [], {}, "cpu", []),
  ],
)
def test_install_cell_picks_the_jax_build(monkeypatch, smi, devices, env, expected, build):
  functions = _install_functions()
  monkeypatch.delenv("COLAB_TPU_ADDR", raising=False)
  monkeypatch.delenv("TPU_NAME", raising=False)
  for key, value in env.items():
    monkeypatch.setenv(key, value)
  functions["shutil"] = types.SimpleNamespace(which=lambda name: None if smi is None else "/usr/bin/nvidia-smi")
  functions["subprocess"] = types.SimpleNamespace(run=lambda *a, **k: types.SimpleNamespace(returncode=smi))
  functions["glob"] = types.SimpleNamespace(glob=lambda pattern: fnmatch.filter(devices, pattern))
  assert functions["detect_runtime"]() == expected
  command = functions["install_command"](expected, "fractal-jax")
  assert command[1:] == ["-m", "pip", "install", "-q", "-c", "fractal-jax/constraints.txt", "-e", "fractal-jax", *build]
