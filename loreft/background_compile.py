"""A cold start without the wait: the compiled step's CUDA kernels are built by a second process while training
runs uncompiled.

On CUDA, MLX compiles each distinct fused kernel of an `mx.compile`d step the first time a process meets it and
keeps it in its kernel folder. For a LoReFT step that is about 24 modules and 100-130 s on a fresh machine,
while the same step uncompiled needs two small ones and runs at about half the compiled speed. So when the
kernel folder has not seen this step, training starts uncompiled at once and a child process builds the compiled
step on a copy of the model cut to a few blocks and two rows of the training data (kernel names depend on
widths, dtypes and the operations, not on depth or batch: tests/test_background_compile.py checks it on the
CPU), writing the kernels into a staging folder of its own. When it is done, the
kernels are moved into the kernel folder (each module's files renamed in, its .ptx last, so a reader never sees
half a module) and training switches to the compiled step, which finds them on disk. A run that ends first keeps
what the child finished for the next run.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import mlx.core as mx

from .cuda import KERNEL_CACHE_ENV

SPEC, LOG = "step.json", "compile.log"
# The child's copy of the model: kernels differ where a block's neighbours differ (the gradient through an
# intervened block into another intervened one fuses differently than into a plain one), so a run that leaves
# some blocks plain gets plain, intervened, intervened, plain; a run that intervenes everywhere, two intervened.
MIXED_LAYERS, MIXED_DEPTH, ALL_DEPTH = [1, 2], 4, 2
ROWS = 2  # rows of the child's one batch: its memory is small beside the training process's
NOTE = ("this GPU's kernel folder has not seen this training step: training runs uncompiled (about half speed) "
        "while a second process compiles it, then switches (LOREFT_BACKGROUND_COMPILE=0 compiles first instead)")


def kernel_folder() -> Path | None:
    """MLX's CUDA kernel folder (MLX_PTX_CACHE_DIR) when this process trains on a CUDA GPU, else None."""
    folder = os.environ.get(KERNEL_CACHE_ENV)
    if not folder or mx.default_device() != mx.gpu or not mx.cuda.is_available():
        return None
    return Path(folder)


def child_shape(layers: list[int], num_layers: int) -> tuple[int, list[int] | str]:
    """(blocks, intervened blocks) of the child's copy of a model whose `layers` of `num_layers` are intervened."""
    if len(layers) == num_layers:
        return min(num_layers, ALL_DEPTH), "all"
    if num_layers < MIXED_DEPTH:
        return num_layers, list(layers)
    return MIXED_DEPTH, MIXED_LAYERS


def step_spec(model_path: str, dtype: mx.Dtype, dequantized: bool, reft_config: dict, layers: list[int],
              num_layers: int, train_config: dict, total_updates: int, loop: dict, rows: list, pad_id: int) -> dict:
    """What the child needs to build the same compiled step (rows: a few training Examples): JSON-ready."""
    depth, child_layers = child_shape(layers, num_layers)
    return {"model": model_path, "dtype": str(dtype).rsplit(".", 1)[-1], "dequantized": dequantized, "depth": depth,
            "reft": {**reft_config, "layers": child_layers}, "train": train_config,
            "total_updates": total_updates, "loop": loop, "mlx": mx.__version__,
            "rows": [dataclasses.asdict(r) for r in rows[:ROWS]], "pad_id": pad_id}


def marker(folder: Path, spec: dict) -> Path:
    """The file that says a child has built this step's kernels into `folder` (its name hashes the spec less
    its rows: kernels do not depend on the data)."""
    kernel_facts = {k: v for k, v in spec.items() if k not in ("rows", "pad_id")}
    digest = hashlib.sha256(json.dumps(kernel_facts, sort_keys=True).encode()).hexdigest()[:24]
    return folder.with_name(folder.name + ".steps") / f"{digest}.json"


def module_files(folder: Path) -> dict[str, list[Path]]:
    """Each kernel module in a kernel folder (MLX writes <name>.ptx, .txt and .cu; long names as subfolders)."""
    modules: dict[str, list[Path]] = {}
    for f in folder.rglob("*"):
        if f.is_file() and f.suffix in (".ptx", ".txt", ".cu"):
            modules.setdefault(str(f.relative_to(folder).with_suffix("")), []).append(f)
    return modules


def merge_modules(staging: Path, folder: Path, complete: bool) -> int:
    """Move the staging folder's modules that `folder` lacks into it; returns how many.

    MLX writes a module's files without renaming them into place, and one at a time: while the child ran, the
    newest module may be half-written, so a child that was stopped (complete=False) gives all but its newest.
    """
    modules = module_files(staging)
    if not complete and modules:
        newest = max(modules, key=lambda m: max(f.stat().st_mtime_ns for f in modules[m]))
        del modules[newest]
    moved = 0
    for name, files in modules.items():
        if (folder / name).with_suffix(".ptx").exists():
            continue
        for f in sorted(files, key=lambda f: f.suffix == ".ptx"):  # MLX looks for the .ptx first: it goes in last
            target = folder / f.relative_to(staging)
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(f, target)
        moved += 1
    return moved


def _link_modules(folder: Path, staging: Path) -> None:
    """Hard links (copies across filesystems) in staging to every module file in folder."""
    for files in module_files(folder).values() if folder.is_dir() else ():
        for f in files:
            target = staging / f.relative_to(folder)
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.link(f, target)
            except OSError:
                shutil.copy2(f, target)


