"""Training callbacks (progress bar, Ctrl-C, TensorBoard, W&B) and the files written beside each adapter (metrics.jsonl, loss.png)."""

from __future__ import annotations

import json
import math
import os
import signal
import sys
from pathlib import Path

from .config import ConfigError
from .model import ParameterStats

TENSORBOARD_DIR = "runs"  # TensorBoard event files, under the adapter folder


class Callback:
    """Hooks the trainer calls; every method is optional."""

    def on_train_start(self, info: dict) -> None:
        """info: total_steps, trainable, total_parameters, percent, notes (advice for this run), config dicts."""

    def on_step(self, step: int, total_steps: int) -> None:
        """After every optimizer step (cheap: no device sync)."""

    def on_report(self, metrics: dict) -> None:
        """Every steps_per_report: step, loss, learning_rate, tokens_per_sec (every token of the rows, prompts too),
        supervised_tokens_per_sec (the tokens the loss is on), trained_tokens, peak_memory_gb, eta_s, progress."""

    def on_eval(self, metrics: dict) -> None:
        """After each evaluation: step, split, loss, perplexity."""

    def on_checkpoint(self, step: int, path: Path) -> None:
        """After a checkpoint folder is complete."""

    def should_stop(self) -> bool:
        """True asks the trainer to stop at the next step boundary (the adapter is saved)."""
        return False

    def on_end(self, summary: dict) -> None:
        """Once, after the final adapter is saved (not called when training fails: the exception propagates)."""


class StopOnSignal(Callback):
    """The first SIGINT or SIGTERM asks the trainer to stop at the next step and save the adapter.

    Further SIGTERMs belong to the same stop (TransformerLab sends two: one to every process of the job,
    one forwarded by its wrapper), so only a second Ctrl-C aborts. The handlers stay in place until
    restore(), so a signal that arrives while the adapter is being saved cannot kill the process.
    """

    def __init__(self, signals=(signal.SIGINT,), log=print):
        self.signals = signals
        self.log = log
        self.requested: int | None = None  # the first signal received
        self._announced = False
        self._previous: dict = {}

    def _handle(self, signum, frame):
        # only set a flag here: the handler may interrupt anything, even a print or a file write
        if self.requested is not None and signum == signal.SIGINT:  # a second Ctrl-C: give up on a clean stop
            self.restore()
            raise KeyboardInterrupt
        if self.requested is None:
            self.requested = signum

    def install(self) -> "StopOnSignal":
        """Catch the signals from now on (also before training starts); returns self."""
        if self._previous:
            return self
        try:
            for sig in self.signals:
                self._previous[sig] = signal.signal(sig, self._handle)
        except ValueError:  # not the main thread: signals stay as they are
            self._previous.clear()
        return self

    def restore(self):
        """Put back the handlers that were there before."""
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def on_train_start(self, info):
        self.install()

    def should_stop(self):
        if self.requested is not None and not self._announced:
            self._announced = True
            again = " (press Ctrl-C again to abort)" if self.requested == signal.SIGINT else ""
            self.log(f"{signal.Signals(self.requested).name} received: stopping now and saving the adapter{again}")
        return self.requested is not None


class ProgressBar(Callback):
    """A tqdm bar with loss, tokens/s and ETA, plus one line per evaluation."""

    def __init__(self, file=None):
        self.file = file or sys.stderr
        self.bar = None

    def on_train_start(self, info):
        from tqdm import tqdm

        for line in start_lines(info):
            print(line, file=self.file)
        self.bar = tqdm(total=info["total_steps"], desc="train", unit="step", file=self.file, dynamic_ncols=True)

    def on_step(self, step, total_steps):
        if self.bar is not None:
            self.bar.update(step - self.bar.n)

    def on_report(self, m):
        if self.bar is not None:
            # all: every token of the rows; sup: the supervised ones (what mlx_lm lora --mask-prompt counts)
            self.bar.set_postfix(loss=f"{m['loss']:.4f}", tok_s_all=f"{m['tokens_per_sec']:.0f}",
                                 tok_s_sup=f"{m.get('supervised_tokens_per_sec', 0):.0f}", lr=f"{m['learning_rate']:.2e}")

    def on_eval(self, m):
        line = eval_line(m)
        (self.bar.write(line, file=self.file) if self.bar is not None else print(line, file=self.file))

    def on_checkpoint(self, step, path):
        if self.bar is not None:
            self.bar.write(f"step {step}: checkpoint saved to {path}", file=self.file)

    def on_end(self, summary):
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def scalars(row: dict) -> dict[str, float]:
    """A report or evaluation row's metrics under the names every logger uses: train/loss, eval/perplexity, ..."""
    if row.get("kind") == "train":
        return {f"train/{k}": float(row[k]) for k in ("loss", "learning_rate", "tokens_per_sec", "supervised_tokens_per_sec")
                if k in row}
    prefix = "eval" if row.get("split") == "valid" else row.get("split", "eval")
    return {f"{prefix}/{k}": float(row[k]) for k in ("loss", "perplexity", "exact_match") if k in row}


