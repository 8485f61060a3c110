"""The CUDA graph-size default (loreft.cuda): which GPUs get it, and that a user's own setting wins.

This machine has no GPU: the CUDA queries are replaced with what MLX reports for the named GPUs.
"""

from __future__ import annotations

import pytest

import loreft.cuda as cuda

VAR = "MLX_MAX_OPS_PER_BUFFER"


def fake_gpu(monkeypatch, architecture: str | None):
    monkeypatch.setattr(cuda.mx.cuda, "is_available", lambda: architecture is not None)
    monkeypatch.setattr(cuda.mx, "device_info", lambda *a: {"architecture": architecture} if architecture else {})


@pytest.mark.parametrize("architecture", ["sm_90", "sm_100", "sm_120"])
def test_raised_where_mlx_picks_100_ops(monkeypatch, architecture):
    monkeypatch.delenv(VAR, raising=False)
    fake_gpu(monkeypatch, architecture)
    assert cuda.tune_cuda_graphs() is True
    assert int(cuda.os.environ[VAR]) == 400


@pytest.mark.parametrize("architecture", [None, "sm_80", "sm_121"])  # no CUDA; A100 and DGX Spark keep MLX's own
def test_left_alone_elsewhere(monkeypatch, architecture):
    monkeypatch.delenv(VAR, raising=False)
    fake_gpu(monkeypatch, architecture)
    assert cuda.tune_cuda_graphs() is False
    assert VAR not in cuda.os.environ


def test_users_setting_wins(monkeypatch):
    monkeypatch.setenv(VAR, "50")
    fake_gpu(monkeypatch, "sm_90")
    assert cuda.tune_cuda_graphs() is False
    assert cuda.os.environ[VAR] == "50"


# ---------------------------------------------------------------- the kernel cache folder

CACHE_VAR = "MLX_PTX_CACHE_DIR"


def test_kernel_cache_defaults_under_the_users_cache(monkeypatch, tmp_path):
    for var in (CACHE_VAR, "LOREFT_CACHE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    fake_gpu(monkeypatch, "sm_90")
    path = cuda.default_kernel_cache()
    assert path == cuda.os.environ[CACHE_VAR]
    assert path.startswith(str(tmp_path / "mlx-loreft"))
    assert cuda.mx.__version__ in path  # kernels compiled by another MLX version are never reused


def test_kernel_cache_follows_loreft_cache_and_home(monkeypatch, tmp_path):
    monkeypatch.delenv(CACHE_VAR, raising=False)
    monkeypatch.setenv("LOREFT_CACHE", str(tmp_path / "own"))
    fake_gpu(monkeypatch, "sm_90")
    assert cuda.default_kernel_cache().startswith(str(tmp_path / "own"))
    monkeypatch.delenv(CACHE_VAR)
    monkeypatch.delenv("LOREFT_CACHE")
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cuda.default_kernel_cache().startswith(str(tmp_path / "home" / ".cache" / "mlx-loreft"))


def test_kernel_cache_users_setting_wins_and_no_cuda_leaves_it(monkeypatch, tmp_path):
    monkeypatch.setenv(CACHE_VAR, str(tmp_path / "mine"))
    fake_gpu(monkeypatch, "sm_90")
    assert cuda.default_kernel_cache() is None
    assert cuda.os.environ[CACHE_VAR] == str(tmp_path / "mine")
    monkeypatch.delenv(CACHE_VAR)
    fake_gpu(monkeypatch, None)
    assert cuda.default_kernel_cache() is None
    assert CACHE_VAR not in cuda.os.environ
