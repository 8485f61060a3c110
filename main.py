"""Entry point for TransformerLab (plugin and task) and the command line; the work is done in loreft/.

- Plugin: the app's harness imports this file as `main` and calls main() with --input_file in argv.
- Task: task.yaml runs `exec python main.py` inside a TransformerLab job (_TFL_JOB_ID, TFL_* set).
- Anywhere else: `python main.py --model ... --data ...` is `loreft train --model ... --data ...`.
Importing this file does nothing: the harness imports it and then calls main(), so training runs once.
"""

import sys


def main(argv=None) -> int:
    """Train once, in whichever runtime this process is in; returns the exit code."""
    from loreft.backend import setup

    setup()  # fast BLAS / CUDA graph size: before anything imports mlx.core
    from loreft.transformerlab import detect_runtime

    args = sys.argv[1:] if argv is None else list(argv)
    runtime = detect_runtime(args)
    if runtime == "plugin":
        from loreft.transformerlab import run_plugin

        return run_plugin()
    if runtime == "task":
        from loreft.transformerlab import run_task

        return run_task()
    from loreft.cli import main as cli_main

    return cli_main(["train", *args])


if __name__ == "__main__":
    sys.exit(main())
