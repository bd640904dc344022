"""The README and docs/*.md cannot go stale silently: the files and modules they name exist, the command lines they
show use real flags, and the figures that come from a command (the models table's parameter counts, the
`--mode=summary` table) are what the code computes now. Also: the `fractal-jax` console script's --help.
"""

from __future__ import annotations

import ast
import contextlib
import io
import os
import re
import shlex
import shutil
import subprocess
import sys

import pytest
from conftest import ROOT
from test_config import OFFICIAL_COUNTS

from fractal_jax.config import load_config_file
from fractal_jax.model import fractal, model_config

README = ROOT / "README.md"
DOCS = [README, *sorted((ROOT / "docs").glob("*.md"))]

# A repository path: one of these top-level folders, then path characters, ending in a word character or "/";
# not preceded by a path character (so URLs and <workdir>/... do not count). configs may carry a `:arg`.
_PATH = re.compile(
  r"(?<![\w./<>-])((?:fractal_jax|configs|docs|benchmarks|launch|tests|notebooks)/[\w./-]*[\w/]|\.ci/run)"
  r"(:[a-z_]+)?"
)
_MODULE = re.compile(r"(?<![\w./-])fractal_jax(?:\.\w+)+")


def _text(path):
  return path.read_text(encoding="utf-8")


def _code_blocks(text, languages=("bash", "console", "python", "")):
  return [body for lang, body in re.findall(r"```(\w*)\n(.*?)```", text, re.DOTALL) if lang in languages]


def _paths(text):
  return {(m.group(1), m.group(2)) for m in _PATH.finditer(text)}


def test_path_pattern_reads_what_the_docs_write():
  sample = (
    "`fractal_jax/model/fractal.py`, (`configs/fractalmar_256.py:large`), [x](docs/performance.md), "
    "tests/fixtures/ and .ci/run; not https://host/a/notebooks/demo.ipynb, <workdir>/checkpoints/ or gs://b/docs/x."
  )
  assert _paths(sample) == {
    ("fractal_jax/model/fractal.py", None),
    ("configs/fractalmar_256.py", ":large"),
    ("docs/performance.md", None),
    ("tests/fixtures/", None),
    (".ci/run", None),
  }


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_named_path_exists(doc):
  missing = []
  for path, arg in sorted(_paths(_text(doc)), key=str):
    target = ROOT / path
    if not target.exists():
      missing.append(path)
    elif arg:  # a config with an argument: it must accept it
      load_config_file(f"{target}{arg}")
  assert not missing, f"{doc.name} names files that are not in the repository: {missing}"
  assert doc != README or len(_paths(_text(doc))) >= 30  # the pattern still finds the README's paths


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_named_module_exists(doc):
  """`fractal_jax.a.b` names a module, or a module and one of its top-level names."""
  missing = []
  for dotted in sorted(set(_MODULE.findall(_text(doc)))):
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
      base = ROOT.joinpath(*parts[:cut])
      source = base.with_suffix(".py") if base.with_suffix(".py").is_file() else base / "__init__.py"
      if source.is_file():
        rest = parts[cut:]
        defined = not rest or (
          len(rest) == 1 and re.search(rf"^(?:def |class )?{rest[0]}\b", _text(source), re.MULTILINE)
        )
        if not defined:
          missing.append(dotted)
        break
    else:
      missing.append(dotted)
  assert not missing, f"{doc.name} names modules that are not in the repository: {missing}"


# ------------------------------------------------------------------------------------------ command lines


def _defined_flags(module_path):
  """{flag name: enum values or None} of the absl flags a module defines (read from its source, not imported)."""
  flags = {}
  for node in ast.walk(ast.parse(_text(module_path))):
    if (
      isinstance(node, ast.Call)
      and isinstance(node.func, ast.Attribute)
      and node.func.attr.startswith("DEFINE_")
      and node.args
      and isinstance(node.args[0], ast.Constant)
    ):
      values = None
      if node.func.attr == "DEFINE_enum" and len(node.args) > 2:
        values = [ast.literal_eval(v) for v in node.args[2].elts]
      flags[node.args[0].value] = values
    if isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "define_config_flag":
      flags["config"] = None  # config.define_config_flag: ml_collections' --config with our file loader
  return flags


