#!/usr/bin/env bash
# Set up a virtual environment in .venv (once) and run the demo or the test suite.
#   ./bootstrap.sh demo     train a LoReFT adapter on the embedded tiny model and show generations
#   ./bootstrap.sh test     run the whole test suite
set -euo pipefail
cd "$(dirname "$0")"
VENV="${LOREFT_VENV:-.venv}"
PYTHON="${PYTHON:-python3}"

if [ ! -x "$VENV/bin/python" ]; then
    "$PYTHON" -m venv "$VENV"
fi
stamp="$VENV/.installed-$(cat pyproject.toml | sha1sum | cut -c1-12)"
if [ ! -f "$stamp" ]; then
    "$VENV/bin/python" -m pip install --quiet --upgrade pip
    "$VENV/bin/python" -m pip install --quiet -e ".[test]"
    # the archived TransformerLab server's SDK pin, for the test that installs the plugin the way it does
    "$VENV/bin/python" -m pip download --quiet --no-deps --dest "$VENV/wheels" "transformerlab==0.0.45"
    touch "$stamp"
fi

case "${1:-}" in
    demo) shift; exec "$VENV/bin/loreft" demo "$@" ;;
    test) shift; exec "$VENV/bin/python" -m pytest -q "$@" ;;
    *) echo "usage: $0 demo|test [extra arguments]" >&2; exit 2 ;;
esac
