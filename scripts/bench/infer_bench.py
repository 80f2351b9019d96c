"""Inference speed: segctl's compiled plan against onnxruntime on the same architecture.

For each architecture, the PyTorch twin (torch_models.py, same layers and parameter counts
as segctl's model) is exported to ONNX (opset 17, dynamic batch) and run by onnxruntime's
CPU execution provider (graph optimizations on, `intra_op_num_threads` = threads, one
inter-op thread): what a Python team deploys. segctl's side is `segctl benchmark --json`
on an untrained model of the same architecture (speed does not depend on the weights).

Both sides run pinned to the same cores (the first `threads` CPUs: on a VM the vCPUs may run
at different speeds, and an unpinned single-threaded run lands on either), one after the
other, alternating in `--rounds` rounds (this VM's speed drifts
from minute to minute; alternating keeps the comparison fair), each round `--calls` timed
calls after a warm-up; a side's figure is the median of its per-round medians. Prints a
Markdown table with images/s, GFLOP/s on each side and the ratio, and writes the raw
results as JSON.

    python scripts/bench/infer_bench.py                       # all rows
    python scripts/bench/infer_bench.py --archs smoke --rounds 1 --calls 5   # quick check
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np
import onnxruntime as ort
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from torch_models import build_model, export_onnx as export_model, parameter_count  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# name -> (torch_models.build_model kwargs, segctl config flags)
ARCHS = {
    "smoke": (dict(arch="unet", widths=[12, 16, 32, 64, 128, 256]), ["--config", "configs/smoke.yaml"]),
    "unet": (dict(arch="unet", depth=4, base_width=32), ["--set", "model.arch=unet", "--set", "model.unet.depth=4", "--set", "model.unet.base_width=32"]),
    "mobilenetv2_unet": (dict(arch="mobilenetv2_unet"), ["--set", "model.arch=mobilenetv2_unet", "--set", "model.encoder.weights=none"]),
}
DESCRIPTION = {
    "smoke": "`unet` widths [12,16,32,64,128,256] (configs/smoke.yaml)",
    "unet": "`unet` depth 4, base width 32",
    "mobilenetv2_unet": "`mobilenetv2_unet`",
}


def export_onnx(arch, path, size):
    kwargs, _ = ARCHS[arch]
    model = build_model(**kwargs)
    export_model(model, path, size)
    return parameter_count(model)


def ort_round(session, batch, size, calls, warmup):
    x = np.random.default_rng(7).standard_normal((batch, 3, size, size), dtype=np.float32)
    for _ in range(warmup):
        session.run(None, {"image": x})
    times = []
    for _ in range(calls):
        t = time.perf_counter()
        session.run(None, {"image": x})
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def segctl_round(segctl, arch, batch, threads, calls, warmup):
    _, flags = ARCHS[arch]
    cmd = [segctl, "benchmark", *flags, "--batch", str(batch), "--threads", str(threads),
           "--iterations", str(calls), "--warmup", str(warmup), "--json", "-q"]
    out = subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True, text=True).stdout
    report = json.loads(out.strip().splitlines()[-1])
    return report["p50_ms"] / 1e3, report


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--segctl", default=os.path.join(ROOT, "target/release/segctl"))
    p.add_argument("--archs", default="smoke,unet,mobilenetv2_unet")
    p.add_argument("--batches", default="1,8")
    p.add_argument("--threads", default="1,2")
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--calls", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--out", default=os.path.join(ROOT, "scripts/bench/results/infer.json"))
    args = p.parse_args()

    rows = []
    all_cpus = os.sched_getaffinity(0)
    tmp = tempfile.mkdtemp(prefix="segctl-infer-bench-")
    for arch in args.archs.split(","):
        onnx_path = os.path.join(tmp, f"{arch}.onnx")
        params = export_onnx(arch, onnx_path, args.size)
        print(f"{arch}: exported the PyTorch twin ({params:,} parameters) to ONNX", file=sys.stderr)
        for threads in map(int, args.threads.split(",")):
            # This process (onnxruntime) and the segctl child it starts run on the same cores.
            cpus = sorted(all_cpus)[:threads]
            os.sched_setaffinity(0, cpus)
            so = ort.SessionOptions()
            so.intra_op_num_threads = threads
            so.inter_op_num_threads = 1
            so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
            so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
            session = ort.InferenceSession(onnx_path, so, providers=["CPUExecutionProvider"])
            for batch in map(int, args.batches.split(",")):
                ort_times, seg_times, report = [], [], None
                for _ in range(args.rounds):
                    t, report = segctl_round(args.segctl, arch, batch, threads, args.calls, args.warmup)
                    seg_times.append(t)
                    ort_times.append(ort_round(session, batch, args.size, args.calls, args.warmup))
                seg, onnx = statistics.median(seg_times), statistics.median(ort_times)
                flops = report["gflop_per_image"]
                row = {
                    "arch": arch, "threads": threads, "batch": batch,
                    "segctl_images_per_s": batch / seg, "onnxruntime_images_per_s": batch / onnx,
                    "ratio": onnx / seg,
                    "gflop_per_image": flops,
                    "segctl_gflop_per_s": flops * batch / seg, "onnxruntime_gflop_per_s": flops * batch / onnx,
                    "segctl_round_s": seg_times, "onnxruntime_round_s": ort_times,
                    "segctl_kernels": report["engine"], "plan": report.get("plan"), "cpus": cpus,
                }
                rows.append(row)
                print(f"  threads {threads} batch {batch}: segctl {row['segctl_images_per_s']:.1f} img/s, "
                      f"onnxruntime {row['onnxruntime_images_per_s']:.1f} img/s, ratio {row['ratio']:.2f}", file=sys.stderr)

    os.sched_setaffinity(0, all_cpus)
    meta = {"onnxruntime": ort.__version__, "torch": torch.__version__, "calls": args.calls, "rounds": args.rounds,
            "size": args.size, "cpu": cpu_name(), "date": time.strftime("%Y-%m-%d %H:%M")}
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=2)

    print(f"| architecture | threads | batch | segctl img/s | onnxruntime img/s | segctl/onnxruntime | segctl GFLOP/s | onnxruntime GFLOP/s |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {DESCRIPTION[r['arch']]} | {r['threads']} | {r['batch']} | {r['segctl_images_per_s']:.1f} | "
              f"{r['onnxruntime_images_per_s']:.1f} | **{r['ratio']:.2f}×** | {r['segctl_gflop_per_s']:.0f} | {r['onnxruntime_gflop_per_s']:.0f} |")


def cpu_name():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


if __name__ == "__main__":
    main()