def _remove(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


def _clear_stale(folder: Path) -> None:
    """Staging folders left by runs that were killed (their process is gone)."""
    for old in folder.parent.glob(folder.name + ".staging-*"):
        try:
            os.kill(int(old.name.rsplit("-", 1)[1]), 0)
        except ProcessLookupError:
            _remove(old)
        except (ValueError, PermissionError):
            pass


class BackgroundCompile:
    """The child process that builds the compiled step's kernels, and the move of its kernels into the folder."""

    def __init__(self, folder: Path, spec: dict):
        self.folder, self.spec, self.marker = folder, spec, marker(folder, spec)
        _clear_stale(folder)
        self.staging = folder.with_name(f"{folder.name}.staging-{os.getpid()}")
        _remove(self.staging)
        self.staging.mkdir(parents=True)
        _link_modules(folder, self.staging)  # what earlier runs compiled, the child reads instead of compiling
        (self.staging / SPEC).write_text(json.dumps(spec))
        # the child finds this loreft whatever its working folder, and the model where this process found it
        package_root = str(Path(__file__).resolve().parents[1])
        path = os.pathsep.join(p for p in (package_root, os.environ.get("PYTHONPATH")) if p)
        env = {**os.environ, KERNEL_CACHE_ENV: str(self.staging), "PYTHONPATH": path, "HF_HUB_OFFLINE": "1"}
        with open(self.staging / LOG, "w") as log:
            self.process = subprocess.Popen([sys.executable, "-m", __name__, str(self.staging)], env=env,
                                            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        self.moved = 0
        self.error: str | None = None

    def done(self) -> bool:
        """Whether the child has exited; on its first exit, its kernels are moved into the folder."""
        if self.process is None:
            return True
        if self.process.poll() is None:
            return False
        self._finish(complete=True)
        return True

    def close(self) -> None:
        """Stop the child if it still runs, keeping the kernels it finished (the run is over)."""
        if self.process is None:
            return
        running = self.process.poll() is None
        if running:
            self.process.kill()
            self.process.wait()
        self._finish(complete=not running)

    def _finish(self, complete: bool) -> None:
        code, self.process = self.process.returncode, None
        ok = complete and code == 0
        if complete and not ok:
            tail = (self.staging / LOG).read_text(errors="replace").strip().splitlines()
            self.error = f"exit {code}: {tail[-1] if tail else 'no output'}"
        try:
            self.moved = merge_modules(self.staging, self.folder, complete=ok)
            if ok:
                record(self.folder, self.spec)
        except OSError as e:  # a full or read-only disk costs the next run its head start, never this run
            self.error = f"its kernels could not be kept: {e}"
        finally:
            _remove(self.staging)


def record(folder: Path | None, spec: dict | None) -> None:
    """Mark folder as holding every kernel of spec's step (a child built them, or the training process did)."""
    if folder is None or spec is None:
        return
    path = marker(folder, spec)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(spec))


def start(folder: Path | None, spec: dict | None) -> BackgroundCompile | None:
    """A child building the step described by spec into folder, or None: no CUDA kernel folder, or done before."""
    if folder is None or spec is None or marker(folder, spec).is_file():
        return None
    try:
        return BackgroundCompile(folder, spec)
    except OSError:  # no room or no right to write beside the kernel folder: compile in the training process
        return None


# ---------------------------------------------------------------------------------------------------
# The child


def _die_with_parent() -> None:
    """Linux: the kernel kills this process when the training process dies (a killed job leaves no child)."""
    try:
        import ctypes

        ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def build_step(staging: Path) -> None:
    """Build and run the step staging/step.json describes, once per kind (accumulating, updating), on its rows."""
    from mlx_lm.utils import _download, load_model

    from .config import ReftConfig, TrainConfig
    from .data import Example, iterate_batches
    from .loss import PAD_TO, stage_batches
    from .model import _block_list, attach
    from .models import dequantize, quantized_layers
    from .trainer import LoopOptions, compile_step, make_optimizer, make_step

    mx.set_cache_limit(0)  # freed buffers go back at once: this process stays small beside the training one
    spec = json.loads((staging / SPEC).read_text())
    model, _ = load_model(_download(spec["model"]), lazy=True)  # weights are read only where used
    blocks = _block_list(model)
    del blocks[spec["depth"]:]
    model.set_dtype(getattr(mx, spec["dtype"]), lambda x: mx.issubdtype(x, mx.floating))
    if spec["dequantized"] and quantized_layers(model):  # the run unpacked its quantized layers
        dequantize(model)
    reft = attach(model, ReftConfig.from_dict(spec["reft"]))
    cfg = TrainConfig.from_dict(spec["train"])
    optimizer = make_optimizer(cfg, spec["total_updates"])
    optimizer.init(model.trainable_parameters())
    plain, state = make_step(reft, optimizer, cfg, options=LoopOptions(**spec["loop"], compiled=False))
    step = compile_step(plain, state)
    rows = [Example(**r) for r in spec["rows"]]
    batch = next(iterate_batches(rows, len(rows), pad_id=spec["pad_id"], pad_to=PAD_TO))
    inputs = tuple(stage_batches(reft, [batch]))  # one shard: the trainer's inputs for a GPU
    model.train()
    accumulated = None
    for update in ([False, True] if cfg.grad_accumulation_steps > 1 else [True]):
        *results, accumulated = step(inputs, accumulated, update)
        mx.eval(state, results, accumulated)


def main(argv: list[str]) -> int:
    from .backend import setup

    _die_with_parent()
    setup()  # the CUDA settings the training process runs with
    build_step(Path(argv[0]))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
