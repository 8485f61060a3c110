"""Data-parallel training with mx.distributed: two ring ranks on 127.0.0.1 against one process, same global batch."""

from __future__ import annotations

import importlib.util
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import pytest

from loreft.data import Example, iterate_batches
from loreft.trainer import steps_per_epoch

ROOT = Path(__file__).resolve().parents[1]
WORKER = Path(__file__).with_name("distributed_worker.py")
TOL = 1e-5  # float32: the ranks add their shares in another order than one process does


def _launcher() -> list[str]:
    script = Path(sys.executable).with_name("mlx.launch")  # the console script mlx installs
    return [str(script)] if script.exists() else [sys.executable, "-c", "from mlx._distributed_utils.launch import main; main()"]


def _free_port_pair() -> int:
    """A port p with p and p + 1 free: the ring backend listens on one port per rank."""
    for _ in range(20):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        try:
            with socket.socket() as s:
                s.bind(("127.0.0.1", port + 1))
            return port
        except OSError:
            continue
    pytest.skip("no two consecutive free TCP ports on 127.0.0.1 for the ring backend")


def ring(args: list[str], timeout: float) -> subprocess.CompletedProcess:
    """Run `python ARGS` as two ring ranks on 127.0.0.1. mlx.launch exits 0 even when a rank fails: check outputs."""
    cmd = _launcher() + ["--hosts", "127.0.0.1", "-n", "2", "--backend", "ring",
                         "--starting-port", str(_free_port_pair()), "--", sys.executable, *args]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    return subprocess.run(cmd, check=False, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def ring_ok(tmp_path_factory):
    """Skip the module's launched tests when two ring ranks cannot talk on this machine."""
    probe = tmp_path_factory.mktemp("ring_probe") / "probe.py"
    probe.write_text(
        "import mlx.core as mx\n"
        "w = mx.distributed.init(strict=True, backend='ring')\n"
        "print('ring', w.rank(), w.size(), mx.distributed.all_sum(mx.array(1.0)).item(), flush=True)\n"
    )
    try:
        out = ring([str(probe)], timeout=60)
    except subprocess.TimeoutExpired:
        pytest.skip("the ring backend did not start within 60 s on 127.0.0.1")
    except OSError as e:
        pytest.skip(f"mlx.launch could not run: {e}")
    if sorted(line for line in out.stdout.splitlines() if line.startswith("ring")) != ["ring 0 2 2.0", "ring 1 2 2.0"]:
        pytest.skip(f"the ring backend cannot start here: {(out.stdout + out.stderr)[-500:]}")


@pytest.fixture(scope="module")
def runs(ring_ok, tiny_model_dir, tmp_path_factory):
    """(single-process results, [rank 0, rank 1] results, their folders) from tests/distributed_worker.py."""
    single, multi = tmp_path_factory.mktemp("single"), tmp_path_factory.mktemp("multi")
    spec = importlib.util.spec_from_file_location("distributed_worker", WORKER)
    worker = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(worker)
    worker.main(str(tiny_model_dir), str(single), "AD")  # this process is a world of one
    out = ring([str(WORKER), str(tiny_model_dir), str(multi), "ABCD"], timeout=240)
    files = [multi / f"rank-{r}.json" for r in range(2)]
    assert all(f.exists() for f in files), f"a rank failed:\n{(out.stdout + out.stderr)[-3000:]}"
    ranks = [json.loads(f.read_text()) for f in files]
    return json.loads((single / "rank-0.json").read_text()), ranks, single, multi


def history(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


def max_diff(a: dict, b: dict) -> float:
    assert sorted(a) == sorted(b)
    return max(float(mx.abs(a[k] - b[k]).max()) for k in a)


def test_two_ranks_reach_the_same_losses_and_adapter_as_one_process(runs):
    single, ranks, single_dir, multi_dir = runs
    assert [r["world"] for r in ranks] == [2, 2] and single["world"] == 1
    one, two = history(single_dir / "A-0"), history(multi_dir / "A-0")
    assert [(r["kind"], r["step"]) for r in one] == [(r["kind"], r["step"]) for r in two]
    assert [r["kind"] for r in one].count("train") == 6 and [r["kind"] for r in one].count("eval") == 3
    for a, b in zip(one, two):
        assert abs(a["loss"] - b["loss"]) < TOL, (a, b)
        # counts over all ranks, not one rank's share or a multiple of it
        assert a.get("trained_tokens") == b.get("trained_tokens") and a.get("tokens") == b.get("tokens")
    adapter_one = mx.load(str(single_dir / "A-0" / "adapter.safetensors"))
    adapter_two = mx.load(str(multi_dir / "A-0" / "adapter.safetensors"))
    assert max_diff(adapter_one, adapter_two) < TOL
    midway = mx.load(str(multi_dir / "A-0" / "checkpoints" / "step-0000002" / "adapter.safetensors"))
    assert max_diff(adapter_one, midway) > 1e-3  # the weights kept moving: the comparison means something
    # every rank holds the same weights after every all-reduced update
    w0, w1 = (mx.load(str(multi_dir / f"A-weights-{r}.safetensors")) for r in range(2))
    assert max_diff(w0, w1) == 0.0
    assert ranks[0]["A"]["summary"]["valid"]["tokens"] == single["A"]["summary"]["valid"]["tokens"]
    assert abs(ranks[1]["A"]["summary"]["valid"]["loss"] - single["A"]["summary"]["valid"]["loss"]) < TOL


def test_only_rank_zero_writes_files_and_gets_callbacks(runs):
    single, ranks, _, multi_dir = runs
    written = {p.name for p in (multi_dir / "A-0").iterdir()}
    assert {"adapter.safetensors", "metrics.jsonl", "loss.png", "training_args.json", "checkpoints"} <= written
    assert sorted(p.name for p in (multi_dir / "A-0" / "checkpoints").iterdir()) == ["step-0000002", "step-0000004"]
    for scenario in "ABC":  # each rank was given its own folder: rank 1's must never appear
        assert not (multi_dir / f"{scenario}-1").exists()
    assert ranks[0]["A"]["events"] == single["A"]["events"] > 0
    assert ranks[1]["A"]["events"] == 0


def test_stop_on_rank_zero_then_resume_from_rank_zeros_checkpoint(runs):
    _, ranks, _, multi_dir = runs
    b0, b1 = ranks[0]["B"], ranks[1]["B"]
    # the stop request came from a callback, which only rank 0 has: both ranks stopped after step 4
    assert (b0["first_steps"], b0["first_stopped"]) == (b1["first_steps"], b1["first_stopped"]) == (4, True)
    assert b0["found"].endswith("step-0000004") and b1["found"] is None  # rank 1's disk has no checkpoint
    # rank 1 resumed from other initial weights and no checkpoint, yet both equal the uninterrupted run
    a = mx.load(str(multi_dir / "A-weights-0.safetensors"))
    for r in range(2):
        assert max_diff(a, mx.load(str(multi_dir / f"B-weights-{r}.safetensors"))) < TOL
    assert [r["loss"] for r in history(multi_dir / "B-0")] == pytest.approx([r["loss"] for r in history(multi_dir / "A-0")], abs=TOL)


def test_stop_between_queued_steps_ends_every_rank_at_the_asked_step(runs):
    single, ranks, single_dir, multi_dir = runs
    # rank 0 asks after step 3 with step 4 already queued; the ranks learn of it from a vote read with step
    # 4's loss, and roll step 4 back: the same end as one process, which stops at once
    assert single["D"]["summary"]["total_steps"] > 4
    assert [r["D"]["summary"]["steps"] for r in ranks] == [single["D"]["summary"]["steps"]] * 2 == [3, 3]
    assert all(r["D"]["summary"]["stopped"] for r in ranks)
    one = mx.load(str(single_dir / "D-weights-0.safetensors"))
    for r in range(2):
        assert max_diff(one, mx.load(str(multi_dir / f"D-weights-{r}.safetensors"))) < TOL
    assert max_diff(one, mx.load(str(multi_dir / "A-weights-0.safetensors"))) > 1e-3  # not the whole run's weights
    assert [r["step"] for r in history(multi_dir / "D-0")] == [1, 2, 3]


def test_non_finite_loss_on_one_rank_stops_every_rank(runs):
    _, ranks, _, _ = runs
    # only rank 0's weights were poisoned after step 1, while step 2 was already queued (the loop keeps one
    # step ahead): step 3 is the first to use them, and its global loss is NaN on both ranks
    assert ranks[0]["C"]["error"] == ranks[1]["C"]["error"]
    assert ranks[0]["C"]["error"] is not None and "loss became nan at step 3" in ranks[0]["C"]["error"]


# --- sharding rules (no launcher needed) ----------------------------------------------------------------


def _examples(n: int) -> list[Example]:
    return [Example(prompt=[1000 + i, 7], completion=[5] * (1 + i % 4)) for i in range(n)]


def test_evaluation_shards_keep_every_row_once():
    examples = _examples(11)
    for world in (2, 3):
        seen = [int(t) for r in range(world)
                for b in iterate_batches(examples, 4, shuffle=False, rank=r, world_size=world, equal_shares=False)
                for t in b.tokens[:, 0]]
        assert sorted(seen) == list(range(1000, 1011))
    # a rank with no row in a batch skips it instead of collating an empty batch
    assert len(list(iterate_batches(_examples(1), 2, shuffle=False, rank=1, world_size=2, equal_shares=False))) == 0


def test_steps_per_epoch_counts_the_batches_each_rank_gets():
    for n, batch, world in [(9, 4, 2), (10, 4, 2), (19, 8, 2), (7, 6, 3)]:
        got = [len(list(iterate_batches(_examples(n), batch, epoch=1, rank=r, world_size=world))) for r in range(world)]
        assert got == [steps_per_epoch(_examples(n), batch, world)] * world
    assert steps_per_epoch(_examples(10), 4) == 3  # one process: ceil(n / batch), as before


def test_under_mlx_launch_only_rank_zero_prints(ring_ok, tiny_model_dir, tmp_path):
    """The CLI's start line, trainable share and 'Adapter saved to' come once, from rank 0, not once per rank."""
    from loreft.demo import DEMO_ROWS

    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in DEMO_ROWS))
    out = ring(["-m", "loreft.cli", "train", "--model", str(tiny_model_dir), "--data", str(data), "--adapter-dir",
                str(tmp_path / "a"), "--iters", "2", "--batch-size", "4", "--rank", "2", "--layers", "1"], timeout=240)
    text = out.stdout + out.stderr
    assert (tmp_path / "a" / "adapter.safetensors").is_file(), text[-3000:]
    for line in ("Training loreft", "Trainable parameters", "Adapter saved to"):
        assert text.count(line) == 1, (line, text[-3000:])
