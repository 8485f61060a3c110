"""Evaluation of an adapter: completion loss / perplexity, and exact match after batched greedy generation."""

from __future__ import annotations

import json
import math
import os
import re
import string
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

import mlx.core as mx
import mlx.nn as nn

from .adapter import current_umask
from .config import check_number
from .data import Example, Formatter, RowSource, iterate_batches, pad_id_for, tokenize_rows
from .generate import batch_generate
from .loss import PAD_TO, completion_loss
from .model import Reft

EVAL_FILE = "eval.json"
EXTRA_TOKENS = 8  # generation budget past the reference's length, so a correct answer can still end (EOS)


# ---------------------------------------------------------------------------------------------------
# Loss and perplexity


def evaluate_loss(
    model: nn.Module, examples: Sequence[Example], batch_size: int, *, reft: Reft | None = None, pad_id: int = 0,
    max_batches: int = 0, group: mx.distributed.Group | None = None,
) -> dict:
    """Completion-token loss and perplexity in eval mode; the interventions edit when reft is given.

    group: the processes that share the examples (the default group when None); each scores its share.
    """
    was_training = model.training
    model.eval()
    total, count = mx.array(0.0), mx.array(0.0)
    world = group or mx.distributed.init()
    try:
        # each rank scores its share of every batch; nothing is dropped (ranks need not stay in step here)
        batches = iterate_batches(examples, batch_size, shuffle=False, pad_id=pad_id, pad_to=PAD_TO,
                                  rank=world.rank(), world_size=world.size(), equal_shares=False)
        for i, batch in enumerate(batches):
            if max_batches and i >= max_batches:
                break
            tokens, mask = mx.array(batch.tokens), mx.array(batch.loss_mask())
            if reft is not None:
                reft.set_locations(reft.locations(batch.prompt_lengths))
            s, n = completion_loss(model, tokens, mask)
            total, count = total + s, count + n
            mx.async_eval(total, count)  # queue this batch while the next one is prepared
    finally:
        if reft is not None:
            reft.set_locations(None)
        model.train(was_training)
    if world.size() > 1:  # on the backend's own stream: nccl cannot use mx.cpu
        total, count = mx.distributed.all_sum(total, group=world), mx.distributed.all_sum(count, group=world)
    loss = (total / mx.maximum(count, 1)).item()
    return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "tokens": int(count.item())}


# ---------------------------------------------------------------------------------------------------
# Exact match


def normalize_answer(text: str) -> str:
    """SQuAD-style normalization: lowercase, drop punctuation and the articles a/an/the, collapse whitespace."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in string.punctuation)
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def exact_match(prediction: str, reference: str) -> bool:
    """Identical text, ignoring leading and trailing whitespace."""
    return prediction.strip() == reference.strip()


def normalized_match(prediction: str, reference: str) -> bool:
    """Identical after normalize_answer."""
    return normalize_answer(prediction) == normalize_answer(reference)


# ---------------------------------------------------------------------------------------------------
# Generation over a dataset


def reference_ids(example: Example, eos_ids) -> list[int]:
    """The completion without the EOS that tokenize_rows appends."""
    ids = list(example.completion)
    return ids[:-1] if ids and ids[-1] in eos_ids else ids


def generate_all(
    model: nn.Module,
    tokenizer,
    reft: Reft | None,
    examples: Sequence[Example],
    *,
    batch_size: int = 8,
    max_tokens: int | None = None,
    edit: bool = True,
    prefill_step_size: int = 2048,
) -> list[list[int]]:
    """Greedy completions (ids, EOS excluded) for every example, in order, generated in left-padded batches.

    max_tokens None: each example may generate its reference's length plus EXTRA_TOKENS.
    Prompts are grouped by length so batches carry little padding.
    """
    eos = set(tokenizer.eos_token_ids)
    order = sorted(range(len(examples)), key=lambda i: len(examples[i].prompt))
    out: list[list[int] | None] = [None] * len(examples)
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        limits = [max_tokens or len(reference_ids(examples[i], eos)) + EXTRA_TOKENS for i in idx]
        results = batch_generate(
            model, tokenizer, [examples[i].prompt for i in idx], reft,
            max_tokens=limits, prefill_step_size=prefill_step_size, edit=edit,
        )
        for i, ids in zip(idx, results):
            out[i] = ids
    return out  # type: ignore[return-value]


def reference_texts(tokenizer, examples: Sequence[Example]) -> list[str]:
    """Each example's reference completion as text (EOS dropped)."""
    eos = set(tokenizer.eos_token_ids)
    return [tokenizer.decode(reference_ids(e, eos)) for e in examples]


