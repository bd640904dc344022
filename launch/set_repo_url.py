"""Copies REPO_URL from setup.py (the repository URL's one home) to where a copy must be literal.

`python launch/set_repo_url.py` rewrites, from setup.py's `REPO_URL = "https://github.com/OWNER/NAME"`:

* the "Open in Colab" links (https://colab.research.google.com/github/OWNER/NAME/blob/BRANCH/notebooks/demo.ipynb)
  in notebooks/demo.ipynb, README.md and docs/*.md: Colab opens the notebook from GitHub, before any checkout;
* the notebook's default `REPO_URL = os.environ.get("FRACTAL_JAX_REPO", "...")`, which its install cell clones.

`--check` changes nothing and exits 1 if a copy differs (tests/test_notebook.py checks the same).
launch/tpu_vm.sh reads setup.py itself.
"""

from __future__ import annotations

import argparse
import pathlib
import re
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
NOTEBOOK = "notebooks/demo.ipynb"
BRANCH = "main"  # the branch the badge opens (launch/tpu_vm.sh clones main by default too)
PLACEHOLDER_OWNER = "YOUR_GITHUB_USER"

_SETUP_LINE = re.compile(r'^REPO_URL = "([^"]+)"$', re.MULTILINE)
_COLAB_LINK = re.compile(r"https://colab\.research\.google\.com/github/[^\s)\"'\\]+?/notebooks/demo\.ipynb")
_NOTEBOOK_DEFAULT = re.compile(r'(os\.environ\.get\(\\"FRACTAL_JAX_REPO\\", \\")([^"\\]*)(\\"\))')


def repo_url(root: pathlib.Path = ROOT) -> str:
  """REPO_URL as setup.py sets it."""
  match = _SETUP_LINE.search((root / "setup.py").read_text(encoding="utf-8"))
  if not match:
    raise SystemExit(f'error: no line REPO_URL = "https://github.com/OWNER/NAME" in {root / "setup.py"}')
  return match.group(1)


def colab_link(url: str) -> str:
  """The Colab address that opens the notebook of the GitHub repository at `url`."""
  match = re.fullmatch(r"https://github\.com/([^/\s]+)/([^/\s]+?)(?:\.git)?/?", url)
  if not match:
    raise SystemExit(f"error: REPO_URL={url!r} is not https://github.com/OWNER/NAME: Colab opens notebooks from GitHub")
  return f"https://colab.research.google.com/github/{match.group(1)}/{match.group(2)}/blob/{BRANCH}/{NOTEBOOK}"


def files(root: pathlib.Path = ROOT) -> list[pathlib.Path]:
  """The files that may hold a copy: the notebook, README.md and docs/*.md."""
  candidates = [root / NOTEBOOK, root / "README.md", *sorted((root / "docs").glob("*.md"))]
  return [path for path in candidates if path.is_file()]


def synced(text: str, url: str) -> str:
  """`text` with every Colab link and the notebook's REPO_URL default set from `url`."""
  text = _COLAB_LINK.sub(colab_link(url), text)
  return _NOTEBOOK_DEFAULT.sub(lambda m: m.group(1) + url + m.group(3), text)


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--check", action="store_true", help="change nothing; exit 1 if a copy differs")
  args = parser.parse_args(argv)
  url = repo_url()
  stale = []
  for path in files():
    text = path.read_text(encoding="utf-8")
    new = synced(text, url)
    if new != text:
      stale.append(path.relative_to(ROOT))
      if not args.check:
        path.write_text(new, encoding="utf-8")
  verb = "differ from" if args.check else "now use"
  print(f"{', '.join(map(str, stale)) or 'no file'} {verb} REPO_URL = {url}")
  if PLACEHOLDER_OWNER in url:
    print(f"note: {url} is a placeholder: set the real URL in setup.py's REPO_URL line, then run this again")
  return 1 if args.check and stale else 0


if __name__ == "__main__":
  sys.exit(main())
