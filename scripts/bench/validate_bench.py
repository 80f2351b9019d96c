#!/usr/bin/env python3
"""Dataset validation throughput: `segctl validate` vs a plain Python/PIL loop.

Generates a synthetic dataset (`segctl fetch-data --synthetic N --seed 1`) in a temporary
folder, reads every file once so that all runs find it in the page cache, then times, for
--repeats rounds (interleaved, median reported):

  segctl     `segctl validate --root DIR --json` (its own samples_per_s, and the wall time of
             the whole process, start-up included); rayon uses every core
  pil        one Python process: for each stem in images/, Image.open(jpg).convert("RGB")
             fully decoded, trimap opened and decoded, mode "L", same size, values within
             {1,2,3} (numpy.unique), class pixel counts (numpy.bincount)
  pil-pool2  the same check in a multiprocessing.Pool(2) (imap over stems, chunksize 16)

segctl validate does more than the loop (split files, duplicate/stray-file checks, colour
notes, statistics); the per-sample decode-and-check dominates both.

Usage (repo root):  python scripts/bench/validate_bench.py [--samples 2000] [--segctl target/release/segctl]
"""

import argparse
import datetime
import json
import multiprocessing
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np
import PIL
from PIL import Image

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
ALLOWED = np.array([1, 2, 3])


def check_pair(paths):
    """Decode and check one (image, trimap) pair; returns (ok, class pixel counts[3])."""
    image_path, mask_path = paths
    try:
        with Image.open(image_path) as im:
            rgb = im.convert("RGB")
            rgb.load()
        with Image.open(mask_path) as m:
            m.load()
            if m.mode != "L" or m.size != rgb.size:
                return False, (0, 0, 0)
            values = np.asarray(m)
        if not np.isin(np.unique(values), ALLOWED).all():
            return False, (0, 0, 0)
        counts = np.bincount(values.ravel(), minlength=4)[1:4]
        return True, tuple(int(c) for c in counts)
    except Exception:  # undecodable file: counted as invalid, like segctl's findings
        return False, (0, 0, 0)


def list_pairs(root):
    images = os.path.join(root, "images")
    trimaps = os.path.join(root, "annotations", "trimaps")
    stems = sorted(f[:-4] for f in os.listdir(images) if f.endswith(".jpg"))
    return [(os.path.join(images, s + ".jpg"), os.path.join(trimaps, s + ".png")) for s in stems]


def summarize(results, elapsed):
    valid = sum(1 for ok, _ in results if ok)
    pixels = np.sum([c for ok, c in results if ok], axis=0) if valid else np.zeros(3)
    n = len(results)
    return {"samples": n, "valid": valid, "elapsed_s": elapsed, "samples_per_s": n / elapsed,
            "class_pixels": {"pet": int(pixels[0]), "background": int(pixels[1]), "border": int(pixels[2])}}


def run_pil(root):
    t0 = time.perf_counter()
    results = [check_pair(p) for p in list_pairs(root)]
    return summarize(results, time.perf_counter() - t0)


def run_pil_pool(root, processes):
    # The pool's start-up (fork) is inside the timing, like segctl's process start-up.
    t0 = time.perf_counter()
    with multiprocessing.Pool(processes) as pool:
        results = list(pool.imap(check_pair, list_pairs(root), chunksize=16))
    return summarize(results, time.perf_counter() - t0)


