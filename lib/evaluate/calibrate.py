"""Reliability thresholds that hold out of sample: chosen on a calibration part of val, measured on the rest (or on
test), and saved with what they were chosen under, so that prediction can refuse to apply them elsewhere.

The calibration part is a seeded split of val by group (the split's leakage unit), not cross-fitting: one fixed pair
of thresholds (the one saved for photo-predict) chosen on photos it is then never reported on, where cross-fitting
would measure two pairs, neither of them the saved one. Training picks its checkpoint on the whole of val, so the
calibration part is disjoint from the queries the thresholds are reported on, not from checkpoint selection.
"""
from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass

import numpy as np
import pandas as pd

from lib.core.errors import DataError
from lib.evaluate.record import Evaluation
from lib.evaluate.run_eval import apply_thresholds
from lib.retrieval.decide import CONFIDENCE, MIN_SUPPORT, Thresholds, choose_thresholds, verdicts

CALIBRATION_COLUMN = "calibration"  # queries: True for the calibration part
# what thresholds.json records and prediction compares: the evaluation's settings the thresholds depend on
PROVENANCE_KEYS = ("protocol", "restrict_to_context", "tta", "k", "weighting", "checkpoint_sha256",
                   "gallery_fingerprint")


@dataclass
class Calibration:
    """How thresholds are chosen (notebook 03's parameters of the same names)."""
    target_accuracy: float | None = 0.95
    target_coverage: float | None = None   # given instead of target_accuracy: the best accuracy at this coverage
    share: float = 0.5                     # of val's groups that form the calibration part
    seed: int = 0
    min_support: int = MIN_SUPPORT         # queries a pair of thresholds must accept to be a candidate
    confidence: float | None = CONFIDENCE  # one-sided Clopper-Pearson bound on accuracy; None: point estimate


def calibration_mask(groups, share: float = 0.5, seed: int = 0) -> np.ndarray:
    """True for the rows whose group falls in the calibration part: round(share x groups) groups drawn by `seed`, so
    photos of one encounter never straddle the two parts; the same groups and seed give the same part."""
    if not 0 < share < 1:
        raise ValueError(f"calibration share must be between 0 and 1, got {share}")
    groups = np.asarray(groups).astype(str)
    unique = np.unique(groups)
    n_cal = min(max(int(round(share * len(unique))), 1), len(unique) - 1) if len(unique) > 1 else len(unique)
    chosen = np.random.default_rng(seed).permutation(unique)[:n_cal]
    return np.isin(groups, chosen)


def _part_report(queries: pd.DataFrame, thresholds: Thresholds) -> dict:
    accepted = verdicts(queries["top1_distance"], queries["margin"], thresholds) == "accepted"
    return {"n": int(len(queries)), "coverage": float(accepted.mean()) if len(queries) else float("nan"),
            "accuracy": float(queries.loc[accepted, "correct"].mean()) if accepted.any() else float("nan")}


def calibrate(ev: Evaluation, settings: Calibration) -> tuple[Thresholds, dict]:
    """Thresholds chosen on the calibration part of `ev` (its queries get CALIBRATION_COLUMN) for the settings' target;
    info: choose_thresholds' figures on that part, the part's settings, and 'held_out': coverage and accuracy of
    the same thresholds on the other queries (what the in-sample figure would hide)."""
    q = ev.queries
    q[CALIBRATION_COLUMN] = calibration_mask(q["group"], settings.share, settings.seed)
    part, rest = q[q[CALIBRATION_COLUMN]], q[~q[CALIBRATION_COLUMN]]
    targets = ({"target_coverage": settings.target_coverage} if settings.target_coverage
               else {"target_accuracy": settings.target_accuracy})
    thresholds, info = choose_thresholds(part["correct"], part["top1_distance"], part["margin"], **targets,
                                         min_support=settings.min_support, confidence=settings.confidence)
    info.update(calibration={"share": settings.share, "seed": settings.seed, "split": ev.split, "n": int(len(part))},
                held_out=_part_report(rest, thresholds))
    return thresholds, info


