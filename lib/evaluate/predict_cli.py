"""Predict new photos with a trained run: photo-predict RUN_DIR PHOTOS --out predictions.csv [--k 20] [--tta]

PHOTOS is a folder (searched recursively), a text file with one photo path a line, or a single photo. The CSV has
one row per photo: predicted class, score, margin, top-K neighbours (JSON lists), the verdict (when notebook 03
saved thresholds in RUN_DIR/eval/val/thresholds.json), an `error` for a photo that could not be read and a `note`
for one smaller than the run's min_size (--refuse-small: an error and no prediction instead).
The gallery is searched with the index notebook 03 saved in RUN_DIR/index/ (--index, --nprobe, --ef-search choose
another, --recall 0.99 re-tunes its search parameters without rebuilding it: lib.retrieval.ann_index); an
approximate index's recall@k against exact search is printed.
--group-new groups the photos called new (verdict 'unclassifiable') into candidate individuals: columns
new_cluster (one id per candidate individual, -1 for the others), new_cluster_size and new_cluster_tightness
(lib.evaluate.new_groups);
`photo-enroll RUN_DIR --from-predictions CSV --cluster N --label NAME` then enrols one of them.
Run it from the repository root: the run's config names its data and split folders relative to it.
`photo-predict --export EXPORT_DIR PHOTOS --out CSV` predicts from an export folder (python -m lib.train.export)
instead: its model.onnx under ONNX Runtime, its gallery index (or --gallery RUN_DIR/index) and thresholds; no
checkpoint, training photos or PyTorch model needed (lib.evaluate.exported).
`photo-predict` is the console script that `pip install -e .` installs; `python -m lib.evaluate.predict_cli` is the same.
"""

import argparse
import sys
from pathlib import Path

from lib.core.errors import DataError
from lib.core.state_io import write_bytes
from lib.evaluate.exported import predict_export
from lib.evaluate.new_groups import add_new_groups
from lib.evaluate.photos import list_photos
from lib.evaluate.predict import PredictSettings, predict_photos


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="photo-predict", description=__doc__.splitlines()[0])
    ap.add_argument("run_dir", type=Path, metavar="RUN_DIR", nargs="?", help="the run folder (not with --export)")
    ap.add_argument("photos", type=Path, metavar="PHOTOS", help="folder, list file or single photo")
    ap.add_argument("--export", type=Path, default=None, metavar="EXPORT_DIR",
                    help="predict from this export folder (python -m lib.train.export) instead of a run folder")
    ap.add_argument("--gallery", type=Path, default=None, metavar="INDEX_DIR",
                    help="with --export: a saved gallery index folder (a run's index/) instead of the export's")
    ap.add_argument("--out", type=Path, required=True, help="CSV to write")
    ap.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    ap.add_argument("--k", type=int, default=None, help="neighbours that vote (default: as the thresholds, else 20)")
    ap.add_argument("--weighting", choices=("inverse", "uniform", "softmax"), default=None)
    ap.add_argument("--tta", action="store_true", help="flip test-time augmentation")
    ap.add_argument("--checkpoint", default="best", help="best | latest | a .pt file name in RUN_DIR")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--index", default=None,
                    help="flat | ivf | hnsw | ivfpq | auto | a faiss factory string such as 'IVF1024,PQ64' "
                         "(default: the index notebook 03 saved)")
    ap.add_argument("--nprobe", type=int, default=None, help="IVF lists visited per photo (default: as saved)")
    ap.add_argument("--ef-search", type=int, default=None, help="HNSW candidates per photo (default: as saved)")
    ap.add_argument("--recall", type=float, default=None,
                    help="re-tune the saved index's search parameters to this recall@k against exact search, "
                         "without rebuilding it (default: as tuned when it was built)")
    ap.add_argument("--refuse-small", action="store_true",
                    help="no prediction for a photo below the run's min_size (default: predict it, with a note)")
    ap.add_argument("--allow-mismatch", action="store_true",
                    help="apply thresholds chosen under other settings (checkpoint, TTA, k, weighting, gallery, "
                         "protocol, context rule), with a warning, instead of refusing")
    ap.add_argument("--group-new", action="store_true",
                    help="group the photos called new into candidate individuals (new_cluster columns)")
    ap.add_argument("--cluster-threshold", type=float, default=None,
                    help="--group-new's cosine-distance threshold (default: the one notebook 03 chose)")
    ap.add_argument("--strict-thresholds", action="store_true",
                    help="refuse thresholds calibrated on a gallery with other enrolled photos than it holds now "
                         "(default: apply them, with a warning)")
    args = ap.parse_args(argv)
    if (args.run_dir is None) == (args.export is None):
        ap.error("give RUN_DIR or --export EXPORT_DIR (one of them)")
    if args.gallery is not None and args.export is None:
        ap.error("--gallery goes with --export (a run folder finds its own index)")
    if args.out.exists() and not args.overwrite:
        print(f"error: {args.out} exists; pass --overwrite to replace it", file=sys.stderr)
        return 2
    try:
        photos = list_photos(args.photos)
        if not photos:
            raise DataError(f"{args.photos}: no photos found")
        settings = PredictSettings(
            k=args.k, tta=args.tta, checkpoint=args.checkpoint, weighting=args.weighting, device=args.device,
            batch_size=args.batch_size, progress=True, small="refuse" if args.refuse_small else "note",
            index=args.index, nprobe=args.nprobe, ef_search=args.ef_search, recall=args.recall,
            allow_mismatch=args.allow_mismatch, strict_thresholds=args.strict_thresholds)
        table = (predict_export(args.export, photos, settings, args.gallery) if args.export
                 else predict_photos(args.run_dir, photos, settings))
        if args.group_new:  # an export carries notebook 03's clustering.json where the run folder has it
            table, grouped = add_new_groups(table, args.export or args.run_dir, args.tta, args.allow_mismatch,
                                            args.cluster_threshold)
            print(grouped)
    except ValueError as e:  # a DataError, or a setting such as --index the library refused with its reason
        print(f"error: {e}", file=sys.stderr)
        return 1
    # a file name that is not UTF-8 stays readable
    write_bytes(args.out, table.to_csv(index=False).encode("utf-8", errors="backslashreplace"))
    bad, noted = (table["error"] != "").sum(), (table["note"] != "").sum()
    print(f"{len(table)} photos -> {args.out}" + (f"; {bad} could not be read (see the error column)" if bad else "")
          + (f"; {noted} below the run's min_size (see the note column)" if noted else ""))
    if table["verdict"].ne("").any():
        print(table["verdict"].value_counts().to_string())
    return 0


if __name__ == "__main__":
    sys.exit(main())
