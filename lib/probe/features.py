"""What the probe compares retrieval methods on: each photo's global embedding (per backbone), its SIFT features and
its engineered colour / texture features, computed once and cached under a key of method, model state (or feature
settings), dataset signature and mask setting (SIFT: per photo, so a probe computes only the photos it matches); and
the SIFT inlier counts of shortlisted pairs, cached per pair; ProbeFeatures holds them for the rest of a probe."""
from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
from torch import nn
from tqdm.auto import tqdm

from lib.core.device import DeviceSettings
from lib.core.errors import DataError
from lib.core.state_io import read_cache, save_npz, try_write_cache
from lib.data.dataset import IndexDataset
from lib.data.images import open_image
from lib.data.masks import MaskedDataset, decode_mask, masks_fingerprint, mean_fill
from lib.data.transforms import build_transforms
from lib.probe.local_match import (MATCHER, RANSAC_ITERS, SiftConfig, in_threads, pair_inliers, shortlist_pairs,
                                   sift_features)
from lib.probe.photo_features import PHOTO_FEATURES, SETTINGS, photo_features
from lib.retrieval.embed import (EMBED_BATCH_SIZE, cached_embeddings, extract_embeddings, files_fingerprint,
                                 state_sha256)
from lib.retrieval.faiss_index import unit_rows
from lib.retrieval.retrieval_split import RetrievalSplit
from lib.train.config import AugConfig
from lib.train.model import ModelConfig, create_model
from lib.train.trained_run import load_trained

if TYPE_CHECKING:  # the config imports the method registry, which imports this module
    from lib.probe.config import ProbeConfig

RUN_KEYS = {"name", "run_dir", "checkpoint"}
PRETRAINED_KEYS = {"name", "backbone", "pretrained", "img_size", "resize"}


@dataclass
class Backbone:
    name: str
    net: nn.Module        # image batch -> one vector per image
    transform: object     # the eval transform its vectors were trained or pretrained with
    mean: tuple           # normalisation mean: masked-out pixels are painted this colour, so they carry no signal
    signature: str        # what the vectors depend on in the model (checkpoint or weights content)
    data_fingerprint: str | None = None  # a trained run's data, to refuse probing it on other splits


def load_backbone(spec: dict) -> Backbone:
    """spec {'name', 'run_dir'[, 'checkpoint']}: a trained run's embedding model (and its run's eval transform);
    spec {'name', 'backbone', 'pretrained'[, 'img_size', 'resize']}: a timm backbone as it comes, its pooled features
    (no training: the embedding head of an untrained model would be random, and a random projection only blurs the
    pretrained features), photos made square by `resize` (lib.data.transforms.RESIZES; default AugConfig's)."""
    keys = RUN_KEYS if "run_dir" in spec else PRETRAINED_KEYS
    if "name" not in spec or set(spec) - keys or ("run_dir" not in spec and "backbone" not in spec):
        raise ValueError(f"backbone spec {spec}: give {{'name', 'run_dir'[, 'checkpoint']}} for a trained run or "
                         "{'name', 'backbone', 'pretrained'[, 'img_size', 'resize']} for a pretrained timm backbone")
    if "run_dir" in spec:
        run = load_trained(spec["run_dir"], spec.get("checkpoint", "best"))
        return Backbone(spec["name"], run.model, run.eval_tf, tuple(run.model.data_config["mean"]),
                        f"run:{run.checkpoint_sha256}", run.config.get("data_fingerprint"))
    model = create_model(ModelConfig(backbone=spec["backbone"], pretrained=spec.get("pretrained", "auto")))
    dc = model.data_config
    _, tf = build_transforms(spec.get("img_size", 224), dc["mean"], dc["std"], preset="none",
                             resize=spec.get("resize", AugConfig.resize))
    net = nn.Sequential(model.backbone, model.pool).eval()
    return Backbone(spec["name"], net, tf, tuple(dc["mean"]), f"pretrained:{spec['backbone']}:{state_sha256(net)}")


def mask_key(rows: pd.DataFrame, mask_col: str, data_dir: str | os.PathLike) -> dict:
    return {"mask_col": mask_col, "masks": masks_fingerprint(rows[mask_col], data_dir)} if mask_col else {"mask_col": ""}


def _key_name(key: dict) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:24]


