"""The torch Dataset over the index table: one row -> (image tensor, class index)."""
from __future__ import annotations

import os
from pathlib import Path

import pandas as pd
import torch
from torch.utils.data import Dataset

from lib.data.images import open_image
from lib.data.resize_cache import fresh_copies


class IndexDataset(Dataset):
    """Rows of the index; images come from the resize cache where it holds an up-to-date copy (decode once; built from
    the source as it is now: lib.data.resize_cache.fresh_copies), else the originals.

    Labels missing from `class_to_idx` (e.g. open-set queries) get -1.
    """

    def __init__(self, index: pd.DataFrame, data_root: str | os.PathLike, transform, class_to_idx: dict[str, int],
                 cache_dir: str | os.PathLike | None = None):
        self.index = index.reset_index(drop=True)
        rels = self.index["path"].tolist()
        self.paths = fresh_copies(data_root, rels, cache_dir) if cache_dir else [Path(data_root) / p for p in rels]
        self.targets = torch.tensor([class_to_idx.get(label, -1) for label in self.index["label"]], dtype=torch.long)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        return self.transform(open_image(self.paths[i])), self.targets[i]
