import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import write_image

import lib.retrieval.embed
from lib.core.device import DeviceSettings
from lib.core.errors import DataError
from lib.data.dataset import IndexDataset
from lib.data.transforms import build_transforms
from lib.evaluate.record import load_evaluation, loo_rule, save_evaluation
from lib.evaluate.results_table import BENCHMARK_COLUMNS, UNTRAINED_BEST, append_benchmark_row, benchmark_row
from lib.evaluate.run_eval import apply_thresholds, evaluate_run
from lib.retrieval.decide import Thresholds
from lib.retrieval.embed import cached_embeddings, extract_embeddings
from lib.retrieval.faiss_index import NO_NEIGHBOUR, load_index
from lib.train.checkpoint import load_checkpoint, save_checkpoint


@pytest.fixture
def extractions(monkeypatch):
    """Counts the embedding extractions the cache lets through."""
    calls = []
    original = lib.retrieval.embed.extract_embeddings

    def counting(model, dataset, *args, **kwargs):
        calls.append(len(dataset))
        return original(model, dataset, *args, **kwargs)

    monkeypatch.setattr(lib.retrieval.embed, "extract_embeddings", counting)
    return calls


def test_evaluation_agrees_with_an_independent_computation(run_dir, demo):
    ev = evaluate_run(run_dir, k=5, device="cpu")
    index = pd.read_csv(demo[1] / "index.csv", dtype=str, keep_default_na=False)
    assert ev.queries["path"].tolist() == index.loc[index["split"] == "val", "path"].tolist()
    assert ev.gallery["path"].tolist() == index.loc[index["split"] == "train", "path"].tolist()
    # brute-force squared L2 between unit vectors
    g = ev.gallery_emb / np.linalg.norm(ev.gallery_emb, axis=1, keepdims=True)
    q = ev.query_emb / np.linalg.norm(ev.query_emb, axis=1, keepdims=True)
    d2 = ((q[:, None] - g[None]) ** 2).sum(-1)
    np.testing.assert_allclose(ev.distances, np.sort(d2, axis=1)[:, :5], atol=1e-5)
    labels = ev.gallery["label"].to_numpy()[ev.neighbours]
    truth = ev.queries["label"].to_numpy()
    assert ev.metrics["recall@1"] == pytest.approx(np.mean(labels[:, 0] == truth))
    assert ev.metrics["recall@5"] == pytest.approx(np.mean((labels == truth[:, None]).any(axis=1)))
    assert ev.metrics["vote_accuracy"] == pytest.approx(np.mean(ev.queries["pred"] == truth))
    assert (ev.class_scores.columns[ev.class_scores.to_numpy().argmax(axis=1)] == ev.queries["pred"]).all()
    np.testing.assert_allclose(ev.class_scores.sum(axis=1), 1)
    hit = labels == truth[:, None]
    assert (ev.queries["rank_of_true"] == np.where(hit.any(1), hit.argmax(1) + 1, 0)).all()
    assert ev.metrics["coverage"] == 1.0 and set(ev.queries["verdict"]) == {"accepted"}
    assert sum(c["support"] for c in ev.metrics["per_class"].values()) == len(truth)
    _, meta, info = load_index(run_dir / "index")  # saved for lib.evaluate.predict
    assert meta["path"].tolist() == ev.gallery["path"].tolist() and info["checkpoint"] == "best_model.pt"
    back = load_evaluation(save_evaluation(ev, run_dir / "eval" / "val"))
    pd.testing.assert_frame_equal(back.queries[["path", "pred", "verdict"]], ev.queries[["path", "pred", "verdict"]])


