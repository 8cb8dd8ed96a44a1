"""Search parameters chosen for a recall target, measured on the gallery itself.

The tuning queries are a seeded sample of the gallery's own vectors, each leaving only itself out (as leave-one-out
evaluation does); their exact k nearest come from a brute-force search (faiss.knn, what a flat index runs), which
also times exact search on this machine. An index's settings form ladders, each from the cheapest setting to the
dearest (IVF: nprobe 1, 2, 4, ... lists; HNSW: efSearch 16, 32, ...; a refined index: one ladder of nprobe per
refine factor); on each ladder the first setting whose recall@k reaches the target is the fastest that does, as a
search's cost only grows along it. Those first settings are timed on the same queries and the fastest wins.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import faiss
import numpy as np

from lib.retrieval.exclusion import Exclusion, leave_one_out
from lib.retrieval.faiss_index import clip_k, knn

TIME_QUERIES = 256   # tuning queries whose search is timed: enough for faiss's batched kernels, cheap to repeat
TIME_ROUNDS = 3      # the fastest of these rounds: the one least slowed by other work on a shared machine
K_FACTORS = (4, 16)  # a refined index re-ranks k x this many candidates by their full vectors (cheap: k x 16
#                      full distances beside the lists scanned), which lifts the recall a PCA projection caps
EF_FLOOR = 16        # HNSW's smallest efSearch tried (faiss searches with max(efSearch, k) anyway)
EF_CEILING = 4096    # and its largest: a graph that needs more is the wrong index for the gallery
ABANDON_AT = 2.0     # a ladder is left once a setting's search costs this many times the best setting found so far
LOWER_BOUND_Z = 1.645  # one-sided 95 %: the tuning sample's recall must reach the target by this many errors


def sample_rows(n: int, size: int, seed: int) -> np.ndarray:
    """`size` distinct rows of n drawn with `seed`, in order (all n when size >= n): the vectors an index trains on,
    the queries its tuning and approximation_recall use."""
    if size >= n:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, size, replace=False))


def set_params(index: faiss.Index, params: dict) -> dict:
    """Sets those of `params` (faiss.ParameterSpace names: nprobe, efSearch, k_factor_rf) that apply to a CPU `index`
    and returns them; the others are skipped (an IVF index has no efSearch)."""
    space, applied = faiss.ParameterSpace(), {}
    for name, value in params.items():
        try:
            space.set_index_parameter(index, name, value)
        except RuntimeError:
            continue
        applied[name] = value
    return applied


def row_recalls(exact: np.ndarray, found: np.ndarray, n: int) -> np.ndarray:
    """Share of each row's `exact` gallery rows (ids < n) that `found`'s row also holds: per-query recall@k."""
    # each row gets its own id range (n + 1 wide), so one isin call compares all rows, and padding (-1) falls in
    # the gap between two ranges where no exact result is
    offset = np.arange(len(exact))[:, None] * (n + 1)
    return np.isin(exact + offset, found + offset).mean(axis=1)


def overlap(exact: np.ndarray, found: np.ndarray, n: int) -> float:
    """recall@k of `found` against `exact`, averaged over the rows."""
    return float(row_recalls(exact, found, n).mean())


def ms_per_query(search, q: np.ndarray) -> float:
    """Milliseconds a query of the fastest of TIME_ROUNDS calls search(q[:TIME_QUERIES])."""
    q = q[:TIME_QUERIES]
    fastest = float("inf")
    for _ in range(TIME_ROUNDS):
        t0 = time.perf_counter()
        search(q)
        fastest = min(fastest, time.perf_counter() - t0)
    return 1000 * fastest / len(q)


@dataclass
class TuningSample:
    """Gallery rows used as queries, their unit vectors and exact k nearest (each leaving itself out), and exact
    search's milliseconds a query over the whole gallery."""
    rows: np.ndarray
    q: np.ndarray
    exact: np.ndarray
    k: int
    n: int
    exclude: Exclusion
    flat_ms: float


def tuned_k(k: int, n: int) -> int:
    """The k a tuning over n gallery vectors measures recall@k at: each tuning query is a gallery vector that leaves
    itself out. A saved tuning serves a search asking for the same."""
    return clip_k(k, n - 1)


def tuning_sample(x: np.ndarray, k: int, size: int, seed: int, avoid: np.ndarray | None = None) -> TuningSample:
    """The tuning queries of the unit gallery rows `x` (size of them, drawn with seed, outside `avoid`, the rows the
    index was trained on, where enough are left: a training vector sits nearer its list's centre than a new photo
    would, and overstates the recall) and their exact answers."""
    n = len(x)
    pool = np.setdiff1d(np.arange(n), np.arange(0) if avoid is None else avoid)
    rows = pool[sample_rows(len(pool), size, seed)] if len(pool) >= min(size, n) else sample_rows(n, size, seed)
    k = tuned_k(k, n)
    exclude = leave_one_out(n).for_queries(rows)

    def exact(q):
        return faiss.knn(q, x, min(k + 1, n))

    _, found = exact(x[rows])
    flat_ms = ms_per_query(exact, x[rows])
    return TuningSample(rows, x[rows], exclude.drop(found, width=k), k, n, exclude, flat_ms)


