# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
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
# when that list is empty, for the `n_queries` worst queries. Opened in Jupyter, the last cell is a browser:
# filter by class or to the errors only, pick a query, or upload a photo (which the run's model embeds).

# %% tags=["parameters"]
run_dir = "runs/photos"         # a run evaluated by notebook 03
split = "val"                   # which saved evaluation to browse
queries = []                    # paths for the static gallery; []: the n_queries worst (most confidently wrong first)
n_queries = 6
k = 5                           # gallery photos shown per query
upload = True                   # load the run's model so that the browser can embed uploaded photos
browser = True                  # show the widget browser; headless runs pass False (a widget output can hang
                                # papermill's client: jupyter/nbclient#312), the static gallery is their output
figures_dir = "figures"

# %%
import os
from pathlib import Path

ROOT = next(p for p in [Path.cwd(), *Path.cwd().parents] if (p / "lib" / "__init__.py").exists())
os.chdir(ROOT)

import numpy as np
from IPython.display import display

from lib.analysis.tables import rows_for_paths, worst_queries
from lib.retrieval.decide import Thresholds
from lib.evaluate.record import load_evaluation
from lib.analysis.gallery import photo_embedder, query_browser
from lib.data.images import open_image
from lib.analysis.figures import save
from lib.analysis.figures import plot_retrieval_grid

ev = load_evaluation(Path(run_dir) / "eval" / split)
tag = f"{Path(run_dir).name}_{split}"
thresholds = Thresholds(**ev.config.get("thresholds", {}))  # the ones notebook 03 applied to this split
print(f"{split}: {len(ev.queries)} queries, gallery {len(ev.gallery)} photos; thresholds {thresholds}")

# %% [markdown]
# ## Static gallery
# Frames: blue the query (with its vote and, when not accepted, the verdict), green a photo of the query's class,
# red another class.

# %%
rows = rows_for_paths(ev.queries, queries) if queries else worst_queries(ev.queries, n_queries)
what = "chosen queries" if queries else f"{len(rows)} worst queries"
fig = plot_retrieval_grid(ev, rows, k=k, with_group=True, title=f"{Path(run_dir).name}, {split}: {what}")
save(fig, Path(figures_dir) / f"05_gallery_{tag}.png")

# %% [markdown]
# ## Query browser
# With `upload=True` the run's model embeds an uploaded photo as notebook 03 embedded the split; the check below
# re-embeds one gallery photo and compares it with the stored embedding (1.0 = the same; a little less when
# notebook 03 read a resize cache).

# %%
embed_fn = None
if upload:
    embed_fn = photo_embedder(run_dir, ev.config.get("checkpoint", "best"), tta=ev.config.get("tta", False))
    again = embed_fn(open_image(Path(ev.data_root) / ev.gallery["path"].iat[0]))
    stored = ev.gallery_emb[0] / np.linalg.norm(ev.gallery_emb[0])
    cosine = float(again @ stored / np.linalg.norm(again))
    print(f"upload path vs notebook 03, cosine on {ev.gallery['path'].iat[0]}: {cosine:.4f}")
if browser:
    display(query_browser(ev, embed_fn=embed_fn, k=k, thresholds=thresholds))
