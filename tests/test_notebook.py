"""notebooks/demo.ipynb runs headless (FAST: no install, a few training steps of a tiny model) and makes its pictures."""

from __future__ import annotations

import os

import nbformat
import pytest
from conftest import ROOT
from nbclient import NotebookClient
from PIL import Image


@pytest.fixture(autouse=True)
def _notebook_env(tmp_path, monkeypatch):
  monkeypatch.setenv("FRACTAL_DEMO_FAST", "1")
  monkeypatch.setenv("FRACTAL_DEMO_WORKDIR", str(tmp_path / "work"))
  monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))


def test_demo_notebook_runs(tmp_path):
  notebook = nbformat.read(ROOT / "notebooks" / "demo.ipynb", as_version=4)
  assert all(not cell.get("outputs") for cell in notebook.cells if cell.cell_type == "code"), "commit it cleared"
  NotebookClient(
    notebook, timeout=900, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
  ).execute()
  work = tmp_path / "work"
  assert Image.open(work / "generation.gif").n_frames > 1
  assert len(list((work / "samples").glob("*.png"))) == 10
  assert len(list((work / "inpainted").glob("*.png"))) == 4
  shown = [o for cell in notebook.cells for o in cell.get("outputs", []) if "image/png" in o.get("data", {})]
  assert len(shown) >= 2  # the sample grid and the inpainting grid are displayed
  text = "".join(o.get("text", "") for cell in notebook.cells for o in cell.get("outputs", []))
  assert "step 3: loss" in text and "regenerating 16 of 64 pixels" in text
