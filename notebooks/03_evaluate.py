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
# `neighbours` nearest, and they vote (class score = sum of 1/d, or the chosen `weighting`). A vote is accepted, or
# marked **unclassifiable** (the nearest photo is too far) or **reshoot** (the two best classes are too close). The two
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
neighbours = 20                  # nearest photos that vote (20 as the project specifies; was `k`)
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
index_recall = 0.95              # the approximate index is tuned to find this share of the exact `neighbours` nearest
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

from lib.core.notebook_params import renamed_parameters

renamed_parameters(globals(), "03_evaluate")  # the old name, for one release

import pandas as pd
from IPython.display import display

from lib.analysis.cluster_figures import plot_cluster_sheets, plot_threshold_curve
from lib.analysis.figures import plot_risk_coverage, save
from lib.analysis.open_set_figures import plot_open_set
from lib.evaluate.chain import chain_parameters, evaluate_chain
from lib.evaluate.classification import classification_table
from lib.retrieval.metrics import per_identity_ap
from lib.retrieval.open_set import baks_baus_by_threshold

# every parameter above that evaluate_run or the chain reads, by its name (lib.evaluate.chain)
settings, chain = chain_parameters(globals())
name = Path(run_dir).name

# %%
result = evaluate_chain(run_dir, settings, chain)
ev, evaluations, chosen = result.ev, result.evaluations, result.chosen
print(result.summary())

# %% [markdown]
# ## Thresholds and the risk–coverage curve
# The thresholds are chosen on the calibration part only: among the pairs that accept at least `min_support` of its
# queries, the largest coverage whose accuracy's one-sided `confidence` Clopper-Pearson lower bound reaches
# `target_accuracy`. They are then measured on the held-out part of val (and on test with `evaluate_test=True`,
# below): the gap between the two is what choosing and reporting on the same queries used to hide.
# Each curve answers the most confident calibration queries first: by vote margin, or by top-1 distance; the star
# is the pair chosen (both signals together).

# %%
fig = plot_risk_coverage(result.risk_coverage_curves(), chosen, result.calibration.target_accuracy)
save(fig, Path(figures_dir) / f"03_risk_coverage_{name}.png")
ev.queries["verdict"].value_counts()

# %% [markdown]
# ## Metrics
# Recall@k: the query's class is among its k nearest photos; mAP ranks the whole gallery; vote accuracy and
# macro-F1 judge the voted class; coverage and accuracy at coverage follow the thresholds above.

# %%
result.rows

# %% [markdown]
# Where the thresholds hold: coverage and accuracy of the accepted queries on the part they were chosen on, on the
# held-out part of val, and on test when it was evaluated.

# %%
result.held_up()

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
# Per-identity AP, worst first, and the all-vs-all similarity table (query, gallery, cosine) go to `results/` (lib.evaluate.chain).

# %%
if task == "reid":
    m, new = ev.metrics, ev.metrics["new_individual"]
    display(pd.Series({"identity-balanced mAP": m["identity_balanced_mAP"], "mAP": m["mAP"],
                       "CMC rank-1": m["recall@1"], "CMC rank-5": m["recall@5"],
                       "identities": ev.queries["label"].nunique(), "queries": len(ev.queries)}).to_frame(split))
    print(f"new individuals (no other photo of theirs in the gallery): {new['n_new']} of {len(ev.queries)} queries"
          + (f"; called new above top-1 distance {new['threshold']:.3f}: precision {new['precision']:.2f}, "
             f"recall {new['recall']:.2f}" if new["n_new"] and new["n_known"] else ""))
    per_identity = per_identity_ap(ev.queries["label"], ev.queries["ap"])
    display(pd.concat({"worst": per_identity.head(5), "best": per_identity.dropna().tail(5)}))
    print("\n".join(f"{what} -> {path}" for what, path in result.exports.items()))

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
table = result.open_set_table()
if table is None:
    print(f"open set: skipped ({ev.metrics['open_set']['skipped']})")
else:
    display(table)
    for split_name, e in evaluations.items():
        o = e.metrics["open_set"]
        if "skipped" in o or not (o["n_known_queries"] and o["n_unknown_queries"]):
            continue
        unknown = set(o["unknown_individuals"])
        sweep = baks_baus_by_threshold(e.queries["label"], e.queries["pred"], e.queries["top1_distance"], unknown)
        fig = plot_open_set(e.queries["label"].isin(unknown), e.queries["top1_distance"], e.queries["margin"], sweep, o,
                            title=f"{name}, {split_name}: {o['n_known_queries']} known and "
                                  f"{o['n_unknown_queries']} unknown queries")
        save(fig, Path(figures_dir) / f"03_open_set_{name}_{split_name}.png")

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
cluster_chosen = result.cluster_chosen
line, scores = result.cluster_summary()
print(line)
display(scores)
if cluster_chosen["curve"]:
    fig = plot_threshold_curve(cluster_chosen["curve"], cluster_chosen["threshold"],
                               title=f"{name}: cluster threshold on val's calibration part")
    save(fig, Path(figures_dir) / f"03_cluster_threshold_{name}.png")
for split_name, e in evaluations.items():
    subset = "unknown" if "unknown" in e.metrics["clustering"] else "all"
    shown = e.queries[f"cluster_{subset}"] >= 0
    fig = plot_cluster_sheets([Path(e.data_root) / p for p in e.queries.loc[shown, "path"]],
                              e.queries.loc[shown, "label"], e.queries.loc[shown, f"cluster_{subset}"],
                              title=f"{name}, {split_name}: {subset} queries grouped (ARI "
                                    f"{e.metrics['clustering'][subset]['ari']:.3f}); red: not the cluster's majority")
    save(fig, Path(figures_dir) / f"03_clusters_{name}_{split_name}.png")
