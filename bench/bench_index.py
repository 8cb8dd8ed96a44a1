"""Exact against approximate Faiss search on large galleries, in one run:
python bench/bench_index.py [--sizes 100000,300000,1000000] [--queries 1000] [--dim 512] [--out results/bench_index.csv]

Galleries of synthetic clustered unit vectors (--dim dimensions) shaped like a re-identification gallery: clusters of
--per-cluster vectors on average (the photos of one individual, cosine ~0.64 between two of them) whose centres
gather in groups of --per-group clusters (individuals of one species or site, whose photos are closer to each other
than to the rest), so a query's 10 nearest are its own cluster's photos and then near-ties among its group's; and
--queries new vectors drawn around the same centres. For each gallery size, each index of lib.retrieval.ann_index
(flat, ivf, hnsw, ivfpq; built with build_search_index, as notebook 03 builds them) is built once and searched with
each of its search parameters: build seconds (training included), memory (the index as faiss serialises it, which
is what it holds in RAM), queries per second (k=10, all queries in one call, all cores, the fastest of 3 calls)
and recall@10 against the flat index's results. The last line checks the goal: at the largest size, an
approximate index at >= 10x flat's queries/s with recall@10 >= 0.95.
"""

import argparse
import os
import time
from pathlib import Path

import faiss
import numpy as np
import pandas as pd

from lib.core.state_io import write_csv
from lib.retrieval.ann_index import IndexSpec, build_search_index, set_search_params
from lib.retrieval.faiss_index import build_index

K = 10
SWEEPS = {"flat": [{}], "ivf": [{"nprobe": p} for p in (2, 4, 8, 16, 32)],
          "hnsw": [{"ef_search": e} for e in (64, 128, 256, 512)],
          "ivfpq": [{"nprobe": p} for p in (4, 16)]}
CENTRE_SPREAD = 1.0  # noise norm around a group's centre: a cluster centre is at cosine ~0.71 to its group's
POINT_SPREAD = 0.75  # noise norm around a cluster centre: a vector is at cosine ~0.8 to its cluster's centre


def unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def around(centres: np.ndarray, n: int, spread: float, rng: np.random.Generator, chunk: int = 100_000) -> np.ndarray:
    """n unit vectors, each around one of `centres` drawn at random, at noise norm `spread`; made a chunk at a
    time, so a million 512-d vectors need no float64 copy."""
    d = centres.shape[1]
    out = np.empty((n, d), dtype=np.float32)
    for start in range(0, n, chunk):
        m = min(chunk, n - start)
        noise = rng.standard_normal((m, d), dtype=np.float32) * np.float32(spread / np.sqrt(d))
        out[start:start + m] = unit(centres[rng.integers(0, len(centres), m)] + noise)
    return out


def gallery_and_queries(n: int, n_queries: int, d: int, per_cluster: int, per_group: int, seed: int):
    rng = np.random.default_rng(seed)
    n_clusters = max(n // per_cluster, 1)
    groups = unit(rng.standard_normal((max(n_clusters // per_group, 1), d), dtype=np.float32))
    centres = around(groups, n_clusters, CENTRE_SPREAD, rng)
    return around(centres, n, POINT_SPREAD, rng), around(centres, n_queries, POINT_SPREAD, rng)


def recall_at_k(found: np.ndarray, exact: np.ndarray) -> float:
    """Share of each query's exact k nearest that `found` also holds, averaged."""
    return float(np.mean([np.isin(e, f).mean() for f, e in zip(found, exact)]))


def timed_search(index, queries: np.ndarray, rounds: int = 3) -> tuple[float, np.ndarray]:
    """(queries per second, the results' rows) of the fastest of `rounds` searches of the whole batch: the one least
    slowed by other work on a shared machine."""
    fastest = float("inf")
    for _ in range(rounds):
        t0 = time.perf_counter()
        _, found = index.search(queries, K)
        fastest = min(fastest, time.perf_counter() - t0)
    return len(queries) / fastest, found


def bench_size(n: int, args) -> list[dict]:
    gallery, queries = gallery_and_queries(n, args.queries, args.dim, args.per_cluster, args.per_group, seed=n)
    rows, exact = [], None
    for kind in args.kinds:
        t0 = time.perf_counter()
        if kind == "flat":
            index, factory = build_index(gallery, "cpu"), "Flat"
        else:
            index, info = build_search_index(gallery, IndexSpec(index=kind), "cpu")
            factory = info["factory"]
        build_s = time.perf_counter() - t0
        memory_mb = faiss.serialize_index(index).nbytes / 2**20
        for params in SWEEPS[kind]:
            if params:
                set_search_params(index, params.get("nprobe", 1), params.get("ef_search", 1))
            qps, found = timed_search(index, queries)
            exact = found if kind == "flat" else exact
            row = {"gallery": n, "index": kind, "factory": factory, "param": " ".join(
                f"{k}={v}" for k, v in params.items()), "build_s": round(build_s, 1), "memory_mb": round(memory_mb),
                "qps": round(qps), f"recall@{K}": round(recall_at_k(found, exact), 4)}
            rows.append(row)
            print(" ".join(f"{k}={v}" for k, v in row.items()), flush=True)
        del index
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="100000,300000,1000000", help="gallery sizes, comma-separated")
    ap.add_argument("--queries", type=int, default=1000)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--per-cluster", type=int, default=10, help="average gallery vectors per cluster")
    ap.add_argument("--per-group", type=int, default=50, help="average clusters per group")
    ap.add_argument("--kinds", default="flat,ivf,hnsw,ivfpq", help="flat must come first: it is the reference")
    ap.add_argument("--out", type=Path, default=Path("results/bench_index.csv"))
    args = ap.parse_args()
    args.kinds = args.kinds.split(",")
    if args.kinds[0] != "flat":
        ap.error("--kinds must start with flat: its results are the exact reference")
    print(f"faiss {faiss.__version__}, {faiss.omp_get_max_threads()} threads, {os.cpu_count()} CPUs (load average "
          f"{os.getloadavg()[0]:.1f}); d={args.dim}, {args.queries} queries, k={K}")
    table = pd.DataFrame([row for n in map(int, args.sizes.split(",")) for row in bench_size(n, args)])
    write_csv(args.out, table)
    print("\n".join(["| " + " | ".join(table.columns) + " |", "|" + "---|" * len(table.columns)]
                    + ["| " + " | ".join(map(str, row)) + " |" for row in table.itertuples(index=False)]))
    largest = table[table["gallery"] == table["gallery"].max()]
    flat_qps = largest.loc[largest["index"] == "flat", "qps"].iloc[0]
    good = largest[(largest["index"] != "flat") & (largest[f"recall@{K}"] >= 0.95)]
    best = good.loc[good["qps"].idxmax()] if len(good) else None
    print(f"goal at {largest['gallery'].iloc[0]:,}: >= 10x flat's {flat_qps:,} queries/s at recall@{K} >= 0.95: "
          + (f"{'met' if best['qps'] >= 10 * flat_qps else 'NOT met'} by {best['factory']} {best['param']} "
             f"({best['qps'] / flat_qps:.1f}x, recall {best[f'recall@{K}']})" if best is not None
             else "NOT met (no approximate index reached the recall)"))


if __name__ == "__main__":
    main()
