"""How much JPEG draft decoding speeds up the resize cache: python bench/bench_resize_cache.py [--n 24] [--workers 2]

Writes its own camera-sized JPEGs (4000x3000, quality 92, smooth scene + sensor-like noise) to a temp folder, builds
a fresh 480-px cache with and without draft, and prints both times, their ratio, and how far the two caches differ.
"""

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from lib.data.resize_cache import build_cache, cache_path  # noqa: E402


def camera_jpeg(path: Path, w: int, h: int, seed: int) -> None:
    """Smooth gradients and blobs (most of a photo's area) plus per-pixel noise (what makes real JPEGs big)."""
    rng = np.random.default_rng(seed)
    y, x = np.ogrid[0:h, 0:w]
    y, x = y / h, x / w
    channels = []
    for _ in range(3):
        fx, fy, phase = rng.uniform(1, 6, 3)
        smooth = 128 + 60 * np.sin(2 * np.pi * (fx * x + phase)) * np.cos(2 * np.pi * fy * y) + 50 * (x - y)
        channels.append(smooth + rng.normal(0, 6, (h, w)))
    Image.fromarray(np.stack(channels, -1).clip(0, 255).astype(np.uint8)).save(path, "JPEG", quality=92)


def timed_build(data: Path, rels: list[str], cache: Path, draft: bool, workers: int) -> float:
    t0 = time.perf_counter()
    report = build_cache(data, rels, cache, size=480, draft=draft, workers=workers)
    seconds = time.perf_counter() - t0
    assert report.written == len(rels) and not report.failed, report
    return seconds


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=24)
    ap.add_argument("--workers", type=int, default=2)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data"
        data.mkdir()
        rels = [f"img_{i:03d}.jpg" for i in range(args.n)]
        for i, rel in enumerate(rels):
            camera_jpeg(data / rel, 4000, 3000, seed=i)
        mb = sum((data / r).stat().st_size for r in rels) / 2**20
        print(f"{args.n} JPEGs 4000x3000 q92 ({mb:.0f} MiB), cache at 480 (shorter side), workers={args.workers}")
        full = timed_build(data, rels, Path(tmp) / "full", draft=False, workers=args.workers)
        draft = timed_build(data, rels, Path(tmp) / "draft", draft=True, workers=args.workers)
        diff = np.mean(
            [
                np.abs(
                    np.asarray(Image.open(cache_path(Path(tmp) / "full", r)), dtype=float)
                    - np.asarray(Image.open(cache_path(Path(tmp) / "draft", r)), dtype=float)
                ).mean()
                for r in rels
            ]
        )
    print(f"full decode : {full:6.2f} s  ({1000 * full / args.n:5.0f} ms/image)")
    print(f"draft decode: {draft:6.2f} s  ({1000 * draft / args.n:5.0f} ms/image)")
    print(f"speed-up full/draft: {full / draft:.2f}x; mean abs pixel difference of the caches: {diff:.2f} / 255")


if __name__ == "__main__":
    main()
