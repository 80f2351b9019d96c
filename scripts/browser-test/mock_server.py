#!/usr/bin/env python3
"""Stand-in for `segctl serve` (Python stdlib only), for developing and testing page.html.

Serves:
  GET  /                                        src/server/page.html (re-read on every request)
  GET  /readyz, /healthz                        200 "ok"
  GET  /v1/models                               {"models": [...]} (empty with --no-models)
  POST /v1/models/{name}:segment?format=F       F = overlay | color (default overlay)
  POST /v1/models/{name}/versions/{v}:segment?format=F

The segment endpoints read the image size from the JPEG SOF / PNG IHDR header of the raw
request body and answer a PNG of that size (three horizontal bands in the class colours),
with Server-Timing, X-Model-Name and X-Model-Version headers. Anything that is not a
JPEG/PNG gets 400 {"error": "..."}, an unknown model or version 404 {"error": "..."}.
"""
import argparse
import json
import os
import re
import struct
import sys
import time
import zlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_PAGE = os.path.normpath(os.path.join(HERE, "..", "..", "src", "server", "page.html"))

# pet, background, border: the legend's colours.
CLASS_COLOURS = [(0xFF, 0x8C, 0x00), (0x1E, 0x90, 0xFF), (0xFF, 0xE1, 0x19)]
MAX_BODY = 32 << 20

MODELS = {
    "pets": {"versions": {1: "AVAILABLE", 2: "AVAILABLE", 3: "LOADING"}, "default": True},
    "pets-small": {"versions": {1: "AVAILABLE"}, "default": False},
}


def image_size(data):
    """(width, height) from a JPEG or PNG header, or None."""
    if data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) >= 24 and data[12:16] == b"IHDR":
        w, h = struct.unpack(">II", data[16:24])
        return (w, h) if w and h else None
    if data[:2] != b"\xff\xd8":
        return None
    i, n = 2, len(data)
    while i + 4 <= n:
        if data[i] != 0xFF:
            return None
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker in (0x01,) or 0xD0 <= marker <= 0xD7:  # standalone markers
            i += 2
            continue
        if marker in (0xD9, 0xDA):  # EOI / SOS before any SOF
            return None
        (seglen,) = struct.unpack(">H", data[i + 2:i + 4])
        if seglen < 2:
            return None
        # SOF0..SOF15 except DHT (C4), JPG (C8), DAC (CC)
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            if i + 9 > n:
                return None
            h, w = struct.unpack(">HH", data[i + 5:i + 9])
            return (w, h) if w and h else None
        i += 2 + seglen
    return None


def png_bands(width, height, colours):
    """An RGB PNG of width x height: horizontal bands, one per colour."""
    rows = []
    for y in range(height):
        c = colours[min(len(colours) - 1, y * len(colours) // height)]
        rows.append(c)
    raw = bytearray()
    cache = {}
    for c in rows:
        if c not in cache:
            cache[c] = b"\x00" + bytes(c) * width
        raw += cache[c]

    def chunk(tag, payload):
        return (struct.pack(">I", len(payload)) + tag + payload
                + struct.pack(">I", zlib.crc32(tag + payload) & 0xFFFFFFFF))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr)
            + chunk(b"IDAT", zlib.compress(bytes(raw), 6)) + chunk(b"IEND", b""))


SEGMENT_RE = re.compile(r"^/v1/models/([^/:]+)(?:/versions/([^/:]+))?:segment$")