def test_leave_one_out_makes_the_split_its_own_gallery_with_identity_metrics(run_dir, tmp_path):
    from sklearn.metrics import average_precision_score

    ev = evaluate_run(run_dir, k=5, device="cpu", protocol="loo", loo_rule="photo")
    assert ev.metrics["protocol"] == "loo" and ev.config["protocol"] == "loo" and ev.config["loo_rule"] == "photo"
    assert ev.gallery["path"].tolist() == ev.queries["path"].tolist()
    assert not (ev.neighbours == np.arange(len(ev.queries))[:, None]).any(), "a photo never retrieves itself"
    q = ev.query_emb / np.linalg.norm(ev.query_emb, axis=1, keepdims=True)
    d2 = ((q[:, None] - q[None]) ** 2).sum(-1)
    np.fill_diagonal(d2, np.inf)
    np.testing.assert_allclose(ev.distances, np.sort(d2, axis=1)[:, :5], atol=1e-5)
    labels = ev.queries["label"].to_numpy()
    expected = []
    for i in range(len(labels)):  # AP of ranking every other photo of the split, by scikit-learn
        others = np.arange(len(labels)) != i
        relevant = labels[others] == labels[i]
        expected.append(average_precision_score(relevant, -d2[i, others]) if relevant.any() else np.nan)
    np.testing.assert_allclose(ev.queries["ap"], expected, atol=1e-6)
    assert ev.metrics["mAP"] == pytest.approx(np.nanmean(expected))
    per_identity = pd.Series(expected).groupby(labels).mean()
    assert ev.metrics["identity_balanced_mAP"] == pytest.approx(per_identity.mean())
    new = ev.metrics["new_individual"]
    assert new["n_new"] == int(np.isnan(expected).sum()) and new["n_new"] + new["n_known"] == len(labels)
    back = load_evaluation(save_evaluation(ev, tmp_path / "loo"))
    np.testing.assert_allclose(back.queries["ap"], ev.queries["ap"])


def test_leave_one_out_leaves_each_querys_group_out_by_default_and_old_records_read_as_the_photo_rule(run_dir,
                                                                                                       tmp_path):
    from sklearn.metrics import average_precision_score

    ev = evaluate_run(run_dir, k=5, device="cpu", protocol="loo")
    groups, labels = ev.queries["group"].to_numpy(), ev.queries["label"].to_numpy()
    assert ev.config["loo_rule"] == "group" and loo_rule(ev) == "group", "the demo's IDs are finer than its classes"
    real = ev.neighbours != NO_NEIGHBOUR
    assert not (groups[np.where(real, ev.neighbours, 0)] == groups[:, None])[real].any(), "no burst sibling"
    q = ev.query_emb / np.linalg.norm(ev.query_emb, axis=1, keepdims=True)
    sims = q @ q.T
    expected = []
    for i in range(len(labels)):  # AP of ranking the split without the query's group, by scikit-learn
        others = groups != groups[i]
        relevant = labels[others] == labels[i]
        expected.append(average_precision_score(relevant, sims[i, others]) if relevant.any() else np.nan)
    np.testing.assert_allclose(ev.queries["ap"], expected, atol=1e-6)  # float32 embeddings: rankings equal
    old = load_evaluation(save_evaluation(ev, tmp_path / "old"))
    del old.config["loo_rule"]
    assert loo_rule(old) == "photo"


def test_a_new_individual_threshold_from_val_is_measured_not_chosen_again(run_dir):
    new = evaluate_run(run_dir, k=5, device="cpu", new_threshold=0.25).metrics["new_individual"]
    assert new["threshold"] == 0.25 and new["n_new"] == 0 and np.isnan(new["recall"])


def test_restricting_to_contexts_needs_a_context_column(run_dir):
    with pytest.raises(DataError, match="restrict_to_context needs a context column"):
        evaluate_run(run_dir, k=5, device="cpu", restrict_to_context=True)


def test_thresholds_change_verdicts_and_coverage(run_dir):
    ev = evaluate_run(run_dir, k=5, device="cpu")
    apply_thresholds(ev, Thresholds(max_distance=float(ev.queries["top1_distance"].median()), min_margin=0.0))
    accepted = ev.queries["verdict"] == "accepted"
    assert ev.metrics["coverage"] == pytest.approx(accepted.mean()) and 0.4 <= accepted.mean() <= 0.6
    assert ev.metrics["accuracy_at_coverage"] == pytest.approx(ev.queries.loc[accepted, "correct"].mean())
    assert set(ev.queries.loc[~accepted, "verdict"]) == {"unclassifiable"}


def test_second_evaluation_reads_the_cache_and_a_changed_checkpoint_recomputes(run_dir, extractions, tmp_path):
    # a cache of its own, whatever ran before (best and latest of a one-epoch run may be the same bytes: one cache)
    run_dir = Path(shutil.copytree(run_dir, tmp_path / "run", ignore=shutil.ignore_patterns("embeddings")))
    first = evaluate_run(run_dir, checkpoint="latest", device="cpu")
    assert extractions == [len(first.gallery), len(first.queries)]
    again = evaluate_run(run_dir, checkpoint="latest", device="cpu")
    assert len(extractions) == 2, "nothing recomputed"
    np.testing.assert_array_equal(again.query_emb, first.query_emb)
    ckpt = load_checkpoint(run_dir / "latest_model.pt")
    ckpt["model"]["head.fc.weight"] = ckpt["model"]["head.fc.weight"] * 2 + 0.1
    save_checkpoint(run_dir / "changed.pt", ckpt)
    changed = evaluate_run(run_dir, checkpoint="changed.pt", device="cpu")
    assert len(extractions) == 4 and not np.allclose(changed.query_emb, first.query_emb)
    evaluate_run(run_dir, checkpoint="latest", tta=True, device="cpu")
    assert len(extractions) == 6, "TTA embeddings are cached apart"


