"""Faiss indexes for galleries too large for exact search: a named kind or any faiss.index_factory string, trained on
(a sample of) the gallery, with its search-time parameters, placed on the GPU(s) when faiss has them, and what the
approximation costs: recall@k of its results against exact search, measured on a sample of the queries.

Kinds: 'flat' (exact, lib.retrieval.faiss_index.build_index), 'ivf' (inverted lists of full vectors), 'hnsw' (a
navigable graph over full vectors), 'ivfpq' (inverted lists of product-quantised codes: about 1/27 of the memory,
and the least recall), 'auto' (exact below `exact_below` gallery vectors, 'ivf' from there on). Every kind ranks by
squared L2 between unit vectors like the exact index, so distances, thresholds and votes mean the same whichever
index found the neighbours.
"""
from __future__ import annotations

import math
import re
import time
import warnings
from dataclasses import asdict, dataclass

import faiss
import numpy as np

from lib.retrieval.exclusion import leave_one_out
from lib.retrieval.faiss_index import (
    build_index,
    clip_k,
    gpu_id,
    gpu_resources,
    knn,
    on_device,
    unit_queries,
    unit_rows,
)

INDEX_KINDS = ("flat", "ivf", "hnsw", "ivfpq", "auto")
# Defaults from bench/bench_index.py (synthetic clustered 512-d unit vectors; docs/benchmarks.md, "Large galleries").
# Below AUTO_EXACT_BELOW an exact search costs a few ms a query on a small CPU and evaluation ranks the whole gallery
# for mAP anyway, so exactness costs little; above it IVF's lists pay off.
AUTO_EXACT_BELOW = 200_000
NPROBE = 8           # IVF lists a query visits: near-exact recall up to 1M in the benchmark; 2 trades recall for speed
EF_SEARCH = 256      # HNSW candidates a query keeps while walking the graph: more = higher recall, slower
HNSW_M = 32          # HNSW links per vector: 32 is faiss's usual choice for a few hundred dimensions
TRAIN_PER_LIST = 64  # k-means training vectors per IVF list: faiss warns below 39, more costs time and gains little
TRAIN_MIN = 10_000   # at least this many (if the gallery has them): 8-bit PQ codebooks want 39 x 256
RECALL_SAMPLE = 1000  # queries whose approximate results are checked against exact search


