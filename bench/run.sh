#!/bin/sh
# The bench (bench/run.py), with the repository's virtualenv when there is one.
cd "$(dirname "$0")/.." || exit 1
if [ -x .venv/bin/python ]; then
    exec .venv/bin/python bench/run.py "$@"
fi
exec python3 bench/run.py "$@"
