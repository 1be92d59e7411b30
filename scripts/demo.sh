#!/bin/bash
# The demo: client / router / server namespaces, the TPROXY recipe in the
# router, tcp-interceptd in the foreground there, real clients through it.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
exec .venv/bin/python scripts/demo.py "$@"
