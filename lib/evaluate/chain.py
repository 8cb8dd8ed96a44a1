"""Notebook 03's evaluation chain in one call: the split evaluated (val), thresholds chosen on its calibration part
and saved for photo-predict, the test split evaluated at them when asked for, the cluster threshold chosen and saved,
every evaluation's classification, open-set and cluster figures added, its record saved and its results row
appended; for re-identification the per-identity AP and the pairs table exported. The notebook shows and plots what
it returns."""
from __future__ import annotations

import os
from dataclasses import dataclass, field, fields
from pathlib import Path

import pandas as pd

from lib.core.state_io import run_state_lock, write_csv
from lib.data.tasks import task_columns
from lib.evaluate.calibrate import CALIBRATION_COLUMN, Calibration, apply_calibrated, calibrate, provenance, thresholds_info
from lib.evaluate.classification import add_classification_metrics
from lib.evaluate.cluster_eval import add_cluster_metrics, choose_cluster_threshold, cluster_columns, save_cluster_choice
from lib.evaluate.open_set_eval import add_open_set_metrics, open_set_columns
from lib.evaluate.record import Evaluation, record_split, save_evaluation
from lib.evaluate.results_table import append_benchmark_row, benchmark_row
from lib.evaluate.run_eval import EvalSettings, evaluate_run
from lib.retrieval.ann_index import IndexSpec, describe
from lib.retrieval.clustering import ClusterSettings
from lib.retrieval.decide import DEFAULT_K, Thresholds, risk_coverage, save_thresholds
from lib.retrieval.metrics import per_identity_ap
from lib.retrieval.pairwise import pairwise_scores

OPEN_SET_SHOWN = ("BAKS", "BAUS", "harmonic_mean", "auroc_top1_distance", "auroc_margin", "coverage",
                  "accuracy_answered", "new_threshold", "min_margin")
CLUSTER_SHOWN = ("n_photos", "n_individuals", "n_clusters", "ari", "ami", "pair_precision", "pair_recall", "pair_f1",
                 "bcubed_f1")


@dataclass
class ChainSettings:
    """What the chain does beyond evaluate_run (notebook 03's parameters of the same names)."""
    task: str = "classification"      # reid: per-identity AP and the pairs table exported
    evaluate_test: bool = False       # also the test split, at the thresholds chosen on val
    target_accuracy: float = 0.95
    target_coverage: float = 0.0      # > 0: chosen for this coverage instead of target_accuracy
    calibration_share: float = 0.5
    calibration_seed: int = 0
    min_support: int = 30
    confidence: float = 0.95
    pos_class: str = ""
    cluster_method: str = "agglomerative"
    cluster_linkage: str = "average"
    cluster_score: str = "ari"
    pairs_top: int = 0
    results_csv: str = "results/benchmarks.csv"
    notes: str = ""

    def __post_init__(self):
        task_columns(self.task)  # an unknown task is an error naming the valid ones

    def calibration(self) -> Calibration:
        return Calibration(target_accuracy=None if self.target_coverage > 0 else self.target_accuracy,
                           target_coverage=self.target_coverage or None, share=self.calibration_share,
                           seed=self.calibration_seed, min_support=self.min_support, confidence=self.confidence)


