#!/usr/bin/env bash
# On a GPU machine with the CUDA 13 driver: runs a binary built by check.sh against the CUDA 13
# and cuDNN libraries that the machine's Python environment holds (PyTorch ships them as wheels).
# The link-time libcuda stub must never be on LD_LIBRARY_PATH here.
# usage: run-gpu.sh BINARY [ARGS...]      (PYTHON=... names another interpreter)
set -euo pipefail
nv=$("${PYTHON:-python3}" -c 'import nvidia;print(list(nvidia.__path__)[0])')
export LD_LIBRARY_PATH="$nv/cu13/lib:$nv/cudnn/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
exec "$@"
