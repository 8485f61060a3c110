"""The background compile (loreft.background_compile): training starts uncompiled while a child process builds
the compiled step's kernels, then switches; the child's kernels reach the kernel folder whole.

This machine has no GPU. MLX's CPU backend compiles the same fused graphs (into $TMPDIR/mlx/<version>/cpu, not
the CUDA kernel folder), so the child, the switch and the kernel names are tested here on the CPU with a kernel
folder named by the test; the module moves are tested on files laid out as MLX's CUDA backend writes them.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import mlx.core as mx
import pytest

import loreft.background_compile as bc
from bench.kernel_count import modules
from loreft.config import ReftConfig, TrainConfig
from loreft.model import attach
from loreft.reporting import Callback
from loreft.trainer import LoopOptions, train

ROOT = Path(__file__).resolve().parents[1]


def write_module(folder: Path, name: str, ptx: bytes = b"ptx") -> None:
    """A module as MLX's CUDA backend writes it: <name>.ptx, .txt (kernel names), .cu (source)."""
    folder.mkdir(parents=True, exist_ok=True)
    for suffix, data in ((".ptx", ptx), (".txt", b"k\tmangled\n"), (".cu", b"src")):
        (folder / (name + suffix)).write_bytes(data)


# ---------------------------------------------------------------- moving modules into the kernel folder


def test_a_finished_childs_modules_all_move_in_and_existing_ones_stay(tmp_path):
    folder, staging = tmp_path / "kernels", tmp_path / "kernels.staging-1"
    write_module(folder, "gather_bfloat16_int32_1", b"mine")
    write_module(staging, "gather_bfloat16_int32_1", b"childs")
    for name in ("fused_a", "fused_b"):
        write_module(staging, name)
    assert bc.merge_modules(staging, folder, complete=True) == 2
    assert sorted(bc.module_files(folder)) == ["fused_a", "fused_b", "gather_bfloat16_int32_1"]
    assert all(len(files) == 3 for files in bc.module_files(folder).values())
    assert (folder / "gather_bfloat16_int32_1.ptx").read_bytes() == b"mine"  # never replaced under a reader


def test_a_stopped_childs_newest_module_is_left_out(tmp_path):
    """MLX writes a module's files in place: the one written last when the child was killed may be partial."""
    folder, staging = tmp_path / "kernels", tmp_path / "staging"
    for i, name in enumerate(["first", "second", "last"]):
        write_module(staging, name)
        stamp = time.time_ns() - (10 - i) * 10**9
        for f in staging.glob(name + ".*"):
            os.utime(f, ns=(stamp, stamp))
    assert bc.merge_modules(staging, folder, complete=False) == 2
    assert sorted(bc.module_files(folder)) == ["first", "second"]


def test_long_module_names_keep_their_subfolders(tmp_path):
    """MLX splits names longer than 245 characters into folders; the move keeps that layout."""
    folder, staging = tmp_path / "kernels", tmp_path / "staging"
    write_module(staging / ("A" * 245), "rest")
    bc.merge_modules(staging, folder, complete=True)
    assert (folder / ("A" * 245) / "rest.ptx").is_file() and (folder / ("A" * 245) / "rest.txt").is_file()


def test_the_staging_folder_starts_with_what_the_kernel_folder_has(tmp_path):
    folder, staging = tmp_path / "kernels", tmp_path / "staging"
    write_module(folder, "earlier_run")
    staging.mkdir()
    bc._link_modules(folder, staging)
    assert (staging / "earlier_run.ptx").read_bytes() == b"ptx"
    assert bc.merge_modules(staging, folder, complete=True) == 0  # nothing new to move


def test_the_marker_ignores_the_rows_but_not_what_shapes_the_kernels(tmp_path):
    from loreft.data import Example

    def spec(rows, lr=1e-3):
        return bc.step_spec("/m", mx.bfloat16, False, ReftConfig().to_dict(), [0, 1], 2,
                            TrainConfig(learning_rate=lr).to_dict(), 10, {"sparse_logits": True}, rows, 0)

    a, b = [Example([1, 2], [3])], [Example([5, 6, 7], [8, 9])]
    assert bc.marker(tmp_path, spec(a)) == bc.marker(tmp_path, spec(b))
    assert bc.marker(tmp_path, spec(a)) != bc.marker(tmp_path, spec(a, lr=2e-3))  # a constant in a fused kernel


def test_the_child_copies_each_kind_of_neighbour():
    assert bc.child_shape([0, 1, 2, 3], 4) == (2, "all")
    assert bc.child_shape([5], 24) == (4, [1, 2])  # plain -> intervened -> intervened -> plain
    assert bc.child_shape([1], 2) == (2, [1])


def stand_in_child(folder: Path, spec: dict, staging: Path, code: str) -> bc.BackgroundCompile:
    """A BackgroundCompile whose child runs `python -c code` (logging to the staging folder) instead of build_step."""
    child = bc.BackgroundCompile.__new__(bc.BackgroundCompile)
    child.folder, child.spec, child.marker, child.moved, child.error = folder, spec, bc.marker(folder, spec), 0, None
    child.staging = staging
    staging.mkdir(parents=True, exist_ok=True)
    with open(staging / bc.LOG, "w") as log:
        child.process = subprocess.Popen([sys.executable, "-c", code], stdout=log, stderr=subprocess.STDOUT)
    return child


