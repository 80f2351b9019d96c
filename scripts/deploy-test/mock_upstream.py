#!/usr/bin/env python3
"""Stand-in for `segctl serve`, for testing the Nginx config without a segctl build.

Python standard library only. Used by nginx-proxy.sh when MOCK_UPSTREAM=1. It mimics just the
parts of segctl's HTTP surface that the proxy test touches:

  GET  /healthz                      200 once the process is up
  GET  /readyz                       503 for --ready-after seconds, then 200
  GET  /metrics                      Prometheus text
  GET  /                             small HTML page
  GET  /v1/models                    JSON list
  GET  /v1/models/pets               TF-Serving version status ("AVAILABLE")
  POST /v1/models/pets:segment       JPEG/PNG body -> PNG mask, or JSON with "mask" when
                                     Accept: application/json (?format=overlay -> PNG too)
  anything else                      404 {"error": "..."}

Like segctl it echoes X-Request-Id, rejects bodies over 32 MiB with 413 JSON, answers errors as
{"error": "..."}, speaks HTTP/1.1 keep-alive (so nginx's upstream keepalive is exercised), and
writes one JSON access-log line per request to stderr, including the forwarding headers it saw
and the client port (the test reads these to check what nginx forwarded and connection reuse).
On SIGTERM it stops accepting, finishes in-flight requests and exits 0.
"""

import argparse
import base64
import json
import os
import random
import signal
import socket
import struct
import sys
import threading
import time
import zlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

MAX_BODY = 32 << 20
MODEL = "pets"


def png(width, height, pixels):
    """A greyscale 8-bit PNG; `pixels` is a bytes object of width*height values."""

    def chunk(kind, data):
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body) & 0xFFFFFFFF)

    raw = b"".join(b"\x00" + pixels[y * width:(y + 1) * width] for y in range(height))
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
        + chunk(b"IDAT", zlib.compress(raw, 9))
        + chunk(b"IEND", b"")
    )


