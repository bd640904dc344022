"""Command-line entry point: `python -m fractal_jax.main --config=<file> --mode=<mode>`.

Hyper-parameters live in the config file and are overridden as
`--config.<field>=<value>` (tuples as `--config.model.depths="(4,2,1)"`);
run-specific I/O and selection flags are top-level. Every input is checked
before anything is compiled; a bad one ends the run with `error: ...` and
exit status 2.

Modes available now: summary.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence

from absl import app, flags
from ml_collections import config_flags

from fractal_jax import model_config

_CONFIG = config_flags.DEFINE_config_file(
  "config", None, "Config file, e.g. configs/fractalar_64.py (see configs/).", lock_config=True
)
_MODE = flags.DEFINE_enum("mode", "summary", ["summary"], "What to run.")
_NO_FLOPS = flags.DEFINE_bool("no_flops", False, "summary: skip the FLOP count (parameters only, faster).")
flags.mark_flags_as_required(["config"])


def run_summary(config) -> None:
  from fractal_jax import summary  # imports jax: keep `--help` fast

  model_settings = model_config.settings(config.model)
  rows = summary.summarize(model_settings, with_flops=not _NO_FLOPS.value)
  side = model_settings.img_size
  print(
    f"fractal model: {side}x{side} images, {len(model_settings.levels) + 1} levels, "
    f"{model_settings.num_classes} classes, compute {model_settings.dtype}"
  )
  print(summary.format_table(rows))
  print(f"parameters: {rows[-1].params:,}")


MODES: dict[str, Callable] = {"summary": run_summary}


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  config = _CONFIG.value
  try:
    model_config.validate(config.model)
    MODES[_MODE.value](config)
  except model_config.ConfigError as error:
    print(f"error: {error}", file=sys.stderr)
    sys.exit(2)


def run() -> None:
  app.run(main)


if __name__ == "__main__":
  run()
