#!/usr/bin/env bash
# The GPU check, as one prepared script for a GPU machine (it has CUDA 13, Python and PyTorch,
# no Rust): segctl's CUDA build against that machine's own PyTorch, training and inference.
#   1. `segctl --version --json` (cuda.available must be true);
#   2. training: scripts/bench/train_bench.py --device cuda:0 (`segctl train --device cuda:0`
#      end to end beside PyTorch's bare step: f32, channels-last, bf16 autocast);
#   3. inference: `segctl benchmark --device cuda:0` beside PyTorch eager (cudnn.benchmark,
#      no_grad) on the same untrained architectures, batch 1 and 8.
# Build the binary here first (scripts/cuda/check.sh --release), carry it, and run from the
# project root:  scripts/cuda/gpu-bench.sh target/release/segctl [OUT_DIR]
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
bin=$(realpath "$1")
out=${2:-${OUT:-/tmp/segctl-gpu}}
mkdir -p "$out"
py=${PYTHON:-python3}
gpu() { PYTHON=$py "$here/run-gpu.sh" "$@"; }
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$out/gpu.csv"
gpu "$bin" --version --json | tee "$out/version.json"
gpu "$py" "$here/../bench/train_bench.py" --device cuda:0 --segctl "$bin" --precision f32 \
    --batch "${BATCH:-32}" --steps "${STEPS:-10}" --epochs 3 --rounds "${ROUNDS:-2}" --threads "${THREADS:-8}" \
    --out "$out/train-cuda.json" \
    2>&1 | tee "$out/train.log"
for arch in unet mobilenetv2_unet; do
    if [[ $arch == unet ]]; then model=(--set model.unet.depth=4 --set model.unet.base_width=32); else model=(--set model.encoder.weights=none); fi
    for batch in 1 8; do
        gpu "$bin" benchmark --device cuda:0 --set model.arch=$arch "${model[@]}" --set data.image_size=128 \
            --batch $batch --iterations 50 --warmup 10 --json > "$out/segctl-$arch-b$batch.json"
        "$py" - "$arch" "$batch" > "$out/torch-$arch-b$batch.json" <<'PY'
import json, sys, time, torch
sys.path.insert(0, "scripts/bench")
import torch_models
arch, batch = sys.argv[1], int(sys.argv[2])
torch.backends.cudnn.benchmark = True
model = torch_models.build_model(arch).eval().cuda()
x = torch.randn(batch, 3, 128, 128, device="cuda")
with torch.no_grad():
    for _ in range(10):
        model(x)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(50):
        model(x).argmax(1).cpu()
    dt = (time.perf_counter() - t0) / 50
print(json.dumps({"impl": "pytorch eager f32", "arch": arch, "batch": batch, "images_per_s": round(batch / dt, 1), "torch": torch.__version__}))
PY
        echo "$arch b$batch: segctl $(grep -o '"images_per_s":[0-9.]*' "$out/segctl-$arch-b$batch.json" | head -1), torch $(grep -o '"images_per_s": [0-9.]*' "$out/torch-$arch-b$batch.json")"
    done
done
