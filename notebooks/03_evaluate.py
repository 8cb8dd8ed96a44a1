# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: Python (photo-retrieval)
#     language: python
#     name: photo-retrieval
# ---

# %% [markdown]
# # 03 · Evaluate: retrieval, voting, reliability
#
# Train photos are the gallery (a Faiss flat index on unit vectors); each photo of the evaluated split asks for its
# `k` nearest, and they vote (class score = sum of 1/d, or the chosen `weighting`). A vote is accepted, or marked
# **unclassifiable** (the nearest photo is too far) or **reshoot** (the two best classes are too close). The two
# thresholds are chosen on a calibration part of the validation split (`calibration_share` of its groups, drawn by
# `calibration_seed`) for `target_accuracy` (or `target_coverage`), and saved to `run_dir/eval/val/thresholds.json`
# with the settings they were chosen under, where `photo-predict` (the command that predicts new photos) finds them
# and refuses them under other settings.
#
# Model selection and threshold choice use validation only. The test split is the final service performance:
# it is evaluated only with `evaluate_test=True`, with the thresholds chosen on val.
# Embeddings are cached in `run_dir/embeddings/` per checkpoint, data and transform: re-running is quick.
#
# Re-identification (`task="reid"`, label = individual): an identity-disjoint split (individuals never seen in
# training, notebook 01's `split_mode="open"` with `unknown_share=1`) is evaluated leave-one-out, each photo querying
# the other photos of the split; under `loo_rule="group"` (the default where groups are finer than individuals) a
# query's own group (burst, sighting, photo) is junk, neither match nor miss, as a gallery of earlier encounters would
# be. An open-set split (`unknown_share` < 1) searches the train gallery, and the last section measures how well
# known individuals are named and unknown ones called new (BAKS, BAUS, AUROC). The notebook adds identity-balanced
# mAP, CMC, per-identity AP and the all-vs-all similarity table.
# `restrict_to_context=True` (e.g. look for a street tree only among the trees at its address) lets a query's
# neighbours, and so its vote, come only from photos of its own context; Recall@k and mAP still rank the whole
# gallery, and notebook 04 breaks the accuracy down by the number of candidates in the context.
#
# Large galleries: `index` chooses the Faiss index that finds the voting neighbours (`auto`: exact below
# `index_exact_below` gallery photos; above, the fastest index at `index_recall` measured on the gallery, or exact
# where none is clearly faster; or `flat`, `ivf`, `hnsw`, `ivfpq`, or a faiss factory string such as
# "IVF1024,PQ64"), its search parameters tuned to `index_recall` unless `nprobe` / `ef_search` are given. An
# approximate index reports its tuning and its recall@k against exact search on a sample of the queries;
# Recall@k and mAP are always exact, the whole gallery ranked a chunk of queries at a time. The index is saved in
# `run_dir/index/`, where `photo-predict` finds it.

