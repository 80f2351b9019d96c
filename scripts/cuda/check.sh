#!/usr/bin/env bash
# Builds segctl with candle's CUDA backend and the cuDNN convolutions (`--features cuda,cudnn`)
# on a machine without a GPU or a CUDA install: the CUDA 13.0 toolkit comes from PyPI wheels
# (setup-cuda-root.sh), libcuda from a link-time stub. Compile only: nothing here runs on a GPU.
# With --release it leaves target/release/segctl, the binary to carry (stripped) to a GPU
# machine (H100/H200: sm_90a; CUDA_COMPUTE_CAP=... for others) and start through run-gpu.sh.
# It builds in the project's own target folder, so the CPU build's dependencies are reused;
# the next `cargo build`/`cargo test` puts the CPU binary back in place.
# usage (from the project root): scripts/cuda/check.sh [--release] [extra cargo args]
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
cd "$here/../.."
cargo fetch -q   # setup-cuda-root.sh reads cudarc's sources for the libcuda stub
ROOT=$(WITH_CUDNN=1 "$here/setup-cuda-root.sh" | tail -1)
export CUDA_HOME=$ROOT PATH=$ROOT/bin:$PATH CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP:-90} CUDAFORGE_THREADS=${CUDAFORGE_THREADS:-2}
export LIBRARY_PATH=$ROOT/lib:$ROOT/lib/stubs${LIBRARY_PATH:+:$LIBRARY_PATH}
cargo build --locked --features cuda,cudnn --bin segctl "$@"
echo "built segctl with cuda,cudnn (nvcc $(nvcc --version | grep -o 'release [0-9.]*'))"
