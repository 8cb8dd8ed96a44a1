"""Download throughput by worker count: python bench/bench_download.py [--n 96] [--latency 0.05] [--workers 1 4 8]

Serves --n camera-like JPEGs from a local HTTP server on 127.0.0.1 that waits --latency seconds before each answer
(the round trip and queueing of a real photo host), downloads them from a CSV of URLs into a fresh folder once per
worker count, and prints files/s, MB/s and the ratio to the first worker count, all measured in this one run.
"""

import argparse
import csv
import io
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
from PIL import Image

from lib.data.url_fetch import DownloadConfig, download_from_csv


def photo_jpeg(seed: int, w: int = 800, h: int = 600) -> bytes:
    """Smooth gradients plus mild noise: JPEGs about the size of a web-sized photo (~100-200 KB)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w] / max(w, h)
    f = rng.uniform(1, 5, 3)
    rgb = np.stack([128 + 90 * np.sin(2 * np.pi * f[c] * (x + c * y)) for c in range(3)], -1)
    buf = io.BytesIO()
    Image.fromarray((rgb + rng.normal(0, 4, rgb.shape)).clip(0, 255).astype(np.uint8)).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def serve(photos: list[bytes], latency: float) -> ThreadingHTTPServer:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            time.sleep(latency)
            body = photos[int(self.path.rsplit("/", 1)[1])]
            self.send_response(200)
            self.send_header("Content-Type", "image/jpeg")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.daemon_threads = True
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    return httpd


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=96, help="photos per run")
    ap.add_argument("--latency", type=float, default=0.05, help="seconds the server waits before each answer")
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 4, 8])
    args = ap.parse_args()
    photos = [photo_jpeg(i) for i in range(args.n)]
    mb = sum(map(len, photos)) / 1e6
    httpd = serve(photos, args.latency)
    url = f"http://127.0.0.1:{httpd.server_address[1]}"
    print(f"{args.n} JPEGs 800x600 ({mb:.1f} MB, {1000 * mb / args.n:.0f} kB each), "
          f"server latency {1000 * args.latency:.0f} ms per request")
    print(f"| workers | seconds | files/s | MB/s | vs workers={args.workers[0]} |")
    print("|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        csv_path = Path(tmp) / "urls.csv"
        with open(csv_path, "w", newline="") as f:
            csv.writer(f).writerows([["url", "class"]] + [[f"{url}/img/{i}", f"c{i % 4}"] for i in range(args.n)])
        base = None
        for workers in args.workers:
            t0 = time.perf_counter()
            report = download_from_csv(csv_path, Path(tmp) / f"w{workers}", DownloadConfig(workers=workers))
            seconds = time.perf_counter() - t0
            assert (report["status"] == "downloaded").all(), report[report["status"] != "downloaded"]
            base = base or seconds
            print(f"| {workers} | {seconds:.2f} | {args.n / seconds:.1f} | {mb / seconds:.1f} | {base / seconds:.2f}x |")
    httpd.shutdown()


if __name__ == "__main__":
    main()
