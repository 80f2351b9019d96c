"""Inference speed: segctl's compiled plan (f32, bf16, int8) against onnxruntime (f32, int8) and
OpenVINO on the same architecture.

For each architecture, the PyTorch twin (torch_models.py, same layers and parameter counts
as segctl's model) is exported to ONNX (opset 17, dynamic batch) and run by onnxruntime's
CPU execution provider (graph optimizations on, `intra_op_num_threads` = threads, one
inter-op thread), and by OpenVINO's CPU plugin (one stream, latency hint,
`INFERENCE_NUM_THREADS` = threads, static batch; each round in a child process of its own,
pinned like the others) at f32 and at its default precision (bf16 on
CPUs with AMX or AVX512-BF16): what a Python team deploys. onnxruntime int8 runs the same
file after `onnxruntime.quantization.quantize_static` (QDQ, per-channel int8 weights, uint8
activations calibrated on the 8 images segctl int8's side calibrates on), as its docs advise
for CNNs. segctl's side is `segctl benchmark --json`
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


def calibration_images(size, count=8):
    """The images both int8 sides calibrate on: standard normal, as the timing input."""
    return np.random.default_rng(11).standard_normal((count, 3, size, size), dtype=np.float32)


def quantize_onnx(onnx_path, size):
    """onnxruntime's static quantization of the exported file: QDQ, per-channel."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.items = iter([{"image": x[None]} for x in calibration_images(size)])

        def get_next(self):
            return next(self.items, None)

    pre = onnx_path.replace(".onnx", ".pre.onnx")
    out = onnx_path.replace(".onnx", ".int8.onnx")
    quant_pre_process(onnx_path, pre)
    quantize_static(pre, out, Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    return out


def ort_session(path, threads):
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])


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


def segctl_round(segctl, arch, batch, threads, calls, warmup, precision="f32"):
    _, flags = ARCHS[arch]
    cmd = [segctl, "benchmark", *flags, "--batch", str(batch), "--threads", str(threads), "--precision", precision,
           "--iterations", str(calls), "--warmup", str(warmup), "--json", "-q"]
    out = subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True, text=True).stdout
    report = json.loads(out.strip().splitlines()[-1])
    return report["p50_ms"] / 1e3, report


def ov_compile(core, onnx_path, batch, size, threads, precision):
    """OpenVINO's CPU plugin as its docs set it up for latency: one stream, `threads`
    inference threads, a static input shape; `precision` None keeps the plugin's default
    (bf16 on CPUs with AMX or AVX512-BF16, f32 elsewhere)."""
    model = core.read_model(onnx_path)
    model.reshape({model.inputs[0].get_any_name(): [batch, 3, size, size]})
    config = {"PERFORMANCE_HINT": "LATENCY", "NUM_STREAMS": "1", "INFERENCE_NUM_THREADS": str(threads)}
    if precision:
        config["INFERENCE_PRECISION_HINT"] = precision
    compiled = core.compile_model(model, "CPU", config)
    return compiled, str(compiled.get_property("INFERENCE_PRECISION_HINT"))


def ov_round(onnx_path, batch, size, threads, precision, calls, warmup):
    """One OpenVINO round in a child process of its own (like segctl's): the CPU plugin sizes
    its thread pool from the affinity it first sees and keeps its workers alive after a call,
    which in this process would leave them on the cores while the next side runs."""
    cmd = [sys.executable, os.path.abspath(__file__), "--openvino-child", onnx_path, "--size", str(size),
           "--batches", str(batch), "--threads", str(threads), "--calls", str(calls), "--warmup", str(warmup),
           "--openvino-precision", precision or "default"]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    result = json.loads(out.strip().splitlines()[-1])
    return result["median_s"], result["precision"]


def ov_child(args):
    import openvino as ov
    batch, threads = int(args.batches), int(args.threads)
    precision = None if args.openvino_precision == "default" else args.openvino_precision
    compiled, used = ov_compile(ov.Core(), args.openvino_child, batch, args.size, threads, precision)
    request = compiled.create_infer_request()
    x = np.random.default_rng(7).standard_normal((batch, 3, args.size, args.size), dtype=np.float32)
    for _ in range(args.warmup):
        request.infer({0: x})
    times = []
    for _ in range(args.calls):
        t = time.perf_counter()
        request.infer({0: x})
        times.append(time.perf_counter() - t)
    print(json.dumps({"median_s": statistics.median(times), "precision": used}))


