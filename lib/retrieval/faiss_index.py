"""Faiss index (build, save beside its metadata, load), exact top-K search, search within a context (no torch).

Vectors are L2-normalised before they enter the index and before they query it, and build_index's index is an
exact IndexFlatL2 (exact search: a re-ID gallery is small enough, and no approximation error; approximate indexes for
large galleries come from lib.retrieval.ann_index and are searched, saved and loaded here alike). Distances are
squared L2 as faiss returns them; for unit vectors d² = 2 − 2·cos, so nearest-by-d² is most-similar-by-cosine and d²
lies in [0, 4].
"""

import io
import os
import re
import warnings
from pathlib import Path

import faiss
import numpy as np
import pandas as pd

from lib.core.errors import DataError
from lib.core.state_io import (atomic_file, manifest_problem, read_bytes_hashed, read_manifest, write_csv,
                                write_manifest)
from lib.retrieval.exclusion import (NO_NEIGHBOUR, Exclusion, check_sizes, fewest_left_out, for_queries,
                                     most_left_out)

SEARCH_BATCH = 4096  # queries per faiss call in search(): bounds its (batch, k) result buffers


def unit_rows(x, what: str) -> np.ndarray:
    """float32, C-contiguous, L2-normalised copy of a (n, d) float array, or a clear error."""
    x = np.asarray(x)
    if x.ndim != 2 or 0 in x.shape:
        raise ValueError(f"{what} must be a non-empty (n, d) array, got shape {x.shape}")
    if not np.issubdtype(x.dtype, np.floating):
        raise TypeError(f"{what} must be floating point, got {x.dtype}")
    x = np.ascontiguousarray(x, dtype=np.float32)  # faiss reads float32 C-contiguous buffers only
    bad = np.flatnonzero(~np.isfinite(x).all(axis=1))
    if len(bad):
        raise DataError(
            f"{what}: {len(bad)} rows contain NaN or inf (rows {bad[:10].tolist()}); the model produced "
            "non-finite embeddings (diverged training, fp16 overflow?)"
        )
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    zero = np.flatnonzero(norms[:, 0] == 0)
    if len(zero):
        raise DataError(f"{what}: {len(zero)} rows are all zero (rows {zero[:10].tolist()}); they have no direction")
    return x / norms


def gpu_id(device) -> int | None:
    """GPU number for the index, or None for the CPU."""
    device = str(device)  # accepts a torch.device too
    if device == "cpu":
        return None
    if device != "auto" and not re.fullmatch(r"cuda(:\d+)?", device):
        raise ValueError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {device!r}")
    n_gpus = faiss.get_num_gpus()
    if n_gpus == 0:
        if device != "auto":
            # a CUDA torch beside faiss-cpu is a common install; the search still works, only slower
            warnings.warn(f"device={device!r} but this faiss build sees no GPU (faiss-cpu?): index stays on the CPU")
        return None
    gpu = int(device.partition(":")[2] or 0)
    if gpu >= n_gpus:
        raise ValueError(f"device={device!r} but faiss sees {n_gpus} GPU(s): cuda:0 to cuda:{n_gpus - 1}")
    return gpu


# one per GPU for this process's life (see gpu_resources)
_GPU_RESOURCES: dict = {}


def gpu_resources(gpu: int):
    """This process's faiss.StandardGpuResources for GPU `gpu`, made on first use and shared by every index placed
    there after it. Each such object reserves its own scratch memory on the card (faiss's default is a share of it),
    which a model training beside it needs: one per index would reserve it again for every validation and for each
    context of search_within. Holding them here also keeps them alive as long as their indexes (faiss's Python
    wrapper does not, and a search after they are collected crashes). Like faiss's, not for two threads at once."""
    if gpu not in _GPU_RESOURCES:
        _GPU_RESOURCES[gpu] = faiss.StandardGpuResources()
    return _GPU_RESOURCES[gpu]


