"""Enrol photos into a trained run's gallery without retraining: new individuals, or new encounters of known ones.

    photo-enroll RUN_DIR PHOTOS --label NAME     PHOTOS: a folder, a list file (one path a line) or one photo
    photo-enroll RUN_DIR FOLDER                  FOLDER/{label}/...: each photo's label is its first folder
    photo-enroll RUN_DIR --list                  what was enrolled (id, label, group, path, when)
    photo-enroll RUN_DIR --remove ID [ID ...]    take entries out (an id, or its first characters)
    photo-enroll RUN_DIR --from-predictions P.CSV --cluster N --label NAME   (or --all-clusters): candidate
                                                 individuals of photo-predict --group-new (lib.evaluate.enrol_clusters)
    photo-enroll RUN_DIR --rename OLD NEW        relabel enrolled photos (a generated new_001 given its real name)

The photos are embedded with the run's checkpoint and stored in RUN_DIR/index/enrolled.npz
(lib.evaluate.enrolled_store), which photo-predict adds to the gallery it searches. An enrolment is refused whole,
with a line per photo, when a photo cannot be read or is smaller than the run's min_size, is already in the gallery
(same file content: a train photo or an enrolled one), or carries a label that conflicts (the same content under
another label, or a label that differs from a known one only by case or spaces; labels are compared and stored in
Unicode NFC). Two enrolments of one run queue on its state lock and both land. `python -m lib.evaluate.enroll_cli` is the same command.
"""
from __future__ import annotations

import argparse
import os
import sys
import unicodedata
from collections import defaultdict
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pandas as pd

from lib.core.device import auto_settings
from lib.core.errors import DataError
from lib.core.state_io import file_sha256, run_state_lock
from lib.data.images import probe_image
from lib.data.splits import read_splits
from lib.data.table import MIN_SIZE
from lib.evaluate.enrolled_store import ID_CHARS, Enrolled, embedding_key, load_enrolled, save_enrolled
from lib.evaluate.photos import embed_photos, list_photos
from lib.train.trained_run import TrainedRun, load_trained, rows_in_split, split_rows, trained_min_size


def labelled_photos(source: str | os.PathLike, label: str | None = None) -> tuple[list[str], list[str]]:
    """(photos, labels): every photo of `source` (lib.evaluate.photos.list_photos) under `label`, or without it, the
    photos of a folder laid out as {label}/..., each labelled by its first folder."""
    photos = list_photos(source)
    if not photos:
        raise DataError(f"{source}: no photos found")
    if label is not None:
        if not label.strip():
            raise DataError("--label is empty")
        return photos, [label] * len(photos)
    if not Path(source).is_dir():
        raise DataError(f"{source}: without --label, PHOTOS must be a folder of {{label}}/... photos")
    parts = [Path(p).relative_to(source).parts for p in photos]
    loose = [p for p, part in zip(photos, parts) if len(part) < 2]
    if loose:
        raise DataError(f"{loose[0]}: not in a label folder ({len(loose)} such photos); without --label each photo "
                        f"sits in {source}/{{label}}/")
    return photos, [part[0] for part in parts]


def _gallery_files(run: TrainedRun) -> pd.DataFrame:
    """The train gallery's photos with their file sizes (a cheap filter before hashing any of them)."""
    train = rows_in_split(split_rows(run), "train")
    files = [Path(run.settings.data.data_dir) / p for p in train["path"]]
    return pd.DataFrame({"file": [str(f) for f in files], "label": train["label"].to_numpy(),
                         "size": [f.stat().st_size if f.exists() else -1 for f in files]})


def _train_contents(run: TrainedRun, sizes: set[int]) -> dict[str, tuple[str, str]]:
    """sha256 -> (what it is, label) for every train photo of one of these file sizes."""
    gallery = _gallery_files(run)
    return {file_sha256(row.file): (f"train photo {row.file}", row.label)
            for row in gallery[gallery["size"].isin(sizes)].itertuples()}


def _spelling(label: str) -> str:
    return unicodedata.normalize("NFC", label).strip().casefold()


def canonical_label(label: str, known_labels: set[str]) -> str:
    """The label in Unicode NFC; a known label's own spelling when it is the same text in another Unicode form (a
    folder name from macOS is decomposed, a typed one composed: one individual either way)."""
    nfc = unicodedata.normalize("NFC", label)
    same = sorted(k for k in known_labels if unicodedata.normalize("NFC", k) == nfc)
    return same[0] if same else nfc


