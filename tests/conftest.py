import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

if os.environ.get("PYTEST_XDIST_WORKER"):
    # `make test` runs a worker per core: one intra-op thread each (and in the notebooks and torchrun processes they
    # start), or two workers of two threads oversubscribe two cores; tests of threading set their own counts
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)

ROOT = Path(__file__).resolve().parents[1]
LIONS = ROOT.parent / "shared" / "datasets" / "lions"


@pytest.fixture
def lions() -> Path:
    if not (LIONS / "train").is_dir():
        pytest.skip(f"real-photo set {LIONS} is absent")
    return LIONS


def write_image(path: Path, size=(240, 240), seed: int = 0, fmt: str = "JPEG") -> Path:
    """A small noisy RGB image (noise so that JPEG files have real data to truncate)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(path, fmt)
    return path


@pytest.fixture(scope="session")
def demo(tmp_path_factory):
    """The synthetic demo collection, indexed, checked and split once per test session: (data_dir, splits_dir)."""
    from data_prep.make_demo import make_demo
    from lib.data.splits import SplitConfig, prepare_splits
    from lib.data.table import check_images, index_from_folder

    base = tmp_path_factory.mktemp("demo")
    data = base / "data"
    make_demo(data)
    index, _ = index_from_folder(data)
    kept, excluded = check_images(index, data)
    prepare_splits(kept, base / "splits", SplitConfig(), excluded)
    return data, base / "splits"


@pytest.fixture(scope="session")
def demo_with_context(demo, tmp_path_factory):
    """The demo as individuals seen at sites (its metadata.csv: label = individual, context = site), split:
    (data_dir, splits_dir)."""
    from lib.data.splits import SplitConfig, prepare_splits
    from lib.data.table import check_images, index_from_csv

    data, _ = demo
    # Re-ID of individuals: each photo is its own encounter, so every individual reaches train, val and test.
    index, _ = index_from_csv(data / "metadata.csv", data, label_col="individual", context_col="context")
    kept, excluded = check_images(index, data)
    splits = tmp_path_factory.mktemp("reid_splits")
    prepare_splits(kept, splits, SplitConfig(), excluded)
    return data, splits


@pytest.fixture(scope="session")
def run_dir(demo, tmp_path_factory):
    """A tiny model trained one short epoch on the demo: something to evaluate and predict with."""
    from lib.train.config import build_config
    from lib.train.run import train_run

    data, splits = demo
    run = tmp_path_factory.mktemp("run")
    config = build_config(data_dir=str(data), splits_dir=str(splits), backbone="resnet10t", embed_dim=16, img_size=32,
                          epochs=1, batches_per_epoch=2, p=6, k=4, num_workers=0, device="cpu",
                          head_epochs=0, unfreeze="all", lr_decay=1.0, s=64.0, margin=0.5, warmup_epochs=5)
    train_run(str(run), config, progress=False)
    return run


def score_tolerance(dim: int) -> float:
    """How far two float32 computations of one cosine score of unit `dim`-vectors may differ: each product and sum
    rounds at float32's eps, a BLAS kernel sums in its own order (another CPU, another chunk shape), and the
    rounding errors add up like a random walk, ~sqrt(dim) x eps; 4x that leaves room for the normalisation."""
    return 4 * float(np.sqrt(dim)) * float(np.finfo(np.float32).eps)


def assert_rankings_match(got, expected, tol: float) -> None:
    """Two ranked (query, gallery, score) tables agree up to float rounding: the same queries with as many pairs,
    scores equal within tol rank by rank, and a gallery photo only out of place where a photo whose score is within
    tol of its own took its place (a swap of near-ties, or a near-tie at the cut of a top-k list)."""
    for query, a in got.groupby("query", sort=False):
        b = expected[expected["query"] == query]
        assert len(a) == len(b), f"query {query}: {len(a)} pairs vs {len(b)}"
        np.testing.assert_allclose(a["score"].to_numpy(), b["score"].to_numpy(), rtol=0, atol=tol,
                                   err_msg=f"query {query}: scores rank by rank")
        theirs = dict(zip(b["gallery"], b["score"]))
        cut = b["score"].min()
        for gallery, score in zip(a["gallery"], a["score"]):
            other = theirs.get(gallery, cut)  # absent from their top-k: it must be a near-tie of their last
            assert abs(other - score) <= 2 * tol, f"query {query}: {gallery} at {score} vs {other}"
    assert set(got["query"]) == set(expected["query"])


def assert_neighbours_match(got, expected, reference, tol: float) -> None:
    """Two (n_q, k) tables of gallery rows, nearest first, agree up to float rounding: no row lists a photo twice, and
    at every rank the photo found is as near, by `reference` ((n_q, n_g) float64 distances or scores), as the one
    expected there, to within tol: a swap of near-ties, or a near-tie at the k-th place, is no error."""
    got, expected = np.asarray(got), np.asarray(expected)
    assert got.shape == expected.shape, (got.shape, expected.shape)
    assert all(len(set(row)) == len(row) for row in got.tolist()), "a row lists one gallery photo twice"
    np.testing.assert_allclose(np.take_along_axis(reference, got, axis=1),
                               np.take_along_axis(reference, expected, axis=1), rtol=0, atol=tol)
