"""Build or update the resize cache: python data_prep/resize_cache.py DATA_ROOT CACHE_DIR [--size 480] [--index x.csv]

Without --index, every image-named file below DATA_ROOT is cached (hidden files and folders skipped, and CACHE_DIR
itself when it lies inside DATA_ROOT). Unreadable images are listed at the end; they do not stop the build.
"""

import argparse
import sys
from pathlib import Path

import pandas as pd  # noqa: E402

from lib.core.errors import DataError  # noqa: E402
from lib.data.images import RESIZE_MODES, find_images  # noqa: E402
from lib.data.resize_cache import build_cache  # noqa: E402


def _rel_paths(data_root: Path, cache_dir: Path, index: Path | None) -> list[str]:
    if index is not None:
        table = pd.read_csv(index, dtype=str)
        if "path" not in table.columns:
            raise DataError(f"{index}: no 'path' column (columns: {', '.join(table.columns)})")
        return table["path"].dropna().tolist()
    paths = find_images(data_root)
    try:
        inside = cache_dir.resolve().relative_to(data_root.resolve()).as_posix()
    except ValueError:
        return paths
    return [p for p in paths if not (p + "/").startswith(inside + "/")]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("data_root", type=Path)
    ap.add_argument("cache_dir", type=Path)
    ap.add_argument("--size", type=int, default=480, help="target side in pixels (default 480)")
    ap.add_argument("--mode", choices=RESIZE_MODES, default="shorter", help="which side gets --size")
    ap.add_argument("--no-draft", action="store_true", help="decode JPEGs at full scale (slower, marginally sharper)")
    ap.add_argument("--workers", type=int, default=None, help="processes (default: all cores)")
    ap.add_argument("--quality", type=int, default=95, help="JPEG quality of the cached files")
    ap.add_argument("--index", type=Path, default=None, help="CSV with a 'path' column relative to DATA_ROOT")
    args = ap.parse_args(argv)
    try:
        if not args.data_root.is_dir():
            raise DataError(f"{args.data_root}: data root is not a folder")
        rel_paths = _rel_paths(args.data_root, args.cache_dir, args.index)
        report = build_cache(
            args.data_root, rel_paths, args.cache_dir, size=args.size, mode=args.mode,
            draft=not args.no_draft, workers=args.workers, quality=args.quality, progress=True,
        )
    except (DataError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{len(rel_paths)} images: {report.written} written, {report.reused} reused, {len(report.failed)} failed")
    for rel, reason in report.failed:
        print(f"  failed {rel}: {reason}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