# ---------------------------------------------------------------- the child and the switch, on the CPU


@pytest.fixture
def cpu_kernel_folder(monkeypatch, tmp_path):
    """Run the background compile on this CPU, with a kernel folder of the test's own."""
    folder = tmp_path / "kernels"
    folder.mkdir()
    monkeypatch.setattr(bc, "kernel_folder", lambda: folder)
    return folder


def wait_for_child_at_first_check(monkeypatch):
    """Make the trainer's first look at the child wait for it to exit: the switch then comes at a known step,
    not whenever the child happens to finish."""
    plain = bc.BackgroundCompile.done

    def done(self):
        if self.process is not None:
            self.process.wait(timeout=300)
        return plain(self)

    monkeypatch.setattr(bc.BackgroundCompile, "done", done)


def run(tiny_model_dir, examples, tmp_path, name, iters=6, callbacks=()):
    import mlx_lm

    ex, pad = examples
    model, _ = mlx_lm.load(str(tiny_model_dir))
    reft = attach(model, ReftConfig(layers=[1, 2], rank=2, positions="f2+l2"))
    cfg = TrainConfig(iters=iters, batch_size=4, learning_rate=2e-2, steps_per_report=1, seed=3)
    summary = train(reft, ex, None, cfg, tmp_path / name, pad_id=pad, base_model=str(tiny_model_dir),
                    callbacks=callbacks, options=LoopOptions(plot=None))
    losses = [r["loss"] for r in summary_history(tmp_path / name)]
    return summary, losses


def summary_history(adapter: Path) -> list[dict]:
    return [r for r in map(json.loads, (adapter / "metrics.jsonl").read_text().splitlines()) if r["kind"] == "train"]


def test_training_switches_to_the_compiled_step_when_the_child_is_done(tiny_model_dir, examples, tmp_path,
                                                                      cpu_kernel_folder, monkeypatch):
    wait_for_child_at_first_check(monkeypatch)
    notes = []

    class Notes(Callback):
        def on_train_start(self, info):
            notes.append(info["notes"])

    first, losses = run(tiny_model_dir, examples, tmp_path, "first", callbacks=[Notes()])
    assert bc.NOTE in notes[0]  # the user is told why the first steps are slow
    background = first["background_compile"]
    assert background["error"] is None
    # the first check comes after step 1 is read, with step 2 queued behind it: step 3 is the first compiled
    assert background["uncompiled_steps"] == 2
    assert list((cpu_kernel_folder.parent / "kernels.steps").glob("*.json")), "no marker after a finished child"
    assert not list(tmp_path.glob("kernels.staging-*")), "the staging folder was left behind"

    # the next run with the same step finds the marker: compiled from its first step, no child
    again, again_losses = run(tiny_model_dir, examples, tmp_path, "again", callbacks=[Notes()])
    assert again["background_compile"] is None and bc.NOTE not in notes[1]
    monkeypatch.setenv("LOREFT_BACKGROUND_COMPILE", "0")
    bc_off, off_losses = run(tiny_model_dir, examples, tmp_path, "off")
    assert bc_off["background_compile"] is None
    # uncompiled then compiled trains the same model as compiled throughout (float32: rounding apart)
    assert again_losses == off_losses
    assert losses == pytest.approx(off_losses, rel=1e-4)


def test_a_step_compiled_in_the_training_process_is_recorded_for_the_next_run(tiny_model_dir, examples, tmp_path,
                                                                                cpu_kernel_folder, monkeypatch):
    """LOREFT_BACKGROUND_COMPILE=0 compiles in the training process, which fills the kernel folder as a child
    would: the next run with the same step starts no child (it would only find the kernels there, late)."""
    monkeypatch.setenv("LOREFT_BACKGROUND_COMPILE", "0")
    first, _ = run(tiny_model_dir, examples, tmp_path, "foreground")
    assert first["background_compile"] is None
    assert list((cpu_kernel_folder.parent / "kernels.steps").glob("*.json")), "no marker after an in-process compile"
    monkeypatch.delenv("LOREFT_BACKGROUND_COMPILE")
    started = []
    plain_start = bc.start
    monkeypatch.setattr(bc, "start", lambda folder, spec: started.append(plain_start(folder, spec)) or started[-1])
    again, _ = run(tiny_model_dir, examples, tmp_path, "again")
    assert started == [None] and again["background_compile"] is None  # the marker was found: no child


