"""The `loreft` command: flags and YAML (flags win), early one-line errors, generate / eval wiring, Ctrl-C, the demo."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import mlx_lm
import pytest

import loreft.data
import loreft.job
from loreft import cli, load_adapter, read_adapter_config
from loreft.reporting import StopOnSignal
from loreft.demo import DEMO_ROWS

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "emoji.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in DEMO_ROWS))
    return path


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_model_dir, data_file):
    """An adapter trained through the CLI from a YAML file and flags; (adapter folder, captured output)."""
    folder = tmp_path_factory.mktemp("cli")
    config = folder / "job.yaml"
    config.write_text(f"model: {tiny_model_dir}\ndata: {data_file}\nrank: 3\npositions: l1\nlayers: '1'\n"
                      "iters: 6\nbatch-size: 2\nsteps_per_report: 2\nlearning_rate: 0.01\n")
    adapter = folder / "adapter"
    code = cli.main(["train", "--config", str(config), "--rank", "2", "--adapter-dir", str(adapter),
                     "--prompt_template", "Q: {{instruction}}\nA: ", "--completion-template", "{{output}}"])
    assert code == 0
    return adapter


def test_train_reads_yaml_and_flags_win(trained, tiny_model_dir, capsys):
    meta = read_adapter_config(trained)
    assert meta["rank"] == 2  # flag over YAML's 3
    assert (meta["config"]["positions"], meta["layers"]) == ("l1", [1])  # from YAML
    assert meta["formatting"]["prompt_template"] == "Q: {{instruction}}\nA: "
    args = json.loads((trained / "training_args.json").read_text())
    assert args["total_steps"] == 6 and args["train"]["batch_size"] == 2
    rows = [json.loads(line) for line in (trained / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["kind"] == "train"] == [2, 4, 6]
    model, _ = mlx_lm.load(str(tiny_model_dir))
    assert load_adapter(model, trained).stats().trainable == 2 * 2 * 64 + 2  # l1: one group on one layer


@pytest.mark.parametrize("flags, field", [
    (["--rank", "zero"], "rank"),
    (["--rank", "0"], "rank"),
    (["--positions", "x7"], "positions"),
    (["--lr-schedule", "weird"], "lr_schedule"),
    (["--epochs", "0"], "epochs"),
    (["--intervention", "lora"], "intervention"),
    (["--config", "{yaml}"], "bogus"),
])
def test_bad_values_fail_fast_naming_the_field(flags, field, tmp_path, monkeypatch, capsys):
    """Exit 2 with one line naming the field, before any data or model is touched (both paths do not exist)."""
    def untouched(*a, **k):
        raise AssertionError("loaded something before validating")

    monkeypatch.setattr(loreft.job, "load_model", untouched)
    monkeypatch.setattr(loreft.data, "load_splits", untouched)
    monkeypatch.setattr(mlx_lm, "load", untouched)
    yaml_file = tmp_path / "bad.yaml"
    yaml_file.write_text("bogus: 1\nrank: 2\n")
    flags = [f.format(yaml=yaml_file) for f in flags]
    code = cli.main(["train", "--model", str(tmp_path / "no-model"), "--data", str(tmp_path / "no.jsonl"), *flags])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and err[0].startswith(f"loreft: error: {field}=")


def test_main_py_is_loreft_train(tmp_path, tiny_model_dir, data_file):
    """python main.py --model ... --data ... outside TransformerLab trains exactly like `loreft train`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("_TFL", "TFL_"))}
    adapter = tmp_path / "adapter"
    run = subprocess.run([sys.executable, str(ROOT / "main.py"), "--model", str(tiny_model_dir), "--data", str(data_file),
                          "--iters", "2", "--batch-size", "2", "--rank", "1", "--adapter-dir", str(adapter)],
                         env=env, capture_output=True, text=True, timeout=120, check=False)
    assert run.returncode == 0, run.stderr
    assert read_adapter_config(adapter)["rank"] == 1 and "Adapter saved to" in run.stdout
    bad = subprocess.run([sys.executable, str(ROOT / "main.py"), "--model", "m", "--data", "d", "--dropout", "1.5"],
                         env=env, capture_output=True, text=True, timeout=60, check=False)
    assert bad.returncode == 2 and bad.stderr.startswith("loreft: error: dropout=1.5")


def test_generate_prints_what_the_library_generates(trained, tiny_model_dir, capsys):
    from loreft.generate import format_prompt, generate

    capsys.readouterr()
    assert cli.main(["generate", "--adapter", str(trained), "--prompt", "Who are you?", "--max-tokens", "6"]) == 0
    printed = capsys.readouterr().out
    model, tokenizer = mlx_lm.load(str(tiny_model_dir))
    reft = load_adapter(model, trained)
    prompt = format_prompt(tokenizer, "Who are you?", read_adapter_config(trained)["formatting"])
    assert printed == generate(model, tokenizer, prompt, reft, max_tokens=6) + "\n"