@dataclass
class ChainResult:
    """What the chain made: the evaluations by split name (the chosen split first), the thresholds and calibrate's
    report of them, the cluster choice, the results rows, and the files exported."""
    evaluations: dict[str, Evaluation]
    thresholds: Thresholds
    chosen: dict
    calibration: Calibration
    cluster_chosen: dict
    rows: pd.DataFrame
    exports: dict[str, Path] = field(default_factory=dict)

    @property
    def ev(self) -> Evaluation:
        """The evaluation the thresholds were chosen on (val)."""
        return next(iter(self.evaluations.values()))

    def risk_coverage_curves(self) -> dict[str, pd.DataFrame]:
        """Risk-coverage of the calibration part, answering the most confident first by vote margin or by top-1
        distance."""
        q = self.ev.queries[self.ev.queries[CALIBRATION_COLUMN]]
        return {"margin": risk_coverage(q["correct"], q["margin"]),
                "top-1 distance": risk_coverage(q["correct"], -q["top1_distance"])}

    def summary(self) -> str:
        """What was evaluated, by which index, and the thresholds with what they achieved, for a person."""
        ev, chosen, t = self.ev, self.chosen, self.thresholds
        rule = f", leaving out each query's own {ev.config['loo_rule']}" if ev.config["loo_rule"] else ""
        held = chosen["held_out"]
        lines = [f"{ev.split}: {len(ev.queries)} queries against {len(ev.gallery)} gallery photos "
                 f"({ev.config['protocol']}{rule}); checkpoint {ev.config['checkpoint']}",
                 *(f"{name}: {describe(e.metrics['index'])}" for name, e in self.evaluations.items()),
                 f"thresholds: max top-1 distance {t.max_distance:.4f}, min margin {t.min_margin:.4f}",
                 f"  calibration part ({chosen['n']} queries): coverage {chosen['coverage']:.3f}, accuracy "
                 f"{chosen['accuracy']:.3f} (lower bound {chosen['accuracy_lower']:.3f})"
                 + ("" if chosen["met"] else "  (target NOT reached: the highest bound taken)"),
                 f"  held-out part ({held['n']} queries): coverage {held['coverage']:.3f}, accuracy "
                 f"{held['accuracy']:.3f}"]
        return "\n".join(lines)

    def held_up(self) -> pd.DataFrame:
        """Coverage and accuracy of the accepted queries where the thresholds were chosen, on val's held-out part,
        and on test when it was evaluated."""
        chosen, held = self.chosen, self.chosen["held_out"]
        table = {"calibration part (chosen here)": {"queries": chosen["n"], "coverage": chosen["coverage"],
                                                    "accuracy": chosen["accuracy"]},
                 "held-out part of val": {"queries": held["n"], "coverage": held["coverage"],
                                          "accuracy": held["accuracy"]}}
        if "test" in self.evaluations:
            test = self.evaluations["test"]
            table["test"] = {"queries": len(test.queries), "coverage": test.metrics["coverage"],
                             "accuracy": test.metrics["accuracy_at_coverage"]}
        return pd.DataFrame(table).T


    def open_set_table(self) -> pd.DataFrame | None:
        """The open-set figures of each evaluation that has them (one column per split); None where every one was
        skipped (its reason: the first evaluation's metrics['open_set']['skipped'])."""
        reports = {name: e.metrics["open_set"] for name, e in self.evaluations.items()}
        shown = {name: {"known individuals": o["n_known_individuals"], "unknown individuals": o["n_unknown_individuals"],
                        "known queries": o["n_known_queries"], "unknown queries": o["n_unknown_queries"],
                        **{key: o[key] for key in OPEN_SET_SHOWN},
                        **{f"{key} (known)": v for key, v in o.get("known_queries", {}).items()}}
                 for name, o in reports.items() if "skipped" not in o}
        return pd.DataFrame(shown) if shown else None

    def cluster_summary(self) -> tuple[str, pd.DataFrame]:
        """(the cluster threshold and where it was chosen, for a person; each evaluation's cluster scores)."""
        c = self.cluster_chosen
        line = (f"cluster threshold {c['threshold']:.4f} (cosine distance), chosen for the best {c['score']} on "
                f"{c['chosen_on']['n_photos']} calibration photos of {c['chosen_on']['n_individuals']} individuals "
                f"({c['chosen_on']['queries']} queries)" + (f"; {c['note']}" if "note" in c else ""))
        scores = {f"{name}, {subset} ({e.metrics['clustering']['measured_on']})": e.metrics["clustering"][subset]
                  for name, e in self.evaluations.items() for subset in ("unknown", "all")
                  if subset in e.metrics["clustering"]}
        return line, pd.DataFrame(scores).T[list(CLUSTER_SHOWN)]


def chain_parameters(params: dict) -> tuple[EvalSettings, ChainSettings]:
    """(EvalSettings, ChainSettings) from notebook 03's parameters by name (its globals()): `neighbours` is
    EvalSettings.k, the neighbours that vote; the index parameters (index, index_recall, index_exact_below, nprobe,
    ef_search) make the IndexSpec; progress bars unless progress=False."""
    k = params.get("neighbours", DEFAULT_K)
    spec = IndexSpec(index=params.get("index", "auto"), recall=params.get("index_recall", IndexSpec.recall), k=k,
                     nprobe=params.get("nprobe"), ef_search=params.get("ef_search"),
                     exact_below=params.get("index_exact_below", IndexSpec.exact_below))
    names = {f.name for f in fields(EvalSettings)} - {"index", "progress", "k"}
    settings = EvalSettings(**{n: params[n] for n in names if n in params}, k=k, index=spec,
                            progress=params.get("progress", True))
    chain = ChainSettings(**{f.name: params[f.name] for f in fields(ChainSettings) if f.name in params})
    return settings, chain


