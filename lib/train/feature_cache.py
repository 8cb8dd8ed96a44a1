"""Frozen features, computed once: each train photo in `views` versions (the eval transform, then seeded draws of the
training augmentation) and each val photo, through the frozen backbone and pooling. A head trained on them skips the
backbone's forward and backward passes, which are the whole cost of an epoch on a CPU. Stored through the embedding
cache (lib.retrieval.embed), keyed by the backbone's weights, the photos, the transform, the view and the precision.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from lib.core.device import DeviceSettings
from lib.data.images import open_image
from lib.retrieval.embed import EMBED_BATCH_SIZE, cached_embeddings, state_sha256


class PooledFeatures(nn.Module):
    """A model's backbone + pooling alone, as float32."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.pooled(x).float()


class SeededView(Dataset):
    """An IndexDataset's photos through `transform` with a fixed random draw per (seed, photo): the same augmented
    view on every run and every resume, whatever the loader's workers, and the global RNG left untouched."""

    def __init__(self, base: Dataset, transform, seed: int):
        self.base, self.transform, self.seed = base, transform, seed
        self.paths, self.targets = base.paths, base.targets

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed * 1_000_003 + i)
            return self.transform(open_image(self.paths[i])), self.targets[i]


@dataclass
class CachedFeatures:
    train: torch.Tensor    # (views, n_train, d): view 0 is the eval transform, the others augmented
    queries: torch.Tensor  # (n_val, d), eval transform

    @property
    def gallery(self) -> torch.Tensor:
        return self.train[0]


# 10 parameters: the run's three photo sets, the views and their seed (TrainConfig's), and how the pass runs; one
# caller, run.py, which holds each of them already
def cache_features(model: nn.Module, train_set: Dataset, gallery_set: Dataset, query_set: Dataset, views: int,
                   settings: DeviceSettings, cache_dir: str | os.PathLike, seed: int = 0,
                   batch_size: int = EMBED_BATCH_SIZE, progress: bool = False) -> CachedFeatures:
    """Pooled features of the train photos in `views` versions (gallery_set's eval transform, then train_set's
    augmentation drawn with seeds) and of the val photos, through the cache in cache_dir."""
    if views < 1:
        raise ValueError(f"cached_views must be >= 1, got {views}")
    pooled = PooledFeatures(model)
    key = state_sha256(nn.ModuleList([model.backbone, model.pool]))

    def features(dataset, desc, extra=None) -> torch.Tensor:
        emb, _ = cached_embeddings(pooled, dataset, settings, cache_dir, key, batch_size=batch_size,
                                   progress=progress, desc=desc, extra={"output": "pooled", **(extra or {})})
        return torch.from_numpy(np.asarray(emb, dtype=np.float32))

    train = [features(gallery_set, "features: train")]
    for v in range(1, views):
        view_seed = seed * 1_000 + v
        train.append(features(SeededView(train_set, train_set.transform, view_seed), f"features: train view {v}",
                              {"view_seed": view_seed}))
    return CachedFeatures(torch.stack(train), features(query_set, "features: val"))
