#!/usr/bin/env bash
# The GPU validation run (see benchmarks/gpu_check.py): from the checkout's root, with python3.
#   bash benchmarks/gpu_check.sh [--budget-s 480] [--out DIR] [--dry-run] ...
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
exec "${PYTHON:-python3}" -m benchmarks.gpu_check "$@"
