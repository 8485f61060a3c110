"""Data pipeline: loading every source format, formatting modes, tokenization and truncation, batching."""

from __future__ import annotations

import json
import types

import numpy as np
import pytest

from loreft.config import ConfigError
from loreft.data import (
    Batch,
    DataError,
    Example,
    Formatter,
    check_enough,
    collate,
    iterate_batches,
    load_splits,
    num_batches,
    tokenize_rows,
)


def padding_fraction(batches) -> float:
    """Share of token slots in these batches that are padding."""
    slots = real = 0
    for b in batches:
        slots += b.tokens.size
        real += int(b.lengths.sum())
    return (slots - real) / slots if slots else 0.0


def target_tokens(batch: Batch) -> int:
    """Completion tokens in a batch, from its lengths (independently of its loss mask)."""
    return int((batch.lengths - batch.prompt_lengths).sum())

ROWS = [{"prompt": f"Question number {i}?", "completion": f"Answer {i}."} for i in range(10)]


def _write(path, rows, fmt):
    import pandas as pd

    if fmt == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif fmt == "json":
        path.write_text(json.dumps(rows))
    elif fmt == "csv":
        pd.DataFrame(rows).to_csv(path, index=False)
    elif fmt == "parquet":
        pd.DataFrame(rows).to_parquet(path)
    return path


# ----------------------------------------------------------------------------------------------- loading


@pytest.mark.parametrize("fmt", ["jsonl", "json", "csv", "parquet"])
def test_each_file_format_loads_with_80_20_split(tmp_path, fmt):
    path = _write(tmp_path / f"data.{fmt}", ROWS, fmt)
    splits = load_splits(str(path))
    assert set(splits) == {"train", "valid"}  # no test split in a single file
    assert (len(splits["train"]), len(splits["valid"])) == (8, 2)
    seen = list(splits["train"]["prompt"]) + list(splits["valid"]["prompt"])
    assert sorted(seen) == sorted(r["prompt"] for r in ROWS)  # a partition: nothing lost, nothing twice
    row = splits["valid"][0]
    assert row["completion"] == ROWS[int(row["prompt"].split()[2][:-1])]["completion"]


def test_folder_with_named_splits_keeps_them(tmp_path):
    _write(tmp_path / "train.jsonl", ROWS[:6], "jsonl")
    _write(tmp_path / "validation.csv", ROWS[6:8], "csv")  # formats may differ between splits
    _write(tmp_path / "test.parquet", ROWS[8:], "parquet")
    splits = load_splits(str(tmp_path))
    assert {k: len(v) for k, v in splits.items()} == {"train": 6, "valid": 2, "test": 2}
    assert list(splits["valid"]["prompt"]) == [r["prompt"] for r in ROWS[6:8]]
    only = load_splits(str(tmp_path), splits=("test",))
    assert list(only) == ["test"]


def test_save_to_disk_folders_load(tmp_path):
    import datasets

    dd = datasets.DatasetDict(
        {"train": datasets.Dataset.from_list(ROWS[:5]), "validation": datasets.Dataset.from_list(ROWS[5:7]),
         "test": datasets.Dataset.from_list(ROWS[7:])}
    )
    dd.save_to_disk(str(tmp_path / "dd"))
    splits = load_splits(str(tmp_path / "dd"))
    assert {k: len(v) for k, v in splits.items()} == {"train": 5, "valid": 2, "test": 3}
    datasets.Dataset.from_list(ROWS).save_to_disk(str(tmp_path / "single"))
    splits = load_splits(str(tmp_path / "single"))
    assert {k: len(v) for k, v in splits.items()} == {"train": 8, "valid": 2}


def test_seeded_split_is_reproducible_and_seed_dependent(tmp_path):
    rows = [{"prompt": f"p{i}", "completion": f"c{i}"} for i in range(50)]
    path = _write(tmp_path / "d.jsonl", rows, "jsonl")
    a = load_splits(str(path), seed=3)["valid"]["prompt"]
    b = load_splits(str(path), seed=3)["valid"]["prompt"]
    c = load_splits(str(path), seed=4)["valid"]["prompt"]
    assert len(a) == 10 and list(a) == list(b)
    assert set(a) != set(c)
    assert "valid" not in load_splits(str(path), valid_fraction=0.0)