def build_index(embeddings, device="auto") -> faiss.Index:
    """Exact IndexFlatL2 over the L2-normalised rows of `embeddings` (n, d); on the GPU when faiss has one.

    device: 'auto' (GPU if faiss sees one), 'cpu', 'cuda' or 'cuda:N'. Index row i is embeddings row i.
    A GPU index must go through faiss.index_gpu_to_cpu before it is serialised (save_index does).
    """
    x = unit_rows(embeddings, "embeddings")
    index = on_device(faiss.IndexFlatL2(x.shape[1]), device)
    index.add(x)
    return index


def faiss_device_for(torch_device) -> str:
    """Where Faiss runs beside a model on `torch_device` (a settings.device): the CPU with a CPU model, also where
    faiss-gpu is installed; the model's own GPU for 'cuda:N' (under DDP, each rank's); 'auto' for plain 'cuda' (GPU 0
    for an exact index, every GPU, sharded, for an approximate one). With faiss-cpu beside a CUDA torch (a common
    install, no error) the CPU."""
    device = str(torch_device)
    if device == "cpu" or faiss.get_num_gpus() == 0:
        return "cpu"
    return device if re.fullmatch(r"cuda:\d+", device) else "auto"


def on_device(index: faiss.Index, device) -> faiss.Index:
    """A CPU index on the one GPU `device` names (as build_index's device), or the index itself for the CPU."""
    gpu = gpu_id(device)
    if gpu is None:
        return index
    return faiss.index_cpu_to_gpu(gpu_resources(gpu), gpu, index)


def unit_queries(index: faiss.Index, queries) -> np.ndarray:
    """unit_rows of the queries, checked against the index's dimension."""
    q = unit_rows(queries, "queries")
    if q.shape[1] != index.d:
        raise ValueError(f"queries have dimension {q.shape[1]} but the index holds dimension {index.d}")
    return q


def clip_k(k: int, available: int) -> int:
    """k clipped to the vectors a query may retrieve; k < 1 or nothing to retrieve is an error."""
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if available < 1:
        raise ValueError("nothing to search: the index has no vector a query may retrieve")
    return min(k, available)


def knn(index: faiss.Index, q: np.ndarray, k: int, exclude: Exclusion | None = None):
    """index.search of unit query rows, and with `exclude` (lib.retrieval.exclusion, one key per query row) the gallery
    rows it leaves out of each query's results removed. A row with fewer than k results left (an approximate index
    found fewer, or a group holds most of the gallery) ends in NO_NEIGHBOUR at distance inf."""
    distances, indices = index.search(q, min(k + most_left_out(exclude), index.ntotal))
    # faiss pads with -1 at the float32 maximum; inf is the padding search_within and the votes already know
    distances[indices == NO_NEIGHBOUR] = np.inf
    if exclude is None:
        return distances, indices
    # an exact duplicate may tie with the query and come first, so left-out rows are dropped by index, not position
    indices, distances = exclude.drop(indices, distances, width=k)
    return distances, indices


def search(index: faiss.Index, queries, k: int, batch_size: int = SEARCH_BATCH, exclude: Exclusion | None = None):
    """(distances, indices), each (n_q, k), nearest first: squared L2 (= 2 − 2·cos) as float32, index rows as int64.

    Queries are L2-normalised as build_index's vectors are. k is clipped to the number of vectors a query
    can retrieve. Queries go to faiss `batch_size` at a time to bound memory.
    exclude (lib.retrieval.exclusion; one key per query and per indexed vector): the rows each query may not find,
    e.g. leave-one-out's own row, or its whole group, so a query in a large group may get fewer than k (the row ends
    in padding).
    """
    q = unit_queries(index, queries)
    check_sizes(exclude, len(q), index.ntotal)
    k = clip_k(k, index.ntotal - fewest_left_out(exclude))
    distances = np.empty((len(q), k), dtype=np.float32)
    indices = np.empty((len(q), k), dtype=np.int64)
    for start in range(0, len(q), batch_size):
        rows = np.arange(start, min(start + batch_size, len(q)))
        distances[rows], indices[rows] = knn(index, q[rows], k, for_queries(exclude, rows))
    return distances, indices