def test_a_failing_child_is_reported_and_training_compiles_itself(tiny_model_dir, examples, tmp_path,
                                                                   cpu_kernel_folder, monkeypatch):
    wait_for_child_at_first_check(monkeypatch)
    monkeypatch.setattr(bc, "build_step", lambda staging: sys.exit("no GPU left for the child"))

    def start(folder, spec):  # the child imports build_step afresh: give it one that fails the same way
        return stand_in_child(folder, spec, folder.with_name(folder.name + ".staging-test"),
                              "import sys; print('CUDA out of memory'); sys.exit(3)")

    monkeypatch.setattr(bc, "start", start)
    summary, losses = run(tiny_model_dir, examples, tmp_path, "failed")
    assert summary["steps"] == 6 and all(map(lambda v: v == v, losses))
    assert summary["background_compile"]["error"] == "exit 3: CUDA out of memory"
    assert summary["background_compile"]["uncompiled_steps"] == 2  # then compiled in this process
    assert not (cpu_kernel_folder.parent / "kernels.steps").exists()  # no marker: the next run tries again


def test_a_run_that_ends_first_stops_the_child(tiny_model_dir, examples, tmp_path, cpu_kernel_folder, monkeypatch):
    children = []
    plain_init = bc.BackgroundCompile.__init__

    def init(self, *args):
        plain_init(self, *args)
        children.append(self.process)

    monkeypatch.setattr(bc.BackgroundCompile, "__init__", init)
    monkeypatch.setattr(bc.BackgroundCompile, "done", lambda self: False)  # the child is never seen finishing
    summary, _ = run(tiny_model_dir, examples, tmp_path, "short", iters=2)
    assert summary["background_compile"]["uncompiled_steps"] == 2
    assert len(children) == 1 and children[0].poll() is not None, "the child outlived the run"
    assert not list(tmp_path.glob("kernels.staging-*"))


CHILD_STEP = """
import loreft.backend; loreft.backend.setup()
import json, sys, mlx_lm
from loreft.config import ReftConfig, TrainConfig
from loreft.data import Example
from loreft.model import attach
from loreft.trainer import LoopOptions, train
model, _ = mlx_lm.load(sys.argv[1])
reft = attach(model, ReftConfig(layers=json.loads(sys.argv[3]), rank=2, positions="f2+l2"))
rows = [Example(list(range(5 + i, 40 + 3 * i)), list(range(7, 12 + i))) for i in range(8)]
cfg = TrainConfig(iters=2, batch_size=8, learning_rate=2e-2, steps_per_report=1)
train(reft, rows, None, cfg, sys.argv[2], pad_id=0, options=LoopOptions(plot=None, background_compile=False, cpu_streams=1))
"""


@pytest.mark.parametrize("layers", ["all", [2]])
def test_the_childs_copy_builds_every_kernel_of_the_full_step(tiny_model_dir, tmp_path, layers):
    """The premise: kernel names depend on widths, dtypes and operations, not on depth or batch size. The full
    model's compiled step (4 blocks, 8 rows) and the child's (2 or 4 blocks, 2 rows), each from an empty kernel
    folder, one stream (as on a GPU)."""
    from loreft.data import Example

    full_tmp, child_tmp = tmp_path / "full", tmp_path / "child"
    full_tmp.mkdir(), child_tmp.mkdir()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    subprocess.run([sys.executable, "-c", CHILD_STEP, str(tiny_model_dir), str(tmp_path / "adapter"), json.dumps(layers)],
                   env={**env, "TMPDIR": str(full_tmp)}, check=True, capture_output=True)
    rows = [Example(list(range(5 + i, 40 + 3 * i)), list(range(7, 12 + i))) for i in range(8)]
    intervened = [0, 1, 2, 3] if layers == "all" else layers
    spec = bc.step_spec(str(tiny_model_dir), mx.float32, False, ReftConfig(layers=layers, rank=2, positions="f2+l2").to_dict(),
                        intervened, 4, TrainConfig(iters=2, batch_size=8, learning_rate=2e-2, steps_per_report=1).to_dict(),
                        2, {"sparse_logits": True, "batched_rotations": True}, rows, 0)
    staging = tmp_path / "staging"
    staging.mkdir()
    (staging / bc.SPEC).write_text(json.dumps(spec))
    subprocess.run([sys.executable, "-m", "loreft.background_compile", str(staging)],
                   env={**env, "TMPDIR": str(child_tmp)}, check=True, capture_output=True)
    # one CUDA module holds every variant (contiguous, strided by rank) that the CPU compiles as a library each
    full, child = set(modules(full_tmp)), set(modules(child_tmp))
    assert len(full) > 10  # the step's fused graphs were found
    assert full <= child, f"kernels the child did not build: {sorted(full - child)[:3]}"


def test_a_kernel_folder_that_cannot_take_the_modules_costs_only_the_head_start(tmp_path, monkeypatch):
    folder = tmp_path / "kernels"
    folder.mkdir()
    write_module(tmp_path / "staging", "fused_a")
    child = stand_in_child(folder, {}, tmp_path / "staging", "pass")
    child.process.wait()

    def full_disk(*args):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(bc.os, "replace", full_disk)
    assert child.done()
    assert "No space left on device" in child.error
    assert not child.marker.exists() and not child.staging.exists()


def test_no_child_where_nothing_can_be_written_beside_the_kernel_folder(tmp_path):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    assert bc.start(blocker / "kernels", {"model": "m"}) is None  # the run compiles in its own process