@dataclass(frozen=True)
class IndexSpec:
    """Which index to build for a gallery and how to search it (notebook 03's `index`, `nprobe`, `ef_search`)."""
    index: str = "auto"             # a kind of INDEX_KINDS, or a faiss.index_factory string such as "IVF1024,PQ64"
    nprobe: int = NPROBE            # IVF: lists visited per query
    ef_search: int = EF_SEARCH      # HNSW: candidate list per query
    exact_below: int = AUTO_EXACT_BELOW  # 'auto': exact search for galleries smaller than this
    train_size: int = 0             # vectors the index is trained on; 0: TRAIN_PER_LIST per IVF list, >= TRAIN_MIN
    recall_sample: int = RECALL_SAMPLE  # queries whose recall@k against exact search is reported
    seed: int = 0                   # draws the training and recall samples

    def __post_init__(self):
        for name in ("nprobe", "ef_search", "recall_sample"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.train_size < 0 or self.exact_below < 0:
            raise ValueError(f"train_size and exact_below must be >= 0, got {self.train_size}, {self.exact_below}")


def n_lists(n: int) -> int:
    """IVF lists for n vectors: the power of two nearest sqrt(n), and at most n / 39 so that k-means has the 39
    training vectors per list faiss asks for."""
    lists = 2 ** round(math.log2(math.sqrt(max(n, 1))))
    return max(1, min(lists, 2 ** int(math.log2(max(n // 39, 1)))))


def pq_subquantizers(d: int) -> int:
    """Product-quantiser sub-vectors for dimension d: about one byte per 8 dimensions (64 bytes for 512-d, 1/32 of
    the float32 vector; with its 8-byte id, 1/27), and a divisor of d as faiss requires."""
    return max(m for m in range(1, max(d // 8, 1) + 1) if d % m == 0)


def resolve_factory(index: str, n: int, d: int, exact_below: int = AUTO_EXACT_BELOW) -> tuple[str, str]:
    """(faiss factory string, why that one) for the setting `index` and a gallery of n vectors of dimension d."""
    kind = index.strip().lower()
    if kind == "auto":
        if n < exact_below:
            return "Flat", f"auto: {n:,} gallery vectors < {exact_below:,}, exact search"
        return f"IVF{n_lists(n)},Flat", f"auto: {n:,} gallery vectors >= {exact_below:,}, approximate search"
    named = {"flat": "Flat", "ivf": f"IVF{n_lists(n)},Flat", "hnsw": f"HNSW{HNSW_M}",
             "ivfpq": f"IVF{n_lists(n)},PQ{pq_subquantizers(d)}"}
    if kind in named:
        return named[kind], f"index={kind!r}"
    return index.strip(), "factory string"


def _faiss_reason(error: RuntimeError) -> str:
    """faiss's own words from one of its errors, without the C++ location that precedes them."""
    text = str(error).strip().splitlines()[-1]
    return re.sub(r"^.*?\.(cpp|h):\d+: ", "", text)


def new_index(factory: str, d: int) -> faiss.Index:
    """An empty faiss index from a factory string (squared L2), or a ValueError that names the valid settings."""
    try:
        return faiss.index_factory(d, factory, faiss.METRIC_L2)
    except RuntimeError as e:
        raise ValueError(f"index={factory!r} is not an index faiss can build for {d}-d vectors ({_faiss_reason(e)}): "
                         f"give one of {', '.join(INDEX_KINDS)}, or a faiss.index_factory string such as "
                         "'IVF1024,Flat', 'HNSW32' or 'IVF1024,PQ64'") from None


def is_exact(index: faiss.Index) -> bool:
    """True for a flat index (CPU or GPU), whose search is exact."""
    return isinstance(index, (faiss.IndexFlat, *((faiss.GpuIndexFlat,) if hasattr(faiss, "GpuIndexFlat") else ())))


def set_search_params(index: faiss.Index, nprobe: int, ef_search: int) -> dict:
    """Sets the search-time parameters that apply to a CPU `index` (nprobe: IVF; efSearch: HNSW) and returns them."""
    space, applied = faiss.ParameterSpace(), {}
    for name, value in (("nprobe", nprobe), ("efSearch", ef_search)):
        try:
            space.set_index_parameter(index, name, value)
        except RuntimeError:
            continue  # the index has no stage that reads it (an IVF index has no efSearch)
        applied[name] = value
    return applied


def sample_rows(n: int, size: int, seed: int) -> np.ndarray:
    """`size` distinct rows of n drawn with `seed`, in order (all n when size >= n): the vectors an index trains on,
    the queries approximation_recall checks."""
    if size >= n:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, size, replace=False))


def _train_size(index: faiss.Index, spec: IndexSpec) -> int:
    if spec.train_size:
        return spec.train_size
    ivf = faiss.try_extract_index_ivf(index)
    return max(TRAIN_PER_LIST * (ivf.nlist if ivf is not None else 0), TRAIN_MIN)


def place(index: faiss.Index, device="auto") -> tuple[faiss.Index, str]:
    """(index, where it is) for a CPU index: an exact one as build_index places it; an approximate one on GPU N for
    'cuda:N', on every GPU (sharded: each holds a part of the gallery) for 'auto' when faiss has several, else on
    the CPU. Call with 'cpu' unless torch sees CUDA (lib.retrieval.faiss_index.faiss_device_for)."""
    if is_exact(index):
        placed = on_device(index, device)
        return placed, "cpu" if placed is index else "gpu"
    gpu = gpu_id(device)  # checks the name; None for the CPU, with a warning when faiss-cpu was asked for a GPU
    if gpu is None:
        return index, "cpu"
    options = faiss.GpuMultipleClonerOptions()
    # faiss-gpu's IVF-PQ needs float16 lookup tables above 48 bytes per code (64 for 512-d); IVF-Flat keeps float32
    options.useFloat16 = isinstance(faiss.try_extract_index_ivf(index), faiss.IndexIVFPQ)
    options.shard = True
    gpus = list(range(faiss.get_num_gpus())) if str(device) == "auto" else [gpu]
    # what faiss.index_cpu_to_all_gpus does, with this process's resources instead of new ones for every call
    resources = [gpu_resources(g) for g in gpus]
    try:
        placed = faiss.index_cpu_to_gpu_multiple_py(resources, index, options, gpus)
    except RuntimeError as e:  # e.g. HNSW, which faiss-gpu does not implement
        warnings.warn(f"{type(index).__name__} cannot go to the GPU ({_faiss_reason(e)}): it searches on the CPU")
        return index, "cpu"
    return placed, f"{len(gpus)} GPUs, sharded" if len(gpus) > 1 else f"cuda:{gpus[0]}"


def build_search_index(embeddings, spec: IndexSpec = IndexSpec(), device="auto") -> tuple[faiss.Index, dict]:
    """(index over the L2-normalised rows of `embeddings`, info) as `spec` asks; index row i is embeddings row i.

    info: spec (as a dict), factory, chosen (why that index), exact, search_params (those that apply), train_rows,
    placement, build_seconds. A flat index is build_index's, unchanged.
    """
    t0 = time.perf_counter()
    n, d = np.shape(embeddings)
    factory, why = resolve_factory(spec.index, n, d, spec.exact_below)
    info = {"spec": asdict(spec), "factory": factory, "chosen": why}
    cpu = new_index(factory, d)
    if is_exact(cpu):
        index = build_index(embeddings, device)  # the exact path stays what it always was
        return index, {**info, "exact": True, "search_params": {}, "train_rows": 0,
                       "placement": "gpu" if type(index).__name__.startswith("Gpu") else "cpu",
                       "build_seconds": time.perf_counter() - t0}
    x = unit_rows(embeddings, "embeddings")
    rows = sample_rows(n, _train_size(cpu, spec), spec.seed) if not cpu.is_trained else np.arange(0)
    try:
        if len(rows):
            cpu.train(x[rows])
        cpu.add(x)
    except RuntimeError as e:
        raise ValueError(f"index={spec.index!r} ({factory}) could not be built over {n:,} vectors: "
                         f"{_faiss_reason(e)}") from None
    params = set_search_params(cpu, spec.nprobe, spec.ef_search)
    index, where = place(cpu, device)
    return index, {**info, "exact": False, "search_params": params, "train_rows": len(rows), "placement": where,
                   "build_seconds": time.perf_counter() - t0}


def approximation_recall(index: faiss.Index, gallery_emb, queries, k: int, sample: int = RECALL_SAMPLE,
                         seed: int = 0, exclude_self: bool = False) -> dict:
    """What `index` costs against exact search: over `sample` queries (sample_rows), the share of each query's exact
    k nearest gallery rows that `index` also returns among its k, averaged ('recall'; 1.0 = no loss).

    gallery_emb: the vectors the index holds, in its row order. exclude_self: leave-one-out as in search() (the
    queries are the gallery, and each query's own row is left out of both rankings).
    Returns {'recall', 'k', 'queries_sampled'}.
    """
    rows = sample_rows(len(queries), sample, seed)
    q = unit_queries(index, np.asarray(queries)[rows])
    k = clip_k(k, index.ntotal - exclude_self)
    exclude = leave_one_out(index.ntotal).of(rows) if exclude_self else None
    _, approx = knn(index, q, k, exclude)
    _, exact = knn(build_index(gallery_emb, "cpu"), q, k, exclude)
    # each query row gets its own id range (N + 1 wide), so one isin call compares all rows, and padding (-1) falls
    # in the gap between two ranges where no exact result is
    offset = np.arange(len(rows))[:, None] * (index.ntotal + 1)
    found = np.isin(exact + offset, approx + offset)
    return {"recall": float(found.mean()), "k": k, "queries_sampled": len(rows)}


def describe(report: dict) -> str:
    """One line for a person about an index's info (build_search_index's, or evaluate_run's metrics['index']): which
    index searched, why, with which parameters, and, under 'recall_vs_exact', what the approximation cost."""
    if report["exact"]:
        return f"index: exact search ({report['chosen']})"
    params = ", ".join(f"{name} {value}" for name, value in report.get("search_params", {}).items())
    line = f"index: {report['factory']} ({report['chosen']}{'; ' + params if params else ''}; {report['placement']})"
    recall = report.get("recall_vs_exact")
    if recall:
        line += (f"; recall@{recall['k']} {recall['recall']:.3f} against exact search on "
                 f"{recall['queries_sampled']:,} sampled queries")
    return line


def searchable(index: faiss.Index, spec: IndexSpec, device="auto") -> tuple[faiss.Index, dict]:
    """A loaded (CPU) index with `spec`'s search parameters and placed as build_search_index places a new one:
    (index, {'search_params', 'placement'}). The parameters are search-time only: changing them needs no rebuild."""
    params = {} if is_exact(index) else set_search_params(index, spec.nprobe, spec.ef_search)
    index, where = place(index, device)
    return index, {"search_params": params, "placement": where}