def search_within(gallery_emb, gallery_keys, query_emb, query_keys, k: int, exclude: Exclusion | None = None,
                  device="auto"):
    """search() where each query retrieves only gallery rows with its key (e.g. a street tree is looked for among the
    trees at its address; a photo among the individuals of its camera site).

    Returns (distances, indices) like search(), indices into the whole gallery, k columns (clipped to what the
    largest searched context holds). A query whose context holds fewer than k photos (minus the rows `exclude` leaves
    out of its ranking, as in search()) gets them all, and the rest of its row is padding: index NO_NEIGHBOUR,
    distance inf. A query whose context has nothing to retrieve is an error naming it.
    """
    g_keys, q_keys = np.asarray(gallery_keys).astype(str), np.asarray(query_keys).astype(str)
    if len(g_keys) != len(gallery_emb) or len(q_keys) != len(query_emb):
        raise ValueError(f"{len(gallery_emb)} gallery embeddings for {len(g_keys)} keys, {len(query_emb)} query "
                         f"embeddings for {len(q_keys)} keys")
    check_sizes(exclude, len(q_keys), len(g_keys))
    contexts, n_queries = np.unique(q_keys, return_counts=True)
    asking = {c: np.flatnonzero(q_keys == c) for c in contexts}
    members = {c: np.flatnonzero(g_keys == c) for c in contexts}
    available = {c: len(members[c]) - fewest_left_out(for_queries(exclude, asking[c], members[c])) for c in contexts}
    empty = [f"{str(c)!r} ({n} queries)" for c, n in zip(contexts, n_queries) if available[c] < 1]
    if empty:
        raise DataError(f"no gallery photo to search in context {', '.join(empty[:5])}"
                        + (f" and {len(empty) - 5} more" if len(empty) > 5 else "")
                        + (" outside the queries' own group" if exclude is not None and exclude.rule == "group" else "")
                        + ": give these photos a context the gallery has, or search without the restriction")
    k = clip_k(k, max(available.values()))
    distances = np.full((len(q_keys), k), np.inf, dtype=np.float32)
    indices = np.full((len(q_keys), k), NO_NEIGHBOUR, dtype=np.int64)
    for c in contexts:
        rows = asking[c]
        index = build_index(np.asarray(gallery_emb)[members[c]], device)
        k_c = min(k, available[c])
        distances[rows, :k_c], local = search(index, np.asarray(query_emb)[rows], k_c,
                                              exclude=for_queries(exclude, rows, members[c]))
        indices[rows, :k_c] = np.where(local == NO_NEIGHBOUR, NO_NEIGHBOUR, members[c][local])
    return distances, indices


def fill_padding(neighbours: np.ndarray) -> np.ndarray:
    """Neighbour rows with each padding entry (NO_NEIGHBOUR) replaced by the row's first neighbour, for label
    lookups: the padding then adds no class to a row, and as its distance is inf it carries no vote."""
    neighbours = np.asarray(neighbours)
    return np.where(neighbours == NO_NEIGHBOUR, neighbours[:, :1], neighbours)


METADATA_COLUMNS = ("path", "label", "group", "context")  # what a search result says about each gallery row
INDEX_FILES = ("index.faiss", "metadata.csv")  # what save_index writes before its manifest
INDEX_MANIFEST = "index.json"  # written last: what made the index, and the sha256 and size of INDEX_FILES


class StaleIndex(DataError):
    """A saved index whose files are not those its manifest names (a save stopped half way, a torn or replaced
    file, an index saved before manifests): never searched; its users rebuild it."""


