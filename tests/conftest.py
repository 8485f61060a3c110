"""Shared fixtures: one tiny random llama (with its tokenizer) built once per test session."""

from __future__ import annotations

import loreft.backend

loreft.backend.setup()  # first, as the CLI does: the fast BLAS loads before any test module imports mlx.core

import pytest


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """Path of a tiny mlx-lm llama folder (hidden 64, 4 layers, 4 heads) that mlx_lm.load reads offline."""
    from loreft.demo import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny_llama"), model_type="llama", seed=0)


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_model_dir):
    """The tiny model's tokenizer as mlx_lm.load returns it (a TokenizerWrapper, with a chat template)."""
    from mlx_lm.tokenizer_utils import load

    return load(tiny_model_dir)


@pytest.fixture(scope="session")
def examples(tiny_model_dir, tiny_tokenizer):
    """The demo rows tokenized for the tiny model (its prompt / completion templates), and its pad id."""
    from loreft.data import Formatter, pad_id_for, tokenize_rows
    from loreft.demo import DEMO_COMPLETION_TEMPLATE, DEMO_PROMPT_TEMPLATE, DEMO_ROWS

    fmt = Formatter(tiny_tokenizer, prompt_template=DEMO_PROMPT_TEMPLATE, completion_template=DEMO_COMPLETION_TEMPLATE)
    ex, _ = tokenize_rows(DEMO_ROWS, fmt, tiny_tokenizer, 128)
    return ex, pad_id_for(tiny_tokenizer)