def enrolment_problems(photos: list[str], labels: list[str], hashes: list[str | None], known: dict,
                       known_labels: set[str]) -> list[str]:
    """One line per photo that cannot be enrolled: unreadable (hash None), a duplicate of a known photo or of
    another photo of this enrolment, the same content under another label, or a label that differs from a known
    one only by case or surrounding spaces."""
    by_spelling = defaultdict(set)
    for name in known_labels:
        by_spelling[_spelling(name)].add(name)
    problems, seen = [], dict(known)
    for path, label, digest in zip(photos, labels, hashes):
        if digest is None:
            continue  # its read error is reported by the caller
        near = by_spelling.get(_spelling(label), set()) - {label}
        if near:
            problems.append(f"{path}: label {label!r} differs only by case or spaces from the known "
                            f"{sorted(near)[0]!r}; use that name, or a clearly different one")
        if digest in seen:
            what, other = seen[digest]
            problems.append(f"{path}: the same file as {what}, " + (f"which is labelled {other!r}: label conflict"
                            if other != label else "already in the gallery: duplicate"))
            continue
        seen[digest] = (f"{path} (in this enrolment)", label)
    return problems


def enrolment_min_size(run: TrainedRun) -> int:
    """The shorter side an enrolled photo needs: the run's min_size (notebook 01's floor for its training photos);
    for a split that did not record it, check_images' default, or the smallest training photo's side where smaller."""
    try:
        recorded = read_splits(run.settings.data.splits_dir).report.get("min_size")
    except DataError:
        recorded = None
    return int(recorded) if recorded else min(trained_min_size(run) or MIN_SIZE, MIN_SIZE)


def _checked(run: TrainedRun, photos: list[str], labels: list[str], hashes: list[str | None], train: dict,
             enrolled: Enrolled) -> tuple[list[str], list[str]]:
    """(the labels as they will be stored, enrolment_problems against this enrolment)."""
    known_labels = set(run.config["class_to_idx"]) | set(enrolled.table["label"])
    labels = [canonical_label(label, known_labels) for label in labels]
    known = {**train, **{row.sha256: (f"enrolled photo {row.path} (id {row.id})", row.label)
                         for row in enrolled.table.itertuples()}}
    return labels, enrolment_problems(photos, labels, hashes, known, known_labels)


def _refuse(problems: list[str]) -> None:
    if problems:
        raise DataError(f"nothing enrolled: {len(problems)} problem(s)\n  " + "\n  ".join(problems))


def enroll_photos(run_dir: str | os.PathLike, photos: list[str], labels: list[str], checkpoint: str = "best",
                  tta: bool = False, device: str = "auto", group: str | None = None) -> pd.DataFrame:
    """Add photos under their labels to the run's gallery (lib.evaluate.enrolled_store); returns their new entries.

    group: the encounter they belong to (default: one per label and enrolment, 'enrolled:{label}:{time}').
    Refused whole (DataError, a line per photo) when a photo cannot be read, is smaller than the run's min_size
    (enrolment_min_size), or on any problem of enrolment_problems; nothing is written then. The photos are embedded
    first; the run's state lock is held only to re-read the enrolment, check again against it (another enrolment
    may have landed meanwhile) and write it, so a second enrolment of the same run waits its turn.
    """
    if len(photos) != len(labels):
        raise ValueError(f"{len(photos)} photos but {len(labels)} labels")
    run = load_trained(run_dir, checkpoint)
    floor = enrolment_min_size(run)
    checks = [probe_image(p, min_size=floor) for p in photos]
    hashes = [file_sha256(p) if c.ok else None for p, c in zip(photos, checks)]
    train = _train_contents(run, {os.path.getsize(p) for p, c in zip(photos, checks) if c.ok})
    labels, problems = _checked(run, photos, labels, hashes, train, load_enrolled(run_dir))
    _refuse([f"{p}: {c.reason}" for p, c in zip(photos, checks) if not c.ok] + problems)
    emb = embed_photos(run, photos, auto_settings(device=device), tta)
    with run_state_lock(run_dir, f"photo-enroll of {len(photos)} photos"):
        enrolled = load_enrolled(run_dir)  # as it is now, not as it was before embedding
        labels, problems = _checked(run, photos, labels, hashes, train, enrolled)
        _refuse(problems)
        when = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
        new = pd.DataFrame({"id": [h[:ID_CHARS] for h in hashes], "path": [str(Path(p).resolve()) for p in photos],
                            "label": labels, "group": [group or f"enrolled:{lab}:{when}" for lab in labels],
                            "sha256": hashes, "enrolled_at": when})
        save_enrolled(run_dir, enrolled.added(new, embedding_key(run, tta), emb))
    return new