def save_index(index: faiss.Index, metadata: pd.DataFrame, folder: str | os.PathLike, info: dict | None = None) -> Path:
    """index.faiss + metadata.csv (row i describes index row i), each written atomically, then index.json (`info`:
    what made it, and each file's sha256) last: a kill between the files leaves a manifest that no longer matches,
    which load_index refuses as stale rather than serve one file of this save beside one of the last."""
    if index.ntotal != len(metadata):
        raise ValueError(f"the index holds {index.ntotal} vectors but the metadata {len(metadata)} rows")
    folder = Path(folder)
    if type(index).__name__.startswith("Gpu") or isinstance(index, (faiss.IndexShards, faiss.IndexReplicas)):
        index = faiss.index_gpu_to_cpu(index)  # faiss serialises CPU indexes only (shards are merged back)
    with atomic_file(folder / "index.faiss") as f:
        f.write(faiss.serialize_index(index))
    write_csv(folder / "metadata.csv", metadata.reset_index(drop=True))
    write_manifest(folder, INDEX_MANIFEST, list(INDEX_FILES), info or {})
    return folder


def load_index(folder: str | os.PathLike, device="cpu") -> tuple[faiss.Index, pd.DataFrame, dict]:
    """(index, metadata, info) as save_index wrote them; device as in build_index. StaleIndex (a DataError) when the
    files are not those the manifest names, or cannot be read."""
    folder = Path(folder)
    if not (folder / "index.faiss").exists():
        raise DataError(f"no saved index in {folder} (index.faiss missing)")
    manifest = read_manifest(folder, INDEX_MANIFEST)
    index, metadata = _read_checked(folder, manifest)
    if index.ntotal != len(metadata):
        raise DataError(f"{folder}: index.faiss holds {index.ntotal} vectors but metadata.csv {len(metadata)} rows; "
                        "the two files come from different saves")
    return on_device(index, device), metadata, {k: v for k, v in manifest.items() if k != "files"}


def _read_checked(folder: Path, manifest: dict | None) -> tuple[faiss.Index, pd.DataFrame]:
    """index.faiss and metadata.csv, each read once and checked against the sha256 the manifest records (hashed from
    the bytes read, so a save landing meanwhile cannot slip in unchecked); else StaleIndex saying why."""
    problem = manifest_problem(folder, manifest, check_hash=False)
    try:
        if not problem:
            data = {name: read_bytes_hashed(folder / name) for name in INDEX_FILES}
            problem = next((f"{name} does not match the sha256 its manifest records" for name, (_, sha) in data.items()
                            if sha != manifest["files"].get(name, {}).get("sha256")), "")
        if not problem:
            return (faiss.deserialize_index(np.frombuffer(data["index.faiss"][0], dtype=np.uint8)),
                    pd.read_csv(io.BytesIO(data["metadata.csv"][0]), dtype=str, keep_default_na=False))
    except (OSError, RuntimeError, ValueError, pd.errors.ParserError) as e:  # faiss raises RuntimeError
        problem = f"it cannot be read ({type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:200]})"
    raise StaleIndex(f"the saved index in {folder} is stale: {problem} (a save stopped half way, or files from "
                     "different saves); it is rebuilt where it is used, or delete the folder")


def search_table(index: faiss.Index, metadata: pd.DataFrame, queries, k: int) -> pd.DataFrame:
    """Top-k gallery rows of each query as one long table: query (row of `queries`), rank (1 = nearest),
    gallery_row, the metadata's path/label/group[/context], distance (squared L2). One query may be a (d,) vector.
    """
    queries = np.asarray(queries)
    distances, indices = search(index, queries[None] if queries.ndim == 1 else queries, k)
    n_q, k = indices.shape
    cols = [c for c in METADATA_COLUMNS if c in metadata.columns]
    table = metadata[cols].iloc[indices.ravel()].reset_index(drop=True)
    table.insert(0, "gallery_row", indices.ravel())
    table.insert(0, "rank", np.tile(np.arange(1, k + 1), n_q))
    table.insert(0, "query", np.repeat(np.arange(n_q), k))
    table["distance"] = distances.ravel()
    return table