SIDES = ["segctl", "segctl_bf16", "segctl_int8", "onnxruntime", "onnxruntime_int8", "openvino_f32", "openvino"]
LABELS = {"segctl": "segctl f32", "segctl_bf16": "segctl bf16", "segctl_int8": "segctl int8", "onnxruntime": "onnxruntime f32",
          "onnxruntime_int8": "onnxruntime int8", "openvino_f32": "OpenVINO f32", "openvino": "OpenVINO default"}


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
    p.add_argument("--sides", default=",".join(SIDES), help="any of " + ", ".join(SIDES))
    p.add_argument("--out", default=os.path.join(ROOT, "scripts/bench/results/infer.json"))
    p.add_argument("--openvino-child", help=argparse.SUPPRESS)
    p.add_argument("--openvino-precision", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.openvino_child:
        ov_child(args)
        return
    sides = args.sides.split(",")
    unknown = set(sides) - set(SIDES)
    if unknown:
        p.error(f"unknown sides {sorted(unknown)}")
    core = any(s.startswith("openvino") for s in sides)

    rows = []
    all_cpus = os.sched_getaffinity(0)
    tmp = tempfile.mkdtemp(prefix="segctl-infer-bench-")
    for arch in args.archs.split(","):
        onnx_path = os.path.join(tmp, f"{arch}.onnx")
        params = export_onnx(arch, onnx_path, args.size)
        print(f"{arch}: exported the PyTorch twin ({params:,} parameters) to ONNX", file=sys.stderr)
        int8_path = quantize_onnx(onnx_path, args.size) if "onnxruntime_int8" in sides else None
        for threads in map(int, args.threads.split(",")):
            # This process (onnxruntime, OpenVINO) and the segctl child it starts run on the
            # same cores.
            cpus = sorted(all_cpus)[:threads]
            os.sched_setaffinity(0, cpus)
            session = ort_session(onnx_path, threads) if "onnxruntime" in sides else None
            session_int8 = ort_session(int8_path, threads) if int8_path else None
            for batch in map(int, args.batches.split(",")):
                ov_precision = None
                times = {s: [] for s in sides}
                reports = {}
                for _ in range(args.rounds):
                    for side in sides:
                        if side == "segctl":
                            t, reports[side] = segctl_round(args.segctl, arch, batch, threads, args.calls, args.warmup)
                        elif side == "segctl_bf16":
                            t, reports[side] = segctl_round(args.segctl, arch, batch, threads, args.calls, args.warmup, "bf16")
                        elif side == "segctl_int8":
                            t, reports[side] = segctl_round(args.segctl, arch, batch, threads, args.calls, args.warmup, "int8")
                        elif side == "onnxruntime":
                            t = ort_round(session, batch, args.size, args.calls, args.warmup)
                        elif side == "onnxruntime_int8":
                            t = ort_round(session_int8, batch, args.size, args.calls, args.warmup)
                        elif side == "openvino_f32":
                            t, _ = ov_round(onnx_path, batch, args.size, threads, "f32", args.calls, args.warmup)
                        else:
                            t, ov_precision = ov_round(onnx_path, batch, args.size, threads, None, args.calls, args.warmup)
                        times[side].append(t)
                report = reports.get("segctl") or reports.get("segctl_bf16") or reports.get("segctl_int8")
                flops = report["gflop_per_image"] if report else None
                row = {"arch": arch, "threads": threads, "batch": batch, "cpus": cpus, "gflop_per_image": flops,
                       "openvino_default_precision": ov_precision}
                for side in sides:
                    med = statistics.median(times[side])
                    row[f"{side}_images_per_s"] = batch / med
                    row[f"{side}_round_s"] = times[side]
                    if flops:
                        row[f"{side}_gflop_per_s"] = flops * batch / med
                for side, rep in reports.items():
                    row[f"{side}_kernels"] = rep["engine"]
                    row[f"{side}_plan"] = rep.get("plan")
                if "segctl" in sides and "onnxruntime" in sides:
                    row["ratio"] = row["segctl_images_per_s"] / row["onnxruntime_images_per_s"]
                rows.append(row)
                print(f"  threads {threads} batch {batch}: " + ", ".join(
                    f"{LABELS[s]} {row[f'{s}_images_per_s']:.1f}" for s in sides) + " img/s", file=sys.stderr)

    os.sched_setaffinity(0, all_cpus)
    meta = {"onnxruntime": ort.__version__, "torch": torch.__version__, "calls": args.calls, "rounds": args.rounds,
            "size": args.size, "cpu": cpu_name(), "flags": cpu_flags(), "date": time.strftime("%Y-%m-%d %H:%M")}
    if core:
        import openvino as ov
        meta["openvino"] = ov.__version__
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=2)

    head = " | ".join(f"{LABELS[s]} img/s" for s in sides)
    ratios = [(a, b) for a, b in [("segctl", "onnxruntime"), ("segctl", "openvino_f32"), ("segctl_bf16", "openvino"),
                                  ("segctl_int8", "onnxruntime_int8"), ("segctl_int8", "openvino")]
              if a in sides and b in sides]
    print(f"| architecture | threads | batch | {head} | " + " | ".join(f"{LABELS[a]} / {LABELS[b]}" for a, b in ratios) + " |")
    print("|---|---:|---:|" + "---:|" * (len(sides) + len(ratios)))
    for r in rows:
        cells = " | ".join(f"{r[f'{s}_images_per_s']:.1f}" for s in sides)
        rs = " | ".join(f"**{r[f'{a}_images_per_s'] / r[f'{b}_images_per_s']:.2f}×**" for a, b in ratios)
        print(f"| {DESCRIPTION[r['arch']]} | {r['threads']} | {r['batch']} | {cells} | {rs} |")
    if rows and rows[0].get("openvino_default_precision"):
        print(f"\nOpenVINO's default inference precision here: {rows[0]['openvino_default_precision']}")


def cpu_flags():
    wanted = ["avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "avx512_fp16", "avx_vnni", "amx_tile", "amx_bf16", "amx_int8"]
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    have = set(line.split(":", 1)[1].split())
                    return [w for w in wanted if w in have]
    except OSError:
        pass
    return []


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
