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
# # 06 · Probe: which retrieval method identifies individuals best?
#
# Compares, on one split, global cosine on embeddings (a pretrained backbone as it comes, and fine-tuned runs),
# alpha query expansion, k-reciprocal re-ranking, re-ranking of the global shortlist by SIFT + RANSAC inliers, and
# the WildFusion-style fusion of cosine and inliers calibrated on the validation split, an ensemble of the backbones
# (rank or score averaging, or weights learned on val pairs), and a hybrid scorer: LightGBM on the deep cosine beside
# engineered colour, texture and keypoint features of each pair, re-sorting the shortlist. Every method is scored by
# identity-balanced mAP, mAP and CMC at `ranks`, with the milliseconds it costs per query. Features are cached
# (`cache_dir`), so a second probe computes nothing again. Rows are appended to `results/probe.csv`, the config
# snapshot goes to `results/probe/<run_id>.json`, each query's AP and top-1 per method to `<run_id>_queries.csv`.

# %% tags=["parameters"]
data_dir = "data/photos"
splits_dir = "splits"           # made by notebook 01
split = "val"                   # the probed split ('test' only for the final word)
task = "classification"         # classification | reid: which column names the individual (see identity_col)
identity_col = ""               # "": the label in re-ID mode, the group (the folder layout's ID) otherwise
protocol = "auto"               # auto | gallery (train photos are the gallery) | loo (the split queries itself)
methods = ["global", "qe", "kreciprocal", "local", "fusion", "ensemble", "hybrid"]
run_dir = "runs/photos"         # a run of notebook 02 on these splits, probed beside `backbones`; "": none
backbones = [                   # pretrained timm backbones as they come (pooled features), and/or more runs:
    {"name": "lite0-imagenet", "backbone": "tf_efficientnet_lite0", "pretrained": "lite0-imagenet", "img_size": 224},
]                               # {"name": "other", "run_dir": "runs/other"}
ranks = [1, 5]                  # CMC ranks reported as recall@k
metric = "identity_balanced_mAP"  # the figure's metric (also: mAP, or recall@k of a rank above)
shortlist_k = 20                # global candidates that local matching and fusion re-score
index = "auto"                  # the shortlist's search: flat | ivf | hnsw | ivfpq | auto (exact for small galleries, else tuned) | factory string
nprobe = None                   # IVF: lists visited per query (None: tuned to recall@k 0.95)
ef_search = None                # HNSW: candidates kept per query (None: tuned)
qe_n = 3                        # query expansion: neighbours added, weighted by cos ** qe_alpha
qe_alpha = 3.0
k1 = 20                         # k-reciprocal re-ranking (Zhong et al. 2017)
k2 = 6
lambda_value = 0.3
sift = {"max_side": 320, "n_features": 500, "ratio": 0.8, "ransac_px": 5.0, "geometry": "homography"}
sift_photos = "shortlisted"     # gallery photos given SIFT: shortlisted (same rankings, less work) | all (fill cache)
calibrate_on = "val"            # split whose pairs fit fusion, ensemble weights, hybrid (cross-fitted if it is `split`)
ensemble_members = []           # backbone names the ensemble combines; []: all of them (it needs two or more)
ensemble_combine = "logistic"   # rank | score | logistic (weights learned on calibrate_on pairs)
hybrid_features = ["cosine", "colour", "lbp", "hog", "keypoints", "inliers"]  # the hybrid's pair feature groups
hybrid_params = {}              # LightGBM overrides of lib.probe.hybrid.DEFAULT_PARAMS, e.g. {"n_estimators": 400}
mask_col = ""                   # column with the background masks (polygon / COCO RLE / mask image path); "": none
masks_csv = ""                  # a CSV with path + mask_col when the split index has no such column
cache_dir = "runs/probe_cache"  # "": no feature cache
device = "auto"
mlflow_uri = "file:./mlruns"    # "": no MLflow
wandb_project = ""              # "": no W&B (needs `pip install wandb`)
figures_dir = "figures"
results_dir = "results"
n_examples = 2                  # queries whose AP rose most and fell most, drawn for the best method vs global

