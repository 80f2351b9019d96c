#!/usr/bin/env python3
"""Helpers for serve_bench.sh (standard library only, plus Pillow for `check`).

  serve_helper.py port                       print a free TCP port on 127.0.0.1
  serve_helper.py largest DIR                print the largest .jpg (by pixels) in DIR
  serve_helper.py wait URL TIMEOUT_S         wait until GET URL answers 200
  serve_helper.py check URL IMAGE            POST IMAGE, check the answer is a PNG class-id mask
                                             at the photo's size; prints a JSON line
  serve_helper.py drain URL IMAGE            one blocking POST (waits out the server's backlog)
  serve_helper.py point FILE NAME C WRK_OUT  append one measured point (parsed from wrk output)
  serve_helper.py rps WRK_OUT                print the requests/s of one wrk run
  serve_helper.py report POINTS OUT ARCH META_JSON   print the Markdown table, write OUT
"""

import datetime
import io
import json
import os
import platform
import socket
import struct
import sys
import time
import urllib.error
import urllib.request


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        print(s.getsockname()[1])


def jpeg_size(path):
    try:
        from PIL import Image

        with Image.open(path) as im:
            return im.size
    except ImportError:
        pass
    data = open(path, "rb").read()
    i = 2
    while i < len(data):
        marker, length = data[i + 1], struct.unpack(">H", data[i + 2:i + 4])[0]
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            h, w = struct.unpack(">HH", data[i + 5:i + 9])
            return w, h
        i += 2 + length
    raise ValueError(f"{path}: no SOF marker")


def largest(directory):
    best = max((f for f in os.listdir(directory) if f.endswith(".jpg")),
               key=lambda f: (lambda s: s[0] * s[1])(jpeg_size(os.path.join(directory, f))))
    print(os.path.join(directory, best))


def wait(url, timeout):
    deadline = time.time() + float(timeout)
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, OSError):
            pass
        time.sleep(0.25)
    sys.exit(f"{url} did not answer 200 within {timeout}s")


def check(url, image):
    from PIL import Image
    import numpy as np

    body = open(image, "rb").read()
    req = urllib.request.Request(url, data=body, method="POST", headers={"Content-Type": "image/jpeg"})
    t0 = time.perf_counter()
    with urllib.request.urlopen(req, timeout=60) as r:
        status, ctype, data = r.status, r.headers.get("Content-Type", ""), r.read()
    elapsed = time.perf_counter() - t0
    with Image.open(image) as im:
        expected = im.size
    mask = Image.open(io.BytesIO(data))
    values = sorted(int(v) for v in np.unique(np.asarray(mask)))
    problems = []
    if status != 200:
        problems.append(f"status {status}")
    if not ctype.startswith("image/png") or mask.format != "PNG":
        problems.append(f"not a PNG ({ctype}, {mask.format})")
    if mask.mode != "L":
        problems.append(f"mode {mask.mode}, expected L")
    if mask.size != expected:
        problems.append(f"size {mask.size}, expected {expected}")
    if not set(values) <= {0, 1, 2}:
        problems.append(f"class ids {values}")
    print(json.dumps({"url": url, "status": status, "content_type": ctype, "png_bytes": len(data), "size": mask.size,
                      "mode": mask.mode, "class_ids": values, "first_request_s": round(elapsed, 4), "ok": not problems}))
    if problems:
        sys.exit(f"bad answer from {url}: {'; '.join(problems)}")


def drain(url, image):
    """One blocking request: returns once the server has worked off what an earlier wrk run
    left queued (wrk closes its connections at the end, the server still computes them)."""
    body = open(image, "rb").read()
    req = urllib.request.Request(url, data=body, method="POST", headers={"Content-Type": "image/jpeg"})
    t0 = time.perf_counter()
    try:
        with urllib.request.urlopen(req, timeout=600) as r:
            r.read()
    except urllib.error.URLError as e:
        print(f"  drain request failed: {e}", file=sys.stderr)
    print(f"{time.perf_counter() - t0:.2f}")


def point(points_file, name, concurrency, wrk_out, rss_file=None):
    text = open(wrk_out).read()
    line = next((l for l in text.splitlines() if l.startswith("WRK_JSON ")), None)
    if line is None:
        sys.exit(f"no WRK_JSON line in {wrk_out}:\n{text}")
    p = json.loads(line[len("WRK_JSON "):])
    p.update(server=name, concurrency=int(concurrency))
    # wrk counts non-2xx/3xx answers as requests too: keep only the successful ones.
    p["ok_requests_per_s"] = (p["requests"] - p["errors"]["status"]) / (p["duration_us"] / 1e6)
    if rss_file:
        samples = [int(l) for l in open(rss_file) if l.strip().isdigit()]
        p["peak_rss_mb"] = max(samples) / 1024 if samples else None
    with open(points_file, "a") as f:
        f.write(json.dumps(p) + "\n")
    e = p["errors"]
    errs = sum(e.values())
    lat = p["latency_us"]
    print(f"  {name} c={concurrency}: {p['ok_requests_per_s']:.1f} req/s, p50 {lat['p50'] / 1e3:.1f} ms, "
          f"p99 {lat['p99'] / 1e3:.1f} ms, {p['requests']} requests" + (f", errors {e}" if errs else ""), file=sys.stderr)
    return p