def test_bad_sources_raise_clear_errors(tmp_path):
    with pytest.raises(DataError, match="not found"):
        load_splits(str(tmp_path / "missing.jsonl"))
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("x")
    with pytest.raises(DataError, match=r"notes\.txt.*expected train\.jsonl"):
        load_splits(str(tmp_path / "empty"))
    bad = tmp_path / "data.xml"
    bad.write_text("<a/>")
    with pytest.raises(ConfigError, match="unsupported file type"):
        load_splits(str(bad))


# -------------------------------------------------------------------------------------------- formatting


def test_plain_columns_mode_and_explicit_columns():
    f = Formatter()
    assert f({"prompt": "Hi ", "completion": "there", "extra": 1}) == ("Hi ", "there")
    assert f.mode == "plain"
    g = Formatter(prompt_column="q", completion_column="a")
    assert g({"q": "2+2=", "a": 4}) == ("2+2=", "4")  # non-text cells (CSV numbers) become text


def test_template_mode_renders_jinja_over_columns():
    f = Formatter(prompt_template="Q: {{ question }}\nA:", completion_template=" {{ answer | upper }}\n")
    row = {"question": "colour of sky?", "answer": "blue"}
    assert f(row) == ("Q: colour of sky?\nA:", " BLUE\n")  # trailing newline kept


def test_alpaca_columns_are_detected():
    f = Formatter()
    p, c = f({"instruction": "Add.", "input": "2 and 3", "output": "5"})
    assert f.mode == "template"
    assert p == "### Instruction:\nAdd.\n\n### Input:\n2 and 3\n\n### Response:\n" and c == "5"
    p, _ = f({"instruction": "Say hi.", "input": "", "output": "hi"})
    assert p == "### Instruction:\nSay hi.\n\n### Response:\n"
    # a dataset with no input column at all (the demo's shape) gets the same prompt, no error
    g = Formatter()
    g.check(["instruction", "output"])
    assert g({"instruction": "Say hi.", "output": "hi"}) == ("### Instruction:\nSay hi.\n\n### Response:\n", "hi")


def test_chat_mode_uses_the_tokenizers_chat_template(tiny_tokenizer):
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi?"},
        {"role": "assistant", "content": "Hello."},
    ]
    f = Formatter(tiny_tokenizer)  # auto-detects the 'messages' column
    prompt, completion = f({"messages": messages})
    assert f.mode == "chat"
    # the demo tokenizer's template: <|role|>content<|end|>\n per turn, then <|assistant|> for generation
    assert prompt == "<|system|>Be brief.<|end|>\n<|user|>Hi?<|end|>\n<|assistant|>"
    assert completion == "Hello."
    with pytest.raises(DataError, match="last message must be the assistant"):
        f({"messages": messages[:2]})
    # before the model loads there is no tokenizer: check() settles the mode, rendering needs the template
    early = Formatter(None, chat_column="messages")
    early.check(["messages"])
    with pytest.raises(DataError, match="chat template"):
        early({"messages": messages})
    no_template = types.SimpleNamespace(chat_template=None)  # a tokenizer that has no chat template
    with pytest.raises(DataError, match="chat template"):
        Formatter(no_template, chat_column="messages").check(["messages"])


def test_undefined_template_variable_names_it_and_lists_columns():
    f = Formatter(prompt_template="{{ questin }} ->", completion_template="{{ answer }}")
    with pytest.raises(DataError) as e:
        f.check(["question", "answer"])
    msg = str(e.value)
    assert "questin" in msg and "question, answer" in msg and "prompt_template" in msg
    # attribute access fails only at render time: StrictUndefined still names it, with the row's columns
    g = Formatter(prompt_template="{{ meta.author }}", completion_template="{{ answer }}")
    with pytest.raises(DataError, match=r"author.*meta, answer"):
        g({"meta": {"title": "x"}, "answer": "y"})


def test_unknown_columns_error_lists_found_and_needed():
    with pytest.raises(DataError) as e:
        Formatter().check(["text", "label"])
    msg = str(e.value)
    assert "text, label" in msg and "'messages'" in msg and "'prompt' and 'completion'" in msg
    assert "'instruction' and 'output'" in msg
    with pytest.raises(ConfigError, match="prompt_template"):
        Formatter(prompt_template="{{ oops ")


# ------------------------------------------------------------------------------------------- tokenizing


def test_tokenize_appends_eos_and_splits_prompt_from_completion(tiny_tokenizer):
    tok = tiny_tokenizer
    rows = [{"prompt": "What is two plus two?", "completion": " four"}]
    (ex,), stats = tokenize_rows(rows, Formatter(), tok, max_seq_length=512)
    assert ex.prompt == tok.encode("What is two plus two?")
    assert ex.completion == tok.encode(" four", add_special_tokens=False) + [tok.eos_token_id]
    assert stats == {"rows": 1, "truncated": 0, "dropped": 0}