def embeddings(backbone: Backbone, rows: pd.DataFrame, data_dir: str | os.PathLike, settings: DeviceSettings,
               mask_col: str = "", cache_dir: str | os.PathLike | None = None, batch_size: int = EMBED_BATCH_SIZE,
               progress: bool = False) -> tuple[np.ndarray, dict]:
    """(embeddings, info) of the rows' photos, background painted out when mask_col is set; from the cache when it
    holds them. info: 'cached' and 'ms_per_image' (of the extraction that made them)."""
    if mask_col:
        dataset = MaskedDataset(rows, data_dir, backbone.transform, {}, mask_col, mean_fill(backbone.mean))
    else:
        dataset = IndexDataset(rows, data_dir, backbone.transform, {})
    backbone.net.to(settings.device)
    desc = f"embed {backbone.name}"
    if cache_dir:
        return cached_embeddings(backbone.net, dataset, settings, Path(cache_dir) / "embeddings", backbone.signature,
                                 batch_size=batch_size, progress=progress, desc=desc,
                                 extra=mask_key(rows, mask_col, data_dir))
    t0 = time.perf_counter()
    emb = extract_embeddings(backbone.net, dataset, settings, batch_size, progress=progress, desc=desc)
    return emb, {"cached": False, "ms_per_image": 1000 * (time.perf_counter() - t0) / max(len(rows), 1)}


def _photo_and_mask(i: int, row: pd.Series, data_dir: Path, mask_col: str):
    """(photo, its foreground mask or None) of row i of a table."""
    image = open_image(data_dir / row["path"])
    where = f"index row {i} ({row['path']})"
    return image, decode_mask(row[mask_col], image.size, data_dir, where=where) if mask_col else None


def _photos_and_masks(rows: pd.DataFrame, data_dir: Path, mask_col: str, desc: str, progress: bool):
    """(photo, its foreground mask or None) of each row in turn, one photo in memory at a time."""
    for i, row in tqdm(rows.reset_index(drop=True).iterrows(), total=len(rows), desc=desc, disable=not progress,
                       leave=False):
        yield _photo_and_mask(i, row, data_dir, mask_col)


def sift_table(rows: pd.DataFrame, data_dir: str | os.PathLike, cfg: SiftConfig, mask_col: str = "",
               cache_dir: str | os.PathLike | None = None, progress: bool = False) -> tuple[list, dict]:
    """([(keypoints, descriptors)] per row, info), each photo's from the cache when it holds them. The cache holds
    one file per photo (under a key of the SIFT settings, the photo's file and its mask), so a later call on other
    or more rows, e.g. a longer shortlist, computes only the photos it has not seen. Descriptors are kept (in memory
    and on disk) as uint8: OpenCV's SIFT descriptors are whole numbers 0..255 held in float32, so nothing is lost at
    a quarter of the size, which is what lets a large gallery's features fit in memory. info: 'cached' (nothing
    computed now), 'computed' (photos computed now), 'ms_per_photo' (each photo's extraction time, however long
    ago it was made: an even share of its batch) and their mean 'ms_per_image'."""
    data_dir, rows = Path(data_dir), rows.reset_index(drop=True)
    folder = Path(cache_dir) / "sift" / _key_name({"method": "sift", **asdict(cfg)}) if cache_dir else None

    def file_of(i: int) -> Path:
        photo = {"file": files_fingerprint([data_dir / rows.at[i, "path"]]),
                 **mask_key(rows.iloc[[i]], mask_col, data_dir)}
        return folder / f"{_key_name(photo)}.npz"

    files = [file_of(i) for i in range(len(rows))] if folder else [None] * len(rows)
    feats, ms = [None] * len(rows), np.zeros(len(rows))
    for i, file in enumerate(files):
        stored = read_cache(file, _read_sift) if file is not None else None
        if stored is not None:
            feats[i], ms[i] = stored
    missing = [i for i, f in enumerate(feats) if f is None]
    t0 = time.perf_counter()
    bar = tqdm(total=len(missing), desc="sift", disable=not progress, leave=False)

    def extract(i: int):  # each worker reads and decodes its own photos: the decoding is spread over the cores too
        image, mask = _photo_and_mask(i, rows.iloc[i], data_dir, mask_col)
        features = sift_features(image, cfg, mask)
        bar.update()
        return features

    made = in_threads(extract, missing)
    bar.close()
    ms[missing] = 1000 * (time.perf_counter() - t0) / max(len(missing), 1)
    desc = np.concatenate([d for _, d in made]) if made else np.zeros((0, 128), np.float32)
    if len(desc) and (desc.min() < 0 or desc.max() > 255 or not np.array_equal(desc, np.round(desc))):
        if folder is not None:
            raise DataError("SIFT descriptors are not whole numbers 0..255 in this OpenCV build; the cache would "
                            "lose precision (run with cache_dir='')")
    else:
        made = [(k, d.astype(np.uint8)) for k, d in made]
    for i, (k, d) in zip(missing, made):
        feats[i] = k, d
        if folder is not None:
            try_write_cache(files[i], save_npz, keypoints=k, descriptors=d, ms=ms[i])
    return feats, {"method": "sift", **asdict(cfg), "cached": not missing, "computed": len(missing),
                   "ms_per_photo": ms, "ms_per_image": float(ms.mean()) if len(ms) else 0.0}


