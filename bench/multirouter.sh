#!/bin/sh
# The bench (bench/multirouter.py), with the repository's virtualenv when there is one.
# No cd: --out DIR is relative to where it is run from.
repo=$(cd "$(dirname "$0")/.." && pwd) || exit 1
if [ -x "$repo/.venv/bin/python" ]; then
    exec "$repo/.venv/bin/python" "$repo/bench/multirouter.py" "$@"
fi
exec python3 "$repo/bench/multirouter.py" "$@"
