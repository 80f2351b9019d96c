#!/usr/bin/env python3
"""Training throughput: segctl against PyTorch eager on CPU, same architectures, one run.

For each architecture (unet depth 4 / base width 32, mobilenetv2_unet) it times, in
alternating rounds (every contender once per round, one process at a time, never two at once;
a contender's figure is the median of its round figures, and its ratio to a PyTorch row the
median of the per-round ratios):

  segctl train (end to end)   `segctl train` on a synthetic dataset at the input size: its
                              loader (JPEG decode, resize, flips), forward, loss, backward,
                              AdamW; images/s of the last epochs as metrics.jsonl reports them
                              (validation off, no checkpoints in between).
  segctl step                 target/release/examples/train_step_bench: the bare step on random
                              tensors (forward in training mode, cross-entropy, backward, AdamW).
  pytorch f32 / channels-last / bf16 autocast / bf16 autocast + channels-last
                              the same bare step in PyTorch (scripts/bench/torch_models.py),
                              torch.set_num_threads(--threads); autocast is
                              torch.autocast("cpu", dtype=torch.bfloat16) around forward and
                              loss, f32 master weights (what a PyTorch user turns on).

segctl runs with RAYON_NUM_THREADS=--threads, PyTorch with OMP_NUM_THREADS=--threads, both
pinned to the same first --threads CPUs (taskset). With --precision bf16 segctl's rows are also
run at `train.precision: bf16`.

--device cuda:N runs both on that GPU instead: `segctl train` with `train.device: cuda:N` (a
binary built by scripts/cuda/check.sh --release; start the bench through
scripts/cuda/run-gpu.sh so it finds the CUDA libraries), PyTorch with the model and tensors on
the GPU, torch.backends.cudnn.benchmark on, autocast on "cuda", and a synchronisation at the end
of every timed step. The bare-step example is CPU-only and is skipped there.

Usage (repo root):  python scripts/bench/train_bench.py [--batch 8] [--size 128] [--steps 8]
                    [--warmup 3] [--threads 2] [--rounds 3] [--arch unet,mobilenetv2_unet]
                    [--precision f32,bf16] [--torch-variants f32,...]
                    [--device cpu|cuda:N] [--out FILE]
"""

import argparse
import datetime
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
ARCHS = ("unet", "mobilenetv2_unet")
TORCH_VARIANTS = ("f32", "f32-channels-last", "bf16-autocast", "bf16-autocast-channels-last")


def torch_worker(args):
    """Runs in a child process: times PyTorch training steps, prints one JSON line."""
    import torch
    from torch import nn

    sys.path.insert(0, HERE)
    import torch_models

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = torch.device(args.device)
    gpu = device.type == "cuda"
    if gpu:
        torch.backends.cudnn.benchmark = True
    variant = args.variant
    channels_last = variant.endswith("channels-last")
    autocast = variant.startswith("bf16")
    model = torch_models.build_model(args.arch, depth=args.depth, base_width=args.base_width).train()
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(device=device, memory_format=fmt)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-4)
    loss_fn = nn.CrossEntropyLoss()
    x = torch.randn(args.batch, 3, args.size, args.size).to(device=device, memory_format=fmt)
    y = torch.randint(0, torch_models.NUM_CLASSES, (args.batch, args.size, args.size)).to(device)
    times = []
    for i in range(args.warmup + args.steps):
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            loss = loss_fn(model(x).float(), y)
        loss.backward()
        opt.step()
        loss.item()
        if gpu:
            torch.cuda.synchronize(device)
        dt = time.perf_counter() - t0
        if i >= args.warmup:
            times.append(dt)
    median = statistics.median(times)
    print(json.dumps({
        "impl": f"pytorch {variant}", "arch": args.arch, "batch": args.batch, "size": args.size, "steps": args.steps,
        "median_step_s": round(median, 4), "images_per_s": round(args.batch / median, 2),
        "parameters": torch_models.parameter_count(model), "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(), "mkldnn_bf16": bool(getattr(torch.backends.mkldnn, "is_available", lambda: False)()),
        "device": str(device), "gpu": torch.cuda.get_device_name(device) if gpu else None,
    }))


def last_json_line(text):
    for line in reversed(text.strip().splitlines()):
        line = line.strip()
        if line.startswith("{"):
            return json.loads(line)
    raise RuntimeError(f"no JSON line in output:\n{text}")


def pinned(cmd, threads):
    """The command pinned to the first `threads` CPUs, when taskset exists."""
    if shutil.which("taskset"):
        return ["taskset", "-c", f"0-{threads - 1}", *cmd]
    return cmd