def exact_match_scores(
    model: nn.Module, tokenizer, reft: Reft | None, examples: Sequence[Example], *, batch_size: int = 8,
    max_tokens: int | None = None, edit: bool = True, prefill_step_size: int = 2048,
    references: list[str] | None = None,
) -> tuple[dict, list[str]]:
    """Greedy-generate every example's completion and score it against the reference: (scores, predictions)."""
    references = reference_texts(tokenizer, examples) if references is None else references
    ids = generate_all(model, tokenizer, reft, examples, batch_size=batch_size, max_tokens=max_tokens, edit=edit,
                       prefill_step_size=prefill_step_size)
    predictions = [tokenizer.decode(p) for p in ids]
    return match_scores(predictions, references), predictions


def match_scores(predictions: list[str], references: list[str]) -> dict:
    """Exact-match and normalized exact-match rates."""
    n = max(len(references), 1)
    return {
        "exact_match": sum(exact_match(p, r) for p, r in zip(predictions, references)) / n,
        "normalized_exact_match": sum(normalized_match(p, r) for p, r in zip(predictions, references)) / n,
    }


# ---------------------------------------------------------------------------------------------------
# The whole evaluation


def as_examples(
    tokenizer, data: Any, formatter: Formatter | None = None, max_seq_length: int = 2048, truncation: str = "left",
    source: RowSource | None = None, split: str = "eval",
) -> list[Example]:
    """Examples as given, or rows (list of dicts / datasets.Dataset) tokenized as training tokenizes them."""
    if isinstance(data, (list, tuple)) and data and all(isinstance(e, Example) for e in data):
        return list(data)
    formatter = formatter or Formatter(tokenizer)
    examples, _ = tokenize_rows(data, formatter, tokenizer, max_seq_length, truncation, split=split, source=source)
    return examples


def evaluate(
    model: nn.Module,
    tokenizer,
    reft: Reft | None,
    data: Any,
    *,
    formatter: Formatter | None = None,
    batch_size: int = 8,
    max_seq_length: int = 2048,
    truncation: str = "left",
    generate: bool = True,
    max_tokens: int | None = None,
    base: bool = False,
    prefill_step_size: int = 2048,
    max_samples: int = 20,
    source: RowSource | None = None,
    split: str = "eval",
) -> dict:
    """Loss, perplexity and (with generate) exact-match rates of the adapter, and of the base model with base=True.

    data: Examples, or rows that formatter (default: auto-detected columns) turns into prompt / completion.
    Returns {"num_examples", "target_tokens", "adapter": {...}, "base": {...}, "samples": [...]}; the
    "adapter" entry is left out when reft is None (then "base" is the model as it is).
    source and split (from load_splits) let an error about a row name its file and line.
    """
    check_number("batch_size", batch_size, 1, integer=True)
    if max_tokens is not None:  # None: the reference's length + EXTRA_TOKENS
        check_number("max_tokens", max_tokens, 1, integer=True)
    examples = as_examples(tokenizer, data, formatter, max_seq_length, truncation, source, split)
    pad_id = pad_id_for(tokenizer)
    references = reference_texts(tokenizer, examples)
    modes = ([("adapter", True)] if reft is not None else []) + ([("base", False)] if base or reft is None else [])

    result: dict[str, Any] = {"num_examples": len(examples)}
    predictions: dict[str, list[str]] = {}
    tic = time.perf_counter()
    for name, edit in modes:
        metrics = evaluate_loss(model, examples, batch_size, reft=reft if edit else None, pad_id=pad_id)
        result["target_tokens"] = metrics.pop("tokens")
        if generate:
            scores, predictions[name] = exact_match_scores(
                model, tokenizer, reft, examples, batch_size=batch_size, max_tokens=max_tokens,
                edit=edit, prefill_step_size=prefill_step_size, references=references,
            )
            metrics.update(scores)
        result[name] = metrics
    result["elapsed_s"] = time.perf_counter() - tic
    if generate:
        result["generation"] = {
            "decoding": "greedy", "max_tokens": max_tokens or f"reference length + {EXTRA_TOKENS}",
            "exact_match": "identical after stripping surrounding whitespace",
            "normalized_exact_match": "SQuAD normalization: lowercase, no punctuation / articles, single spaces",
        }
        result["samples"] = [
            {"prompt": tokenizer.decode(examples[i].prompt), "reference": references[i],
             **{name: predictions[name][i] for name in predictions}}
            for i in range(min(max_samples, len(examples)))
        ]
    return result


def write_eval(adapter_path: str | Path, results: dict, filename: str = EVAL_FILE) -> Path:
    """Write results as JSON into the adapter folder atomically (temp file + os.replace)."""
    folder = Path(adapter_path)
    if not folder.is_dir():
        raise FileNotFoundError(f"adapter folder {folder} does not exist")
    text = json.dumps(results, indent=2)  # serialize first: a bad value never leaves a half-written file
    fd, tmp = tempfile.mkstemp(prefix=f".{filename}.tmp-", dir=folder)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.chmod(tmp, 0o666 & ~current_umask())  # mkstemp's file is private; eval.json is an ordinary file
        os.replace(tmp, folder / filename)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return folder / filename
