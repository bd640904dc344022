"""The process settings of `cpu_tuning` (XLA flags are only edited, never read back here)."""

from __future__ import annotations

import pytest

from fractal_jax import cpu_tuning

FLAG = "--xla_cpu_prefer_vector_width=512"


@pytest.fixture
def avx512(monkeypatch):
  monkeypatch.setattr(cpu_tuning, "_has_avx512", lambda: True)
  monkeypatch.delenv("FRACTAL_JAX_CPU_TUNING", raising=False)


def test_wide_vectors_added_to_existing_flags(avx512, monkeypatch):
  monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
  assert cpu_tuning.prefer_wide_vectors()
  assert cpu_tuning.os.environ["XLA_FLAGS"] == f"--xla_force_host_platform_device_count=8 {FLAG}"
  assert not cpu_tuning.prefer_wide_vectors()  # once only
  assert cpu_tuning.os.environ["XLA_FLAGS"].count("prefer_vector_width") == 1


def test_wide_vectors_respect_the_user(avx512, monkeypatch):
  monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_prefer_vector_width=256")
  assert not cpu_tuning.prefer_wide_vectors()
  assert cpu_tuning.os.environ["XLA_FLAGS"] == "--xla_cpu_prefer_vector_width=256"
  monkeypatch.setenv("XLA_FLAGS", "")
  monkeypatch.setenv("FRACTAL_JAX_CPU_TUNING", "0")
  assert not cpu_tuning.prefer_wide_vectors() and not cpu_tuning.keep_freed_memory()
  assert cpu_tuning.os.environ["XLA_FLAGS"] == ""


def test_no_wide_vectors_without_avx512(monkeypatch):
  monkeypatch.setattr(cpu_tuning, "_has_avx512", lambda: False)
  monkeypatch.delenv("FRACTAL_JAX_CPU_TUNING", raising=False)
  monkeypatch.delenv("XLA_FLAGS", raising=False)
  assert not cpu_tuning.prefer_wide_vectors()
  assert "XLA_FLAGS" not in cpu_tuning.os.environ


@pytest.mark.parametrize(
  "platforms, accelerator, applied",
  [("cpu", True, True), ("tpu", False, False), ("cuda,cpu", False, False), ("", True, False), ("", False, True)],
)
def test_only_runs_that_compute_on_the_cpu_are_tuned(avx512, monkeypatch, platforms, accelerator, applied):
  """JAX_PLATFORMS decides when set; otherwise a TPU or GPU device file means JAX will not compute on the CPU."""
  monkeypatch.setenv("JAX_PLATFORMS", platforms)
  monkeypatch.setenv("XLA_FLAGS", "")
  monkeypatch.setattr(cpu_tuning, "accelerator_present", lambda: accelerator)
  assert cpu_tuning.prefer_wide_vectors() == applied
  assert (FLAG in cpu_tuning.os.environ["XLA_FLAGS"]) == applied