# %% tags=["parameters"]
run_dir = "runs/photos"          # a run trained by notebook 02
task = "classification"          # classification | reid (identity metrics, per-identity AP, pairwise export)
protocol = "auto"                # gallery (train photos) | loo (the split queries itself) | auto: loo for open sets
loo_rule = "auto"                # loo: group (own group is junk) | photo (only itself) | auto: group if finer than ids
restrict_to_context = False      # True: a query's neighbours and vote come only from photos of its own context
split = "val"                    # the split thresholds are chosen on; the test split is never used for choosing
checkpoint = "best"              # best | latest | a checkpoint file name in run_dir
k = 20                           # neighbours that vote (20 as the project specifies)
weighting = "inverse"            # inverse (1/d) | uniform | softmax
tta = False                      # flip test-time augmentation (mean of the photo's and its mirror's embeddings)
target_accuracy = 0.95           # thresholds: the largest coverage at this accuracy on val ...
target_coverage = 0.0            # ... or, when > 0, the best accuracy answering at least this share
calibration_share = 0.5          # of val's groups on which thresholds are chosen; the rest measures them
calibration_seed = 0             # draws that part
min_support = 30                 # a pair of thresholds must accept at least this many calibration queries
confidence = 0.95                # one-sided Clopper-Pearson bound on accuracy that must reach the target
evaluate_test = False            # True: also evaluate the test split (final numbers), with the val thresholds
index = "auto"                   # flat | ivf | hnsw | ivfpq | auto | a faiss factory string, e.g. "IVF1024,PQ64"
index_exact_below = 10000        # auto: exact search without measuring for a gallery smaller than this
index_recall = 0.95              # recall@k against exact search the approximate index is tuned to reach
nprobe = None                    # IVF: lists visited per query (None: tuned; higher: better recall, slower)
ef_search = None                 # HNSW: candidates kept per query (the same trade)
pairs_top = 0                    # reid pairs table: keep each query's best N gallery photos (0: every pair)
device = "auto"
results_csv = "results/benchmarks.csv"
figures_dir = "figures"
notes = ""                       # free text for the results row
pos_class = ""                   # two classes: the positive one, for the threshold sweep ("": no sweep)
cluster_method = "agglomerative"  # grouping photos into individuals: agglomerative | hdbscan
cluster_linkage = "average"      # agglomerative: average | complete (linkage on cosine distance)
cluster_score = "ari"            # what the cluster threshold maximises on the calibration part: ari | pair_f1

# %%
from pathlib import Path

from lib.core.start import work_from_repo_root

work_from_repo_root()  # relative paths from the repository root, lib from its checkout

import pandas as pd
from IPython.display import display

from lib.core.state_io import run_state_lock
from lib.retrieval.decide import risk_coverage, save_thresholds
from lib.evaluate.calibrate import (CALIBRATION_COLUMN, Calibration, apply_calibrated, calibrate, provenance,
                                    thresholds_info)
from lib.evaluate.cluster_eval import (add_cluster_metrics, choose_cluster_threshold, cluster_columns,
                                       save_cluster_choice)
from lib.retrieval.clustering import ClusterSettings
from lib.analysis.cluster_figures import plot_cluster_sheets, plot_threshold_curve
from lib.evaluate.results_table import append_benchmark_row, benchmark_row
from lib.evaluate.run_eval import evaluate_run
from lib.evaluate.classification import add_classification_metrics, classification_table
from lib.evaluate.open_set_eval import add_open_set_metrics, open_set_columns
from lib.evaluate.record import record_split, save_evaluation
from lib.retrieval.metrics import per_identity_ap
from lib.analysis.figures import plot_risk_coverage, save
from lib.analysis.open_set_figures import plot_open_set
from lib.retrieval.open_set import threshold_sweep
from lib.retrieval.ann_index import IndexSpec, describe
from lib.retrieval.pairwise import pairwise_scores

if split in ("train", "test"):
    raise ValueError(f"split={split!r}: thresholds are chosen on validation; use evaluate_test=True for the test split")
eval_dir = Path(run_dir) / "eval"
index_spec = IndexSpec(index=index, recall=index_recall, k=k, nprobe=nprobe, ef_search=ef_search,
                       exact_below=index_exact_below)

# %%
ev = evaluate_run(run_dir, split=split, checkpoint=checkpoint, k=k, weighting=weighting, tta=tta, device=device,
                  progress=True, protocol=protocol, restrict_to_context=restrict_to_context, index=index_spec,
                  loo_rule=loo_rule)
rule = f", leaving out each query's own {ev.config['loo_rule']}" if ev.config["loo_rule"] else ""
print(f"{split}: {len(ev.queries)} queries against {len(ev.gallery)} gallery photos ({ev.config['protocol']}{rule}); "
      f"checkpoint {ev.config['checkpoint']}")
print(describe(ev.metrics["index"]))

# %% [markdown]
# ## Thresholds and the risk–coverage curve
# The thresholds are chosen on the calibration part only: among the pairs that accept at least `min_support` of its
# queries, the largest coverage whose accuracy's one-sided `confidence` Clopper-Pearson lower bound reaches
# `target_accuracy`. They are then measured on the held-out part of val (and on test with `evaluate_test=True`,
# below): the gap between the two is what choosing and reporting on the same queries used to hide.
# Each curve answers the most confident calibration queries first: by vote margin, or by top-1 distance; the star
# is the pair chosen (both signals together).