def _command_lines(text, program):
  """The command lines of the code blocks that run `python -m <program>`, continuation lines joined."""
  lines = []
  for block in _code_blocks(text, ("bash", "")):
    for line in block.replace("\\\n", " ").splitlines():
      line = line.strip()
      if line.startswith(f"python -m {program} "):
        lines.append(shlex.split(line, comments=True))
  return lines


def _check_override(word, config):
  node = config
  for part in word.split("=", 1)[0].removeprefix("--config.").split("."):
    assert hasattr(node, "keys") and part in node.keys(), f"{word}: no such config field"
    node = node[part]


@pytest.mark.parametrize("program", ["fractal_jax.main", "fractal_jax.convert"])
def test_readme_commands_use_real_flags(program):
  defined = _defined_flags(ROOT.joinpath(*program.split(".")).with_suffix(".py"))
  commands = _command_lines(_text(README), program)
  assert len(commands) >= (8 if program.endswith("main") else 2), commands
  for words in commands:
    config = None
    for word in words[3:]:
      name, _, value = word.removeprefix("--").partition("=")
      assert word.startswith("--"), f"{shlex.join(words)}: {word} is not a flag"
      if name.startswith("config."):
        continue  # checked below, against the config the command names
      assert name in defined, f"{shlex.join(words)}: {program} has no flag --{name}"
      if defined[name] is not None:
        assert value in defined[name], f"{shlex.join(words)}: --{name} takes one of {defined[name]}"
      if name == "config":
        config = load_config_file(str(ROOT / value))
    for word in words[3:]:
      if word.startswith("--config."):
        _check_override(word, config)


# ------------------------------------------------------------------------------------------- the figures


def _models_table():
  """The README's models table: one dict per row, keyed by the header's cells."""
  lines = _text(README).splitlines()
  start = next(i for i, line in enumerate(lines) if line.startswith("| config"))
  header = [cell.strip() for cell in lines[start].strip("|").split("|")]
  rows = []
  for line in lines[start + 2 :]:  # after the |---| line
    if not line.startswith("| `configs/"):
      break
    rows.append(dict(zip(header, (cell.strip() for cell in line.strip("|").split("|")), strict=True)))
  return rows


def _numbers(cell):
  return tuple(int(n) for n in cell.split(", "))


def _generators(cell):
  """'AR, AR' or 'MAR x3' -> ('ar', 'ar') or ('mar', 'mar', 'mar')."""
  kinds = []
  for part in cell.split(", "):
    kind, _, times = part.partition(" x")
    kinds += [kind.lower()] * int(times or 1)
  return tuple(kinds)


def test_models_table_matches_the_configs():
  """Every row's parameter count, levels, widths, depths and generators, for each spelling of its config."""
  rows = _models_table()
  assert len(rows) >= len(OFFICIAL_COUNTS) + 2
  for row in rows:
    specs = re.findall(r"`(configs/[^`]+)`", row["config (thin file / definition)"])
    assert specs, row
    expected = int(row["parameters"].replace(",", ""))
    for spec in specs:
      config = load_config_file(str(ROOT / spec))
      count = fractal.count_params(fractal.abstract_params(model_config.settings(config.model)))
      assert count == expected, f"{spec}: {count:,} parameters, the README says {expected:,}"
      assert _numbers(row["levels (image sizes)"]) == tuple(config.model.img_size_list), spec
      assert _numbers(row["widths"]) == tuple(config.model.widths), spec
      assert _numbers(row["depths"]) == tuple(config.model.depths), spec
      assert _generators(row["generators"]) == tuple(config.model.types[:-1]), spec