def test_a_checkpoint_that_predates_resize_evaluates_with_the_crop_it_trained_with(run_dir, tmp_path):
    from lib.train.trained_run import load_trained

    ckpt = load_checkpoint(run_dir / "latest_model.pt")
    size = ckpt["config"]["aug"]["img_size"]
    for resize in ("squash", "pad"):
        ckpt["config"]["aug"]["resize"] = resize
        save_checkpoint(tmp_path / f"{resize}.pt", ckpt)
    del ckpt["config"]["aug"]["resize"]
    save_checkpoint(tmp_path / "old.pt", ckpt)
    for name, resize in (("squash.pt", "squash"), ("pad.pt", "pad"), ("old.pt", "crop")):
        run = load_trained(tmp_path, name)
        dc = run.model.data_config
        assert repr(run.eval_tf) == repr(build_transforms(size, dc["mean"], dc["std"], preset="none",
                                                          resize=resize)[1]), name
    assert "CenterCrop" in repr(run.eval_tf)


class CountingModel(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3)
        self.forwards = 0

    def forward(self, x):
        self.forwards += 1
        return torch.nn.functional.normalize(self.conv(x).mean(dim=(2, 3)), dim=1)


def test_cache_recomputes_when_an_image_or_the_transform_changes(tmp_path):
    for i in range(4):
        write_image(tmp_path / "data" / f"{i}.jpg", size=(40, 30), seed=i)
    rows = pd.DataFrame({"path": [f"{i}.jpg" for i in range(4)], "label": "a"})
    _, tf32 = build_transforms(32, (0.5,) * 3, (0.25,) * 3, preset="none")
    _, tf24 = build_transforms(24, (0.5,) * 3, (0.25,) * 3, preset="none")
    model, settings, cache = CountingModel(), DeviceSettings(), tmp_path / "emb"

    def embed(tf):
        before = model.forwards
        emb, info = cached_embeddings(model, IndexDataset(rows, tmp_path / "data", tf, {"a": 0}), settings, cache, "ck")
        return emb, model.forwards - before

    first, n = embed(tf32)
    assert n == 1
    cached, n = embed(tf32)
    assert n == 0 and np.array_equal(cached, first)
    assert embed(tf24)[1] == 1
    write_image(tmp_path / "data" / "2.jpg", size=(40, 30), seed=99)  # same path, new content
    changed, n = embed(tf32)
    assert n == 1 and np.allclose(changed[[0, 1, 3]], first[[0, 1, 3]], atol=1e-6)
    assert not np.allclose(changed[2], first[2])


def test_flip_tta_is_the_renormalised_mean_of_image_and_mirror(tmp_path):
    write_image(tmp_path / "0.jpg", size=(32, 32))
    _, tf = build_transforms(32, (0.5,) * 3, (0.25,) * 3, preset="none")
    dataset = IndexDataset(pd.DataFrame({"path": ["0.jpg"], "label": "a"}), tmp_path, tf, {"a": 0})
    model = CountingModel()
    emb = extract_embeddings(model, dataset, DeviceSettings(), tta=True)
    x = dataset[0][0][None]
    with torch.no_grad():
        expected = torch.nn.functional.normalize(model(x) + model(x.flip(-1)), dim=1).numpy()
    np.testing.assert_allclose(emb, expected, atol=1e-6)
    assert not np.allclose(emb, extract_embeddings(model, dataset, DeviceSettings()), atol=1e-4)


def test_bad_requests_are_refused(run_dir):
    with pytest.raises(ValueError, match="gallery"):
        evaluate_run(run_dir, split="train")
    with pytest.raises(DataError, match="best_model.pt"):
        evaluate_run(run_dir, checkpoint="nope.pt")
    with pytest.raises(DataError, match="no images"):
        evaluate_run(run_dir, split="holdout", device="cpu")