# %%
calibration = Calibration(target_accuracy=None if target_coverage > 0 else target_accuracy,
                          target_coverage=target_coverage or None, share=calibration_share, seed=calibration_seed,
                          min_support=min_support, confidence=confidence)
thresholds, chosen = calibrate(ev, calibration)
apply_calibrated(ev, thresholds, chosen)  # val's coverage and accuracy_at_coverage: those of the held-out part
with run_state_lock(run_dir, "saving thresholds"):  # one writer of the run's decision state at a time
    save_thresholds(eval_dir / split / "thresholds.json", thresholds, thresholds_info(ev, chosen, calibration))
held = chosen["held_out"]
print(f"thresholds: max top-1 distance {thresholds.max_distance:.4f}, min margin {thresholds.min_margin:.4f}\n"
      f"  calibration part ({chosen['n']} queries): coverage {chosen['coverage']:.3f}, accuracy "
      f"{chosen['accuracy']:.3f} (lower bound {chosen['accuracy_lower']:.3f})"
      + ("" if chosen["met"] else "  (target NOT reached: the highest bound taken)")
      + f"\n  held-out part ({held['n']} queries): coverage {held['coverage']:.3f}, accuracy {held['accuracy']:.3f}")
q = ev.queries[ev.queries[CALIBRATION_COLUMN]]
curves = {"margin": risk_coverage(q["correct"], q["margin"]),
          "top-1 distance": risk_coverage(q["correct"], -q["top1_distance"])}
fig = plot_risk_coverage(curves, chosen, calibration.target_accuracy)
save(fig, Path(figures_dir) / f"03_risk_coverage_{Path(run_dir).name}.png")
ev.queries["verdict"].value_counts()

# %% [markdown]
# ## Metrics
# Recall@k: the query's class is among its k nearest photos; mAP ranks the whole gallery; vote accuracy and
# macro-F1 judge the voted class; coverage and accuracy at coverage follow the thresholds above.

# %%
evaluations = {split: ev}
if evaluate_test:
    evaluations["test"] = evaluate_run(run_dir, split="test", checkpoint=checkpoint, k=k, weighting=weighting,
                                       tta=tta, thresholds=thresholds, device=device, progress=True,
                                       protocol=protocol, restrict_to_context=restrict_to_context,
                                       new_threshold=ev.metrics["new_individual"]["threshold"], index=index_spec,
                                       loo_rule=loo_rule)
    print(f"test: {describe(evaluations['test'].metrics['index'])}")
rows = []
open_set_threshold = None  # the open-set rule's new-individual threshold: chosen on val, applied to test
# the threshold that groups photos into individuals: chosen on val's calibration part, saved for photo-predict
cluster_chosen = choose_cluster_threshold(ev, ClusterSettings(cluster_method, cluster_linkage), cluster_score)
save_cluster_choice(eval_dir / split / "clustering.json", cluster_chosen, provenance(ev))
for name, e in evaluations.items():
    add_classification_metrics(e, pos_class)
    open_set_threshold = add_open_set_metrics(e, open_set_threshold).get("new_threshold")
    add_cluster_metrics(e, cluster_chosen)
    save_evaluation(e, eval_dir / name)
    row = {**benchmark_row(e, notes=notes), **open_set_columns(e), **cluster_columns(e)}
    append_benchmark_row(results_csv, row, replace_key="evaluation_id")  # a re-run replaces its own row
    rows.append(row)
pd.DataFrame(rows).set_index("split")

# %% [markdown]
# Where the thresholds hold: coverage and accuracy of the accepted queries on the part they were chosen on, on the
# held-out part of val, and on test when it was evaluated.

# %%
held_up = {"calibration part (chosen here)": {"queries": chosen["n"], "coverage": chosen["coverage"],
                                              "accuracy": chosen["accuracy"]},
           "held-out part of val": {"queries": held["n"], "coverage": held["coverage"], "accuracy": held["accuracy"]}}
