"""Bad input, one row per case: the command, the files before, the exit code, a piece of the one-line message.

Every row also checks that no traceback is printed, that the error is the only line on stderr, that every file
in the working folder is exactly as it was (nothing deleted, nothing half-written, no folder left behind), and,
where the issue asks for it, that the base model was never loaded.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import mlx.core as mx
import mlx_lm
import pytest

from loreft import cli
from loreft.demo import DEMO_ROWS, build_tiny_model

ROWS = "".join(json.dumps(r) + "\n" for r in DEMO_ROWS)  # 10 instruction / output rows
GOOD = object()  # files value: a copy of the adapter trained by the `trained` fixture (with checkpoints)
TINY = object()  # files value: a copy of the tiny model folder
TRAIN = ["train", "--model", "{tiny}", "--data", "train.jsonl", "--adapter-dir", "out", "--iters", "2", "--batch-size", "2"]
# the settings the `trained` adapter was made with: resuming it with these is valid, so each row changes one thing
RUN = ["--rank", "2", "--layers", "1", "--positions", "l1"]


@dataclass
class Case:
    id: str
    args: list[str]
    files: dict = field(default_factory=dict)  # path -> str | bytes | GOOD | TINY
    code: int = 2
    message: str = ""
    loads_model: bool = False  # False: the error must come before mlx_lm.load


def train(*extra, data="train.jsonl"):
    args = list(TRAIN) + list(extra)
    args[args.index("--data") + 1] = data
    return args


def with_adapter_dir(path, *extra):
    args = train(*extra)
    args[args.index("--adapter-dir") + 1] = path
    return args


CASES = [
    # the user's files are never deleted
    Case("adapter-dir holds the user's files", with_adapter_dir("proj"),
         {"train.jsonl": ROWS, "proj/NOTES.md": "mine\n", "proj/sub/data.csv": "a,b\n1,2\n"},
         message="pass --overwrite"),
    Case("adapter-dir holds the training data", with_adapter_dir("proj", "--overwrite") + ["--data", "proj/train.jsonl"],
         {"proj/train.jsonl": ROWS}, message="proj/train.jsonl, which saving the adapter would replace"),
    Case("adapter-dir is the current folder", with_adapter_dir("."), {"train.jsonl": ROWS},
         message="adapter_dir='.' is invalid: it holds"),
    Case("adapter-dir is empty text", with_adapter_dir(""), {"train.jsonl": ROWS}, message="give a folder name"),
    Case("adapter-dir is a file", with_adapter_dir("notes.txt"), {"train.jsonl": ROWS, "notes.txt": "keep me\n"},
         message="it is a file, not a folder"),
    Case("adapter-dir cannot be written", with_adapter_dir("notes.txt/out"), {"train.jsonl": ROWS, "notes.txt": "x\n"},
         message="cannot write there"),
    Case("adapter-dir has a foreign reft_config.json", with_adapter_dir("lora"),
         {"train.jsonl": ROWS, "lora/reft_config.json": '{"peft_type": "LORA"}'}, message="(reft_config.json)"),
    # data files
    Case("empty data file", train(), {"train.jsonl": ""}, message="train.jsonl is empty"),
    Case("blank-lines-only data file", train(), {"train.jsonl": "\n\n  \n"}, message="train.jsonl is empty"),
    Case("malformed JSONL line", train(), {"train.jsonl": ROWS + '{"instruction": "x", "output": \n'},
         message="train.jsonl line 11: not valid JSON"),
    Case("JSONL line that is a list", train(), {"train.jsonl": ROWS[:200].rsplit("\n", 1)[0] + "\n[1, 2]\n" + ROWS},
         message="not an object"),
    Case("non-UTF-8 bytes", train(), {"train.jsonl": ROWS.encode() + b'{"instruction": "caf\xe9", "output": "x"}\n'},
         message="train.jsonl line 11: bytes that are not UTF-8"),
    Case("malformed JSON array", train(data="train.json"), {"train.json": "[\n" + json.dumps(DEMO_ROWS[0]) + ",\n{oops}\n]"},
         message="train.json line 3: not valid JSON"),
    Case("null completion names the file line", train("--valid-fraction", "0"),
         {"train.jsonl": ROWS[:ROWS.index("\n") + 1] + "\n" + '{"instruction": "hi", "output": null}\n' + ROWS},
         message="train.jsonl line 3: the completion is empty", loads_model=True),
    Case("CSV row with too many fields", train(data="train.csv"),
         {"train.csv": "instruction,output\na,b\nc,d,e,f\n"}, message="train.csv line 3: 4 fields, but the header has 2"),
    Case("a data folder without data files", train(data="data"), {"data/notes.md": "x"}, message="no data files found"),
    Case("missing data file", train(data="nothing.jsonl"), message="not found: nothing.jsonl"),
    Case("unsupported data file", train(data="train.txt"), {"train.txt": "hello\n"}, message="unsupported file type"),
    Case("columns that say nothing", train(), {"train.jsonl": '{"q": "a", "a": "b"}\n' * 4},
         message="train.jsonl: cannot tell how to split rows"),
    Case("fewer rows than a batch", train("--batch-size", "9"), {"train.jsonl": ROWS},  # 8 train rows after the split
         message="fewer than batch_size=9", loads_model=True),
    # parameter values: the table's bounds and finiteness, before anything loads
    Case("learning rate nan", train("--learning-rate", "nan"), {"train.jsonl": ROWS}, message="learning_rate=nan"),
    Case("learning rate inf", train("--learning-rate", "inf"), {"train.jsonl": ROWS}, message="learning_rate=inf"),
    Case("learning rate below the table's minimum", train("--learning-rate", "1e-12"), {"train.jsonl": ROWS},
         message=">= 1e-08"),
    Case("rank above the table's maximum", train("--rank", "2000"), {"train.jsonl": ROWS}, message="<= 1024"),
    Case("dropout above the table's maximum", train("--dropout", "0.995"), {"train.jsonl": ROWS}, message="<= 0.99"),
    Case("weight decay negative", train("--weight-decay", "-1"), {"train.jsonl": ROWS}, message="weight_decay=-1.0"),
    Case("grad clip infinite", train("--grad-clip", "inf"), {"train.jsonl": ROWS}, message="grad_clip=inf"),
    Case("batch size not an integer", train("--batch-size", "2.5"), {"train.jsonl": ROWS}, message="an integer"),
    Case("consreft has no dropout", train("--intervention", "consreft", "--dropout", "0.1"), {"train.jsonl": ROWS},
         message="consreft has no dropout"),
    Case("save_every between accumulated batches", train("--grad-accumulation-steps", "2", "--save-every", "5"),
         {"train.jsonl": ROWS}, message="multiple of grad_accumulation_steps=2"),
    Case("YAML file missing", train("--config", "job.yaml"), {"train.jsonl": ROWS}, message="no such file"),
    Case("YAML not a mapping", train("--config", "job.yaml"), {"train.jsonl": ROWS, "job.yaml": "- a\n- b\n"},
         message="expected a mapping"),
    Case("YAML with an unknown key", train("--config", "job.yaml"), {"train.jsonl": ROWS, "job.yaml": "rnak: 4\n"},
         message="rnak"),
    Case("YAML not valid", train("--config", "job.yaml"), {"train.jsonl": ROWS, "job.yaml": "rank: [1,\n"},
         message="not valid YAML"),
    Case("YAML not UTF-8", train("--config", "job.yaml"), {"train.jsonl": ROWS, "job.yaml": b"rank: \xff\n"},
         message="not UTF-8"),
    Case("YAML value out of range", train("--config", "job.yaml"), {"train.jsonl": ROWS, "job.yaml": "dropout: 1.5\n"},
         message="dropout=1.5"),
    # the model
    Case("model path that does not exist", train() [:2] + ["./no-such-model"] + train()[3:], {"train.jsonl": ROWS},
         message="no such folder"),
    Case("model folder without config.json", train()[:2] + ["empty-model"] + train()[3:],
         {"train.jsonl": ROWS, "empty-model/README.md": "x"}, message="no config.json"),
    Case("model folder with bad config.json", train()[:2] + ["model"] + train()[3:],
         {"train.jsonl": ROWS, "model": TINY, "model/config.json": '{"model_type": "llama",'},
         message="config.json line 1: not valid JSON"),
    Case("model folder with truncated weights", train()[:2] + ["model"] + train()[3:],
         {"train.jsonl": ROWS, "model": TINY, "model/model.safetensors": b"\x10\x00\x00"},
         message="could not be loaded", loads_model=True),
    # resume: the path and the checkpoint's run, checked before the model loads
    Case("resume from a missing folder", train("--resume", "nowhere"), {"train.jsonl": ROWS}, message="no such folder"),
    Case("resume from a folder that is no checkpoint", train("--resume", "good"), {"train.jsonl": ROWS, "good": GOOD},
         message="not a training checkpoint"),
    Case("resume with another rank", with_adapter_dir("good", *RUN, "--resume", "auto", "--rank", "3", "--iters", "6"),
         {"train.jsonl": ROWS, "good": GOOD}, message="rank=2 there, 3 here"),
    Case("resume with other layers", with_adapter_dir("good", *RUN, "--resume", "auto", "--layers", "2", "--iters", "6"),
         {"train.jsonl": ROWS, "good": GOOD}, message="layers=[1] there"),
    Case("resume with another type", with_adapter_dir("good", *RUN, "--resume", "auto", "--intervention", "noreft",
                                                      "--iters", "6"),
         {"train.jsonl": ROWS, "good": GOOD}, message="intervention='loreft' there, 'noreft' here"),
    Case("resume onto another base model", with_adapter_dir("good", *RUN, "--resume", "auto", "--iters", "6")[:2]
         + ["model"] + with_adapter_dir("good", *RUN, "--resume", "auto", "--iters", "6")[3:],
         {"train.jsonl": ROWS, "good": GOOD, "model": TINY}, message="base model"),
    Case("resume past this run's end", with_adapter_dir("good", *RUN, "--resume", "auto", "--iters", "2"),
         {"train.jsonl": ROWS, "good": GOOD}, message="at step 4, this run has iters=2"),
    Case("resume with a damaged checkpoint", with_adapter_dir("good", *RUN, "--resume", "auto", "--iters", "6"),
         {"train.jsonl": ROWS, "good": GOOD, "good/checkpoints/step-0000004/reft_config.json": "{"},
         message="not valid JSON"),
    Case("resume with a truncated optimizer state", with_adapter_dir("good", *RUN, "--resume", "auto", "--iters", "6"),
         {"train.jsonl": ROWS, "good": GOOD, "good/checkpoints/step-0000004/optimizer.safetensors": b"\x00" * 9},
         message="optimizer.safetensors cannot be read", loads_model=True),
    # adapters given to generate and eval
    Case("generate: no adapter there", ["generate", "--adapter", "nowhere", "--prompt", "hi"],
         message="not a ReFT adapter folder"),
    Case("generate: truncated weights", ["generate", "--adapter", "a", "--prompt", "hi"],
         {"a": GOOD, "a/adapter.safetensors": b"\x40\x00\x00\x00\x00\x00\x00\x00{\"a\":"},
         message="cannot be read"),
    Case("generate: random weights file", ["generate", "--adapter", "a", "--prompt", "hi"],
         {"a": GOOD, "a/adapter.safetensors": os.urandom(64)}, message="cannot be read"),
    Case("generate: weights missing", ["generate", "--adapter", "a", "--prompt", "hi"],
         {"a": GOOD, "a/adapter.safetensors": None}, message="adapter.safetensors is missing"),
    Case("generate: reft_config.json not JSON", ["generate", "--adapter", "a", "--prompt", "hi"],
         {"a": GOOD, "a/reft_config.json": '{"format": "mlx-loreft-adapter",\n'}, message="line 2: not valid JSON"),
    Case("generate: another format", ["generate", "--adapter", "a", "--prompt", "hi"],
         {"a": GOOD, "a/reft_config.json": '{"peft_type": "LORA"}'}, message="not an mlx-loreft-adapter file"),
    Case("generate: a newer format_version", ["generate", "--adapter", "a", "--prompt", "hi"],
         {"a": GOOD, "a/reft_config.json": json.dumps({"format": "mlx-loreft-adapter", "format_version": 9})},
         message="format_version 9"),
    Case("generate: adapter for another hidden size", ["generate", "--adapter", "a", "--model", "{other}", "--prompt", "hi"],
         {"a": GOOD}, message="hidden size 64"),
    Case("generate: temperature below 0", ["generate", "--adapter", "a", "--prompt", "hi", "--temp", "-1"],
         {"a": GOOD}, message="temp=-1.0"),
    Case("generate: top_p of 0", ["generate", "--adapter", "a", "--prompt", "hi", "--top-p", "0"],
         {"a": GOOD}, message="top_p=0.0"),
    Case("eval: two adapters", ["eval", "--adapter", "a", "--adapter", "b", "--data", "train.jsonl"],
         {"a": GOOD, "b": GOOD, "train.jsonl": ROWS}, message="one adapter at a time"),
    Case("eval: batch size 0", ["eval", "--adapter", "a", "--data", "train.jsonl", "--batch-size", "0"],
         {"a": GOOD, "train.jsonl": ROWS}, message="batch_size=0"),
    Case("eval: bad data", ["eval", "--adapter", "a", "--data", "train.jsonl"],
         {"a": GOOD, "train.jsonl": "{oops}\n"}, message="train.jsonl line 1: not valid JSON"),
    Case("eval: split the data lacks", ["eval", "--adapter", "a", "--data", "train.jsonl", "--split", "test"],
         {"a": GOOD, "train.jsonl": ROWS}, message="has no 'test' split"),
]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_model_dir):
    """An adapter with checkpoints at steps 2 and 4, trained through the CLI."""
    folder = tmp_path_factory.mktemp("bad-inputs")
    (folder / "train.jsonl").write_text(ROWS)
    adapter = folder / "good"
    code = cli.main(["train", "--model", str(tiny_model_dir), "--data", str(folder / "train.jsonl"), "--adapter-dir",
                     str(adapter), "--iters", "6", "--batch-size", "2", "--save-every", "2", *RUN])
    assert code == 0 and (adapter / "checkpoints" / "step-0000002").is_dir()
    return adapter


@pytest.fixture(scope="module")
def other_model(tmp_path_factory):
    """A tiny model of another hidden size (32, not 64)."""
    return build_tiny_model(tmp_path_factory.mktemp("other-model"), hidden_size=32, num_layers=4, num_heads=2,
                            intermediate_size=64)


def make_files(root: Path, files: dict, adapter: Path, model: Path) -> None:
    for rel, content in sorted(files.items(), key=lambda kv: kv[1] not in (GOOD, TINY)):  # copies first
        path = root / rel
        if content is GOOD or content is TINY:
            shutil.copytree(adapter if content is GOOD else model, path)
        elif content is None:
            path.unlink()
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(content if isinstance(content, bytes) else content.encode())


def snapshot(root: Path) -> dict:
    """Every file's bytes and every folder under root."""
    return {str(p.relative_to(root)): (p.read_bytes() if p.is_file() else None) for p in sorted(root.rglob("*"))}


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(case, tmp_path, monkeypatch, capsys, trained, tiny_model_dir, other_model):
    make_files(tmp_path, case.files, trained, tiny_model_dir)
    monkeypatch.chdir(tmp_path)
    before = snapshot(tmp_path)
    loads = []
    real_load = mlx_lm.load
    monkeypatch.setattr(mlx_lm, "load", lambda *a, **k: loads.append(a) or real_load(*a, **k))
    args = [a.format(tiny=tiny_model_dir, other=other_model) for a in case.args]

    code = cli.main(args)

    out, err = capsys.readouterr()
    assert code == case.code, err
    assert "Traceback" not in out + err
    lines = [line for line in err.strip().splitlines() if not line.startswith("loreft: warning: ")]
    assert len(lines) == 1 and lines[0].startswith("loreft: error: "), err
    assert case.message in lines[0], lines[0]
    assert snapshot(tmp_path) == before  # nothing deleted, changed, or left behind
    if not case.loads_model:
        assert loads == [], "the model loaded before the input was checked"