def run_segctl(segctl, root):
    t0 = time.perf_counter()
    proc = subprocess.run([segctl, "validate", "--root", root, "--json", "-q"], capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.exit(f"segctl validate failed (exit {proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    report = json.loads(proc.stdout)
    return {"samples": report["pairs"], "valid": report["valid_pairs"], "elapsed_s": report["elapsed_s"],
            "samples_per_s": report["samples_per_s"], "wall_s": wall, "wall_samples_per_s": report["pairs"] / wall,
            "class_pixel_fractions": report["class_pixel_fractions"], "error_count": report["error_count"]}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--samples", type=int, default=2000)
    p.add_argument("--segctl", default=os.path.join(REPO, "target/release/segctl"))
    p.add_argument("--repeats", type=int, default=3, help="timed rounds per contender (median reported)")
    p.add_argument("--pool", type=int, default=2, help="processes of the Pool variant (0 = skip it)")
    p.add_argument("--root", help="use this existing dataset instead of generating one")
    p.add_argument("--keep", action="store_true", help="keep the generated dataset")
    p.add_argument("--out", default=os.path.join(HERE, "results/validate.json"))
    args = p.parse_args()
    segctl = os.path.abspath(args.segctl)
    if not os.access(segctl, os.X_OK):
        sys.exit(f"{segctl} not found: build it with `cargo build --release`")

    tmp = None
    if args.root:
        root = os.path.abspath(args.root)
    else:
        tmp = tempfile.mkdtemp(prefix="segctl-validate-bench-")
        root = os.path.join(tmp, "data")
        print(f"generating {args.samples} synthetic samples in {root} ...", file=sys.stderr, flush=True)
        t0 = time.perf_counter()
        subprocess.run([segctl, "fetch-data", "--synthetic", str(args.samples), "--seed", "1", "--root", root, "-q"],
                       check=True, stdout=subprocess.DEVNULL)
        print(f"  generated in {time.perf_counter() - t0:.1f}s", file=sys.stderr, flush=True)
    try:
        pairs = list_pairs(root)
        total_bytes = 0
        for a, b in pairs:  # warm the page cache: every timed run reads from memory
            for f in (a, b):
                with open(f, "rb") as fh:
                    total_bytes += len(fh.read())
        sizes = []
        for a, _ in pairs[:: max(1, len(pairs) // 200)]:
            with Image.open(a) as im:
                sizes.append(im.size[0] * im.size[1])
        contenders = [("segctl", lambda: run_segctl(segctl, root)), ("pil", lambda: run_pil(root))]
        if args.pool > 0:
            contenders.append((f"pil-pool{args.pool}", lambda: run_pil_pool(root, args.pool)))
        # One untimed round of each (first-touch, imports, lazy loading), then interleaved rounds.
        for name, fn in contenders:
            fn()
        runs = {name: [] for name, _ in contenders}
        for r in range(args.repeats):
            for name, fn in contenders:
                res = fn()
                runs[name].append(res)
                print(f"  round {r + 1} {name}: {res['samples_per_s']:.1f} samples/s", file=sys.stderr, flush=True)
    finally:
        if tmp and not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)

    def med(name, key):
        return statistics.median(r[key] for r in runs[name])

    seg_sps, seg_wall = med("segctl", "samples_per_s"), med("segctl", "wall_s")
    seg_wall_sps = med("segctl", "wall_samples_per_s")
    n = len(pairs)
    print()
    print(f"Dataset validation, {n} synthetic samples (median {statistics.median(sizes) / 1e3:.0f} kpixel images, "
          f"{total_bytes / 1e6:.1f} MB), page cache warm, median of {args.repeats} rounds, {os.cpu_count()} cores")
    print()
    print("| contender | processes | samples/s | wall time s | segctl/this (samples/s) | segctl wall/this |")
    print("|---|---:|---:|---:|---:|---:|")
    print(f"| segctl validate (its JSON) | 1 (rayon, {os.cpu_count()} threads) | {seg_sps:.1f} | {med('segctl', 'elapsed_s'):.3f} | 1.00x | |")
    print(f"| segctl validate (process wall) | 1 (rayon, {os.cpu_count()} threads) | {seg_wall_sps:.1f} | {seg_wall:.3f} | | 1.00x |")
    results = {}
    for name, _ in contenders[1:]:
        sps, el = med(name, "samples_per_s"), med(name, "elapsed_s")
        procs = args.pool if name.startswith("pil-pool") else 1
        label = "Python PIL loop" if name == "pil" else f"Python PIL multiprocessing.Pool({args.pool})"
        print(f"| {label} | {procs} | {sps:.1f} | {el:.3f} | {seg_sps / sps:.2f}x | {seg_wall_sps / sps:.2f}x |")
        results[name] = {"samples_per_s": sps, "elapsed_s": el, "ratio_segctl_over_this": seg_sps / sps,
                         "ratio_segctl_wall_over_this": seg_wall_sps / sps, "rounds": runs[name]}
    valid = {name: runs[name][-1]["valid"] for name in runs}
    if len(set(valid.values())) != 1:
        print(f"\nwarning: contenders disagree on the number of valid samples: {valid}", file=sys.stderr)

    out = {
        "benchmark": "validate", "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count()},
        "settings": {"samples": n, "seed": 1, "repeats": args.repeats, "pool": args.pool, "dataset_bytes": total_bytes,
                     "median_image_pixels": statistics.median(sizes), "python": platform.python_version(),
                     "pillow": PIL.__version__, "numpy": np.__version__},
        "segctl": {"samples_per_s": seg_sps, "elapsed_s": med("segctl", "elapsed_s"), "wall_s": seg_wall,
                   "wall_samples_per_s": seg_wall_sps, "rounds": runs["segctl"]},
        **results,
        "valid_samples": valid,
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(out, f, indent=2)
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
