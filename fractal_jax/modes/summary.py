"""`--mode=summary`: a table of the levels with parameters and forward FLOPs (`fractal_jax.model.costs`)."""

from __future__ import annotations

from fractal_jax.model import costs
from fractal_jax.model.costs import LevelRow
from fractal_jax.model.model_config import ModelSettings


def print_summary(model_settings: ModelSettings, with_flops: bool = True) -> None:
  """Prints the model's shape, the per-level table (`format_table`) and the parameter count."""
  rows = costs.summarize(model_settings, with_flops=with_flops)
  side = model_settings.img_size
  print(
    f"fractal model: {side}x{side} images, {len(model_settings.levels) + 1} levels, "
    f"{model_settings.num_classes} classes, compute {model_settings.dtype}"
  )
  print(format_table(rows))
  print(f"parameters: {rows[-1].params:,}")


def format_table(rows: list[LevelRow]) -> str:
  """The rows of `costs.summarize` as a text table, the total under a rule."""
  header = ("level", "type", "seq", "patch", "width", "depth", "heads", "items/img", "params", "GFLOPs/img")
  lines = []
  for r in rows:
    if r.name == "total":
      cells = (r.name, "", "", "", "", "", "", "", f"{r.params:,}", f"{r.gflops_per_image:.2f}")
    elif r.kind == "table":
      cells = (r.name, "", "", "", str(r.width), "", "", "", f"{r.params:,}", "")
    else:
      cells = (
        r.name,
        r.kind,
        str(r.seq_len),
        str(r.patch_size),
        str(r.width),
        str(r.depth),
        str(r.heads),
        f"{r.items_per_image:,}",
        f"{r.params:,}",
        f"{r.gflops_per_image:.2f}",
      )
    lines.append(cells)
  widths = [max(len(c) for c in col) for col in zip(header, *lines)]
  fmt = lambda cells: "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths)))  # noqa: E731
  rule = "-" * (sum(widths) + 2 * (len(widths) - 1))
  return "\n".join([fmt(header), rule] + [fmt(c) for c in lines[:-1]] + [rule, fmt(lines[-1])])