if "test" in evaluations:
    m = evaluations["test"].metrics
    held_up["test"] = {"queries": len(evaluations["test"].queries), "coverage": m["coverage"],
                       "accuracy": m["accuracy_at_coverage"]}
pd.DataFrame(held_up).T

# %% [markdown]
# ## Classification metrics
# Accuracy and macro-F1 of the top class, one-vs-rest AUROC per class (macro: their mean), from the vote shares, and
# for a `loss="ce"` run from its softmax probabilities too. With two classes and `pos_class`: the threshold of best F1
# on the positive class's score, its precision and recall; `flipped` means the score ranked the classes the wrong way
# round and was turned (orientation correction, as the marmoset pipeline reports).

# %%
classification_table(ev.metrics["classification"])

# %% [markdown]
# ## Per class
# Precision and recall of the vote for each class of the split (support = its queries).

# %%
pd.DataFrame(ev.metrics["per_class"]).T.sort_values("f1")

# %% [markdown]
# ## Re-identification (task="reid")
# Identity-balanced mAP weighs every individual alike (plain mAP favours the often-photographed ones); CMC rank-k
# is Recall@k. A query whose individual has no other photo in the gallery is new: it should be called new when its
# nearest photo is far; the threshold with the best F1 of that call is chosen on this split (val) and the test
# split is measured at it. In leave-one-out only an individual with a single photo (under the group rule: a single
# group) in the split is new.
# Per-identity AP, worst first, and the all-vs-all similarity table (query, gallery, cosine) go to `results/`.

# %%
if task == "reid":
    results = Path(results_csv).parent
    tag = f"{Path(run_dir).name}_{split}"
    m = ev.metrics
    display(pd.Series({"identity-balanced mAP": m["identity_balanced_mAP"], "mAP": m["mAP"],
                       "CMC rank-1": m["recall@1"], "CMC rank-5": m["recall@5"],
                       "identities": ev.queries["label"].nunique(), "queries": len(ev.queries)}).to_frame(split))
    new = m["new_individual"]
    print(f"new individuals (no other photo of theirs in the gallery): {new['n_new']} of {len(ev.queries)} queries"
          + (f"; called new above top-1 distance {new['threshold']:.3f}: precision {new['precision']:.2f}, "
             f"recall {new['recall']:.2f}" if new["n_new"] and new["n_known"] else ""))
    per_identity = per_identity_ap(ev.queries["label"], ev.queries["ap"])
    per_identity.to_csv(results / f"03_per_identity_ap_{tag}.csv")
    display(pd.concat({"worst": per_identity.head(5), "best": per_identity.dropna().tail(5)}))
    pairs = pairwise_scores(ev.query_emb, ev.queries["path"], ev.gallery_emb, ev.gallery["path"],
                            record_split(ev).exclude, top=pairs_top or None)
    pairs.to_csv(results / f"03_pairs_{tag}.csv", index=False)
    print(f"{len(pairs)} pairs -> {results / f'03_pairs_{tag}.csv'}")

# %% [markdown]
# ## Open set: a known individual, a new one, or a photo to take again
# With notebook 01's `split_mode="open"` (unknown_share < 1), val and test mix queries of known individuals (earlier
# encounters in the gallery) with queries of unknown ones (none). Each query gets one answer: **new individual** when
# its nearest gallery photo is farther than the new-individual threshold (chosen on val for the best harmonic mean of
# BAKS and BAUS, applied to test), **reshoot** when its vote margin is below the margin threshold (above), else the
# voted individual. BAKS is the accuracy on the known queries and
# BAUS the share of unknown queries called new, each per individual and averaged over individuals (wildlife-datasets'
# definitions); AUROC says how well the top-1 distance, or the vote margin, tells new from known at any threshold.
# Recall@k and mAP of the known queries alone sit beside them (the main metrics count every unknown query as a miss).

# %%
open_sets = {name: e.metrics["open_set"] for name, e in evaluations.items()}
if all("skipped" in o for o in open_sets.values()):
    print(f"open set: skipped ({next(iter(open_sets.values()))['skipped']})")