def remove_enrolled(run_dir: str | os.PathLike, ids: list[str]) -> pd.DataFrame:
    """Take the entries named by `ids` (an id or its first characters, one entry each) out; returns them."""
    with run_state_lock(run_dir, f"photo-enroll --remove {' '.join(ids)}"):
        enrolled = load_enrolled(run_dir)
        drop = np.zeros(len(enrolled), dtype=bool)
        for wanted in ids:
            hits = (enrolled.table["id"].str.startswith(wanted.strip()).to_numpy() if wanted.strip()
                    else np.zeros(len(enrolled), dtype=bool))
            if hits.sum() != 1:
                listed = ", ".join(enrolled.table["id"]) or "none"
                raise DataError(f"{wanted!r} names {int(hits.sum())} enrolled entries of {run_dir}, not one "
                                f"(enrolled ids: {listed}); nothing removed")
            drop |= hits
        save_enrolled(run_dir, enrolled.without(drop))
    return enrolled.table[drop]


def _clusters_command(args) -> None:
    from lib.evaluate.enrol_clusters import enrol_clusters, rename_enrolled  # it builds on this module

    if args.rename:
        n = rename_enrolled(args.run_dir, *args.rename)
        print(f"renamed {n} enrolled photos of {args.run_dir}: {args.rename[0]} -> {args.rename[1]}")
        return
    new = enrol_clusters(args.run_dir, args.from_predictions, None if args.all_clusters else args.cluster,
                         args.label, checkpoint=args.checkpoint, tta=args.tta, device=args.device, group=args.group)
    counts = new["label"].value_counts(sort=False)
    print(f"enrolled {len(new)} photos in {args.run_dir}: " + ", ".join(f"{label} {n}" for label, n in counts.items())
          + (f"\n(rename a generated name: photo-enroll {args.run_dir} --rename {counts.index[0]} NAME)"
             if args.all_clusters else ""))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="photo-enroll", description=__doc__.splitlines()[0])
    ap.add_argument("run_dir", type=Path, metavar="RUN_DIR")
    ap.add_argument("photos", type=Path, metavar="PHOTOS", nargs="?", help="folder, list file or single photo")
    ap.add_argument("--label", help="the label of every photo (default: each photo's first folder under PHOTOS)")
    ap.add_argument("--group", help="the encounter the photos belong to (default: one per label and enrolment)")
    ap.add_argument("--list", action="store_true", help="show what was enrolled")
    ap.add_argument("--remove", nargs="+", metavar="ID", help="take entries out by id (or its first characters)")
    ap.add_argument("--from-predictions", type=Path, metavar="CSV",
                    help="a photo-predict --group-new CSV: enrol its --cluster N under --label, or --all-clusters")
    ap.add_argument("--cluster", type=int, help="with --from-predictions: the new_cluster id to enrol")
    ap.add_argument("--all-clusters", action="store_true",
                    help="with --from-predictions: every cluster, named new_001, new_002... (rename with --rename)")
    ap.add_argument("--rename", nargs=2, metavar=("OLD", "NEW"), help="relabel the enrolled photos labelled OLD")
    ap.add_argument("--checkpoint", default="best", help="best | latest | a .pt file name in RUN_DIR")
    ap.add_argument("--tta", action="store_true", help="flip test-time augmentation (as photo-predict --tta)")
    ap.add_argument("--device", default="auto")
    args = ap.parse_args(argv)
    if sum(map(bool, (args.photos, args.list, args.remove, args.from_predictions, args.rename))) != 1:
        ap.error("give PHOTOS, --list or --remove (or --from-predictions, --rename)")
    if args.from_predictions and (args.cluster is None) == (not args.all_clusters):
        ap.error("--from-predictions needs --cluster N (with --label) or --all-clusters")
    try:
        if not (args.run_dir / "best_model.pt").exists() and not list(args.run_dir.glob("*.pt")):
            raise DataError(f"{args.run_dir}: not a trained run (no checkpoint in it)")
        if args.list:
            table = load_enrolled(args.run_dir).table
            print(table[["id", "label", "group", "path", "enrolled_at"]].to_string(index=False) if len(table)
                  else f"nothing enrolled in {args.run_dir}")
        elif args.from_predictions or args.rename:
            _clusters_command(args)
        elif args.remove:
            gone = remove_enrolled(args.run_dir, args.remove)
            print("\n".join(f"removed {r.id} ({r.label}) {r.path}" for r in gone.itertuples()))
        else:
            photos, labels = labelled_photos(args.photos, args.label)
            new = enroll_photos(args.run_dir, photos, labels, args.checkpoint, args.tta, args.device, args.group)
            counts = new["label"].value_counts()
            print(f"enrolled {len(new)} photos in {args.run_dir}: "
                  + ", ".join(f"{label} {n}" for label, n in counts.items()))
    except ValueError as e:  # a DataError: what was refused and why
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
