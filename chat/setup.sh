#!/usr/bin/env bash
# Install what the chat task needs: mlx-loreft with its `serve` extra, then gradio and openai for the page.
# mlx-loreft comes from the repository around this folder (its setup.sh picks the right MLX for the
# machine), else from $LOREFT_PACKAGE (a pip requirement, e.g. git+https://github.com/<owner>/mlx-loreft).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(dirname "$here")"

if [ -n "${VIRTUAL_ENV:-}" ] && [ -x "$VIRTUAL_ENV/bin/python" ]; then PY="$VIRTUAL_ENV/bin/python"; else PY="$(command -v python3 || command -v python)"; fi
install() { if command -v uv >/dev/null 2>&1; then uv pip install --python "$PY" "$@"; else "$PY" -m pip install "$@"; fi; }

if [ -n "${LOREFT_PACKAGE:-}" ]; then
    install "${LOREFT_PACKAGE}"
elif [ -f "$root/pyproject.toml" ] && grep -q 'name = "mlx-loreft"' "$root/pyproject.toml"; then
    bash "$root/setup.sh" --task
else
    echo "chat/setup.sh: error: mlx-loreft is not next to this folder; set the task's 'mlx-loreft package' (LOREFT_PACKAGE)" >&2
    exit 1
fi
install "starlette>=0.37" "uvicorn>=0.30" "openai>=1.40" gradio
"$PY" -c "import loreft.serve, gradio, openai; print('chat task ready: gradio', gradio.__version__)"
