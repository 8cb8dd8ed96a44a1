"""Validation during training: retrieval with Faiss, train photos as the gallery and val photos as queries, or val
leave-one-out. One rule for both phases: in the head phase the backbone is frozen, so the model embeds the cached
pooled features (the numbers the full forward pass would give, without the backbone); afterwards it embeds the images.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from lib.core.device import DeviceSettings
from lib.retrieval.embed import extract_embeddings
from lib.retrieval.faiss_index import faiss_device_for
from lib.retrieval.ranking import evaluate_retrieval
from lib.train.feature_cache import CachedFeatures, PooledFeatures


@dataclass
class Validation:
    gallery_set: Dataset
    query_set: Dataset
    settings: DeviceSettings
    batch_size: int
    protocol: str                          # resolved: "gallery" | "loo"
    features: CachedFeatures | None = None  # the head phase's cache, when there is one

    def __call__(self, net: nn.Module, prefix: str = "val_", cached: bool = False) -> tuple[dict, np.ndarray]:
        """(recall@1/5 and mAP under `prefix`, top-1 hit per query) of `net`'s embeddings: of the cached features
        (cached=True: `net.embed_features`, or `net` itself where it has none) or of the images."""
        embed = self._of_features if cached else self._of_images
        queries = embed(net, self.query_set)
        gallery = None if self.protocol == "loo" else embed(net, self.gallery_set)
        return retrieval_metrics(gallery, self.gallery_set.targets.numpy(), queries, self.query_set.targets.numpy(),
                                 self.protocol, prefix, faiss_device_for(self.settings.device))

    def frozen_baseline(self, model: nn.Module) -> dict:
        """The frozen backbone's own pooled features, without any head: the baseline every run is measured against
        (a random head blurs them; training that ends below them has not earned its keep)."""
        if self.features is not None:
            return self(nn.Identity(), "frozen_val_", cached=True)[0]
        return self(PooledFeatures(model), "frozen_val_")[0]

    def _of_images(self, net: nn.Module, dataset: Dataset) -> np.ndarray:
        return extract_embeddings(net, dataset, self.settings, self.batch_size)

    @torch.no_grad()
    def _of_features(self, net: nn.Module, dataset: Dataset) -> np.ndarray:
        x = self.features.queries if dataset is self.query_set else self.features.gallery
        was_training = net.training
        net.eval()
        emb = getattr(net, "embed_features", net)(x.to(self.settings.device)).cpu().numpy()
        net.train(was_training)
        return emb


def retrieval_metrics(gallery: np.ndarray | None, gallery_labels: np.ndarray, queries: np.ndarray,
                      query_labels: np.ndarray, protocol: str, prefix: str, device: str = "auto") -> tuple[dict, np.ndarray]:
    """(recall@1/5 and mAP under `prefix`, top-1 hit per query) of gallery and query embeddings, searched by Faiss on
    `device` (faiss_device_for of the model's: a CPU run stays off the GPU, a DDP rank on its own). Under "loo" the
    queries are the gallery: `gallery` and `gallery_labels` are not read (the caller need not embed a gallery)."""
    loo = protocol == "loo"
    if loo:
        gallery, gallery_labels = queries, query_labels
    # the top-1 rows come from the ranking the metrics already made: no second index
    m = evaluate_retrieval(gallery, gallery_labels, queries, query_labels, ks=(1, 5), exclude_self=loo, device=device,
                           keep=1)
    hits = gallery_labels[m["top"][:, 0]] == query_labels
    return {f"{prefix}recall@1": m["recall@1"], f"{prefix}recall@5": m["recall@5"], f"{prefix}mAP": m["mAP"]}, hits
