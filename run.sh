#!/usr/bin/env bash
# attnkern's two entry points, each on a fresh machine or an existing checkout:
#   ./run.sh main [ARGS...]      the main job: `attnkern profile` on the built-in sample slide
#                                (or `./run.sh main compare --op all`, `./run.sh main profile SLIDE`)
#   ./run.sh test [PYTEST ARGS]  the tests
# Both create or reuse the virtual environment .venv in the project root, install the
# dependencies of requirements.txt when it changed, and build the C++ extension when csrc/ or
# setup.py changed.
set -euo pipefail
cd "$(dirname "$0")"

PYTHON=${PYTHON:-python3}
VENV=.venv
PY=$VENV/bin/python

bootstrap() {
    if [ ! -x "$PY" ]; then
        echo "[attnkern] creating $VENV" >&2
        "$PYTHON" -m venv "$VENV"
    fi
    local want have
    want=$(cat requirements.txt | sha256sum | cut -d' ' -f1)
    have=$(cat "$VENV/.deps-stamp" 2>/dev/null || true)
    if [ "$want" != "$have" ]; then
        echo "[attnkern] installing dependencies (requirements.txt)" >&2
        "$PY" -m pip install -q --upgrade pip
        "$PY" -m pip install -q -r requirements.txt
        echo "$want" > "$VENV/.deps-stamp"
    fi
    want=$(cat setup.py pyproject.toml csrc/* 2>/dev/null | sha256sum | cut -d' ' -f1)
    have=$(cat "$VENV/.build-stamp" 2>/dev/null || true)
    if [ "$want" != "$have" ] || ! "$PY" -c "from attnkern import _cpu; _cpu.require()" 2>/dev/null; then
        echo "[attnkern] building the C++ extension" >&2
        MAX_JOBS=${MAX_JOBS:-2} "$PY" -m pip install -q --no-build-isolation --no-deps -e .
        "$PY" -c "from attnkern import _cpu; _cpu.require()"
        echo "$want" > "$VENV/.build-stamp"
    fi
}

cmd=${1:-}
shift || true
case "$cmd" in
    main)
        bootstrap
        case "${1:-}" in
            profile|compare|--help|-h|--version) ;;
            *) set -- profile "$@" ;;  # no subcommand: profile (options pass through)
        esac
        exec "$VENV/bin/attnkern" "$@"
        ;;
    test)
        bootstrap
        exec "$PY" -m pytest "$@"
        ;;
    *)
        echo "usage: ./run.sh main [ATTNKERN ARGS...] | ./run.sh test [PYTEST ARGS...]" >&2
        exit 2
        ;;
esac
