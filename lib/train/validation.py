"""Validation during training: retrieval with Faiss, train photos as the gallery and val photos as queries, or val
leave-one-out, under the split and leave-one-out rule evaluation uses (lib.retrieval.retrieval_split: the group rule
where the groups are finer than the individuals), so the checkpoint chosen is the best under the rule it is later
scored by. One rule for both phases: in the head phase the backbone is frozen, so the model embeds the cached
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
from lib.retrieval.exclusion import NO_NEIGHBOUR
from lib.retrieval.faiss_index import faiss_device_for
from lib.retrieval.ranking import evaluate_retrieval
from lib.retrieval.retrieval_split import RetrievalSplit, retrieval_split
from lib.train.feature_cache import CachedFeatures, PooledFeatures


@dataclass
class Validation:
    split: RetrievalSplit                   # the val rows querying the train rows, or themselves leave-one-out
    gallery_set: Dataset
    query_set: Dataset
    settings: DeviceSettings
    batch_size: int
    features: CachedFeatures | None = None  # the head phase's cache, when there is one

    def __call__(self, net: nn.Module, prefix: str = "val_", cached: bool = False) -> tuple[dict, np.ndarray]:
        """(recall@1/5 and mAP under `prefix`, with the split's val_protocol and val_loo_rule; top-1 hit per query)
        of `net`'s embeddings: of the cached features (cached=True: `net.embed_features`, or `net` itself where it has
        none) or of the images."""
        embed = self._of_features if cached else self._of_images
        queries = embed(net, self.query_set)
        gallery = queries if self.split.loo else embed(net, self.gallery_set)
        metrics, hits = retrieval_metrics(gallery, queries, self.split, prefix, faiss_device_for(self.settings.device))
        return {**metrics, "val_protocol": self.split.protocol, "val_loo_rule": self.split.loo_rule}, hits

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


def validation_for(gallery_set: Dataset, query_set: Dataset, settings: DeviceSettings, batch_size: int,
                   protocol: str) -> Validation:
    """The Validation of IndexDataset-like sets (their `.index`: the train rows, the val rows), its split resolved
    by lib.retrieval.retrieval_split as evaluation resolves it (protocol: the run's val_protocol)."""
    split = retrieval_split(gallery_set.index, query_set.index, protocol)
    return Validation(split, gallery_set, query_set, settings, batch_size)


def retrieval_metrics(gallery: np.ndarray, queries: np.ndarray, split: RetrievalSplit, prefix: str,
                      device: str = "auto") -> tuple[dict, np.ndarray]:
    """(recall@1/5 and mAP under `prefix`, top-1 hit per query) of the split's gallery and query embeddings (under
    leave-one-out the same array), searched by Faiss on `device` (faiss_device_for of the model's: a CPU run stays
    off the GPU, a DDP rank on its own) under the split's exclusion."""
    # the top-1 rows come from the ranking the metrics already made: no second index
    m = evaluate_retrieval(gallery, split.gallery_labels, queries, split.query_labels, split.exclude, ks=(1, 5),
                           device=device, keep=1)
    top1 = m["top"][:, 0]  # padding where a query's group held every photo it could find
    hits = (top1 != NO_NEIGHBOUR) & (split.gallery_labels[top1] == split.query_labels)
    return {f"{prefix}recall@1": m["recall@1"], f"{prefix}recall@5": m["recall@5"], f"{prefix}mAP": m["mAP"]}, hits