def test_left_truncation_keeps_completion_and_counts(tiny_tokenizer):
    tok, eos = tiny_tokenizer, tiny_tokenizer.eos_token_id
    long_prompt = " ".join(["The quick brown fox jumps over the lazy dog."] * 6)
    rows = [
        {"prompt": long_prompt, "completion": "Yes."},
        {"prompt": "Hi", "completion": "Hello."},
        {"prompt": "Hi", "completion": " ".join(["far too long"] * 20)},  # completion alone exceeds the limit
    ]
    full_prompt = tok.encode(long_prompt)
    completion = tok.encode("Yes.", add_special_tokens=False) + [eos]
    max_len = 20
    assert len(full_prompt) + len(completion) > max_len
    examples, stats = tokenize_rows(rows, Formatter(), tok, max_seq_length=max_len, truncation="left")
    assert stats == {"rows": 3, "truncated": 1, "dropped": 1}
    ex = examples[0]
    assert ex.completion == completion
    assert ex.prompt == full_prompt[-(max_len - len(completion)):]  # the prompt's start was cut
    assert ex.length == max_len
    assert examples[1].prompt == tok.encode("Hi")  # short rows untouched

    examples, stats = tokenize_rows(rows, Formatter(), tok, max_seq_length=max_len, truncation="drop")
    assert stats == {"rows": 3, "truncated": 0, "dropped": 2}
    assert len(examples) == 1 and examples[0].prompt == tok.encode("Hi")


def test_bos_is_kept_when_truncating_and_not_doubled_by_chat_templates(tiny_model_dir):
    from tokenizers import Tokenizer, processors
    from transformers import PreTrainedTokenizerFast

    inner = Tokenizer.from_file(str(tiny_model_dir / "tokenizer.json"))
    inner.post_processor = processors.TemplateProcessing(single="<|bos|> $A", special_tokens=[("<|bos|>", 1)])
    tok = PreTrainedTokenizerFast(tokenizer_object=inner, bos_token="<|bos|>", eos_token="<|eos|>")
    tok.chat_template = "{{ bos_token }}{% for m in messages %}{{ m['content'] }}{% endfor %}"
    bos = tok.bos_token_id
    prompt = " ".join(["Representation finetuning edits hidden states."] * 4)
    ids = tok.encode(prompt)
    assert ids[0] == bos and ids[1] != bos
    (ex,), stats = tokenize_rows([{"prompt": prompt, "completion": "ok"}], Formatter(), tok, max_seq_length=12)
    assert stats["truncated"] == 1 and ex.length == 12
    assert ex.prompt[0] == bos and ex.prompt[1:] == ids[-(12 - len(ex.completion) - 1):]
    assert ex.completion[0] != bos  # no specials on the completion
    chat = [{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}]}]
    (ex,), _ = tokenize_rows(chat, Formatter(tok), tok, max_seq_length=64)
    assert ex.prompt[0] == bos and ex.prompt[1] != bos


def test_tokenize_errors(tiny_tokenizer):
    tok = tiny_tokenizer
    with pytest.raises(DataError, match="empty"):
        tokenize_rows([], Formatter(), tok, max_seq_length=64)
    rows = [{"prompt": "a", "completion": "b"}, {"prompt": "c", "completion": "  "}]
    with pytest.raises(DataError, match="train row 2: the completion is empty"):  # rows count from 1, as lines do
        tokenize_rows(rows, Formatter(), tok, max_seq_length=64)
    with pytest.raises(DataError, match="train row 1: the prompt is empty"):
        tokenize_rows([{"prompt": "", "completion": "b"}], Formatter(), tok, max_seq_length=64)
    long = [{"prompt": "x", "completion": "a much longer completion than allowed"}]
    with pytest.raises(DataError, match=r"all 1 train rows were dropped.*max_seq_length=4"):
        tokenize_rows(long, Formatter(), tok, max_seq_length=4)
    with pytest.raises(ConfigError, match="truncation"):
        tokenize_rows(rows, Formatter(), tok, max_seq_length=64, truncation="right")
    with pytest.raises(DataError, match=r"valid row 1: completion column 'completion' is empty"):
        tokenize_rows([{"prompt": "a", "completion": None}], Formatter(), tok, 64, split="valid")


