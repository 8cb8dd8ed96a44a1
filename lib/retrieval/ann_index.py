"""Faiss indexes for galleries too large for exact search: a named kind or any faiss.index_factory string, trained on
(a sample of) the gallery, its search-time parameters tuned to a recall target (lib.retrieval.index_tuning) unless
given, placed on the GPU(s) when faiss has them, and what the approximation costs: recall@k of its results against
exact search, measured on a sample of the queries.

Kinds: 'flat' (exact, lib.retrieval.faiss_index.build_index), 'ivf' (inverted lists of full vectors), 'hnsw' (a
navigable graph over full vectors), 'ivfpq' (inverted lists of product-quantised codes: about 1/27 of the memory,
and the least recall), 'auto' (exact below `exact_below` gallery vectors; from there on IVF, or IVF over a PCA
projection re-ranked by the full vectors, whichever answers fastest at the recall target, and exact search where
neither is clearly faster than it, all measured on the gallery). Every kind ranks by squared L2 between unit
vectors like the exact index, so distances, thresholds and votes mean the same whichever index found the neighbours.
"""
from __future__ import annotations

import math
import re
import time
import warnings
from dataclasses import asdict, dataclass

import faiss
import numpy as np

from lib.retrieval.decide import DEFAULT_K
from lib.retrieval.exclusion import Exclusion, check_sizes, fewest_left_out, for_queries
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
from lib.retrieval.index_tuning import overlap, sample_rows, set_params, tune, tuned_k, tuning_record, tuning_sample

INDEX_KINDS = ("flat", "ivf", "hnsw", "ivfpq", "auto")
RECALL = 0.95        # recall@k against exact search that the search parameters are tuned to reach
# 'auto': below this many vectors exact search without measuring: it costs well under a millisecond a query there,
# tuning an index would cost more than it saves, and a small gallery's search stays the same from run to run
AUTO_EXACT_BELOW = 10_000
# 'auto': the tuned index must answer this much faster than exact search at the target recall, or exact search is
# kept; the margin keeps the noise of timing on a shared machine from choosing
AUTO_MIN_SPEEDUP = 1.5
NPROBE = None        # IVF lists a query visits; None: tuned to the recall target
EF_SEARCH = None     # HNSW candidates a query keeps while walking the graph; None: tuned
HNSW_M = 32          # HNSW links per vector: faiss's usual choice for a few hundred dimensions
HNSW_EF_CONSTRUCTION = 80  # candidates while linking: faiss's 40 loses recall as the graph grows
LISTS_PER_ROOT = 4   # IVF lists per sqrt(n): the Faiss wiki's 4-16 sqrt(n), its low end to bound the training cost
TRAIN_PER_LIST = 39  # k-means training vectors per IVF list: faiss's minimum; more costs time and gains little
TRAIN_MIN = 10_000   # at least this many (if the gallery has them): 8-bit PQ codebooks want 39 x 256
RECALL_SAMPLE = 1000  # gallery vectors that tune the index; queries whose recall against exact search is reported
PCA_VARIANCE = 0.8   # a PCA-reduced candidate keeps the components holding this share of the variance ...
PCA_MIN = 32         # ... at least this many, and is tried only where that is at most a quarter of the dimension


