"""Chat task entry point: resolve the adapter, start `loreft serve`, then the Gradio page streaming from it.

    MODEL_NAME   base model (empty: the adapter's own base model)
    ADAPTER      a job's saved adapter (job id, experiment/job id, or <id>_<name>) or an adapter folder
    LOREFT_PORT  the API's port on 127.0.0.1 (8001); GRADIO_HOST, GRADIO_PORT: the page's (0.0.0.0, 7860)
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

ADAPTER_CONFIG = "reft_config.json"


class ChatTaskError(Exception):
    """A parameter of the chat task is wrong; the message says which and why."""


def resolve_adapter(value: str, workspace: str | None = None) -> Path:
    """An adapter folder from a path or a training job's saved model under <workspace>/experiments/*/jobs/*/models/.

    value: a folder; a job id ('12'); 'experiment/job id' ('alpha/12'); or the model's folder name ('12_loreft').
    """
    value = value.strip()
    folder = Path(value).expanduser()
    if folder.is_dir():
        if not (folder / ADAPTER_CONFIG).is_file():
            raise ChatTaskError(f"adapter: {folder} is not a ReFT adapter folder ({ADAPTER_CONFIG} is missing)")
        return folder
    if not workspace:
        raise ChatTaskError(f"adapter: no folder {value!r}, and TFL_WORKSPACE_DIR is not set to look for a job's model")
    experiments = Path(workspace) / "experiments"
    parts = value.strip("/").split("/")
    if len(parts) == 2:
        pattern = f"{parts[0]}/jobs/{parts[1]}/models/*"
    elif len(parts) == 1:
        pattern = f"*/jobs/{value}/models/*"
    else:
        raise ChatTaskError(f"adapter: {value!r} is neither a folder nor a job id, experiment/job id or model name")
    found = sorted(p for p in experiments.glob(pattern) if (p / ADAPTER_CONFIG).is_file())
    if len(parts) == 1 and not found:
        found = sorted(p for p in experiments.glob(f"*/jobs/*/models/{value}") if (p / ADAPTER_CONFIG).is_file())
    if not found:
        raise ChatTaskError(f"adapter: no ReFT adapter saved by a job matches {value!r} under {experiments}")
    if len(found) > 1:
        raise ChatTaskError(f"adapter: {value!r} matches several adapters: {', '.join(map(str, found))}; give its folder")
    return found[0]


def serve_command(model: str, adapter: Path | None, port: int) -> list[str]:
    """The `loreft serve` command line for this base model and adapter (named 'adapter')."""
    if not model and adapter is None:
        raise ChatTaskError("set the base model, the adapter, or both")
    cmd = [sys.executable, "-m", "loreft.cli", "serve", "--host", "127.0.0.1", "--port", str(port)]
    if model:
        cmd += ["--model", model]
    if adapter is not None:
        cmd += ["--adapter", f"adapter={adapter}"]
    return cmd


def wait_until_ready(url: str, proc: subprocess.Popen, timeout: float = 900) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise ChatTaskError(f"loreft serve exited with code {proc.returncode} (see the log above)")
        try:
            with urllib.request.urlopen(url + "/health", timeout=2):
                return
        except OSError:
            time.sleep(1)
    raise ChatTaskError(f"loreft serve did not answer within {timeout:.0f} s")


def main() -> int:
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # the app stops a job with SIGTERM: stop the server too
    port = int(os.environ.get("LOREFT_PORT", "8001"))
    try:
        ref = os.environ.get("ADAPTER", "").strip()
        adapter = resolve_adapter(ref, os.environ.get("TFL_WORKSPACE_DIR")) if ref else None
        cmd = serve_command(os.environ.get("MODEL_NAME", "").strip(), adapter, port)
    except ChatTaskError as e:
        print(f"chat task: error: {e}", file=sys.stderr)
        return 2
    print("Starting:", " ".join(cmd), flush=True)
    server = subprocess.Popen(cmd)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_until_ready(url, server)
        from openai import OpenAI

        from chat_page import build_page

        client = OpenAI(base_url=url + "/v1", api_key="local")
        models = [m.id for m in client.models.list().data]
        page = build_page(client, models, default=models[-1])
        page.queue().launch(server_name=os.environ.get("GRADIO_HOST", "0.0.0.0"), prevent_thread_lock=True,
                            server_port=int(os.environ.get("GRADIO_PORT", "7860")))  # prints "Running on local URL"
        while server.poll() is None:  # until the job is stopped (SIGTERM) or the server ends
            time.sleep(1)
        print(f"chat task: loreft serve exited with code {server.returncode}", file=sys.stderr)
        return 1
    except ChatTaskError as e:
        print(f"chat task: error: {e}", file=sys.stderr)
        return 1
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()


if __name__ == "__main__":
    sys.exit(main())
