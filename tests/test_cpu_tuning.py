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
