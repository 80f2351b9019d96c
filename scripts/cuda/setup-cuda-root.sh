#!/usr/bin/env bash
# Makes a CUDA 13.0 toolkit root out of PyPI wheels, plus a link-time libcuda stub, so that
# candle's `cuda` (and `cudnn`) features compile on a machine without a GPU or a CUDA install.
# Prints the root. The venv lives outside the repository (SEGCTL_CUDA_VENV to move it).
# usage: [WITH_CUDNN=1] scripts/cuda/setup-cuda-root.sh   (check.sh calls it)
set -euo pipefail
VENV=${SEGCTL_CUDA_VENV:-$HOME/.cache/segctl-cuda/venv}
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
"$VENV/bin/pip" install -q \
  nvidia-cuda-nvcc==13.0.88 nvidia-cuda-crt==13.0.88 nvidia-nvvm==13.0.88 \
  nvidia-cuda-runtime==13.0.96 nvidia-cuda-cccl==13.0.85 nvidia-cuda-nvrtc==13.0.88 \
  nvidia-cublas==13.0.2.14 nvidia-curand==10.4.0.35 ${WITH_CUDNN:+nvidia-cudnn-cu13==9.21.1.3} >&2
ROOT=$("$VENV/bin/python" -c 'import nvidia,os;print(os.path.join(list(nvidia.__path__)[0],"cu13"))')
cd "$ROOT/lib"
# the wheels ship only lib*.so.N; the linker wants the unversioned names
for f in cudart.so.13 cublas.so.13 cublasLt.so.13 curand.so.10 nvrtc.so.13; do ln -sf "lib$f" "lib${f%.so.*}.so"; done
# libcuda comes with the GPU driver, which cannot be installed here: link against a stub with
# the real soname; at run time the driver's own libcuda.so.1 is loaded instead.
mkdir -p stubs
cudarc=$(ls -d "$HOME"/.cargo/registry/src/*/cudarc-* 2>/dev/null | sort -V | tail -1)
[ -n "$cudarc" ] || { echo "run 'cargo fetch' in the project first (cudarc sources are needed)" >&2; exit 1; }
grep -ohE '^ +fn cu[A-Za-z0-9_]+\(' "$cudarc"/src/driver/sys/*.rs | sed -E 's/^ +fn //;s/\(//' | sort -u \
  | awk '{print "int " $1 "(void){return 34;}"}' > stubs/libcuda_stub.c
gcc -shared -fPIC -Wl,-soname,libcuda.so.1 -o stubs/libcuda.so stubs/libcuda_stub.c
if [ -n "${WITH_CUDNN:-}" ]; then
  cudnn=$(dirname "$ROOT")/cudnn
  ln -sf "$cudnn/lib/libcudnn.so.9" "$ROOT/lib/libcudnn.so"
  for h in "$cudnn"/include/*.h; do ln -sf "$h" "$ROOT/include/"; done
fi
echo "$ROOT"
