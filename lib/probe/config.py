"""The probe's knobs (ProbeConfig, checked when made); the methods they choose from are lib.probe.methods.PROBE_METHODS."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from lib.probe.ensemble import COMBINERS
from lib.probe.hybrid import gbm_params
from lib.probe.local_match import SiftConfig
from lib.probe.methods import PROBE_METHODS
from lib.probe.pair_features import HYBRID_FEATURES
from lib.retrieval.ann_index import EF_SEARCH, NPROBE
from lib.retrieval.embed import EMBED_BATCH_SIZE

SIFT_PHOTOS = ("shortlisted", "all")  # gallery photos whose SIFT features the probe computes


@dataclass
class ProbeConfig:
    data_dir: str = "data/demo"
    splits_dir: str = "splits"
    split: str = "val"                 # the probed split; 'test' only when asked for, as everywhere
    identity_col: str = "label"        # column naming the individual ('group' = the folder layout's ID)
    protocol: str = "auto"             # auto | gallery (train photos are the gallery) | loo (split all-vs-all)
    # leave-one-out: what a query may not find besides itself (lib.retrieval.exclusion): group (the other photos of
    # its group: encounter, sighting, photo) | photo (itself only) | auto (group where the groups are finer than
    # the individuals)
    loo_rule: str = "auto"
    methods: list = field(default_factory=lambda: list(PROBE_METHODS))
    ranks: list = field(default_factory=lambda: [1, 5])  # CMC ranks, reported as recall@k
    backbones: list = field(default_factory=lambda: [
        {"name": "imagenet", "backbone": "tf_efficientnet_lite0", "pretrained": "lite0-imagenet", "img_size": 224}])
    shortlist_k: int = 20              # global candidates re-scored by local matching and fusion
    # the shortlist's search (notebook 03's `index`): flat | ivf | hnsw | ivfpq | auto (exact for small galleries, else
    # the fastest index tuned to recall@k 0.95) | a faiss factory string; an approximate one says its recall
    index: str = "auto"
    nprobe: int | None = NPROBE        # None: tuned to the recall target
    ef_search: int | None = EF_SEARCH
    qe_n: int = 3
    qe_alpha: float = 3.0
    k1: int = 20
    k2: int = 6
    lambda_value: float = 0.3
    sift: dict = field(default_factory=dict)  # SiftConfig fields (max_side, n_features, ratio, ransac_px, geometry)
    # shortlisted: SIFT of the queries and of the gallery photos in some query's shortlist, the only ones matched,
    # so the rankings are the same as with 'all' (every gallery photo) at a cost that grows with queries x
    # shortlist_k, not with the gallery; 'all' fills the cache for a whole gallery ahead of later probes.
    sift_photos: str = "shortlisted"
    calibrate_on: str = "val"          # split whose pairs fit the learned methods (fusion, ensemble weights, hybrid)
    ensemble_members: list = field(default_factory=list)  # backbone names the ensemble combines; []: all probed
    ensemble_combine: str = "logistic"  # rank | score | logistic (weights learned on calibrate_on pairs)
    hybrid_features: list = field(default_factory=lambda: list(HYBRID_FEATURES))  # pair feature groups
    hybrid_params: dict = field(default_factory=dict)  # LightGBM overrides of lib.probe.hybrid.DEFAULT_PARAMS
    mask_col: str = ""                 # column with polygon / RLE / mask image path: background painted out
    masks_csv: str = ""                # CSV (path + mask_col) to take the masks from when the index has none
    cache_dir: str = "runs/probe_cache"  # "" = no feature cache
    device: str = "auto"
    batch_size: int = EMBED_BATCH_SIZE

    def __post_init__(self):
        unknown = [m for m in self.methods if m not in PROBE_METHODS]
        if unknown or not self.methods:
            raise ValueError(f"methods {unknown or self.methods}: choose from {', '.join(PROBE_METHODS)}")
        if not self.ranks or min(self.ranks) < 1:
            raise ValueError(f"ranks must be CMC ranks >= 1, got {self.ranks}")
        if self.shortlist_k < 1:
            raise ValueError(f"shortlist_k must be >= 1, got {self.shortlist_k}")
        names = [b.get("name") for b in self.backbones]
        if not names or len(set(names)) != len(names):
            raise ValueError(f"backbones need distinct names, got {names}")
        SiftConfig(**self.sift)  # a bad SIFT knob fails here, before any feature is computed
        if self.sift_photos not in SIFT_PHOTOS:
            raise ValueError(f"sift_photos {self.sift_photos!r}: choose from {', '.join(SIFT_PHOTOS)}")
        if self.ensemble_combine not in COMBINERS:
            raise ValueError(f"ensemble_combine {self.ensemble_combine!r}: choose from {', '.join(COMBINERS)}")
        strangers = sorted(set(self.ensemble_members) - set(names))
        if strangers or len(set(self.ensemble_members)) == 1:
            raise ValueError(f"ensemble_members {self.ensemble_members}: name two or more of the backbones {names} "
                             "(or none: all of them)")
        unknown = sorted(set(self.hybrid_features) - set(HYBRID_FEATURES))
        if unknown or not self.hybrid_features:
            raise ValueError(f"hybrid_features {unknown or self.hybrid_features}: choose from "
                             f"{', '.join(HYBRID_FEATURES)}")
        gbm_params(self.hybrid_params)


def probe_config(**params) -> ProbeConfig:
    """ProbeConfig from flat notebook parameters; an unknown name is an error listing the valid ones."""
    valid = {f.name for f in dataclasses.fields(ProbeConfig)}
    unknown = sorted(set(params) - valid)
    if unknown:
        raise ValueError(f"unknown probe parameter(s) {unknown}; valid: {sorted(valid)}")
    return ProbeConfig(**params)


def learns(cfg: ProbeConfig) -> bool:
    """Whether a method cfg.methods names is fitted on pairs with known answers (of the calibrate_on split)."""
    return any(PROBE_METHODS[m].learned for m in cfg.methods)