def test_build_end_to_end_with_demo_templates(tmp_path, tiny_tokenizer):
    from loreft.demo import DEMO_COMPLETION_TEMPLATE, DEMO_PROMPT_TEMPLATE, DEMO_ROWS

    _write(tmp_path / "train.jsonl", DEMO_ROWS, "jsonl")
    fmt = Formatter(tiny_tokenizer, DEMO_PROMPT_TEMPLATE, DEMO_COMPLETION_TEMPLATE)
    splits = load_splits(str(tmp_path), valid_fraction=0.2, seed=0)
    examples, stats = {}, {}
    for name, rows in splits.items():
        examples[name], stats[name] = tokenize_rows(rows, fmt, tiny_tokenizer, 128, "left", split=name)
    assert {k: len(v) for k, v in examples.items()} == {"train": 8, "valid": 2}
    assert stats["train"]["rows"] == 8
    decoded = {tiny_tokenizer.decode(e.prompt) for e in examples["train"] + examples["valid"]}
    assert decoded == {f"<|user|>{r['instruction']}<|end|>\n<|assistant|>" for r in DEMO_ROWS}


# -------------------------------------------------------------------------------------------- batching


def _synthetic(n, seed=0, lo=2, hi=60):
    """Examples with unique token content (first token = example id) and mixed lengths."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        p = int(rng.integers(1, 20))
        c = int(rng.integers(1, hi - p)) if hi - p > 1 else 1
        out.append(Example([1000 + i] + [5] * (p - 1), [7] * (c - 1) + [2]))
    return out


def test_loss_mask_covers_exactly_completion_tokens(tiny_tokenizer):
    tok = tiny_tokenizer
    rows = [{"prompt": "Who are you?" * k, "completion": " I am a tiny model." * (4 - k)} for k in range(1, 4)]
    examples, _ = tokenize_rows(rows, Formatter(), tok, max_seq_length=256)
    (batch,) = list(iterate_batches(examples, 3, shuffle=False, pad_id=tok.pad_token_id, pad_to=8))
    mask = batch.loss_mask()
    assert mask.shape == (3, batch.tokens.shape[1] - 1) and mask.dtype == np.float32
    assert mask.shape[1] % 8 == 0 and batch.tokens.dtype == np.int32  # the model's inputs: a multiple of pad_to
    by_prompt = {tuple(e.prompt): e for e in examples}
    for b in range(3):
        ex = by_prompt[tuple(batch.tokens[b, : batch.prompt_lengths[b]])]
        targets = batch.tokens[b, 1:]
        assert targets[mask[b] == 1].tolist() == ex.completion  # every completion token incl. EOS, in order
        for t in range(mask.shape[1]):  # position by position: never prompt, never padding
            if t + 1 < len(ex.prompt) or t + 1 >= ex.length:
                assert mask[b, t] == 0
        assert (batch.tokens[b, ex.length:] == tok.pad_token_id).all()
    assert mask.sum() == target_tokens(batch) == sum(len(e.completion) for e in examples)


@pytest.mark.parametrize("rows, parts, sizes", [(5, 2, [3, 2]), (5, 3, [2, 2, 1]), (2, 3, [1, 1]), (1, 2, [1])])
def test_a_batch_splits_into_consecutive_row_groups_of_its_width(rows, parts, sizes):
    examples = [Example(prompt=[10 + i] * (1 + i), completion=[50 + i] * (3 - i % 3)) for i in range(rows)]
    batch = collate(examples, pad_id=0, pad_to=8)
    split = batch.split(parts)
    assert [len(p.tokens) for p in split] == sizes
    assert all(p.tokens.shape[1] == batch.tokens.shape[1] for p in split)
    assert np.array_equal(np.concatenate([p.tokens for p in split]), batch.tokens)
    assert np.array_equal(np.concatenate([p.loss_mask() for p in split]), batch.loss_mask())
    assert np.array_equal(np.concatenate([p.lengths for p in split]), batch.lengths)


@pytest.mark.parametrize("longest, width", [(512, 513), (513, 513), (514, 545), (2, 33), (33, 33), (34, 65)])
def test_inputs_are_padded_to_a_multiple_of_pad_to(longest, width):
    # the model sees tokens[:, :-1]: that width, not the batch's, is rounded up (a row of 512 tokens gets one pad)
    rows = [Example(prompt=[7] * (longest - 1), completion=[9]), Example(prompt=[5], completion=[6])]
    batch = collate(rows, pad_id=0, pad_to=32)
    assert batch.tokens.shape == (2, width)
    assert batch.tokens[0, :longest].tolist() == [7] * (longest - 1) + [9] and not batch.tokens[0, longest:].any()


def test_length_sorting_cuts_padding_below_unsorted_baseline():
    examples = _synthetic(256)
    sorted_batches = list(iterate_batches(examples, 8, seed=0, pad_to=1))
    ids = sorted(int(b) for batch in sorted_batches for b in batch.tokens[:, 0])
    assert ids == [1000 + i for i in range(256)]  # every example exactly once per epoch
    rng = np.random.default_rng(1)
    order = rng.permutation(256)
    baseline = [collate([examples[i] for i in order[j : j + 8]], pad_to=1) for j in range(0, 256, 8)]
    sorted_pad, base_pad = padding_fraction(sorted_batches), padding_fraction(baseline)
    assert base_pad > 0.3 and sorted_pad < base_pad / 5, (sorted_pad, base_pad)


def test_batch_order_is_deterministic_per_seed_and_epoch():
    examples = _synthetic(80)

    def firsts(**kw):
        return [tuple(b.tokens[:, 0]) for b in iterate_batches(examples, 8, **kw)]

    assert firsts(seed=0, epoch=0) == firsts(seed=0, epoch=0)
    assert firsts(seed=0, epoch=0) != firsts(seed=0, epoch=1)
    assert firsts(seed=0, epoch=0) != firsts(seed=1, epoch=0)
    ordered = list(iterate_batches(examples, 8, shuffle=False))
    maxes = [int(b.lengths.max()) for b in ordered]
    assert maxes == sorted(maxes)  # without shuffling, batches come shortest first
    assert {len(b.lengths) for b in iterate_batches(examples[:20], 8)} == {8, 4}  # partial last batch kept


def test_drop_last_and_num_batches():
    examples = _synthetic(21)
    for epoch in range(3):
        batches = list(iterate_batches(examples, 4, epoch=epoch, drop_last=True))
        assert len(batches) == 5 == num_batches(21, 4, drop_last=True)
        assert all(len(b.lengths) == 4 for b in batches)
    left_out = [
        set(range(1000, 1021)) - {int(t) for b in iterate_batches(examples, 4, epoch=e, drop_last=True) for t in b.tokens[:, 0]}
        for e in range(4)
    ]
    assert len({frozenset(s) for s in left_out}) > 1  # not always the same example left out
    assert num_batches(21, 4) == 6 == len(list(iterate_batches(examples, 4)))


def test_rank_sharding_partitions_each_global_batch():
    examples = _synthetic(64)
    world = 4
    glob = list(iterate_batches(examples, 8, seed=5, epoch=2))
    shards = [list(iterate_batches(examples, 8, seed=5, epoch=2, rank=r, world_size=world)) for r in range(world)]
    assert all(len(s) == len(glob) for s in shards)  # every rank takes the same number of steps
    for step, g in enumerate(glob):
        parts = [set(shards[r][step].tokens[:, 0].tolist()) for r in range(world)]
        assert all(len(p) == 2 for p in parts)
        assert set().union(*parts) == set(g.tokens[:, 0].tolist())
        assert sum(len(p) for p in parts) == 8  # disjoint
    with pytest.raises(ConfigError, match="divisible by world_size=4"):
        next(iterate_batches(examples, 6, world_size=4))
    with pytest.raises(ConfigError, match="rank"):
        next(iterate_batches(examples, 8, rank=2, world_size=2))
    # a remainder that is not divisible by world_size is trimmed so ranks stay in step
    shards = [list(iterate_batches(examples[:19], 8, rank=r, world_size=2)) for r in range(2)]
    assert [len(s) for s in shards] == [3, 3] == [num_batches(19, 8, world_size=2)] * 2
    assert [len(b.lengths) for b in shards[0]] == [len(b.lengths) for b in shards[1]]


def test_too_small_split_error():
    with pytest.raises(DataError, match=r"valid split has 3 example\(s\), fewer than batch_size=4"):
        check_enough(_synthetic(3), 4, "valid")
    check_enough(_synthetic(4), 4, "valid")


def test_batch_helpers_on_a_hand_made_batch():
    b = Batch(np.array([[9, 8, 7, 6, 0], [9, 8, 7, 0, 0]], np.int32), np.array([2, 1], np.int32), np.array([4, 3], np.int32))
    expected = np.array([[0, 1, 1, 0], [1, 1, 0, 0]], np.float32)  # targets t+1 in [prompt_len, length)
    np.testing.assert_array_equal(b.loss_mask(), expected)
    assert target_tokens(b) == 4
    assert padding_fraction([b]) == pytest.approx(3 / 10)