# %%
from pathlib import Path

from lib.core.start import work_from_repo_root

work_from_repo_root()  # relative paths from the repository root, lib from its checkout

from dataclasses import asdict

from lib.analysis.figures import save
from lib.data.tasks import task_columns
from lib.probe.compare import run_probe, save_probe
from lib.probe.config import probe_config
from lib.probe.figures import most_changed, plot_importances, plot_probe, plot_rankings
from lib.train.tracking import log_table

identity = identity_col or task_columns(task).identity_col
runs = [{"name": Path(run_dir).name, "run_dir": run_dir}] if run_dir else []
cfg = probe_config(data_dir=data_dir, splits_dir=splits_dir, split=split, identity_col=identity,
                   protocol=protocol, methods=methods, ranks=ranks, backbones=backbones + runs,
                   shortlist_k=shortlist_k, index=index, nprobe=nprobe, ef_search=ef_search, qe_n=qe_n,
                   qe_alpha=qe_alpha, k1=k1, k2=k2, lambda_value=lambda_value, sift=sift, sift_photos=sift_photos,
                   calibrate_on=calibrate_on, ensemble_members=ensemble_members, ensemble_combine=ensemble_combine,
                   hybrid_features=hybrid_features, hybrid_params=hybrid_params, mask_col=mask_col,
                   masks_csv=masks_csv, cache_dir=cache_dir, device=device)
table, rankings = run_probe(cfg, progress=True)
snapshot = save_probe(table, cfg, results_dir, rankings)
log_table(table, asdict(cfg), f"probe {table['run_id'].iloc[0]}", ["backbone", "method"], mlflow_uri, wandb_project)
print(f"rows appended to {Path(results_dir) / 'probe.csv'}; config snapshot {snapshot}")
table[["backbone", "method", *[f"recall@{k}" for k in ranks], "mAP", "identity_balanced_mAP", "feature_ms_per_image",
       "method_ms_per_query", "ms_per_query", "features_cached"]].round(4)

# %% [markdown]
# ## Accuracy and cost per method
# Left: the chosen metric per method and backbone. Right: milliseconds per query on a log scale, feature extraction
# (pale, per image, 0 work when cached but its first cost is shown) under the method's own work (dark).

# %%
tag = f"{Path(splits_dir).name}_{split}" + (f"_masked-{mask_col}" if mask_col else "")
fig = plot_probe(table, metric)
save(fig, Path(figures_dir) / f"06_probe_{tag}.png")

# %% [markdown]
# ## What the learned methods lean on
# The hybrid's pair features by their share of the boosted trees' split gain (averaged over the two cross-fitted
# halves), and the ensemble's members by their learned weights on per-query standardised cosines. A feature near
# zero adds nothing the others do not already say; a member near zero could be dropped from the ensemble.

# %%
if table["importance"].ne("").any():
    fig = plot_importances(table)
    save(fig, Path(figures_dir) / f"06_probe_importance_{tag}.png")
else:
    print("no learned method among the methods: add 'hybrid', or 'ensemble' with ensemble_combine='logistic'")

# %% [markdown]
# ## What the best method changed
# For the best row's backbone, the queries whose AP moved most between global cosine and the best method (for an
# ensemble, the global cosine of the best single backbone): the query, then the top 5 of each (green: the same
# individual).

# %%
best = table.sort_values(metric, ascending=False).iloc[0]
singles = table[table["method"] == "global"].sort_values(metric, ascending=False)["backbone"].tolist()
base = best["backbone"] if best["backbone"] in singles or not singles else singles[0]
before, after = (base, "global"), (best["backbone"], best["method"])
print(f"best: {best['backbone']} / {best['method']} ({metric} {best[metric]:.3f})")
if before in rankings and after != before:
    changed = most_changed(rankings, before, after, n_examples)
    if changed:
        fig = plot_rankings(rankings, data_dir, [before, after], changed)
        save(fig, Path(figures_dir) / f"06_probe_rankings_{tag}.png", dpi=70)  # dozens of photos: keep the file small
    else:
        print("no query's AP changed between the two")