class Handler(BaseHTTPRequestHandler):
    server_version = "segctl-mock/1"
    page = DEFAULT_PAGE
    no_models = False
    delay = 0.0

    def log_message(self, fmt, *args):
        if not self.server.quiet:
            sys.stderr.write("mock: %s %s\n" % (self.address_string(), fmt % args))

    def send(self, status, body, ctype, headers=None):
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def json(self, status, obj, headers=None):
        self.send(status, json.dumps(obj).encode(), "application/json", headers)

    def error(self, status, msg):
        self.json(status, {"error": msg})

    def do_HEAD(self):
        self.do_GET()

    def do_GET(self):
        path = urlsplit(self.path).path
        if path in ("/", "/index.html"):
            try:
                with open(self.page, "rb") as f:
                    body = f.read()
            except OSError as e:
                return self.error(500, "cannot read page: %s" % e)
            return self.send(200, body, "text/html; charset=utf-8")
        if path in ("/readyz", "/healthz"):
            return self.send(200, b"ok\n", "text/plain; charset=utf-8")
        if path == "/v1/models":
            models = [] if self.no_models else [
                {"name": name,
                 "versions": [{"version": v, "state": s} for v, s in sorted(m["versions"].items())],
                 "default": m["default"]}
                for name, m in MODELS.items()]
            return self.json(200, {"models": models})
        return self.error(404, "no route for GET %s" % path)

    def do_POST(self):
        t_start = time.perf_counter()
        url = urlsplit(self.path)
        m = SEGMENT_RE.match(url.path)
        length = int(self.headers.get("Content-Length") or 0)
        if length > MAX_BODY:
            return self.error(413, "request body too large (%d bytes, limit %d)" % (length, MAX_BODY))
        body = self.rfile.read(length) if length else b""
        if not m:
            return self.error(404, "no route for POST %s" % url.path)
        name = unquote(m.group(1))
        model = MODELS.get(name) if not self.no_models else None
        if model is None:
            return self.error(404, "model `%s` not found" % name)
        if m.group(2) is None:
            available = [v for v, s in model["versions"].items() if s == "AVAILABLE"]
            if not available:
                return self.error(503, "model `%s` has no available version" % name)
            version = max(available)
        else:
            try:
                version = int(unquote(m.group(2)))
            except ValueError:
                return self.error(400, "version must be a positive integer")
            if model["versions"].get(version) != "AVAILABLE":
                return self.error(404, "model `%s` version %d is not available" % (name, version))
        fmt = (parse_qs(url.query).get("format") or ["overlay"])[0]
        if fmt not in ("overlay", "color"):
            return self.error(400, "unknown format `%s` (expected overlay, color, classes)" % fmt)
        if not body:
            return self.error(400, "empty request body: send the image bytes")
        size = image_size(body)
        if size is None:
            return self.error(400, "could not decode image: not a JPEG or PNG (Content-Type %s)"
                              % (self.headers.get("Content-Type") or "none"))
        t_decode = time.perf_counter()
        if self.delay:
            time.sleep(self.delay)
        colours = CLASS_COLOURS if fmt == "color" else [
            tuple((3 * c + 128) // 4 for c in col) for col in CLASS_COLOURS]
        png = png_bands(size[0], size[1], colours)
        t_end = time.perf_counter()
        timing = "decode;dur=%.1f, queue;dur=0.1, inference;dur=%.1f, encode;dur=%.1f" % (
            (t_decode - t_start) * 1e3, self.delay * 1e3 + 0.5, (t_end - t_decode) * 1e3)
        self.send(200, png, "image/png", {
            "Server-Timing": timing, "X-Model-Name": name, "X-Model-Version": str(version)})


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8080)
    ap.add_argument("--page", default=DEFAULT_PAGE, help="page to serve at / (default: %(default)s)")
    ap.add_argument("--no-models", action="store_true", help="serve an empty model list")
    ap.add_argument("--delay-ms", type=float, default=0.0, help="pretend inference takes this long")
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args()
    Handler.page = args.page
    Handler.no_models = args.no_models
    Handler.delay = args.delay_ms / 1e3
    srv = ThreadingHTTPServer((args.host, args.port), Handler)
    srv.quiet = args.quiet
    srv.daemon_threads = True
    print("mock segctl serving on http://%s:%d" % (args.host, srv.server_address[1]), flush=True)
    try:
        srv.serve_forever()
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