def recall_at(index: faiss.Index, s: TuningSample, params: dict) -> tuple[float, float]:
    """(recall@k, its one-sided 95 % lower bound) of `index` with `params` on the sample's queries against their
    exact answers; the bound (normal approximation over the queries) is what must reach a target, so that a
    setting that meets it by the luck of the sample is not chosen."""
    set_params(index, params)
    _, found = knn(index, s.q, s.k, s.exclude)
    per_query = row_recalls(s.exact, found, s.n)
    spread = per_query.std(ddof=1) / np.sqrt(len(per_query)) if len(per_query) > 1 else 0.0
    return float(per_query.mean()), float(per_query.mean() - LOWER_BOUND_Z * spread)


def ladders(index: faiss.Index, k: int) -> list[list[dict]]:
    """The settings of `index` to sweep, as ladders from the cheapest setting to the dearest; [[{}]] when it has none
    (a flat or an unknown index: searched as it is)."""
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is not None:
        probes = [{"nprobe": 2 ** i} for i in range(int(np.log2(ivf.nlist)) + 1)]
        if isinstance(faiss.downcast_index(index), faiss.IndexRefine):  # the most candidates first: see tune()
            return [[{**p, "k_factor_rf": f} for p in probes] for f in sorted(K_FACTORS, reverse=True)]
        return [probes]
    if isinstance(faiss.downcast_index(index), faiss.IndexHNSW):
        top = int(np.ceil(np.log2(min(max(index.ntotal, k, EF_FLOOR), EF_CEILING))))
        return [[{"efSearch": 2 ** i} for i in range(int(np.log2(EF_FLOOR)), top + 1)]]
    return [[{}]]


@dataclass
class OperatingPoint:
    """A setting of an index and what it gave on the tuning sample."""
    params: dict
    recall: float
    recall_low: float  # its one-sided 95 % lower bound, which must reach the target
    ms_per_query: float
    met: bool

    def better_than(self, other: OperatingPoint | None) -> bool:
        """Meeting the target beats missing it; then the faster; two that miss, the higher recall."""
        if other is None or self.met != other.met:
            return other is None or self.met
        return self.ms_per_query < other.ms_per_query if self.met else self.recall > other.recall


def climb(index: faiss.Index, s: TuningSample, ladder: list[dict], target: float,
          beat: OperatingPoint | None = None) -> OperatingPoint:
    """The first setting of `ladder` whose recall's lower bound reaches `target` (else its last: the highest
    recall), timed. With `beat` (a setting that met the target), the climb stops, unmet, once a setting's recall
    search takes ABANDON_AT times its time a query: the settings above cost more still."""
    limit = ABANDON_AT * beat.ms_per_query if beat is not None and beat.met else float("inf")
    for params in ladder:
        t0 = time.perf_counter()
        recall, low = recall_at(index, s, params)
        if low >= target or 1000 * (time.perf_counter() - t0) / len(s.q) > limit:
            break
    set_params(index, params)
    return OperatingPoint(params, recall, low, ms_per_query(lambda q: knn(index, q, s.k, None), s.q), low >= target)


def tune(index: faiss.Index, s: TuningSample, target: float, beat: OperatingPoint | None = None) -> OperatingPoint:
    """The fastest setting of `index` whose recall@k on the sample reaches `target` (its lower bound does; where
    none does, the one with the highest recall), set on the index; `beat`: the best setting of another index, which
    bounds how far each ladder is climbed (climb)."""
    best, floor = None, 1
    for ladder in ladders(index, s.k):
        # fewer refine candidates need at least the lists that more needed: each ladder starts where the last met
        rungs = [p for p in ladder if p.get("nprobe", floor) >= floor] or ladder[-1:]
        point = climb(index, s, rungs, target, min((p for p in (beat, best) if p is not None and p.met),
                                                   key=lambda p: p.ms_per_query, default=None))
        floor = point.params.get("nprobe", 1) if point.met else floor
        if point.better_than(best):
            best = point
    set_params(index, best.params)
    return best


def tuning_record(point: OperatingPoint, s: TuningSample, target: float, seconds: float) -> dict:
    """What the tuning chose and measured, for index.json, the evaluation record and describe()."""
    return {"target": target, "k": s.k, **asdict(point), "queries": len(s.rows), "flat_ms_per_query": s.flat_ms,
            "speedup_vs_flat": s.flat_ms / point.ms_per_query, "seconds": seconds}