@pytest.mark.parametrize("case", [c for c in CASES if c.id in ("empty data file", "generate: random weights file")],
                         ids=lambda c: c.id)
def test_the_console_command_exits_2_with_one_line(case, tmp_path, trained, tiny_model_dir):
    """The same through a real process: exit status 2, one line, no traceback; --debug shows the traceback."""
    make_files(tmp_path, case.files, trained, tiny_model_dir)
    args = [a.format(tiny=tiny_model_dir) for a in case.args]
    run = lambda *extra: subprocess.run([sys.executable, "-m", "loreft.cli", *args, *extra], cwd=tmp_path,  # noqa: E731
                                        capture_output=True, text=True, timeout=300)
    plain = run()
    assert plain.returncode == 2 and "Traceback" not in plain.stderr
    assert [line for line in plain.stderr.splitlines() if line.strip()] == [plain.stderr.strip()]
    assert case.message in plain.stderr
    debug = run("--debug")
    assert debug.returncode != 0 and "Traceback" in debug.stderr and case.message in debug.stderr


# ---------------------------------------------------------------------------------------------------
# What a run does to the folders it is given


def run_train(tiny_model_dir, folder, *extra) -> int:
    return cli.main(["train", "--model", str(tiny_model_dir), "--data", "train.jsonl", "--adapter-dir", str(folder),
                     "--iters", "2", "--batch-size", "2", *RUN, *extra])