def rps(wrk_out):
    """Successful (2xx/3xx) requests per second of one wrk run; warns about failures."""
    line = next(l for l in open(wrk_out).read().splitlines() if l.startswith("WRK_JSON "))
    p = json.loads(line[len("WRK_JSON "):])
    bad = p["errors"]["status"] + p["errors"]["timeout"]
    if bad:
        print(f"  warning: {p['errors']} in {wrk_out}", file=sys.stderr)
    print(round((p["requests"] - p["errors"]["status"]) / (p["duration_us"] / 1e6), 3))


def ms(us):
    return f"{us / 1e3:.1f}"


def report(points_file, out, arch, meta_json):
    meta = json.loads(meta_json)
    points = [json.loads(l) for l in open(points_file) if l.strip()]
    rounds = {}
    for p in points:
        rounds.setdefault(p["server"], {}).setdefault(p["concurrency"], []).append(p)
    # Per server and level, the round with the median throughput (its latency and RSS with it;
    # the peak RSS is the highest of all rounds).
    by = {}
    for server, levels_ in rounds.items():
        for c, ps in levels_.items():
            ranked = sorted(ps, key=lambda q: q["ok_requests_per_s"])
            chosen = dict(ranked[(len(ranked) - 1) // 2])
            rss = [q.get("peak_rss_mb") or 0 for q in ps]
            chosen["peak_rss_mb"] = max(rss) if any(rss) else None
            chosen["rounds_requests_per_s"] = [round(q["ok_requests_per_s"], 2) for q in ps]
            by.setdefault(server, {})[c] = chosen
    seg = by.get("segctl", {})
    competitors = [name for name in by if name != "segctl"]
    levels = sorted(set().union(*[set(v) for v in by.values()]))
    rows = []
    print()
    print(f"Serving `{arch}` (128x128 model input, {meta.get('image_w')}x{meta.get('image_h')} JPEG, "
          f"{meta.get('duration_s')} s per point, wrk on the same {os.cpu_count()}-core machine)")
    print(f"segctl: {meta.get('segctl_config')}")
    for name in competitors:
        print(f"{name}: gunicorn, {meta.get('competitors', {}).get(name, {}).get('config')}")
    print()

    def cells(p):
        if not p:
            return ["-", "-", "-", "-"]
        if p["requests"] == 0:
            return ["0 (no answer in time)", "-", "-", "-"]
        errs = p["errors"]["status"] + p["errors"]["timeout"]
        mark = f" ({errs} err)" if errs else ""
        rss = f"{p['peak_rss_mb']:.0f}" if p.get("peak_rss_mb") else "-"
        return [f"{p['ok_requests_per_s']:.1f}{mark}", ms(p["latency_us"]["p50"]), ms(p["latency_us"]["p99"]), rss]

    for name in competitors:
        print(f"segctl against {name}:")
        print()
        print(f"| connections | segctl req/s | p50 ms | p99 ms | peak RSS MB | {name} req/s | p50 ms | p99 ms | peak RSS MB | segctl/{name} |")
        print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        for c in levels:
            s_, f = seg.get(c), by[name].get(c)
            ratio = s_["ok_requests_per_s"] / f["ok_requests_per_s"] if s_ and f and f["ok_requests_per_s"] > 0 else None
            print(f"| {c} | " + " | ".join(cells(s_) + cells(f)) + f" | {f'**{ratio:.2f}x**' if ratio else '-'} |")
        print()
    for c in levels:
        row = {"concurrency": c, "segctl": seg.get(c)}
        for name in competitors:
            f = by[name].get(c)
            row[name] = f
            s_ = seg.get(c)
            row[f"throughput_ratio_segctl_over_{name}"] = s_["ok_requests_per_s"] / f["ok_requests_per_s"] if s_ and f and f["ok_requests_per_s"] > 0 else None
        rows.append(row)
    soak_file = points_file + ".soak"
    soak = [json.loads(l) for l in open(soak_file) if l.strip()] if os.path.exists(soak_file) else []
    if soak:
        print(f"Soak: {soak[0]['concurrency']} connections for {soak[0]['duration_us'] / 1e6:.0f} s:")
        print()
        print("| server | req/s | p50 ms | p99 ms | errors | timeouts | peak RSS MB |")
        print("|---|---:|---:|---:|---:|---:|---:|")
        for p in soak:
            e = p["errors"]
            print(f"| {p['server']} | {p['ok_requests_per_s']:.1f} | {ms(p['latency_us']['p50'])} | {ms(p['latency_us']['p99'])} | "
                  f"{e['status'] + e.get('connect', 0) + e.get('read', 0) + e.get('write', 0)} | {e['timeout']} | "
                  f"{p.get('peak_rss_mb') or 0:.0f} |")
        print()
    result = {
        "benchmark": "serve", "arch": arch, "soak": soak,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count()},
        "settings": meta, "results": rows, "all_points": points,
    }
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as fh:
        json.dump(result, fh, indent=2)
    failed = [f"{p['server']} c={p['concurrency']}: {p['requests']} answers, {p['errors']}" for p in points
              if p["errors"]["status"] or p["errors"]["timeout"] or p["requests"] == 0]
    if failed:
        print("\nWARNING: failed or timed-out requests (req/s above counts successful answers only):\n  " + "\n  ".join(failed))
    print(f"\nwrote {out}")


def main():
    cmd, args = sys.argv[1], sys.argv[2:]
    {"port": free_port, "largest": largest, "wait": wait, "check": check, "drain": drain, "point": point, "rps": rps, "report": report}[cmd](*args)


if __name__ == "__main__":
    main()