def test_models_table_counts_are_the_official_ones():
  rows = {row["official name"]: row for row in _models_table()}
  for name, count in OFFICIAL_COUNTS.items():
    row = rows[name.replace("_64", "_in64").replace("_256", "_in256")]
    assert f"`configs/{name}.py`" in row["config (thin file / definition)"]
    assert row["parameters"] == f"{count:,}"


def test_summary_block_is_what_the_command_prints():
  """The pasted `--mode=summary` output, byte for byte (FLOPs come from lowering each level: a few seconds)."""
  from fractal_jax.modes import summary

  match = re.search(
    r"`python -m fractal_jax\.main --config=(\S+) --mode=summary`[^`]*(?:`[^`]*`[^`]*)*?```\n(.*?)```",
    _text(README),
    re.DOTALL,
  )
  assert match, "no `python -m fractal_jax.main --config=... --mode=summary` followed by its output in the README"
  config = load_config_file(str(ROOT / match.group(1)))
  printed = io.StringIO()
  with contextlib.redirect_stdout(printed):
    summary.print_summary(model_config.settings(config.model))
  assert printed.getvalue() == match.group(2), (
    f"the README's summary of {match.group(1)} is stale; the command prints now:\n{printed.getvalue()}"
  )


def test_python_example_runs(monkeypatch):
  """The README's Python API block runs as written (from the repository root) and prints what it says."""
  (block,) = [b for b in _code_blocks(_text(README), ("python",)) if "import jax" in b]
  monkeypatch.chdir(ROOT)
  printed = io.StringIO()
  with contextlib.redirect_stdout(printed):
    exec(compile(block, "README.md", "exec"), {"__name__": "readme_example"})
  out = printed.getvalue().splitlines()
  assert out[0].endswith("bits per dimension") and float(out[0].split()[0]) > 0
  assert out[1] == "(4, 8, 8, 3) uint8"


# ------------------------------------------------------------------------------------------ console script


def _help(command, cwd, env):
  result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=120)
  assert result.returncode == 1, result.stderr  # absl exits 1 after --help
  return result.stdout


def _normalised(help_text):
  """--help output without its module heading line (absl names the flags' module: a path, or the script)."""
  return re.sub(r"^flags:\n\n\S+:\n", "flags:\n\nMODULE:\n", help_text, count=1, flags=re.MULTILINE)


def test_console_script_help_is_the_full_help():
  """`fractal-jax --help` shows what `python -m fractal_jax.main --help` shows: the docstring and every flag."""
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  as_module = _help([sys.executable, "-m", "fractal_jax.main", "--help"], ROOT, env)
  # The console script's code path: `fractal_jax.main.run` called from another __main__ (setup.py entry_points).
  script = "import sys; from fractal_jax.main import run; sys.argv = ['fractal-jax', '--help']; sys.exit(run())"
  as_script = _help([sys.executable, "-c", script], ROOT, env)
  for text in (as_module, as_script):
    assert "Command-line entry point" in text and "--mode" in text and "--checkpoint" in text, text
  assert _normalised(as_script) == _normalised(as_module)
  # The installed script itself, where it runs this checkout (a `pip install -e .` of it, as .ci/run makes).
  installed = shutil.which("fractal-jax", path=os.path.dirname(sys.executable))
  if installed:
    env_outside = {k: v for k, v in env.items() if k != "PYTHONPATH"}
    where = subprocess.run(
      [sys.executable, "-c", "import fractal_jax; print(fractal_jax.__file__)"],
      cwd=os.path.dirname(installed),
      env=env_outside,
      capture_output=True,
      text=True,
    ).stdout.strip()
    if where == str(ROOT / "fractal_jax" / "__init__.py"):
      assert _normalised(_help([installed, "--help"], ROOT, env_outside)) == _normalised(as_module)
