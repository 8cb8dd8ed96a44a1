"""Download the photos a CSV of URLs lists: python -m data_prep.download --csv urls.csv --out data/raw [--source NAME]

Files land in OUT[/SOURCE]/{class}/{ID}_{seq}.ext, each checked as an image before it gets its name; run the same
command again to fetch only what is missing (nothing is downloaded twice or overwritten). With --consolidate-dir,
several sources (one run each) meet in one folder by hard link, symlink or copy. Every CSV row is a row of the report
CSV (downloaded / present / failed with the reason / interrupted); the failures are also printed.

    python -m data_prep.download --csv data/csv/raw_aurita.csv --source aurita --out data/raw_sources \\
        --consolidate-dir data/raw --workers 8 --link-mode hard
"""

import argparse
import sys
from pathlib import Path

from lib.core.errors import DataError
from lib.data.url_fetch import LINK_MODES, DownloadConfig, destination, download_from_csv

_SHOWN_FAILURES = 20


def main(argv=None) -> int:
    d = DownloadConfig()
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--csv", required=True, type=Path, help="the URL list")
    # the underscore spellings are the ones the marmoset pipeline's own commands use
    ap.add_argument("--out", "--out_sources", dest="out", required=True, type=Path, help="folder to download into")
    ap.add_argument("--source", default=d.source, help="source name: files go to OUT/SOURCE/ (default: OUT/)")
    ap.add_argument("--url-col", default=d.url_col, help=f"column holding the URL (default {d.url_col!r})")
    ap.add_argument("--class-col", default=d.class_col, help=f"column holding the class (default {d.class_col!r})")
    ap.add_argument("--id-col", default=d.id_col,
                    help="column holding the object ID that groups photos (default: none, each URL its own object)")
    ap.add_argument("--consolidate-dir", "--consolidate_dir", dest="consolidate_dir", type=Path, default=None,
                    help="also put every good file into this folder's {class}/")
    ap.add_argument("--link-mode", "--link_mode", dest="link_mode", choices=LINK_MODES, default=d.link_mode,
                    help=f"how --consolidate-dir gets the files (default {d.link_mode})")
    ap.add_argument("--workers", type=int, default=d.workers, help=f"parallel downloads (default {d.workers})")
    ap.add_argument("--timeout", type=float, default=d.timeout,
                    help=f"seconds a server may stay silent before an attempt fails (default {d.timeout:g})")
    ap.add_argument("--retries", type=int, default=d.retries,
                    help=f"further attempts after timeouts, broken connections, HTTP 5xx/429 (default {d.retries})")
    ap.add_argument("--report", type=Path, default=None,
                    help="report CSV (default: download_report.csv in the download folder)")
    args = ap.parse_args(argv)
    try:
        config = DownloadConfig(url_col=args.url_col, class_col=args.class_col, id_col=args.id_col,
                                source=args.source, workers=args.workers, timeout=args.timeout, retries=args.retries,
                                link_mode=args.link_mode)
    except ValueError as e:
        ap.error(str(e))
    try:
        report_path = args.report or destination(args.out, config) / "download_report.csv"
        report = download_from_csv(args.csv, args.out, config, consolidate_dir=args.consolidate_dir,
                                   report_path=report_path, progress=True)
    except (DataError, OSError) as e:  # OSError: a folder that cannot be written, a full disk
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: every finished file is kept; run the same command again to fetch the rest", file=sys.stderr)
        return 130
    counts = report["status"].value_counts()
    print(f"{len(report)} rows: {counts.get('downloaded', 0)} downloaded, {counts.get('present', 0)} already present, "
          f"{counts.get('failed', 0)} failed -> {destination(args.out, config)}; report: {report_path}")
    failed = report[report["status"] == "failed"]
    for row in failed.head(_SHOWN_FAILURES).itertuples():
        print(f"  line {row.line} {row.url}: {row.reason}")
    if len(failed) > _SHOWN_FAILURES:
        print(f"  ... and {len(failed) - _SHOWN_FAILURES} more in the report")
    return 0


if __name__ == "__main__":
    sys.exit(main())