def evaluate_chain(run_dir: str | os.PathLike, settings: EvalSettings, chain: ChainSettings) -> ChainResult:
    """The whole chain for settings.split (val): see the module's doc. Writes run_dir/eval/<split>/ (the record,
    thresholds.json, clustering.json), run_dir/eval/test/ with evaluate_test, and a row per split to
    chain.results_csv (a re-run replaces its own)."""
    if settings.split in ("train", "test"):
        raise ValueError(f"split={settings.split!r}: thresholds are chosen on validation; use evaluate_test=True for "
                         "the test split")
    eval_dir = Path(run_dir) / "eval"
    ev = evaluate_run(run_dir, settings)
    calibration = chain.calibration()
    thresholds, chosen = calibrate(ev, calibration)
    apply_calibrated(ev, thresholds, chosen)  # val's coverage and accuracy_at_coverage: those of the held-out part
    with run_state_lock(run_dir, "saving thresholds"):  # one writer of the run's decision state at a time
        save_thresholds(eval_dir / settings.split / "thresholds.json", thresholds,
                        thresholds_info(ev, chosen, calibration))
    evaluations = {settings.split: ev}
    if chain.evaluate_test:
        evaluations["test"] = evaluate_run(run_dir, settings, split="test", thresholds=thresholds,
                                           new_threshold=ev.metrics["new_individual"]["threshold"])
    # the threshold that groups photos into individuals: chosen on val's calibration part, saved for photo-predict
    cluster_chosen = choose_cluster_threshold(ev, ClusterSettings(chain.cluster_method, chain.cluster_linkage),
                                              chain.cluster_score)
    save_cluster_choice(eval_dir / settings.split / "clustering.json", cluster_chosen, provenance(ev))
    rows = _record(evaluations, eval_dir, chain, cluster_chosen)
    exports = _reid_exports(ev, Path(run_dir).name, chain) if chain.task == "reid" else {}
    return ChainResult(evaluations, thresholds, chosen, calibration, cluster_chosen, rows, exports)


def _record(evaluations: dict[str, Evaluation], eval_dir: Path, chain: ChainSettings, cluster_chosen: dict):
    """Each evaluation's added figures, its saved record and its results row (the open-set rule's new-individual
    threshold chosen on val, applied to test); the rows as a table."""
    rows, open_set_threshold = [], None
    for name, e in evaluations.items():
        add_classification_metrics(e, chain.pos_class)
        open_set_threshold = add_open_set_metrics(e, open_set_threshold).get("new_threshold")
        add_cluster_metrics(e, cluster_chosen)
        save_evaluation(e, eval_dir / name)
        row = {**benchmark_row(e, notes=chain.notes), **open_set_columns(e), **cluster_columns(e)}
        append_benchmark_row(chain.results_csv, row, replace_key="evaluation_id")  # a re-run replaces its own row
        rows.append(row)
    return pd.DataFrame(rows).set_index("split")


def _reid_exports(ev: Evaluation, run_name: str, chain: ChainSettings) -> dict[str, Path]:
    """Per-identity AP (worst first) and the all-vs-all pairs table (query, gallery, cosine; each query's best
    pairs_top, or every pair) beside the results CSV, under the evaluation's own exclusion."""
    results, tag = Path(chain.results_csv).parent, f"{run_name}_{ev.split}"
    paths = {"per_identity_ap": results / f"03_per_identity_ap_{tag}.csv", "pairs": results / f"03_pairs_{tag}.csv"}
    write_csv(paths["per_identity_ap"], per_identity_ap(ev.queries["label"], ev.queries["ap"]), index=True)
    pairs = pairwise_scores(ev.query_emb, ev.queries["path"], ev.gallery_emb, ev.gallery["path"],
                            record_split(ev).exclude, top=chain.pairs_top or None)
    write_csv(paths["pairs"], pairs)
    return paths