def sift_key(features: tuple[np.ndarray, np.ndarray]) -> str:
    """Hash of one photo's keypoints and descriptors: names it in the inlier cache whatever table, split or run it
    came from. Descriptors are hashed as float32 so the uint8 store and float32 features (same counts) share it."""
    digest = hashlib.blake2b(digest_size=16)
    keypoints, descriptors = features
    digest.update(np.ascontiguousarray(keypoints, np.float32).tobytes())
    digest.update(np.ascontiguousarray(descriptors, np.float32).tobytes())
    return digest.hexdigest()


def inlier_table(query_features: list, gallery_features: list, candidates: np.ndarray, cfg: SiftConfig,
                 cache_dir: str | os.PathLike | None = None, workers: int | None = None) -> tuple[np.ndarray, dict]:
    """((n_q, K) float32 inliers of query i against gallery candidates[i, j], as shortlist_inliers, info) with only
    the pairs the cache lacks matched. The cache holds one table of (query key, gallery key, inliers) per matching
    setting (ratio, RANSAC threshold and cap, geometry); detection settings, photos and masks are in the photos' keys.
    info: 'pairs' (shortlist entries), 'matched' (distinct pairs computed now), 'ms_per_pair' (of those)."""
    rows = shortlist_pairs(len(query_features), candidates)
    q_keys = [sift_key(f) for f in query_features]
    g_keys = {g: sift_key(gallery_features[g]) for g in {g for _, g in rows}}
    wanted = [(q_keys[i], g_keys[g]) for i, g in rows]
    key = {"method": "sift_inliers", "ratio": cfg.ratio, "ransac_px": cfg.ransac_px, "geometry": cfg.geometry,
           "ransac_iters": RANSAC_ITERS, "matcher": MATCHER}
    file = Path(cache_dir) / "sift_inliers" / f"{_key_name(key)}.npz" if cache_dir else None
    known = (read_cache(file, _read_inliers) if file is not None else None) or {}
    missing = list({p: row for p, row in zip(wanted, rows) if p not in known}.items())  # each new pair once
    t0 = time.perf_counter()
    counts = pair_inliers([(query_features[i], gallery_features[g]) for _, (i, g) in missing], cfg, workers)
    seconds = time.perf_counter() - t0
    known.update(zip([p for p, _ in missing], counts.tolist()))
    if file is not None and missing:
        pairs = list(known)
        try_write_cache(file, save_npz, query=np.array([q for q, _ in pairs]), gallery=np.array([g for _, g in pairs]),
                  inliers=np.array([known[p] for p in pairs], np.float32))
    inliers = np.array([known[p] for p in wanted], np.float32).reshape(np.shape(candidates))
    return inliers, {**key, "pairs": len(wanted), "matched": len(missing),
                     "ms_per_pair": 1000 * seconds / max(len(missing), 1)}


def _read_sift(file: Path) -> tuple[tuple[np.ndarray, np.ndarray], float]:
    with np.load(file, allow_pickle=False) as f:
        return (f["keypoints"], f["descriptors"]), float(f["ms"])


def _read_inliers(file: Path) -> dict:
    with np.load(file, allow_pickle=False) as f:
        return dict(zip(zip(f["query"].tolist(), f["gallery"].tolist()), f["inliers"].tolist()))


def _read_photo_features(file: Path) -> tuple[dict, dict]:
    with np.load(file, allow_pickle=False) as f:
        return {n: f[n] for n in PHOTO_FEATURES}, json.loads(str(f["info"]))