def apply_calibrated(ev: Evaluation, thresholds: Thresholds, info: dict) -> Evaluation:
    """apply_thresholds to every query of `ev` (their verdicts), with the coverage and accuracy_at_coverage the record
    reports measured on the held-out part only (the calibration part's own are in-sample), and calibrate's `info`
    under metrics['thresholds']."""
    apply_thresholds(ev, thresholds)
    held = info["held_out"]
    ev.metrics.update(coverage=held["coverage"], accuracy_at_coverage=held["accuracy"], thresholds=info,
                      coverage_measured_on=f"held-out part of {ev.split} ({held['n']} queries)")
    return ev


def provenance(ev: Evaluation) -> dict:
    """The evaluation settings thresholds chosen on `ev` depend on (PROVENANCE_KEYS, plus the checkpoint's name)."""
    return {"checkpoint": ev.config.get("checkpoint"), **{k: ev.config.get(k) for k in PROVENANCE_KEYS},
            "enrolment": ev.config.get("enrolment")}


def check_provenance(saved: dict, actual: dict, source, allow_mismatch: bool = False) -> list[str]:
    """Compare what thresholds were chosen under (`saved`, from `source`) with how they are about to be used
    (`actual`, PROVENANCE_KEYS). A difference is a DataError naming each one, or with allow_mismatch a warning;
    a key the file lacks (written before it was recorded) is a warning that it cannot be checked. Returns the
    differences."""
    missing = [k for k in PROVENANCE_KEYS if k in actual and k not in saved]
    if missing:
        warnings.warn(f"{source} predates recorded provenance: cannot check {', '.join(missing)} "
                      "(choose the thresholds again with notebook 03)", stacklevel=2)
    differ = [f"{k}: chosen with {saved[k]!r}, used with {actual[k]!r}" for k in PROVENANCE_KEYS
              if k in actual and k in saved and saved[k] != actual[k]]
    if differ and not allow_mismatch:
        raise DataError(f"{source} does not fit this prediction ({'; '.join(differ)}): its thresholds mean something "
                        "else here; choose them again (notebook 03) or pass --allow-mismatch to apply them anyway")
    if differ:
        warnings.warn(f"{source}: applied although " + "; ".join(differ), stacklevel=2)
    return differ


def check_enrolment(saved: dict, now: dict, source, strict: bool = False) -> None:
    """Say when the gallery's enrolled photos (`now`: lib.evaluate.gallery_index.enrolment_stamp) are not those the
    thresholds in `source` were calibrated with (`saved['enrolment']`): a grown gallery shifts the distances and vote
    shares they cut. A warning, or with `strict` a DataError; thresholds that predate the record are warned about only
    when photos are enrolled now."""
    then = saved.get("enrolment")
    if then == now or (then is None and not now["n_enrolled"]):
        return
    if then is None:
        warnings.warn(f"{source} predates recorded enrolment: cannot check that the {now['n_enrolled']} enrolled "
                      "photos of the gallery were there when its thresholds were chosen", stacklevel=2)
        return
    change = "grew" if now["n_enrolled"] > then["n_enrolled"] else "changed"
    said = (f"the gallery {change} since {source} was calibrated: {then['n_enrolled']} enrolled photos then, "
            f"{now['n_enrolled']} now")
    if strict:
        raise DataError(f"{said}; choose the thresholds again (notebook 03), or predict without --strict-thresholds")
    warnings.warn(f"{said}; its thresholds are applied as they are", stacklevel=2)


def thresholds_info(ev: Evaluation, chosen: dict, settings: Calibration) -> dict:
    """What thresholds.json records besides the thresholds: how they were chosen and on what."""
    return {**chosen, **provenance(ev), "split": ev.split, "index": ev.config.get("index"),
            "calibration_settings": asdict(settings)}
