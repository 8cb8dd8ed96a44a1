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
# # 01 · Index, check and split the photos
#
# Builds the dataset index (folder layout `data_dir/{class}/{ID}_{seq}.jpg`, or a metadata CSV), checks every
# image (unreadable, truncated or undersized files exclude their whole ID group), and writes the group-aware,
# stratified train/val/test split files that every later notebook reuses. Re-running reuses the split files;
# data that no longer matches them stops here unless `fresh=True`.

# %% tags=["parameters"]
data_dir = "data/photos"    # photo root; paths in the index are relative to it
task = "classification"     # classification | reid (the label is the individual; see split_mode for open sets)
metadata_csv = ""           # "": read the folder layout; else a CSV with the columns named below
path_col = "path"
label_col = ""              # "": "label", or "individual" when task is "reid"
group_col = ""              # CSV column holding the leakage unit (object, encounter); "": each image its own group
context_col = ""            # CSV column with a context (site, address), kept for re-identification
split_col = ""              # CSV column with a ready-made split, kept as `given_split` for later notebooks
group_by = "id"             # folder layout: "id": text before the first "_" is the group; "file": each file alone
min_size = 224              # images smaller than min_size x min_size exclude their group (224: EfficientNet's minimum input)
near_duplicate_distance = 6   # pHash bits (of 64) within which photos of two groups count as near-copies; 0: off
merge_near_duplicates = False  # True: each near-copy cluster becomes one group (a new split: also set fresh to True)
split_mode = "group"        # group | time (closed-set by date) | open (open-set re-ID) | given (split_col)
unknown_share = 0.2         # open/given: share of the val/test individuals held out of train (1: identity-disjoint)
time_col = ""               # with split_mode "time": column with each photo's date or order
ratios = [0.7, 0.15, 0.15]  # train / val / test share of each class's images
seed = 42
n_folds = 0                 # > 1: also write K train/val folds around the fixed test split
splits_dir = "splits"       # one folder per dataset: split files are checked against the data they were made from
fresh = False               # True: split again; the old files move to splits_dir/replaced-<time>/
cache_dir = ""              # "": no resize cache; else resized copies go here (decode once, train many times)
cache_size = 480            # shorter side of the cached images
figures_dir = "figures"

# %%
from pathlib import Path

from lib.core.start import work_from_repo_root

work_from_repo_root()  # relative paths from the repository root, lib from its checkout

import pandas as pd
from IPython.display import Markdown, display

from lib.data.table import check_images, index_from_csv, index_from_folder
from lib.data.tasks import task_columns
from lib.analysis.figures import plot_split_distribution, save
from lib.data.splits import SplitConfig, assign_splits, open_set_modes, prepare_splits
import lib.data.near_duplicates as near_dup

pd.set_option("display.max_colwidth", 120)

# %% [markdown]
# ## Index

# %%
label_col = label_col or task_columns(task).label_col
if metadata_csv:
    index, problems = index_from_csv(metadata_csv, data_dir, path_col=path_col, label_col=label_col,
                                     group_col=group_col or None, context_col=context_col or None,
                                     split_col=split_col or None)
else:
    index, problems = index_from_folder(data_dir, group_by=group_by)
print(f"{len(index)} images, {index['group'].nunique()} groups, {index['label'].nunique()} classes")
display(problems)

# %% [markdown]
# ## Image checks
# Every file is decoded once; a file that fails, or is smaller than `min_size`, takes its whole group out.

# %%
kept, exclusions = check_images(index, data_dir, min_size=min_size)
print(f"kept {len(kept)} images in {kept['group'].nunique()} groups; "
      f"excluded {len(exclusions)} images in {exclusions['group'].nunique()} groups")
display(exclusions)

# %% [markdown]
# ## Near-duplicates across groups
# Burst shots and re-saved copies (resized, re-compressed, slightly cropped) filed under different IDs would put a
# near-copy of a training photo among the queries. Pairs in different groups whose perceptual hashes differ in at most
# `near_duplicate_distance` bits are listed in the split report and `splits_dir/near_duplicates.csv`. With
# `merge_near_duplicates`, each cluster of same-label groups becomes one group before splitting; pairs across labels
# are never merged (a group has one label): check those labels by hand.

# %%
near_pairs = None
if near_duplicate_distance:
    near_pairs = near_dup.near_duplicate_pairs(kept, near_dup.perceptual_hashes(kept, data_dir), near_duplicate_distance)
    across_labels = int((near_pairs["label_a"] != near_pairs["label_b"]).sum())
    print(f"{len(near_pairs)} near-duplicate pairs cross groups ({across_labels} of them across labels: not merged)")
    if merge_near_duplicates and len(near_pairs):
        n_groups = kept["group"].nunique()
        kept = near_dup.merge_near_duplicates(kept, near_pairs)
        print(f"merged: {n_groups} -> {kept['group'].nunique()} groups")
    display(near_dup.pair_actions(near_pairs, merge_near_duplicates).head(20))

# %% [markdown]
# ## Split
# With `split_mode="open"`, `unknown_share` of the val/test individuals are held out whole: they have no photo in
# train, so the gallery does not know them and a query of theirs should be called new; the other individuals' groups
# are shared out as in group mode, so their val/test queries find earlier encounters in the gallery. The split report
# and `splits_dir/unknown_individuals.json` list the unknown ones. `unknown_share=1` is the identity-disjoint split
# (every individual in one split; val and test evaluated leave-one-out). A `given` CSV keeps its own splits; when it
# has no val, the val carved from its train holds out `unknown_share` of its individuals the same way.

# %%
split_config = SplitConfig(ratios=tuple(ratios), seed=seed, n_folds=n_folds, mode=split_mode, time_col=time_col,
                           unknown_share=unknown_share if split_mode in open_set_modes() else None)
splits = prepare_splits(kept, splits_dir, split_config, exclusions=exclusions, fresh=fresh, min_size=min_size)
if near_pairs is not None:  # after prepare_splits: fresh=True moves every file of the split folder aside
    near_dup.write_near_duplicates(splits_dir, near_pairs, near_duplicate_distance, merge_near_duplicates)
report = splits.report
display(Markdown(Path(splits_dir, "split_report.md").read_text()))

# %%
with_split = assign_splits(kept, splits.groups)
fig = plot_split_distribution(with_split)
save(fig, Path(figures_dir) / "01_split_distribution.png")

# %% [markdown]
# ## Resize cache (optional)

# %%
if cache_dir:
    from lib.data.resize_cache import build_cache

    cache_report = build_cache(data_dir, kept["path"].tolist(), cache_dir, size=cache_size)
    print(cache_report)
