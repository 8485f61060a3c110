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