@dataclass(frozen=True)
class IndexSpec:
    """Which index to build for a gallery and how to search it (notebook 03's `index`, `recall`, `nprobe`,
    `ef_search`). The search parameters are tuned to reach `recall` unless nprobe / ef_search are given."""
    index: str = "auto"             # a kind of INDEX_KINDS, or a faiss.index_factory string such as "IVF1024,PQ64"
    recall: float = RECALL          # recall@k against exact search the tuned search parameters reach
    k: int = DEFAULT_K              # the neighbours whose recall is tuned: the voting k
    nprobe: int | None = NPROBE     # IVF: lists visited per query (None: tuned)
    ef_search: int | None = EF_SEARCH  # HNSW: candidate list per query (None: tuned)
    exact_below: int = AUTO_EXACT_BELOW  # 'auto': exact search without measuring below this many vectors
    train_size: int = 0             # vectors the index is trained on; 0: TRAIN_PER_LIST per IVF list, >= TRAIN_MIN
    recall_sample: int = RECALL_SAMPLE  # gallery vectors that tune it; queries whose recall is reported
    seed: int = 0                   # draws the training, tuning and recall samples

    def __post_init__(self):
        for name in ("nprobe", "ef_search", "recall_sample", "k"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.train_size < 0 or self.exact_below < 0:
            raise ValueError(f"train_size and exact_below must be >= 0, got {self.train_size}, {self.exact_below}")
        if not 0 < self.recall <= 1:
            raise ValueError(f"recall must be in (0, 1], got {self.recall}")

    def explicit(self) -> dict:
        """The search parameters given (faiss.ParameterSpace names), which override the tuning."""
        return {name: value for name, value in (("nprobe", self.nprobe), ("efSearch", self.ef_search))
                if value is not None}


def n_lists(n: int) -> int:
    """IVF lists for n vectors: the power of two nearest LISTS_PER_ROOT x sqrt(n), and at most n / 39 so that
    k-means has the 39 training vectors per list faiss asks for."""
    lists = 2 ** round(math.log2(LISTS_PER_ROOT * math.sqrt(max(n, 1))))
    return max(1, min(lists, 2 ** int(math.log2(max(n // 39, 1)))))


def pq_subquantizers(d: int) -> int:
    """Product-quantiser sub-vectors for dimension d: about one byte per 8 dimensions (64 bytes for 512-d, 1/32 of
    the float32 vector; with its 8-byte id, 1/27), and a divisor of d as faiss requires."""
    return max(m for m in range(1, max(d // 8, 1) + 1) if d % m == 0)


def resolve_factory(index: str, n: int, d: int, exact_below: int = AUTO_EXACT_BELOW) -> tuple[str, str]:
    """(faiss factory string, why that one) for the setting `index` and a gallery of n vectors of dimension d; for
    'auto' from exact_below on, the first candidate build_search_index measures."""
    kind = index.strip().lower()
    if kind == "auto":
        if n < exact_below:
            return "Flat", f"auto: {n:,} gallery vectors < {exact_below:,}, exact search"
        return f"IVF{n_lists(n)},Flat", f"auto: {n:,} gallery vectors >= {exact_below:,}"
    named = {"flat": "Flat", "ivf": f"IVF{n_lists(n)},Flat", "hnsw": f"HNSW{HNSW_M}",
             "ivfpq": f"IVF{n_lists(n)},PQ{pq_subquantizers(d)}"}
    if kind in named:
        return named[kind], f"index={kind!r}"
    return index.strip(), "factory string"


def reduced_width(x: np.ndarray) -> int | None:
    """Dimensions of a PCA-reduced candidate for unit vectors x (a sample): the power of two at or above the
    components holding PCA_VARIANCE of their variance, at least PCA_MIN; None where that is over a quarter of the
    dimension (no low intrinsic dimension to exploit)."""
    spectrum = np.linalg.eigvalsh(np.cov(x, rowvar=False, dtype=np.float64))[::-1]
    needed = int(np.searchsorted(np.cumsum(spectrum) / spectrum.sum(), PCA_VARIANCE)) + 1
    width = max(PCA_MIN, 2 ** math.ceil(math.log2(needed)))
    return width if 4 * width <= x.shape[1] else None


def auto_candidates(x: np.ndarray, seed: int) -> list[str]:
    """The indexes 'auto' builds and measures for unit vectors x: IVF over the full vectors, and where the vectors'
    variance lies in few dimensions IVF over their PCA projection, its results re-ranked by the full vectors (so its
    distances are exact ones)."""
    lists = n_lists(len(x))
    width = reduced_width(x[sample_rows(len(x), TRAIN_MIN, seed)])
    return [f"IVF{lists},Flat"] + ([f"PCA{width},IVF{lists},Flat,RFlat"] if width else [])


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


def _filled(factory: str, x: np.ndarray, spec: IndexSpec) -> tuple[faiss.Index, np.ndarray]:
    """(CPU index `factory` trained on a sample of the unit rows x and holding them all, the rows trained on)."""
    cpu = new_index(factory, x.shape[1])
    if spec.index.strip().lower() == "hnsw":
        faiss.downcast_index(cpu).hnsw.efConstruction = HNSW_EF_CONSTRUCTION
    rows = sample_rows(len(x), _train_size(cpu, spec), spec.seed) if not cpu.is_trained else np.arange(0)
    try:
        if len(rows):
            cpu.train(x[rows])
        cpu.add(x)
    except RuntimeError as e:
        raise ValueError(f"index={spec.index!r} ({factory}) could not be built over {len(x):,} vectors: "
                         f"{_faiss_reason(e)}") from None
    return cpu, rows


def _tuned(x: np.ndarray, spec: IndexSpec, factories: list[str]) -> tuple[faiss.Index, str, np.ndarray,
                                                                          dict | None]:
    """(CPU index, its factory, rows trained on, tuning record or None): the index given search parameters where
    `spec` gives some that apply to it; else of `factories`, each built and tuned to spec.recall, the fastest."""
    cpu, rows = _filled(factories[0], x, spec)
    if set_params(cpu, spec.explicit()):
        return cpu, factories[0], rows, None
    t0 = time.perf_counter()
    sample = tuning_sample(x, spec.k, spec.recall_sample, spec.seed, avoid=rows)
    best, tried = None, []
    for factory in factories:
        if tried:  # the previous candidate is dropped before the next is built: at most two in memory
            cpu, rows = _filled(factory, x, spec)
        point = tune(cpu, sample, spec.recall, best and best[3])
        tried.append({"factory": factory, **asdict(point)})
        if point.better_than(best and best[3]):
            best = (cpu, factory, rows, point)
    cpu, factory, rows, point = best
    record = tuning_record(point, sample, spec.recall, time.perf_counter() - t0)
    return cpu, factory, rows, {**record, "factory": factory, "candidates": tried}


def _auto_why(tuning: dict) -> tuple[bool, str]:
    """(exact search rather than the tuned index, why) for 'auto', from the tuning's measurements."""
    speedup, k, target = tuning["speedup_vs_flat"], tuning["k"], tuning["target"]
    if not tuning["met"]:
        return True, f"auto: exact search, no index tried reached recall@{k} {target} (best {tuning['recall']:.3f})"
    if speedup < AUTO_MIN_SPEEDUP:
        return True, (f"auto: exact search, the fastest index at recall@{k} >= {target} ({tuning['factory']}) "
                      f"answered only {speedup:.1f}x as fast (measured; needs {AUTO_MIN_SPEEDUP}x)")
    return False, f"auto: fastest at recall@{k} >= {target}, {speedup:.1f}x exact search (measured)"


def build_search_index(embeddings, spec: IndexSpec = IndexSpec(), device="auto") -> tuple[faiss.Index, dict]:
    """(index over the L2-normalised rows of `embeddings`, info) as `spec` asks; index row i is embeddings row i.

    An approximate index's search parameters are tuned to spec.recall (lib.retrieval.index_tuning) unless spec gives
    them; 'auto' from spec.exact_below vectors on builds and tunes its candidates (auto_candidates) and keeps the
    fastest, or exact search where that is not AUTO_MIN_SPEEDUP times faster than exact search.
    info: spec (as a dict), factory, chosen (why that index), exact, search_params (those that apply), tuning
    (index_tuning.tuning_record with the factory and every candidate tried; None where parameters were given),
    train_rows, placement, build_seconds. A flat index is build_index's, unchanged.
    """
    t0 = time.perf_counter()
    n, d = np.shape(embeddings)
    factory, why = resolve_factory(spec.index, n, d, spec.exact_below)
    info = {"spec": asdict(spec), "factory": factory, "chosen": why}
    exact = is_exact(new_index(factory, d))
    if not exact:
        x = unit_rows(embeddings, "embeddings")
        auto = spec.index.strip().lower() == "auto"
        cpu, factory, rows, tuning = _tuned(x, spec, auto_candidates(x, spec.seed) if auto else [factory])
        info.update(factory=factory, tuning=tuning)
        if auto and tuning is not None:
            exact, info["chosen"] = _auto_why(tuning)
        elif tuning is not None and not tuning["met"]:
            warnings.warn(f"{factory} reaches recall@{tuning['k']} {tuning['recall']:.3f} at best, short of the "
                          f"target {spec.recall}: searched at that setting (a finer index, or exact, would reach it)")
    if exact:
        index = build_index(embeddings, device)  # the exact path stays what it always was
        return index, {**info, "factory": "Flat", "exact": True, "search_params": {}, "train_rows": 0,
                       "placement": "gpu" if type(index).__name__.startswith("Gpu") else "cpu",
                       "build_seconds": time.perf_counter() - t0}
    params = set_params(cpu, spec.explicit() if tuning is None else tuning["params"])
    index, where = place(cpu, device)
    return index, {**info, "exact": False, "search_params": params, "train_rows": len(rows), "placement": where,
                   "build_seconds": time.perf_counter() - t0}


def approximation_recall(index: faiss.Index, gallery_emb, queries, k: int, sample: int = RECALL_SAMPLE,
                         seed: int = 0, exclude: Exclusion | None = None) -> dict:
    """What `index` costs against exact search: over `sample` queries (sample_rows), the share of each query's exact
    k nearest gallery rows that `index` also returns among its k, averaged ('recall'; 1.0 = no loss).

    gallery_emb: the vectors the index holds, in its row order. exclude (lib.retrieval.exclusion, one key per query):
    the rows each query may not find (leave-one-out's own row, or its group), left out of both rankings as search()
    leaves them out.
    Returns {'recall', 'k', 'queries_sampled'}.
    """
    rows = sample_rows(len(queries), sample, seed)
    q = unit_queries(index, np.asarray(queries)[rows])
    check_sizes(exclude, len(queries), index.ntotal)
    k = clip_k(k, index.ntotal - fewest_left_out(exclude))
    sampled = for_queries(exclude, rows)
    _, approx = knn(index, q, k, sampled)
    _, exact = knn(build_index(gallery_emb, "cpu"), q, k, sampled)
    return {"recall": overlap(exact, approx, index.ntotal), "k": k, "queries_sampled": len(rows)}


def describe(report: dict) -> str:
    """One line for a person about an index's info (build_search_index's, or evaluate_run's metrics['index']): which
    index searched, why, with which parameters, what its tuning measured, and, under 'recall_vs_exact', what the
    approximation cost on the queries searched."""
    tuning = report.get("tuning")
    tuned = (f"; tuned in {tuning['seconds']:.1f} s on {tuning['queries']:,} gallery vectors: recall@{tuning['k']} "
             f"{tuning['recall']:.3f} (target {tuning['target']}) at {tuning['speedup_vs_flat']:.1f}x exact search's "
             "speed") if tuning else ""
    if report["exact"]:
        return f"index: exact search ({report['chosen']}{tuned})"
    params = ", ".join(f"{name} {value}" for name, value in report.get("search_params", {}).items())
    line = (f"index: {report['factory']} ({report['chosen']}{'; ' + params if params else ''}; "
            f"{report['placement']}{tuned})")
    recall = report.get("recall_vs_exact")
    if recall:
        line += (f"; recall@{recall['k']} {recall['recall']:.3f} against exact search on "
                 f"{recall['queries_sampled']:,} sampled queries")
    return line


def retune(index: faiss.Index, spec: IndexSpec, train_rows: int = 0) -> dict:
    """Tunes the search parameters of a built CPU `index` to spec.recall, without rebuilding it: the tuning sample's
    exact answers come from the vectors the index holds (exact for IVF-Flat, HNSW and refined indexes; a PQ index
    gives back its codes' approximations); train_rows: how many it was trained on (with spec.seed, which). Returns
    the tuning record."""
    t0 = time.perf_counter()
    trained = sample_rows(index.ntotal, train_rows, spec.seed) if train_rows else None
    sample = tuning_sample(index.reconstruct_n(0, index.ntotal), spec.k, spec.recall_sample, spec.seed, trained)
    point = tune(index, sample, spec.recall)
    return tuning_record(point, sample, spec.recall, time.perf_counter() - t0)


def searchable(index: faiss.Index, spec: IndexSpec, device="auto", built: dict | None = None) -> tuple[faiss.Index,
                                                                                                      dict]:
    """A loaded (CPU) index with its search parameters and placed as build_search_index places a new one: (index,
    {'search_params', 'placement'} and 'tuning' where it was re-tuned). The parameters are spec's where it gives
    them, else those tuned when it was built (`built`: its info) when spec asks for the same recall@k, else tuned
    again here (retune). Search parameters need no rebuild."""
    tuning = None
    params = {} if is_exact(index) else set_params(index, spec.explicit())
    saved = (built or {}).get("tuning") or {}
    if not is_exact(index) and not params:
        if (saved.get("target"), saved.get("k")) == (spec.recall, tuned_k(spec.k, index.ntotal)):
            params = set_params(index, saved["params"])
        else:
            tuning = retune(index, spec, (built or {}).get("train_rows", 0))
            params = tuning["params"]
    index, where = place(index, device)
    return index, {"search_params": params, "placement": where, **({"tuning": tuning} if tuning else {})}