def run(cmd, env=None, label=""):
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"{label} failed (exit {proc.returncode}): {' '.join(cmd)}\n{proc.stdout}\n{proc.stderr}")
    return proc.stdout


def cpu_flags():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    keep = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "avx_vnni", "amx_bf16", "amx_int8", "amx_tile", "avx512_fp16")
                    return [flag for flag in line.split(":", 1)[1].split() if flag in keep]
    except OSError:
        pass
    return []


def cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def segctl_end_to_end(args, arch, precision, data_root, work):
    """`segctl train` for a few epochs; images/s of the last epochs (loader included)."""
    run_dir = os.path.join(work, f"run-{arch}-{precision}")
    shutil.rmtree(run_dir, ignore_errors=True)
    config = os.path.join(work, f"{arch}.yaml")
    # Random encoder weights for mobilenetv2_unet: the bench measures speed, not the start.
    unet = f"  unet:\n    depth: {args.depth}\n    base_width: {args.base_width}\n" if arch == "unet" else "  encoder:\n    weights: none\n"
    with open(config, "w") as f:
        f.write(
            f"data:\n  root: {data_root}\n  image_size: {args.size}\n  val_fraction: 0.0\n  seed: 1\n"
            f"model:\n  arch: {arch}\n{unet}"
            f"train:\n  epochs: {args.epochs}\n  batch_size: {args.batch}\n  device: {args.device}\n  output_dir: {work}\n"
            f"  run_name: run-{arch}-{precision}\n  max_steps_per_epoch: {args.steps}\n  precision: {precision}\n"
            f"  tensorboard: false\n  checkpoint:\n    every_epochs: 1000\n    keep_last: 1\n"
        )
    env = dict(os.environ, RAYON_NUM_THREADS=str(args.threads))
    run(pinned([args.segctl, "train", "--config", config, "--json"], args.threads), env=env, label="segctl train")
    epochs = []
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        for line in f:
            line = line.strip()
            if line:
                epochs.append(json.loads(line))
    # The first epoch holds the first step's page faults and the loader's first decodes.
    rates = [e["train_images_per_s"] for e in epochs[1:]] or [epochs[-1]["train_images_per_s"]]
    return {"impl": f"segctl train {precision}", "images_per_s": round(statistics.median(rates), 2), "epochs": len(epochs)}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--steps", type=int, default=8, help="timed steps (bare step) / steps per epoch (end to end)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--epochs", type=int, default=3, help="epochs of the end-to-end run (the first is not counted)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--depth", type=int, default=4, help="unet depth")
    p.add_argument("--base-width", type=int, default=32, help="unet base width")
    p.add_argument("--arch", default=",".join(ARCHS), help="comma-separated subset of unet,mobilenetv2_unet")
    p.add_argument("--precision", default="f32,bf16", help="segctl precisions to run (f32, bf16)")
    p.add_argument("--torch-variants", default=",".join(TORCH_VARIANTS),
                   help="PyTorch rows to run (bf16 autocast emulates bf16 on CPUs without AVX512-BF16/AMX and takes minutes a step)")
    p.add_argument("--device", default="cpu", help="cpu, or cuda:N for both sides on that GPU")
    p.add_argument("--segctl", default=os.path.join(REPO, "target/release/segctl"))
    p.add_argument("--bench-bin", default=os.path.join(REPO, "target/release/examples/train_step_bench"))
    p.add_argument("--out", default=os.path.join(HERE, "results/train.json"))
    p.add_argument("--_torch-worker", dest="torch_worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--variant", default="f32", help=argparse.SUPPRESS)
    args = p.parse_args()

    if args.torch_worker:
        torch_worker(args)
        return

    archs = [a.strip() for a in args.arch.split(",") if a.strip()]
    torch_variants = [v.strip() for v in args.torch_variants.split(",") if v.strip()]
    unknown = [v for v in torch_variants if v not in TORCH_VARIANTS]
    if unknown or "f32" not in torch_variants:
        sys.exit(f"--torch-variants: {', '.join(unknown) or 'f32 is required'} (known: {', '.join(TORCH_VARIANTS)})")
    precisions = [x.strip() for x in args.precision.split(",") if x.strip()]
    gpu = args.device != "cpu"
    if gpu and not args.device.startswith("cuda"):
        sys.exit(f"--device {args.device}: cpu or cuda:N")
    for exe in (args.segctl,) if gpu else (args.segctl, args.bench_bin):
        if not os.access(exe, os.X_OK):
            sys.exit(f"{exe} not found: `cargo build --release && cargo build --release --example train_step_bench`")

    work = tempfile.mkdtemp(prefix="segctl-train-bench-")
    data_root = os.path.join(work, "pets")
    # Enough training images for --steps batches per epoch (the loader decodes real JPEGs).
    samples = 2 * args.batch * args.steps + 16
    run([args.segctl, "fetch-data", "--synthetic", str(2 * samples), "--seed", "3", "--root", data_root], label="fetch-data")

    common = ["--batch", str(args.batch), "--size", str(args.size), "--steps", str(args.steps), "--warmup", str(args.warmup)]
    torch_common = [*common, "--device", args.device]
    figures = {}  # (arch, contender) -> [round figures]
    meta = {}
    for rnd in range(args.rounds):
        for arch in archs:
            contenders = []
            for precision in precisions:
                contenders.append((f"segctl train {precision}", lambda a=arch, pr=precision: segctl_end_to_end(args, a, pr, data_root, work)))
                if gpu:
                    continue
                contenders.append((f"segctl step {precision}", lambda a=arch, pr=precision: last_json_line(run(
                    pinned([args.bench_bin, "--arch", a, *common, "--base-width", str(args.base_width), "--depth", str(args.depth), "--precision", pr], args.threads),
                    env=dict(os.environ, RAYON_NUM_THREADS=str(args.threads)), label="train_step_bench"))))
            for variant in torch_variants:
                contenders.append((f"pytorch {variant}", lambda a=arch, v=variant: last_json_line(run(
                    pinned([sys.executable, os.path.abspath(__file__), "--_torch-worker", "--arch", a, *torch_common, "--threads", str(args.threads),
                            "--depth", str(args.depth), "--base-width", str(args.base_width), "--variant", v], args.threads),
                    env=dict(os.environ, OMP_NUM_THREADS=str(args.threads)), label="PyTorch worker"))))
            # Alternate the order between rounds so no contender always runs first.
            if rnd % 2 == 1:
                contenders.reverse()
            for name, fn in contenders:
                print(f"[round {rnd + 1}/{args.rounds}] {arch}: {name}", file=sys.stderr, flush=True)
                result = fn()
                figures.setdefault((arch, name), []).append(result["images_per_s"])
                meta[(arch, name)] = result
    shutil.rmtree(work, ignore_errors=True)

    rows = []
    for arch in archs:
        f32_rounds = figures[(arch, "pytorch f32")]
        bf16_rounds = figures.get((arch, "pytorch bf16-autocast"))
        for (a, name), values in figures.items():
            if a != arch:
                continue
            median = statistics.median(values)
            # Ratios within each round (the VM's speed drifts between rounds), then their median.
            over_f32 = statistics.median(v / b for v, b in zip(values, f32_rounds))
            over_bf16 = statistics.median(v / b for v, b in zip(values, bf16_rounds)) if bf16_rounds else None
            rows.append({"arch": arch, "contender": name, "images_per_s": round(median, 2), "rounds": values,
                         "over_pytorch_f32": round(over_f32, 3), "over_pytorch_bf16_autocast": over_bf16 and round(over_bf16, 3),
                         "detail": meta[(a, name)]})

    print()
    print(f"Training throughput on {args.device}, batch {args.batch}, {args.size}x{args.size}, {args.threads} threads, median of {args.rounds} alternating rounds "
          f"(images/s, higher is better); CPU: {cpu_model()}; flags: {' '.join(cpu_flags())}")
    print()
    print("Ratios are medians of the per-round ratios (each round runs every contender once, back to back).")
    print()
    print("| arch | contender | images/s | / PyTorch f32 step | / PyTorch bf16 autocast step | rounds |")
    print("|---|---|---:|---:|---:|---|")
    for r in rows:
        bf16 = f"{r['over_pytorch_bf16_autocast']:.2f}x" if r["over_pytorch_bf16_autocast"] else "not run"
        print(f"| {r['arch']} | {r['contender']} | {r['images_per_s']:.2f} | {r['over_pytorch_f32']:.2f}x | {bf16} | "
              f"{', '.join(f'{v:.2f}' for v in r['rounds'])} |")

    result = {
        "benchmark": "train", "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": {"platform": platform.platform(), "cpu": cpu_model(), "flags": cpu_flags(), "cpus": os.cpu_count()},
        "settings": {"batch": args.batch, "size": args.size, "steps": args.steps, "warmup": args.warmup, "epochs": args.epochs,
                     "threads": args.threads, "rounds": args.rounds, "device": args.device, "unet_depth": args.depth, "unet_base_width": args.base_width,
                     "python": platform.python_version()},
        "results": rows,
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
