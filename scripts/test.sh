#!/bin/bash
# The whole test suite: lint, unit tests, and the integration tests that
# build client / router / server namespaces and run the real daemon in them.
# Extra arguments go to pytest (e.g. scripts/test.sh -k halfclose).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
.venv/bin/ruff check tcp_intercept lab tests bench scripts
exec .venv/bin/python -m pytest -p no:cacheprovider "$@"
