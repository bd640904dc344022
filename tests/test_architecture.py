"""The package layout and its import contracts: the tree shows the layers, and imports only go down them.

Layers, bottom to top (a package may import its own modules and those of the
packages listed for it, nothing else of fractal_jax):

    config, cpu_tuning      settings and process set-up (no fractal_jax imports)
    model                   the Flax model and its loss
    parallel, io, data      meshes and shardings; checkpoint and image files; input pipelines
    sampling                compiled samplers
    evaluation              NLL, Inception features and image metrics
    train                   the training step and loop
    modes                   one thin module per --mode, imported by main only
    main, convert           entry points

Read from the source with `ast` (imports inside functions count too).
"""

from __future__ import annotations

import ast
import pathlib

import pytest
from conftest import ROOT

PACKAGE = ROOT / "fractal_jax"
TOP_LEVEL_MODULES = {"__init__", "main", "convert", "config", "cpu_tuning"}
ALLOWED: dict[str, set[str]] = {
  "config": set(),
  "cpu_tuning": set(),
  "model": {"config"},
  "parallel": {"config", "model"},
  "io": {"config", "model"},
  "data": {"config"},
  "sampling": {"config", "model", "parallel", "io"},
  "evaluation": {"config", "model", "parallel", "io", "data", "sampling"},
  "train": {"config", "model", "parallel", "io", "data", "sampling", "evaluation"},
  "modes": {"config", "model", "parallel", "io", "data", "sampling", "evaluation", "train"},
  "main": {"config", "cpu_tuning", "model", "parallel", "io", "data", "sampling", "evaluation", "train", "modes"},
  "convert": {"config", "model", "io"},
  "__init__": set(),
}


def _unit(module: str) -> str:
  """`fractal_jax.model.blocks` -> "model"; `fractal_jax.main` -> "main"."""
  return module.split(".")[1]


def _imports(path: pathlib.Path) -> list[tuple[int, str]]:
  """(line, module) of every fractal_jax import in a file; `from fractal_jax import x` counts as fractal_jax.x."""
  found = []
  for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
    if isinstance(node, ast.Import):
      found += [(node.lineno, alias.name) for alias in node.names if alias.name.startswith("fractal_jax.")]
    elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
      if node.module == "fractal_jax":
        found += [(node.lineno, f"fractal_jax.{alias.name}") for alias in node.names]
      elif node.module.startswith("fractal_jax."):
        found.append((node.lineno, node.module))
  return found


def _modules() -> list[pathlib.Path]:
  return sorted(PACKAGE.rglob("*.py"))


def test_the_top_level_holds_only_entry_points_config_and_cpu_set_up():
  top = {path.stem for path in PACKAGE.glob("*.py")}
  assert top <= TOP_LEVEL_MODULES, f"modules to move into a subpackage: {sorted(top - TOP_LEVEL_MODULES)}"


def test_subpackages_are_one_level_deep_and_known():
  packages = {path.parent.relative_to(PACKAGE) for path in _modules() if path.parent != PACKAGE}
  assert all(len(p.parts) == 1 for p in packages), f"nested packages: {sorted(map(str, packages))}"
  assert {p.parts[0] for p in packages} <= set(ALLOWED), f"packages without a contract: {sorted(map(str, packages))}"


@pytest.mark.parametrize("path", _modules(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_imports_only_go_down_the_layers(path):
  relative = path.relative_to(PACKAGE)
  unit = relative.parts[0] if len(relative.parts) > 1 else relative.stem
  bad = [
    f"line {line}: {module}"
    for line, module in _imports(path)
    if _unit(module) != unit and _unit(module) not in ALLOWED[unit]
  ]
  assert not bad, f"{relative} ({unit}) may import only {sorted(ALLOWED[unit])} of fractal_jax: {bad}"


def test_modes_are_imported_by_main_only():
  """A mode is an entry point's piece: shared work lives in the library, not in another mode."""
  bad = [
    f"{path.relative_to(PACKAGE)} line {line}: {module}"
    for path in _modules()
    if path.relative_to(PACKAGE) != pathlib.Path("main.py")
    for line, module in _imports(path)
    if _unit(module) == "modes"
  ]
  assert not bad, f"only fractal_jax/main.py may import fractal_jax.modes: {bad}"


def test_the_checker_sees_a_violation(tmp_path):
  """The test has teeth: a model module importing the trainer is caught."""
  module = tmp_path / "fake.py"
  module.write_text("from fractal_jax.train import trainer\nfrom fractal_jax import modes\n")
  units = [_unit(name) for _, name in _imports(module)]
  assert units == ["train", "modes"] and not set(units) <= ALLOWED["model"]
