"""Notebook 03's grouping of an evaluation's queries (lib.evaluate.cluster_eval): the threshold chosen on the
calibration part only, measured on the rest, the unknown queries of an open split apart from all of them."""
import dataclasses

import numpy as np
import pandas as pd
import pytest
from test_clustering import blobs

from lib.core.errors import DataError
from lib.evaluate.calibrate import CALIBRATION_COLUMN, calibration_mask
from lib.evaluate.cluster_eval import (add_cluster_metrics, choose_cluster_threshold, cluster_columns,
                                       load_cluster_choice, save_cluster_choice)
from lib.evaluate.record import Evaluation
from lib.retrieval.cluster_metrics import cluster_scores
from lib.retrieval.clustering import cluster_photos


def open_split(seed: int = 0) -> Evaluation:
    emb, ind = blobs(16, 4, spread=0.6, seed=seed)
    labels = np.array([f"ind{i}" for i in ind])
    queries = pd.DataFrame({"path": [f"q{i}.jpg" for i in range(len(ind))], "label": labels,
                            "group": [f"g{i // 2}" for i in range(len(ind))]})  # two photos an encounter
    queries[CALIBRATION_COLUMN] = calibration_mask(queries["group"], 0.5, 0)
    gallery = pd.DataFrame({"path": ["g.jpg"] * 6, "label": [f"ind{i}" for i in range(6)]})  # 6 known individuals
    return Evaluation(split="val", data_root=".", gallery=gallery, queries=queries, neighbours=np.zeros((64, 1)),
                      distances=np.zeros((64, 1)), class_scores=pd.DataFrame(), gallery_emb=np.zeros((6, 32)),
                      query_emb=emb.astype(np.float32), config={"protocol": "gallery"})


def test_threshold_from_the_calibration_part_scores_from_the_rest(tmp_path):
    ev = open_split()
    chosen = choose_cluster_threshold(ev)
    unknown = ~ev.queries["label"].isin(ev.gallery["label"]).to_numpy()
    cal = ev.queries[CALIBRATION_COLUMN].to_numpy()
    assert chosen["chosen_on"]["n_photos"] == int((unknown & cal).sum()) and chosen["chosen_on"]["queries"] == "unknown"
    # the same choice from the calibration photos alone: the held-out photos never entered it
    moved = ev.query_emb.copy()
    moved[~cal] = np.random.default_rng(1).normal(size=moved[~cal].shape)
    assert choose_cluster_threshold(dataclasses.replace(ev, query_emb=moved))["threshold"] == chosen["threshold"]
    report = add_cluster_metrics(ev, chosen)
    held = unknown & ~cal
    q = ev.queries[held]
    again = cluster_scores(q["label"], cluster_photos(ev.query_emb[held], chosen["threshold"], q["group"]))
    assert report["unknown"] == pytest.approx(again) and report["measured_on"] == "held-out part of val"
    assert report["all"]["n_photos"] == int((~cal).sum())
    assert (ev.queries.loc[cal, "cluster_all"] == -1).all() and (ev.queries.loc[~cal, "cluster_all"] >= 0).all()
    for g, members in ev.queries[~cal].groupby("group"):
        assert members["cluster_all"].nunique() == 1, f"encounter {g} split"
    row = cluster_columns(ev)
    assert row["cluster_unknown_ari"] == report["unknown"]["ari"] and row["cluster_threshold"] == chosen["threshold"]
    save_cluster_choice(tmp_path / "eval" / "val" / "clustering.json", chosen, {"checkpoint_sha256": "x"})
    assert load_cluster_choice(tmp_path)["threshold"] == chosen["threshold"]
    test = open_split(seed=5)
    test.split = "test"
    assert add_cluster_metrics(test, chosen)["measured_on"] == "all of test", "val's threshold on every test query"


def test_a_damaged_choice_is_a_one_line_error(tmp_path):
    (tmp_path / "eval" / "val").mkdir(parents=True)
    (tmp_path / "eval" / "val" / "clustering.json").write_text('{"threshold": ')
    with pytest.raises(DataError, match="clustering.json: unreadable cluster threshold"):
        load_cluster_choice(tmp_path)
    assert load_cluster_choice(tmp_path / "nothing") is None
