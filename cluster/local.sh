#!/usr/bin/env bash
# Local multi-node Ray cluster + MLflow server: `cluster/local.sh up|down|status|env [N] [options]`.
# The logic lives in cluster/local.py (run `cluster/local.sh --help`).
here=$(cd "$(dirname "$0")" && pwd)
exec "${PYTHON:-$here/../.venv/bin/python}" "$here/local.py" "$@"