else:
    table = {name: {"known individuals": o["n_known_individuals"], "unknown individuals": o["n_unknown_individuals"],
                    "known queries": o["n_known_queries"], "unknown queries": o["n_unknown_queries"],
                    **{key: o[key] for key in ("BAKS", "BAUS", "harmonic_mean", "auroc_top1_distance", "auroc_margin",
                                               "coverage", "accuracy_answered", "new_threshold", "min_margin")},
                    **{f"{key} (known)": v for key, v in o.get("known_queries", {}).items()}}
             for name, o in open_sets.items() if "skipped" not in o}
    display(pd.DataFrame(table))
    for name, e in evaluations.items():
        o = open_sets[name]
        if "skipped" in o or not (o["n_known_queries"] and o["n_unknown_queries"]):
            continue
        unknown = set(o["unknown_individuals"])
        sweep = threshold_sweep(e.queries["label"], e.queries["pred"], e.queries["top1_distance"], unknown)
        fig = plot_open_set(e.queries["label"].isin(unknown), e.queries["top1_distance"], e.queries["margin"], sweep, o,
                            title=f"{Path(run_dir).name}, {name}: {o['n_known_queries']} known and "
                                  f"{o['n_unknown_queries']} unknown queries")
        save(fig, Path(figures_dir) / f"03_open_set_{Path(run_dir).name}_{name}.png")

# %% [markdown]
# ## New individuals grouped
# The photos a user would get back as "new" are grouped into candidate individuals (`photo-predict --group-new`):
# clustered by their embeddings (`cluster_method`; agglomerative with `cluster_linkage` on cosine distance), the
# photos of one group (encounter) always together. The distance threshold is chosen on the calibration part of val
# (its unknown queries on an open split, else all of them) for the best `cluster_score` against their true
# individuals, saved to `run_dir/eval/val/clustering.json` for `photo-predict`, and measured on the held-out part of
# val and on test: ARI and AMI (chance-corrected agreement with the true individuals; AnimalCLEF ranks by ARI),
# pairwise and B-cubed F1, and the number of clusters against the number of individuals. Each row of the contact
# sheet is a cluster; a photo framed red is not the cluster's majority individual.

# %%
print(f"cluster threshold {cluster_chosen['threshold']:.4f} (cosine distance), chosen for the best "
      f"{cluster_score} on {cluster_chosen['chosen_on']['n_photos']} calibration photos of "
      f"{cluster_chosen['chosen_on']['n_individuals']} individuals ({cluster_chosen['chosen_on']['queries']} queries)"
      + (f"; {cluster_chosen['note']}" if "note" in cluster_chosen else ""))
scores = {f"{name}, {subset} ({e.metrics['clustering']['measured_on']})": e.metrics["clustering"][subset]
          for name, e in evaluations.items() for subset in ("unknown", "all") if subset in e.metrics["clustering"]}
display(pd.DataFrame(scores).T[["n_photos", "n_individuals", "n_clusters", "ari", "ami", "pair_precision",
                                "pair_recall", "pair_f1", "bcubed_f1"]])
if cluster_chosen["curve"]:
    fig = plot_threshold_curve(cluster_chosen["curve"], cluster_chosen["threshold"],
                               title=f"{Path(run_dir).name}: cluster threshold on val's calibration part")
    save(fig, Path(figures_dir) / f"03_cluster_threshold_{Path(run_dir).name}.png")
for name, e in evaluations.items():
    subset = "unknown" if "unknown" in e.metrics["clustering"] else "all"
    shown = e.queries[f"cluster_{subset}"] >= 0
    fig = plot_cluster_sheets([Path(e.data_root) / p for p in e.queries.loc[shown, "path"]],
                              e.queries.loc[shown, "label"], e.queries.loc[shown, f"cluster_{subset}"],
                              title=f"{Path(run_dir).name}, {name}: {subset} queries grouped (ARI "
                                    f"{e.metrics['clustering'][subset]['ari']:.3f}); red: not the cluster's majority")
    save(fig, Path(figures_dir) / f"03_clusters_{Path(run_dir).name}_{name}.png")
