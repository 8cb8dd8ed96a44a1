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
# # 04 · Where it fails: confusion and error anatomy
#
# Reads the evaluation notebook 03 saved (`run_dir/eval/<split>/`) and takes its errors apart: which classes are
# confused with which, how close the vote was when it was wrong, whether errors grow with the number of candidate
# classes (and per context, where the data has one), where the true class stood, which classes or contexts hold
# most of the errors, which classes never succeed, per-class AP, an embedding map, and the worst queries as
# pictures. Figures go to `figures/04_*_<run>_<split>.png`, tables to `results/04_*_<run>_<split>.csv`.

# %% tags=["parameters"]
run_dir = "runs/photos"         # a run evaluated by notebook 03
task = "classification"         # classification | reid (labels are individuals: per-identity and per-context views)
split = "val"                   # which saved evaluation (val, or test once notebook 03 evaluated it)
figures_dir = "figures"
results_dir = "results"
top_n = 30                      # confusion matrix: all classes up to this many, else the top_n most confused
top_pairs = 20                  # rows of the most-confused-pairs table
worst_n = 10                    # worst classes / contexts shown
n_worst_queries = 8             # retrieval grids: the most confidently wrong queries
shown = 5                       # neighbours shown per query in the grids (was `k_show`)
candidates = 0                  # candidate classes are counted among this many neighbours (0: all; was `k_candidates`)
tiny_margin = 0.005             # margin below which a vote is a coin toss
embedding_maps = ["tsne", "umap"]   # umap only when umap-learn is installed
max_map_points = 5000           # t-SNE is quadratic: subsample beyond this

# %%
import importlib.util
from pathlib import Path

from lib.core.start import work_from_repo_root

work_from_repo_root()  # relative paths from the repository root, lib from its checkout

from lib.core.notebook_params import renamed_parameters

renamed_parameters(globals(), "04_confusion_analysis")  # the old names, for one release

import pandas as pd
from IPython.display import display

from lib.analysis import tables as A
from lib.analysis import figures as P
from lib.evaluate.record import load_evaluation
from lib.analysis.figures import save

ev = load_evaluation(Path(run_dir) / "eval" / split)
tag = f"{Path(run_dir).name}_{split}"
figures, results = Path(figures_dir), Path(results_dir)
results.mkdir(parents=True, exist_ok=True)
q = ev.queries
among = candidates or None  # neighbours the candidate classes are counted among
print(f"{split}: {len(q)} queries, {int(A.errors(q).sum())} wrong; gallery {len(ev.gallery)} photos, "
      f"{ev.gallery['label'].nunique()} classes; {ev.neighbours.shape[1]} neighbours stored per query")

# %% [markdown]
# ## Key findings

# %%
findings = A.key_findings(ev, k=among, tiny_margin=tiny_margin, worst_n=worst_n)
pd.Series(findings).to_frame("value").to_csv(results / f"04_key_findings_{tag}.csv")
pd.Series(findings).to_frame("value")

# %% [markdown]
# ## Confusion matrix
# Rows are true classes, each normalised to the share of its queries; the colour scale is a square root so that
# small confusions still show. With more than `top_n` classes only the most confused ones are drawn.

# %%
view = A.confusion_view(q, top_n=top_n)
fig = P.plot_confusion(view, n_classes=len(set(q["label"]) | set(q["pred"])))
save(fig, figures / f"04_confusion_{tag}.png")

# %% [markdown]
# ## Most-confused class pairs
# Both directions counted together, with one example each: the query and the gallery photo it was taken for.

# %%
pairs = A.confused_pairs(ev, top=top_pairs)
pairs.to_csv(results / f"04_confused_pairs_{tag}.csv", index=False)
if len(pairs):
    save(P.plot_confused_pairs(ev, pairs), figures / f"04_confused_pairs_{tag}.png")
pairs

# %% [markdown]
# ## Error anatomy
# How sure was the vote when it was wrong? Errors with a margin near 0 are coin tosses between two classes (more
# margin in training, or more photos, may help); confident errors point at look-alikes or label mistakes.

# %%
margins = A.margin_summary(q)
margins.to_csv(results / f"04_margins_{tag}.csv")
save(P.plot_margins(q, tiny=tiny_margin), figures / f"04_margins_{tag}.png")
margins