class TensorBoardLogger(Callback):
    """Scalars to TensorBoard event files in log_dir (tensorboardX: pip install 'mlx-loreft[tensorboard]')."""

    def __init__(self, log_dir: str | Path):
        try:
            from tensorboardX import SummaryWriter
        except ImportError:
            raise ConfigError("report_to", "tensorboard", "needs the tensorboardX package: pip install 'mlx-loreft[tensorboard]'") from None
        self.writer = SummaryWriter(logdir=str(log_dir))

    def _log(self, row: dict) -> None:
        for name, value in scalars(row).items():
            self.writer.add_scalar(name, value, row["step"])
        self.writer.flush()

    def on_report(self, m):
        self._log(m)

    def on_eval(self, m):
        self._log(m)

    def on_end(self, summary):
        self.writer.close()


class WandbLogger(Callback):
    """Scalars to Weights & Biases (pip install 'mlx-loreft[wandb]'); offline, to local files, when no API key is set."""

    def __init__(self, project: str = "mlx-loreft", name: str | None = None, config: dict | None = None, wandb=None):
        if wandb is None:
            try:
                import wandb
            except ImportError:
                raise ConfigError("report_to", "wandb", "needs the wandb package: pip install 'mlx-loreft[wandb]'") from None
        has_key = bool(os.environ.get("WANDB_API_KEY")) or _netrc_has("api.wandb.ai")
        mode = os.environ.get("WANDB_MODE") or ("online" if has_key else "offline")
        self.run = wandb.init(project=project, name=name, config=config or {}, mode=mode)

    def on_report(self, m):
        self.run.log(scalars(m), step=m["step"])

    def on_eval(self, m):
        self.run.log(scalars(m), step=m["step"])

    def on_end(self, summary):
        self.run.finish()


def _netrc_has(host: str) -> bool:
    try:
        import netrc

        return netrc.netrc().authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


def report_callbacks(report_to: tuple[str, ...], adapter_dir: str | Path, config: dict | None = None) -> list[Callback]:
    """The loggers named in report_to ('tensorboard', 'wandb'); a missing package is a ConfigError."""
    loggers: list[Callback] = []
    if "tensorboard" in report_to:
        loggers.append(TensorBoardLogger(Path(adapter_dir) / TENSORBOARD_DIR))
    if "wandb" in report_to:
        loggers.append(WandbLogger(name=Path(adapter_dir).name, config=config))
    return loggers


def start_lines(info: dict) -> list[str]:
    """What a run shows when it starts: the trainable share of the model, then the trainer's notes."""
    share = str(ParameterStats(info["trainable"], info["total_parameters"]))
    return [share, *(f"Note: {n}" for n in info.get("notes", []))]


def write_metrics(history: list[dict], path: Path) -> None:
    """One JSON object per line: train reports and evaluations, in order."""
    path.write_text("".join(json.dumps(row) + "\n" for row in history))


def report_line(m: dict, total_steps: int) -> str:
    """One line per report, for logs without a progress bar (TransformerLab's job output)."""
    return (f"step {m['step']}/{total_steps}: loss {m['loss']:.4f}, lr {m['learning_rate']:.3g}, "
            f"{m['tokens_per_sec']:.0f} tokens/s (all; {m.get('supervised_tokens_per_sec', 0):.0f} supervised), "
            f"ETA {m['eta_s']:.0f}s")


def eval_line(m: dict) -> str:
    """One line per evaluation."""
    return f"step {m['step']}: {m['split']} loss {m['loss']:.4f}, perplexity {m['perplexity']:.3f}"


def plot_loss(history: list[dict], path: Path, title: str = "LoReFT training") -> None:
    """Train and validation loss against step, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    train = [(r["step"], r["loss"]) for r in history if r.get("kind") == "train" and math.isfinite(r["loss"])]
    valid = [(r["step"], r["loss"]) for r in history if r.get("kind") == "eval" and r.get("split") == "valid"]
    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    if train:
        ax.plot(*zip(*train), label="train", color="tab:blue")
    if valid:
        ax.plot(*zip(*valid), "o-", label="validation", color="tab:orange")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (completion tokens)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if train or valid:
        ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
