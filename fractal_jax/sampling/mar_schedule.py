"""The MAR sampling schedule, computed on the host like the official code.

With T iterations over L patches and a random order per sample, step t
predicts the patches at order positions `[lo_t, hi_t)`: after step t the
first `mask_len_t` positions of the order stay hidden, where

    mask_len_t = max(1, min(hidden_before_t - 1, floor(L * cos(pi/2 * (t+1) / T))))

in float64 (NumPy), exactly as the official code; float32 gives a different
schedule for about one (L, T) pair in ten. The last step predicts all that
remain (`lo = 0`), and a `num_iter` above L is clamped to L. The counts are
the same for every sample, so the schedule is a set of static constants.
"""

from __future__ import annotations

import dataclasses
import math
import warnings

import numpy as np


@dataclasses.dataclass(frozen=True)
class MarSchedule:
  seq_len: int
  num_iter: int
  lo: tuple[int, ...]  # first order position predicted at step t
  hi: tuple[int, ...]  # one past the last; hi[0] = L, hi[t] = lo[t-1]
  mask_len: tuple[int, ...]  # the clamped count of the official code (>= 1, even on the last step)

  @property
  def counts(self) -> tuple[int, ...]:
    return tuple(high - low for low, high in zip(self.lo, self.hi))

  def cfg_scale(self, cfg: float, step: int, schedule: str) -> float:
    """Level-0 guidance at `step`: "linear" uses the clamped count, never reaching cfg."""
    if schedule == "linear":
      return 1.0 + (cfg - 1.0) * (self.seq_len - self.mask_len[step]) / self.seq_len
    return cfg


def clamp_num_iter(seq_len: int, num_iter: int, level: int | None = None) -> int:
  """The official `min(L, num_iter)`, with a warning when it changes the value."""
  if num_iter > seq_len:
    where = f" at level {level}" if level is not None else ""
    warnings.warn(f"num_iter={num_iter}{where} exceeds the sequence length {seq_len}; using {seq_len}", stacklevel=2)
    return seq_len
  return num_iter


def mar_schedule(seq_len: int, num_iter: int) -> MarSchedule:
  if num_iter < 1:
    raise ValueError(f"num_iter must be >= 1, got {num_iter}")
  num_iter = min(seq_len, num_iter)
  lo, hi, mask_lens = [], [], []
  hidden = seq_len
  for step in range(num_iter):
    ratio = np.cos(math.pi / 2.0 * (step + 1) / num_iter)  # float64
    mask_len = int(max(1, min(hidden - 1, np.floor(seq_len * ratio))))
    last = step >= num_iter - 1
    lo.append(0 if last else mask_len)
    hi.append(hidden)
    mask_lens.append(mask_len)
    hidden = mask_len
  return MarSchedule(seq_len, num_iter, tuple(lo), tuple(hi), tuple(mask_lens))
