#!/usr/bin/env bash
# Every benchmark with its default (full) settings, one after the other; results in
# scripts/bench/results/. PYTHON: the interpreter with scripts/bench/requirements.txt installed.
#   PYTHON=/tmp/benchenv/bin/python scripts/bench/run_all.sh 2>&1 | tee scripts/bench/results/run_all.log
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cd "$HERE/../.."
PYTHON="${PYTHON:-python3}"
export PYTHON
mkdir -p "$HERE/results"
"$PYTHON" "$HERE/validate_bench.py"
"$PYTHON" "$HERE/train_bench.py"
"$PYTHON" "$HERE/infer_bench.py" --rounds 5 --calls 40
ARCH=smoke "$HERE/serve_bench.sh"
ARCH=mobilenetv2_unet "$HERE/serve_bench.sh"
