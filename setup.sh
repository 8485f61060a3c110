#!/usr/bin/env bash
# Install what main.py needs into the active virtual environment (TransformerLab activates the plugin's
# venv before running this; a task runs it from its setup step). The MLX backend is chosen per machine:
#   macOS on Apple silicon -> mlx (Metal); Linux with an NVIDIA GPU -> mlx[cuda13] (driver >= 580) or
#   mlx[cuda12]; any other Linux -> mlx[cpu]. Then this package itself and its other dependencies.
#   bash setup.sh          the plugin: also pyproject's `plugin` extra (what the app's plugin SDK imports,
#                          in case the app's own sync of its base requirements failed)
#   bash setup.sh --task   the task: also the `transformerlab` extra (the `lab` package main.py reports through)
set -euo pipefail
cd "$(dirname "$0")"

die() { echo "setup.sh: error: $*" >&2; exit 1; }

if [ -n "${VIRTUAL_ENV:-}" ] && [ -x "$VIRTUAL_ENV/bin/python" ]; then
    PY="$VIRTUAL_ENV/bin/python"
else
    PY="$(command -v python3 || command -v python || true)"
fi
[ -n "$PY" ] || die "no python found; activate the environment to install into first"

install() {  # uv when the app provides it (it does for plugins), pip otherwise
    if command -v uv >/dev/null 2>&1; then
        uv pip install --python "$PY" "$@"
    else
        "$PY" -m pip install "$@"
    fi
}

os="$(uname -s)"
arch="$(uname -m)"
case "$os" in
    Darwin)
        [ "$arch" = "arm64" ] || die "MLX needs Apple silicon on macOS; this Mac is $arch"
        backend="mlx"
        ;;
    Linux)
        driver="$(nvidia-smi --query-gpu=driver_version --format=csv,noheader 2>/dev/null | head -n 1 || true)"
        if [ -n "$driver" ]; then
            major="${driver%%.*}"
            if [ "$major" -ge 580 ] 2>/dev/null; then backend="mlx[cuda13]"; else backend="mlx[cuda12]"; fi
            echo "NVIDIA driver $driver found: installing $backend"
        else
            backend="mlx[cpu]"
        fi
        ;;
    *)
        die "MLX runs on macOS (Apple silicon) and Linux, not on $os"
        ;;
esac

# The package's dependencies from pyproject.toml, minus its own choice of MLX backend: mlx-cpu and
# mlx-cuda-* install the same library files, so exactly one of them may be present.
extra="plugin"
[ "${1:-}" = "--task" ] && extra="transformerlab"
"$PY" -c "import tomllib" 2>/dev/null || install tomli || die "could not install tomli (Python < 3.11 needs it)"
deps="$("$PY" - "$extra" <<'PYEOF'
import re, sys
try:
    import tomllib
except ImportError:  # Python 3.10
    import tomli as tomllib
project = tomllib.load(open("pyproject.toml", "rb"))["project"]
reqs = list(project["dependencies"])
reqs += project.get("optional-dependencies", {}).get(sys.argv[1], [])
for r in reqs:
    if re.match(r"^\s*mlx\s*(\[|[<>=!~;]|$)", r) is None:  # keep mlx-lm and everything else
        print(r)
PYEOF
)" || die "could not read the dependencies from pyproject.toml"

mapfile -t dep_list <<< "$deps"
echo "Installing $backend and: ${dep_list[*]}"
install "$backend" "${dep_list[@]}" || die "installing $backend and the dependencies failed (see above)"
install --no-deps . || die "installing mlx-loreft from $(pwd) failed (see above)"

"$PY" -c "import mlx.core as mx, mlx_lm, loreft; print('mlx-loreft', loreft.__version__, 'on', mx.default_device())" \
    || die "the installed packages do not import (see above)"
if [ "$extra" = "transformerlab" ]; then
    "$PY" -c "from lab import lab" || die "the transformerlab package does not import (see above)"
fi
echo "setup.sh: done"
