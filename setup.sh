#!/usr/bin/env bash
# Install what main.py needs into the active virtual environment (TransformerLab activates the plugin's
# venv before running this; a task runs it from its setup step, in the job's venv). The MLX backend is
# chosen per machine: macOS on Apple silicon -> mlx (Metal); Linux with an NVIDIA GPU -> mlx[cuda13]
# (driver >= 580) or mlx[cuda12]; any other Linux -> mlx[cpu]. Then the other dependencies.
#   bash setup.sh          the plugin (the app up to v0.30), or the command line anywhere else
#   bash setup.sh --task   the task (the app from v0.31)
# The `transformerlab` package the app put in the venv is never replaced: the plugin SDK of the archived
# server needs its pinned 0.0.x (0.1.x breaks it). Only when it is missing is it installed: for a plugin,
# the version the app pins (read from its requirements under $_TFL_SOURCE_CODE_DIR, which the app sets),
# for a task the pyproject's `transformerlab` extra; outside the app (no $_TFL_SOURCE_CODE_DIR), none.
# This package itself is not built (a build would fetch setuptools, which the app's venvs may lack): the
# folder goes on the venv's import path with a .pth file, as an editable install does, and the `loreft`
# command into the venv's bin/. Keep the folder where it is.
set -euo pipefail
cd "$(dirname "$0")"

die() { echo "setup.sh: error: $*" >&2; exit 1; }

if [ -n "${VIRTUAL_ENV:-}" ] && [ -x "$VIRTUAL_ENV/bin/python" ]; then
    PY="$VIRTUAL_ENV/bin/python"
else
    PY="$(command -v python3 || command -v python || true)"
fi
[ -n "$PY" ] || die "no python found; activate the environment to install into first"
"$PY" -c 'import sys; sys.exit(sys.prefix == sys.base_prefix)' \
    || die "$PY is not in a virtual environment; activate the one to install into first"

install() {  # uv when the app provides it (it does for plugins and tasks), pip otherwise
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

mode="plugin"
[ "${1:-}" = "--task" ] && mode="task"

# transformerlab: the app's own, or (only when missing) the one this runtime needs
extra=""
pins=()
# (lab prints its home folder when imported: the version is the last line)
if tl_version="$("$PY" -c 'import importlib.metadata as m, lab; print(m.version("transformerlab"))' 2>/dev/null | tail -n 1)"; then
    echo "Keeping the app's transformerlab $tl_version"
elif [ "$mode" = "task" ]; then
    extra="transformerlab"
elif [ -n "${_TFL_SOURCE_CODE_DIR:-}" ]; then
    src="$_TFL_SOURCE_CODE_DIR"
    pin="$(cat "$src"/requirements*.txt "$src"/requirements*.in 2>/dev/null | grep -o -m 1 -E '^transformerlab==[^ ;#]+' || true)"
    pin="${pin:-transformerlab==0.0.45}"  # the archived transformerlab-api's last pin
    echo "No transformerlab in this venv: installing $pin, the app's pin, and the plugin SDK's other imports"
    pins=("$pin")
    extra="plugin"
else
    echo "No TransformerLab here (\$_TFL_SOURCE_CODE_DIR is unset): installing for the command line only"
fi

# The package's dependencies from pyproject.toml, minus its own choice of MLX backend: mlx-cpu and
# mlx-cuda-* install the same library files, so exactly one of them may be present.
"$PY" -c "import tomllib" 2>/dev/null || install tomli || die "could not install tomli (Python < 3.11 needs it)"
deps="$("$PY" - "$extra" <<'PYEOF'
import re, sys
try:
    import tomllib
except ImportError:  # Python 3.10
    import tomli as tomllib
project = tomllib.load(open("pyproject.toml", "rb"))["project"]
reqs = list(project["dependencies"])
if sys.argv[1]:
    reqs += project.get("optional-dependencies", {}).get(sys.argv[1], [])
for r in reqs:
    if re.match(r"^\s*mlx\s*(\[|[<>=!~;]|$)", r) is None:  # keep mlx-lm and everything else
        print(r)
PYEOF
)" || die "could not read the dependencies from pyproject.toml"

mapfile -t dep_list <<< "$deps"
echo "Installing $backend and: ${dep_list[*]} ${pins[*]:-}"
install "$backend" "${dep_list[@]}" ${pins[@]+"${pins[@]}"} || die "installing $backend and the dependencies failed (see above)"

# this package: the folder on the import path, and the loreft command
paths="$("$PY" -c 'import sysconfig; p = sysconfig.get_paths(); print(p["purelib"]); print(p["scripts"])')" \
    || die "could not find the venv's site-packages"
site="$(sed -n 1p <<< "$paths")"
scripts="$(sed -n 2p <<< "$paths")"
pwd > "$site/mlx_loreft.pth"
cat > "$scripts/loreft" <<EOF
#!$PY
import sys

from loreft.cli import main

sys.exit(main())
EOF
chmod +x "$scripts/loreft"

(cd / && "$PY" -c "import mlx.core as mx, mlx_lm, loreft; print('mlx-loreft', loreft.__version__, 'on', mx.default_device())") \
    || die "the installed packages do not import (see above)"
if [ -n "${tl_version:-}" ] || [ -n "$extra" ]; then
    "$PY" -c "from lab import lab" || die "the transformerlab package does not import (see above)"
fi
echo "setup.sh: done"