def test_overwrite_replaces_the_users_folder_only_when_asked(tmp_path, monkeypatch, capsys, tiny_model_dir):
    make_files(tmp_path, {"train.jsonl": ROWS, "proj/NOTES.md": "mine\n"}, None, None)
    monkeypatch.chdir(tmp_path)
    assert run_train(tiny_model_dir, "proj") == 2
    assert (tmp_path / "proj" / "NOTES.md").read_text() == "mine\n"
    assert run_train(tiny_model_dir, "proj", "--overwrite") == 0
    assert sorted(p.name for p in (tmp_path / "proj").iterdir()) == ["adapter.safetensors", "loss.png", "metrics.jsonl",
                                                                     "reft_config.json", "training_args.json"]


def test_replacing_an_earlier_adapter_says_what_goes(tmp_path, monkeypatch, capsys, trained, tiny_model_dir):
    make_files(tmp_path, {"train.jsonl": ROWS, "a": GOOD, "a/eval.json": "{}"}, trained, None)
    monkeypatch.chdir(tmp_path)
    assert run_train(tiny_model_dir, "a") == 0  # an adapter folder this project wrote: no flag needed
    out = capsys.readouterr().out
    assert "holds an earlier run's adapter" in out and "eval.json" in out
    assert not (tmp_path / "a" / "eval.json").exists() and not (tmp_path / "a" / "checkpoints").exists()