# %% [markdown]
# Accuracy against the number of candidate classes: distinct classes among the neighbours, and, where the
# data has a `context` (a street address, a camera site), the gallery classes sharing the query's context.

# %%
by_candidates = A.accuracy_by(q, A.candidate_counts(ev, among), "candidates")
by_candidates.to_csv(results / f"04_accuracy_by_candidates_{tag}.csv")
n_shown = among or ev.neighbours.shape[1]
save(P.plot_accuracy_by(by_candidates, f"distinct classes among the {n_shown} nearest gallery photos",
                        "Accuracy by number of candidate classes"), figures / f"04_accuracy_by_candidates_{tag}.png")
in_context = A.context_candidates(ev)
if in_context is not None:
    by_context = A.accuracy_by(q, in_context, "classes_in_context")
    by_context.to_csv(results / f"04_accuracy_by_context_candidates_{tag}.csv")
    save(P.plot_accuracy_by(by_context, "gallery classes sharing the query's context",
                            "Accuracy by number of candidates in the context"),
         figures / f"04_accuracy_by_context_candidates_{tag}.png")
by_candidates

# %% [markdown]
# Where the true class stood in the vote when it lost, and which classes (or contexts) hold most errors.

# %%
by = "context" if "context" in q.columns else "label"
ranks = A.rank_of_true_table(ev)
worst = A.worst(q, by, top=worst_n)
ranks.to_csv(results / f"04_rank_of_true_class_{tag}.csv")
worst.to_csv(results / f"04_worst_{by}s_{tag}.csv")
save(P.plot_error_shares(ranks, worst, "class" if by == "label" else by), figures / f"04_error_shares_{tag}.png")
display(ranks)
worst

# %% [markdown]
# Per context (a camera site, a street address), worst first: how many individuals share it, how often the vote is
# right there, the mean AP, the vote margins of its right and wrong answers (plotted for the `worst_n` worst), and
# the individuals that fail every time they are photographed there.

# %%
contexts = A.per_context(q)
if contexts is not None:
    contexts.to_csv(results / f"04_per_context_{tag}.csv")
    save(P.plot_margins_by(q, "context", contexts.index[:worst_n]), figures / f"04_margins_by_context_{tag}.png")
    display(contexts.head(worst_n))
else:
    print("no context column: nothing per context")

# %% [markdown]
# Classes that never succeed, with their number of gallery photos and what they were taken for.

# %%
always = A.always_fail(ev)
always.to_csv(results / f"04_always_fail_{tag}.csv")
always

# %% [markdown]
# ## Per-class AP (per-identity AP when task="reid")
# Each query ranks the whole gallery; a class's AP is the mean over its queries (lowest first). In re-ID the mean
# of these per-identity APs is the identity-balanced mAP.

# %%
ap = A.per_class_ap(ev)
if task == "reid":
    ap = ap.rename_axis("identity")
    m = ev.metrics  # notebook 03's figures; .get: records from before a metric existed
    print(f"identity-balanced mAP {m.get('identity_balanced_mAP', float('nan')):.3f} over {len(ap)} individuals "
          f"(plain mAP {m.get('mAP', float('nan')):.3f})")
ap.to_csv(results / f"04_per_class_ap_{tag}.csv")
save(P.plot_per_class_ap(ap), figures / f"04_per_class_ap_{tag}.png")
save(P.plot_class_heatmap(ap, max_classes=top_n), figures / f"04_per_class_heatmap_{tag}.png")
ap.head(worst_n)

# %% [markdown]
# ## Embedding map
# Gallery photos as dots, queries as stars, wrong queries ringed red: a class that forms no island of its own,
# or two classes sharing one, is what the confusion matrix counts.

# %%
for method in embedding_maps:
    if method == "umap" and importlib.util.find_spec("umap") is None:
        print("umap-learn is not installed: UMAP map skipped")
        continue
    save(P.plot_embedding_map(ev, method, max_points=max_map_points), figures / f"04_{method}_{tag}.png")

# %% [markdown]
# ## The worst queries
# Most confidently wrong first. Frames: blue the query, green a photo of its class, red another class.

# %%
rows = A.worst_queries(q, n_worst_queries)
fig = P.plot_retrieval_grid(ev, rows, k=shown, title=f"Worst {len(rows)} queries of {split}")
save(fig, figures / f"04_worst_queries_{tag}.png")