def photo_table(rows: pd.DataFrame, data_dir: str | os.PathLike, mask_col: str = "",
                cache_dir: str | os.PathLike | None = None, progress: bool = False) -> tuple[dict, dict]:
    """({'colour', 'lbp', 'hog'}: (n, d) float32 engineered features (lib.probe.photo_features) of the rows' photos,
    background left out where mask_col is set; info) from the cache when it holds them."""
    data_dir = Path(data_dir)
    paths = [data_dir / p for p in rows["path"]]
    key = {"method": "photo_features", **SETTINGS, "data_fingerprint": files_fingerprint(paths),
           **mask_key(rows, mask_col, data_dir)}
    file = Path(cache_dir) / "photo_features" / f"{_key_name(key)}.npz" if cache_dir else None
    stored = read_cache(file, _read_photo_features) if file is not None else None
    if stored is not None:
        return stored[0], {**stored[1], "cached": True, "file": str(file)}
    t0 = time.perf_counter()
    per_photo = [photo_features(image, mask)
                 for image, mask in _photos_and_masks(rows, data_dir, mask_col, "photo features", progress)]
    table = {n: np.stack([p[n] for p in per_photo]) if per_photo else np.zeros((0, 0), np.float32)
             for n in PHOTO_FEATURES}
    info = {**key, "ms_per_image": 1000 * (time.perf_counter() - t0) / max(len(rows), 1)}
    if file is not None:
        try_write_cache(file, save_npz, **table, info=json.dumps(info, default=str))
    return table, {**info, "cached": False, **({"file": str(file)} if file else {})}


class ProbeFeatures:
    """Each backbone's embeddings and the engineered photo features, per row set, and the SIFT features, per photo,
    computed on first use (through the cache) and kept for the rest of the probe: the ensemble reuses every
    member's. `cached` collects, per lookup, whether the cache had it (the probe resets it per row of its table)."""

    def __init__(self, cfg: ProbeConfig, settings, progress: bool):
        self.cfg, self.settings, self.progress = cfg, settings, progress
        self.cache_dir = cfg.cache_dir or None
        self.cached, self._embedded, self._sift, self._photos = [], {}, {}, {}

    def embed(self, backbone, rows: pd.DataFrame):
        """(unit vectors, ms per image of their extraction) of the rows' photos by `backbone`."""
        key = backbone.name, tuple(rows["path"])
        if key not in self._embedded:
            emb, info = embeddings(backbone, rows, self.cfg.data_dir, self.settings, self.cfg.mask_col,
                                   self.cache_dir, self.cfg.batch_size, self.progress)
            self._embedded[key] = (unit_rows(emb, f"{backbone.name} embeddings"), info["ms_per_image"],
                                   bool(info.get("cached")))
        return self.embedded(backbone.name, rows)

    def embedded(self, name: str, rows: pd.DataFrame):
        """(unit vectors, ms per image) that embed() made of the rows' photos by the backbone called `name`."""
        vectors, ms, cached = self._embedded[name, tuple(rows["path"])]
        self.cached.append(cached)
        return vectors, ms

    def vectors(self, backbone, s: RetrievalSplit):
        """(query vectors, gallery vectors) of a probe set."""
        q, _ = self.embed(backbone, s.queries)
        return q, q if s.loo else self.embed(backbone, s.gallery)[0]

    def sift(self, rows: pd.DataFrame, shortlists: np.ndarray | None = None):
        """([(keypoints, descriptors)] per row, mean ms per image of their extraction) of the rows' photos; given
        shortlists (row numbers of `rows`) and sift_photos 'shortlisted', of those rows only, the others None.
        Kept per photo: another backbone's or split's shortlist computes only the photos not held yet."""
        paths = rows["path"].tolist()
        wanted = set(range(len(paths)))
        if shortlists is not None and self.cfg.sift_photos == "shortlisted":
            wanted = set(np.ravel(shortlists).tolist())
        new = sorted(i for i in wanted if paths[i] not in self._sift)
        if new:
            feats, info = sift_table(rows.iloc[new], self.cfg.data_dir, SiftConfig(**self.cfg.sift),
                                     self.cfg.mask_col, self.cache_dir, self.progress)
            self.cached.append(info["cached"])
            self._sift.update(zip([paths[i] for i in new], zip(feats, info["ms_per_photo"])))
        held = [self._sift[p] if i in wanted else (None, np.nan) for i, p in enumerate(paths)]
        return [f for f, _ in held], float(np.nanmean([ms for _, ms in held])) if wanted else 0.0

    def keypoints(self, rows: pd.DataFrame, shortlists: np.ndarray | None = None) -> np.ndarray:
        """Keypoint counts of the rows' photos as sift() gives them: NaN where it computed none."""
        return np.array([np.nan if f is None else len(f[0]) for f in self.sift(rows, shortlists)[0]])

    def photos(self, rows: pd.DataFrame):
        """({'colour', 'lbp', 'hog'}: (n, d) engineered features, ms per image) of the rows' photos."""
        key = tuple(rows["path"])
        if key not in self._photos:
            table, info = photo_table(rows, self.cfg.data_dir, self.cfg.mask_col, self.cache_dir, self.progress)
            self.cached.append(bool(info.get("cached")))
            self._photos[key] = table, info["ms_per_image"]
        return self._photos[key]