def test_benchmark_rows_append_and_unite_columns(run_dir, tmp_path):
    ev = evaluate_run(run_dir, device="cpu")
    trained = ev.config["checkpoint_epoch"]
    assert trained == load_checkpoint(run_dir / "best_model.pt")["epoch"]
    ev.config["checkpoint_epoch"] = 1  # a checkpoint that training made (epoch 0 adds a note; checked below)
    row = benchmark_row(ev, notes="first")
    assert list(row) == list(BENCHMARK_COLUMNS) and row["version"] == run_dir.name and row["split"] == "val"
    csv = tmp_path / "results" / "benchmarks.csv"
    append_benchmark_row(csv, row)
    append_benchmark_row(csv, {**row, "notes": "second"})
    table = pd.read_csv(csv)
    assert list(table.columns) == list(BENCHMARK_COLUMNS) and table["notes"].tolist() == ["first", "second"]
    append_benchmark_row(csv, {**row, "notes": "third", "ensemble": 3})  # a column the file does not have
    table = pd.read_csv(csv)
    assert list(table.columns) == [*BENCHMARK_COLUMNS, "ensemble"] and table["notes"].tolist() == ["first", "second", "third"]
    assert table["ensemble"].isna().tolist() == [True, True, False]
    append_benchmark_row(csv, {"version": "x", "split": "val"})  # a row with fewer keys keeps the header
    assert pd.read_csv(csv)["version"].tolist()[-1] == "x" and len(pd.read_csv(csv).columns) == len(table.columns)
    # a run whose best checkpoint is the untrained model says so in its results row
    assert row["checkpoint_epoch"] == 1
    ev.config["checkpoint_epoch"] = 0
    assert benchmark_row(ev, notes="first")["notes"] == f"first; {UNTRAINED_BEST}"


def test_the_same_evaluation_again_replaces_its_row(run_dir, tmp_path):
    """Re-running notebook 03 replaces that evaluation's row in place; another checkpoint, split or setting is a new
    row, and rows written before the id existed are kept."""
    csv = tmp_path / "benchmarks.csv"
    append_benchmark_row(csv, {"version": "old", "split": "val", "notes": "before ids"})
    ev = evaluate_run(run_dir, device="cpu")
    first = benchmark_row(ev, notes="first")
    append_benchmark_row(csv, first, replace_key="evaluation_id")
    other = benchmark_row(evaluate_run(run_dir, device="cpu", k=3), notes="k=3")
    assert other["evaluation_id"] != first["evaluation_id"]
    append_benchmark_row(csv, other, replace_key="evaluation_id")
    again = benchmark_row(evaluate_run(run_dir, device="cpu"), notes="again")
    assert again["evaluation_id"] == first["evaluation_id"]
    append_benchmark_row(csv, again, replace_key="evaluation_id")
    table = pd.read_csv(csv, keep_default_na=False)
    # the notes as given: the tiny run's best checkpoint may be epoch 0, which appends UNTRAINED_BEST to them
    assert [n.split("; ")[0] for n in table["notes"]] == ["before ids", "again", "k=3"]
    assert float(table.loc[1, "recall@1"]) == pytest.approx(first["recall@1"])


@pytest.mark.parametrize("protocol", ["gallery", "loo"])
def test_the_voting_neighbours_come_from_the_one_exact_ranking(run_dir, monkeypatch, protocol):
    """An exact gallery index: the k neighbours are the first k of the ranking that made recall@k and mAP, no second
    search; they equal brute force (each query's own group left out under leave-one-out)."""
    import lib.evaluate.run_eval

    def no_second_search(*args, **kwargs):
        raise AssertionError("a second k-neighbour search")

    monkeypatch.setattr(lib.evaluate.run_eval, "search", no_second_search)
    ev = evaluate_run(run_dir, k=5, device="cpu", protocol=protocol)
    g = ev.gallery_emb / np.linalg.norm(ev.gallery_emb, axis=1, keepdims=True)
    q = ev.query_emb / np.linalg.norm(ev.query_emb, axis=1, keepdims=True)
    d2 = ((q[:, None] - g[None]) ** 2).sum(-1)
    if protocol == "loo":
        groups = ev.queries["group"].to_numpy()
        d2[groups[:, None] == groups[None]] = np.inf
    width = ev.neighbours.shape[1]
    np.testing.assert_allclose(ev.distances, np.sort(d2, axis=1)[:, :width], atol=1e-5)
    real = ev.neighbours != NO_NEIGHBOUR
    assert np.isfinite(np.take_along_axis(d2, np.where(real, ev.neighbours, 0), axis=1)[real]).all()
    assert ev.metrics["index"]["exact"] and "top" not in ev.metrics and "top_distances" not in ev.metrics
