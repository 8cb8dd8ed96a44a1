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
# # 05 · Retrieval gallery and query browser
#
# What the model answers, photo by photo: a query of the evaluated split (or a photo you upload) beside its
# nearest gallery photos, with their label, group and distance, the vote and the reliability verdict.
#
# Headless (papermill, `make demo`) it writes a static gallery for `queries` (paths relative to the data root) or,
# when that list is empty, for the `n_queries` worst queries. Opened in Jupyter, the last cell is the query browser:
# pick a run and split, filter by class, verdict or right/wrong, pick a query, or upload a photo (which the run's
# model embeds). Each answer's verdict reads known (with its class) / new / reshoot, with the top-1 distance or the
# vote margin that decided it against the run's thresholds. `make browse` serves that browser alone as a web page
# (Voilà, with `report=False`).

# %% tags=["parameters"]
run_dir = "runs/photos"         # a run evaluated by notebook 03
split = "val"                   # which saved evaluation to show
queries = []                    # paths for the static gallery; []: the n_queries worst (most confidently wrong first)
n_queries = 6
shown = 5                       # gallery photos shown per query (was `k`)
upload = True                   # the browser embeds uploaded photos with the run's model (loaded at the first upload)
browser = True                  # show the browser; headless runs pass False (a widget output can hang papermill's
                                # client: jupyter/nbclient#312), the static gallery is their output
report = True                   # the static gallery and the upload-path check; `make browse` passes False, so the
                                # page shows only the browser and opens at once
runs_root = "runs"              # the browser offers every evaluated run in this folder
thumbs_dir = "cache/thumbs"     # the browser's thumbnails, each photo resized once
figures_dir = "figures"

# %%
from pathlib import Path

from lib.core.start import work_from_repo_root

work_from_repo_root()  # relative paths from the repository root, lib from its checkout

from lib.core.notebook_params import renamed_parameters

renamed_parameters(globals(), "05_retrieval_gallery")  # the old name, for one release

from IPython.display import display

from lib.analysis.browse_page import browse_page

# %% [markdown]
# ## Static gallery
# Frames: blue the query (with its vote and, when not accepted, the verdict), green a photo of the query's class,
# red another class.

# %%
if report:
    # imported here, not above: the browser page (report=False) opens faster without matplotlib and scikit-learn
    from lib.analysis.figures import plot_retrieval_grid, save
    from lib.analysis.query_results import run_thresholds
    from lib.analysis.tables import rows_for_paths, worst_queries
    from lib.evaluate.record import load_evaluation

    ev = load_evaluation(Path(run_dir) / "eval" / split)
    tag = f"{Path(run_dir).name}_{split}"
    print(f"{split}: {len(ev.queries)} queries, gallery {len(ev.gallery)} photos; thresholds {run_thresholds(ev)}")
    rows = rows_for_paths(ev.queries, queries) if queries else worst_queries(ev.queries, n_queries)
    what = "chosen queries" if queries else f"{len(rows)} worst queries"
    fig = plot_retrieval_grid(ev, rows, k=shown, with_group=True, title=f"{Path(run_dir).name}, {split}: {what}")
    save(fig, Path(figures_dir) / f"05_gallery_{tag}.png")

# %% [markdown]
# ## Upload path check
# The browser embeds an uploaded photo with the run's model as notebook 03 embedded the split; this re-embeds one
# gallery photo that way and compares it with the stored embedding (1.0 = the same; a little less when notebook 03
# read a resize cache).

# %%
if report and upload:
    import numpy as np

    from lib.analysis.query_results import photo_embedder
    from lib.data.images import open_image

    embed_fn = photo_embedder(run_dir, ev.config.get("checkpoint", "best"), tta=ev.config.get("tta", False))
    again = embed_fn(open_image(Path(ev.data_root) / ev.gallery["path"].iat[0]))
    stored = ev.gallery_emb[0] / np.linalg.norm(ev.gallery_emb[0])
    cosine = float(again @ stored / np.linalg.norm(again))
    print(f"upload path vs notebook 03, cosine on {ev.gallery['path'].iat[0]}: {cosine:.4f}")

# %% [markdown]
# ## Query browser
# Pick a run and split (every evaluation under `runs_root`), filter the list, click a query; or upload a photo: its
# nearest gallery photos and the decision with the run's thresholds. Thumbnails are made once, in `thumbs_dir`.

# %%
if browser:
    display(browse_page(runs_root, run_dir, split, shown, thumbs_dir, upload))