def test_folders_and_files_get_ordinary_permissions(tmp_path, monkeypatch, capsys, tiny_model_dir):
    make_files(tmp_path, {"train.jsonl": ROWS}, None, None)
    monkeypatch.chdir(tmp_path)
    old = os.umask(0o022)
    try:
        assert run_train(tiny_model_dir, "a") == 0
        assert cli.main(["eval", "--adapter", "a", "--data", "train.jsonl", "--no-generate"]) == 0
    finally:
        os.umask(old)
    assert (tmp_path / "a").stat().st_mode & 0o777 == 0o755
    for name in ("adapter.safetensors", "reft_config.json", "eval.json"):
        assert (tmp_path / "a" / name).stat().st_mode & 0o777 == 0o644, name


def test_output_and_records_of_a_run(tmp_path, monkeypatch, capsys, tiny_model_dir):
    make_files(tmp_path, {"train.jsonl": ROWS}, None, None)
    monkeypatch.chdir(tmp_path)
    assert run_train(tiny_model_dir, "a", "--dtype", "auto") == 0
    out, err = capsys.readouterr()
    assert (out + err).count("Trainable parameters") == 1
    assert "Generating train split" not in out + err
    args = json.loads((tmp_path / "a" / "training_args.json").read_text())
    assert args["train"]["dtype"] == ("bfloat16" if mx.default_device() == mx.gpu else "float32")  # what 'auto' chose


def test_an_adapter_on_another_base_model_of_the_same_shape_warns(tmp_path, capsys, trained, tiny_model_dir):
    twin = build_tiny_model(tmp_path / "twin", model_type="llama", seed=1)  # same shape, other weights
    assert cli.main(["generate", "--adapter", str(trained), "--model", str(twin), "--prompt", "hi", "--max-tokens", "2"]) == 0
    err = capsys.readouterr().err
    assert "loreft: warning: " in err and f"trained on {tiny_model_dir}" in err
    assert cli.main(["generate", "--adapter", str(trained), "--prompt", "hi", "--max-tokens", "2"]) == 0
    assert "warning" not in capsys.readouterr().err  # its own base model: no warning
