#!/usr/bin/env python3
"""Training throughput, segctl (candle) vs PyTorch eager on CPU, same architectures.

For each architecture (unet depth 4 / base width 32, mobilenetv2_unet), both sides time full
training steps on random data: forward in training mode (BatchNorm batch statistics),
pixel-wise cross-entropy over 3 classes, backward, AdamW step (lr 1e-3, weight decay 1e-4,
betas 0.9/0.999, eps 1e-8), and report the median step time after warm-up as images/s.

  segctl:  target/release/examples/train_step_bench (RAYON_NUM_THREADS=--threads)
  PyTorch: scripts/bench/torch_models.py, torch.set_num_threads(--threads), run in a child
           process of this script (one architecture per process) so the two sides never
           share a process or overlap in time.

Usage (repo root):  python scripts/bench/train_bench.py [--batch 32] [--size 128] [--steps 10]
                    [--warmup 3] [--threads 2] [--arch unet,mobilenetv2_unet] [--out FILE]
"""

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
ARCHS = ("unet", "mobilenetv2_unet")


def torch_worker(args):
    """Runs in a child process: times PyTorch training steps, prints one JSON line."""
    import torch
    from torch import nn

    sys.path.insert(0, HERE)
    import torch_models

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = torch_models.build_model(args.arch, depth=args.depth, base_width=args.base_width).train()
    fmt = torch.channels_last if args.channels_last else torch.contiguous_format
    model = model.to(memory_format=fmt)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-4)
    loss_fn = nn.CrossEntropyLoss()
    x = torch.randn(args.batch, 3, args.size, args.size).to(memory_format=fmt)
    y = torch.randint(0, torch_models.NUM_CLASSES, (args.batch, args.size, args.size))
    times = []
    for i in range(args.warmup + args.steps):
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(model(x), y)
        loss.backward()
        opt.step()
        loss.item()
        dt = time.perf_counter() - t0
        if os.environ.get("BENCH_VERBOSE"):
            print(f"torch {args.arch} step {i}: {dt:.3f}s", file=sys.stderr)
        if i >= args.warmup:
            times.append(dt)
    median = statistics.median(times)
    print(json.dumps({
        "impl": "pytorch", "arch": args.arch, "batch": args.batch, "size": args.size, "steps": args.steps,
        "median_step_s": round(median, 4), "images_per_s": round(args.batch / median, 2),
        "parameters": torch_models.parameter_count(model), "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(), "channels_last": args.channels_last,
    }))


def last_json_line(text):
    for line in reversed(text.strip().splitlines()):
        line = line.strip()
        if line.startswith("{"):
            return json.loads(line)
    raise RuntimeError(f"no JSON line in output:\n{text}")


def run(cmd, env=None, label=""):
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.exit(f"{label} failed (exit {proc.returncode}): {' '.join(cmd)}\n{proc.stdout}\n{proc.stderr}")
    result = last_json_line(proc.stdout)
    result["wall_s"] = round(wall, 2)
    return result


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--depth", type=int, default=4, help="unet depth")
    p.add_argument("--base-width", type=int, default=32, help="unet base width")
    p.add_argument("--arch", default=",".join(ARCHS), help="comma-separated subset of unet,mobilenetv2_unet")
    p.add_argument("--bench-bin", default=os.path.join(REPO, "target/release/examples/train_step_bench"))
    p.add_argument("--channels-last", action="store_true", help="PyTorch side in channels_last memory format")
    p.add_argument("--out", default=os.path.join(HERE, "results/train.json"))
    p.add_argument("--_torch-worker", dest="torch_worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()

    if args.torch_worker:
        torch_worker(args)
        return

    archs = [a.strip() for a in args.arch.split(",") if a.strip()]
    for a in archs:
        if a not in ARCHS:
            sys.exit(f"unknown arch `{a}`")
    if not os.access(args.bench_bin, os.X_OK):
        sys.exit(f"{args.bench_bin} not found: build it with `cargo build --release --example train_step_bench`")

    common = ["--batch", str(args.batch), "--size", str(args.size), "--steps", str(args.steps), "--warmup", str(args.warmup)]
    rows = []
    for arch in archs:
        env = dict(os.environ, RAYON_NUM_THREADS=str(args.threads))
        seg_cmd = [args.bench_bin, "--arch", arch, *common, "--base-width", str(args.base_width), "--depth", str(args.depth)]
        print(f"[{arch}] segctl: {' '.join(seg_cmd)}", file=sys.stderr, flush=True)
        seg = run(seg_cmd, env=env, label="train_step_bench")
        torch_cmd = [sys.executable, os.path.abspath(__file__), "--_torch-worker", "--arch", arch, *common,
                     "--threads", str(args.threads), "--depth", str(args.depth), "--base-width", str(args.base_width)]
        if args.channels_last:
            torch_cmd.append("--channels-last")
        print(f"[{arch}] pytorch: {' '.join(torch_cmd[1:])}", file=sys.stderr, flush=True)
        # One OpenMP thread pool of --threads threads, no extra inter-op threads.
        tenv = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
        pt = run(torch_cmd, env=tenv, label="PyTorch worker")
        if seg.get("parameters") != pt.get("parameters"):
            print(f"warning: parameter counts differ for {arch}: segctl {seg.get('parameters')} vs PyTorch {pt.get('parameters')}",
                  file=sys.stderr)
        rows.append({"arch": arch, "segctl": seg, "pytorch": pt,
                     "ratio_segctl_over_pytorch": round(seg["images_per_s"] / pt["images_per_s"], 3)})

    print()
    print(f"Training throughput, batch {args.batch}, {args.size}x{args.size}, {args.threads} threads, "
          f"median of {args.steps} steps after {args.warmup} warm-up (images/s, higher is better)")
    print()
    print("| arch | segctl img/s | PyTorch img/s | ratio (segctl/PyTorch) | segctl step s | PyTorch step s | parameters |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        s, t = r["segctl"], r["pytorch"]
        print(f"| {r['arch']} | {s['images_per_s']:.2f} | {t['images_per_s']:.2f} | {r['ratio_segctl_over_pytorch']:.2f}x | "
              f"{s['median_step_s']:.3f} | {t['median_step_s']:.3f} | {s.get('parameters', '?'):,} |")

    result = {
        "benchmark": "train", "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": {"platform": platform.platform(), "processor": platform.processor(), "cpus": os.cpu_count()},
        "settings": {"batch": args.batch, "size": args.size, "steps": args.steps, "warmup": args.warmup,
                     "threads": args.threads, "unet_depth": args.depth, "unet_base_width": args.base_width,
                     "channels_last": args.channels_last, "torch": rows[0]["pytorch"].get("torch") if rows else None, "python": platform.python_version()},
        "results": rows,
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