def test_eval_writes_eval_json(trained, data_file, capsys):
    assert cli.main(["eval", "--adapter", str(trained), "--data", str(data_file), "--max-tokens", "4", "--base"]) == 0
    results = json.loads((trained / "eval.json").read_text())
    assert results["split"] == "train" and results["num_examples"] == len(DEMO_ROWS)
    for label in ("adapter", "base"):
        assert results[label]["loss"] > 0 and "exact_match" in results[label]
    assert "Results written to" in capsys.readouterr().out


def test_ctrl_c_stops_at_the_next_step_and_saves(tmp_path, tiny_model_dir, data_file):
    """The first SIGINT ends training cleanly with the adapter saved (the summary says stopped)."""
    from loreft.job import job_from_params, run_job
    from loreft.reporting import Callback

    class InterruptAt(Callback):
        def on_step(self, step, total_steps):
            if step == 3:
                os.kill(os.getpid(), signal.SIGINT)

    job = job_from_params({"model": str(tiny_model_dir), "data": str(data_file), "iters": 500, "batch_size": 2,
                           "rank": 1, "adapter_dir": str(tmp_path / "ad"), "steps_per_report": 1})
    stop = StopOnSignal(log=lambda *a: None)
    try:
        summary = run_job(job, callbacks=[stop, InterruptAt()], log=lambda *a: None)
        assert signal.getsignal(signal.SIGINT) == stop._handle  # kept while anything may still be written
    finally:
        stop.restore()
    assert summary["stopped"] and summary["steps"] == 3
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # restored
    assert (tmp_path / "ad" / "loss.png").is_file()  # drawn after the adapter was saved
    model, _ = mlx_lm.load(str(tiny_model_dir))
    load_adapter(model, tmp_path / "ad")


def test_sigterm_stops_loreft_train_with_the_adapter_saved(tmp_path, tiny_model_dir, data_file):
    """`loreft train` under kill (twice, as schedulers and TransformerLab send it): exit 0, a loadable adapter."""
    import time

    adapter = tmp_path / "ad"
    proc = subprocess.Popen([sys.executable, "-m", "loreft.cli", "train", "--model", str(tiny_model_dir), "--data",
                             str(data_file), "--iters", "20000", "--batch-size", "2", "--rank", "1", "--save-every", "2",
                             "--adapter-dir", str(adapter)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 90
    while not (adapter / "checkpoints").is_dir() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, proc.communicate()[0]
    proc.send_signal(signal.SIGTERM)
    proc.send_signal(signal.SIGTERM)  # the same stop, not an abort
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0 and "Training stopped early" in out and "Traceback" not in out, out
    model, _ = mlx_lm.load(str(tiny_model_dir))
    load_adapter(model, adapter)
    assert (adapter / "loss.png").is_file()


def test_tiny_demo_runs_and_learns(tmp_path, capsys):
    """A shortened tiny demo: the model is built into the cache once, the loss falls, the answers are shown."""

    cache, out = tmp_path / "cache", tmp_path / "demo"
    assert cli.main(["demo", "--tiny", "--epochs", "40", "--cache-dir", str(cache), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert printed.count("before:") == printed.count("after:") >= 3
    assert "Exact answers on the 10 training prompts" in printed
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if '"train"' in line]
    assert rows[-1]["loss"] < rows[0]["loss"] - 1.0
    assert (out / "loss.png").stat().st_size > 0
    (model_dir,) = cache.iterdir()
    stamp = (model_dir / "model.safetensors").stat().st_mtime_ns
    from loreft.demo import demo_model_dir

    assert demo_model_dir(cache) == model_dir and (model_dir / "model.safetensors").stat().st_mtime_ns == stamp


def test_generate_with_two_adapters_applies_both(trained, tiny_model_dir, capsys):
    from loreft.generate import format_prompt, generate
    from loreft.model import ReftStack

    capsys.readouterr()
    args = ["generate", "--adapter", str(trained), "--adapter", str(trained), "--prompt", "Who are you?", "--max-tokens", "6"]
    assert cli.main(args) == 0
    printed = capsys.readouterr().out
    model, tokenizer = mlx_lm.load(str(tiny_model_dir))
    stack = ReftStack([load_adapter(model, trained), load_adapter(model, trained)])  # the same edit, twice over
    prompt = format_prompt(tokenizer, "Who are you?", read_adapter_config(trained)["formatting"])
    assert printed == generate(model, tokenizer, prompt, stack, max_tokens=6) + "\n"
