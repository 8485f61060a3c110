"""Process settings under mlx.launch: CUDA graphs off for several NCCL ranks, untouched everywhere else."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from loreft.launch import CUDA_GRAPHS_ENV, plain_streams_for_nccl


@pytest.fixture
def env(monkeypatch):
    for name in ("NCCL_HOST_IP", "MLX_WORLD_SIZE", CUDA_GRAPHS_ENV):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def test_two_nccl_ranks_turn_cuda_graphs_off(env):
    env.setenv("NCCL_HOST_IP", "10.0.0.1")
    env.setenv("MLX_WORLD_SIZE", "2")
    assert plain_streams_for_nccl() is True
    assert os.environ[CUDA_GRAPHS_ENV] == "0"


def test_a_users_choice_wins(env):
    env.setenv("NCCL_HOST_IP", "10.0.0.1")
    env.setenv("MLX_WORLD_SIZE", "4")
    env.setenv(CUDA_GRAPHS_ENV, "1")
    assert plain_streams_for_nccl() is False
    assert os.environ[CUDA_GRAPHS_ENV] == "1"


@pytest.mark.parametrize("setting", [{}, {"MLX_WORLD_SIZE": "2"}, {"NCCL_HOST_IP": "10.0.0.1", "MLX_WORLD_SIZE": "1"},
                                     {"NCCL_HOST_IP": "10.0.0.1", "MLX_WORLD_SIZE": "two"}])
def test_one_process_or_another_backend_keeps_graphs(env, setting):
    for name, value in setting.items():
        env.setenv(name, value)
    assert plain_streams_for_nccl() is False
    assert CUDA_GRAPHS_ENV not in os.environ


def test_importing_loreft_applies_it_before_any_kernel():
    code = "import os, loreft; print(loreft.CUDA_GRAPHS_OFF, os.environ.get('MLX_USE_CUDA_GRAPHS'))"
    base = {k: v for k, v in os.environ.items() if k not in ("NCCL_HOST_IP", "MLX_WORLD_SIZE", CUDA_GRAPHS_ENV)}
    ranks = subprocess.run([sys.executable, "-c", code], env={**base, "NCCL_HOST_IP": "10.0.0.1", "MLX_WORLD_SIZE": "2"},
                           capture_output=True, text=True, check=True)
    alone = subprocess.run([sys.executable, "-c", code], env=base, capture_output=True, text=True, check=True)
    assert ranks.stdout.split() == ["True", "0"]
    assert alone.stdout.split() == ["False", "None"]