def image_kind(body):
    """A cheap stand-in for decoding: JPEG needs SOI ... EOI, PNG its signature and IEND."""
    if body.startswith(b"\xff\xd8\xff") and body.rstrip(b"\x00").endswith(b"\xff\xd9"):
        return "jpeg"
    if body.startswith(b"\x89PNG\r\n\x1a\n") and b"IEND" in body[-16:]:
        return "png"
    return None


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "segctl-mock/0"

    # --- plumbing ------------------------------------------------------------------------------

    # Keep-alive bookkeeping so SIGTERM can close idle connections (like hyper's graceful
    # shutdown) while requests in flight finish.
    def setup(self):
        super().setup()
        # Headers and body go out in two writes: without this, Nagle + delayed ACK add ~40 ms.
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.busy = False
        with self.server.lock:
            self.server.handlers.add(self)

    def finish(self):
        with self.server.lock:
            self.server.handlers.discard(self)
        super().finish()

    def parse_request(self):
        self.busy = True
        return super().parse_request()

    def handle_one_request(self):
        super().handle_one_request()
        self.busy = False
        if self.server.stopping:
            self.close_connection = True

    def log_message(self, fmt, *args):  # silence the default one-line log; we log JSON instead
        pass

    def _log(self, status, length):
        h = self.headers
        line = {
            "ts": round(time.time(), 3),
            "method": self.command,
            "path": self.path,
            "status": status,
            "bytes": length,
            "client_port": self.client_address[1],
            "request_id": h.get("X-Request-Id"),
            "host": h.get("Host"),
            "x_forwarded_for": h.get("X-Forwarded-For"),
            "x_forwarded_proto": h.get("X-Forwarded-Proto"),
            "x_real_ip": h.get("X-Real-IP"),
            "connection": h.get("Connection"),
        }
        with self.server.lock:
            self.server.requests += 1
        sys.stderr.write(json.dumps(line) + "\n")
        sys.stderr.flush()

    def _send(self, status, body, content_type):
        if isinstance(body, str):
            body = body.encode()
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        rid = self.headers.get("X-Request-Id")
        if rid:
            self.send_header("X-Request-Id", rid)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)
        self._log(status, len(body))

    def _json(self, status, obj):
        self._send(status, json.dumps(obj) + "\n", "application/json")

    def _error(self, status, message):
        self._json(status, {"error": message})

    def _read_body(self):
        length = self.headers.get("Content-Length")
        if length is None:
            if "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():
                self.close_connection = True
                self._error(411, "chunked bodies are not supported by the mock; send Content-Length")
                return None
            return b""
        length = int(length)
        if length > MAX_BODY:
            self.close_connection = True
            self._error(413, f"body of {length} bytes exceeds the 32 MiB limit")
            return None
        return self.rfile.read(length)

    # --- routes --------------------------------------------------------------------------------

    def do_HEAD(self):
        self.do_GET()

    def do_GET(self):
        path = self.path.split("?", 1)[0]
        if path == "/healthz":
            self._json(200, {"status": "alive"})
        elif path == "/readyz":
            if time.monotonic() >= self.server.ready_at:
                self._json(200, {"status": "ready"})
            else:
                self._error(503, "models are still loading")
        elif path == "/metrics":
            self._send(
                200,
                "# HELP segctl_http_requests_total HTTP requests served.\n"
                "# TYPE segctl_http_requests_total counter\n"
                f"segctl_http_requests_total {self.server.requests}\n",
                "text/plain; version=0.0.4; charset=utf-8",
            )
        elif path == "/":
            self._send(200, "<!doctype html><title>segctl</title><h1>segctl (mock)</h1>\n", "text/html; charset=utf-8")
        elif path == "/v1/models":
            self._json(200, {"models": [{"name": MODEL, "versions": [1], "default": True}]})
        elif path == f"/v1/models/{MODEL}":
            self._json(
                200,
                {"model_version_status": [{"version": "1", "state": "AVAILABLE", "status": {"error_code": "OK", "error_message": ""}}]},
            )
        else:
            self._error(404, f"no route for GET {path}")

    def do_POST(self):
        path, _, query = self.path.partition("?")
        body = self._read_body()
        if body is None:
            return
        if path == f"/v1/models/{MODEL}:segment":
            kind = image_kind(body)
            if kind is None:
                self._error(400, "body is not a decodable JPEG or PNG image")
                return
            side = 64
            # Noisy mask so the JSON answer is big enough to be gzip-eligible (>= 1 KiB).
            rng = random.Random(len(body))
            mask = png(side, side, bytes(rng.choice((1, 2, 3)) for _ in range(side * side)))
            if "application/json" in (self.headers.get("Accept") or ""):
                self._json(
                    200,
                    {
                        "model": MODEL,
                        "version": 1,
                        "input_format": kind,
                        "width": side,
                        "height": side,
                        "classes": ["pet", "background", "border"],
                        "mask": base64.b64encode(mask).decode(),
                    },
                )
            else:
                self._send(200, mask, "image/png")
        else:
            self._error(404, f"no route for POST {path}")


class Server(ThreadingHTTPServer):
    daemon_threads = False  # let in-flight requests finish on shutdown
    block_on_close = True

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.lock = threading.Lock()
        self.handlers = set()
        self.requests = 0
        self.stopping = False

    def close_idle(self):
        """Stop reading on keep-alive connections that wait for a next request."""
        self.stopping = True
        with self.lock:
            idle = [h for h in self.handlers if not h.busy]
        for h in idle:
            try:
                h.connection.shutdown(socket.SHUT_RD)
            except OSError:
                pass


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8080)
    ap.add_argument("--ready-after", type=float, default=float(os.environ.get("MOCK_READY_AFTER", "1.0")),
                    help="seconds /readyz answers 503 before 200 (models 'loading')")
    args = ap.parse_args()

    server = Server((args.host, args.port), Handler)
    server.ready_at = time.monotonic() + args.ready_after

    def on_term(signum, frame):
        # shutdown() blocks until serve_forever returns, so call it from another thread.
        def stop():
            server.shutdown()
            server.close_idle()

        threading.Thread(target=stop, daemon=True).start()

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)
    sys.stderr.write(json.dumps({"msg": "mock segctl listening", "host": args.host, "port": server.server_address[1]}) + "\n")
    sys.stderr.flush()
    server.serve_forever(poll_interval=0.2)
    server.server_close()  # joins request threads
    return 0


if __name__ == "__main__":
    sys.exit(main())
