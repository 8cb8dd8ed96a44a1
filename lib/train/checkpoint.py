"""Checkpoints that survive a kill and cannot run code: fp32 weights, full training state, RNG states, written
atomically, read back with torch's weights-only unpickler."""
from __future__ import annotations

import io
import os
import pickle
import random
from pathlib import Path

import numpy as np
import torch

from lib.core.errors import DataError
from lib.core.state_io import atomic_file

# Set to 1 to load a checkpoint that holds other pickled objects: only for a file you made yourself.
TRUST_ENV = "PHOTO_RETRIEVAL_TRUST_CHECKPOINTS"


def _numpy_globals() -> list:
    """What numpy arrays and scalars unpickle through (numpy's RNG state in every checkpoint; numpy floats in older
    histories): data only, no code. Taken from live objects so the names match this numpy; numpy 1 wrote the same
    functions under numpy.core."""
    reconstruct, scalar = np.zeros(1).__reduce__()[0], np.float64(0).__reduce__()[0]
    dtypes = [type(np.dtype(t)) for t in (np.float64, np.float32, np.int64, np.int32, np.uint32, np.bool_)]
    return [np.ndarray, np.dtype, reconstruct, scalar, *dtypes,
            (reconstruct, "numpy.core.multiarray._reconstruct"), (scalar, "numpy.core.multiarray.scalar")]


SAFE_GLOBALS = _numpy_globals()
ALLOWED_NAMES = {g[1] if isinstance(g, tuple) else f"{g.__module__}.{g.__qualname__}" for g in SAFE_GLOBALS}


class CorruptCheckpoint(DataError):
    """A checkpoint file that cannot be read: truncated, empty, or not a checkpoint."""


def fp32_state_dict(module: torch.nn.Module) -> dict:
    """Weights in fp32 whatever precision trained them, so any GPU (or the CPU) can load them."""
    return {k: (v.detach().float() if v.is_floating_point() else v.detach()).cpu() for k, v in module.state_dict().items()}


def save_checkpoint(path: str | os.PathLike, state: dict) -> None:
    """torch.save through lib.core.state_io.atomic_file: a kill mid-write never leaves a broken file, and a failed
    write (a full disk) leaves the previous file as it was and stops the run with a message naming it."""
    path = Path(path)
    try:
        with atomic_file(path) as f:
            torch.save(state, f)
    except (OSError, RuntimeError) as e:  # torch reports a failed write inside its zip writer as a RuntimeError
        kept = "the previous one is intact" if path.exists() else "there was no previous one"
        raise DataError(f"could not write checkpoint {path} ({e}); {kept}. Free disk space and re-run to resume") from e


def load_checkpoint(path: str | os.PathLike, map_location: str = "cpu", trusted: bool | None = None,
                    data: bytes | None = None) -> dict:
    """A checkpoint through torch's weights-only unpickler: tensors, plain Python types and numpy arrays load, and a
    file holding any other pickled object (which could run code as it loads) is refused, naming what it holds. Only
    `trusted=True` (or the environment variable PHOTO_RETRIEVAL_TRUST_CHECKPOINTS=1) loads such a file, for one you
    made yourself. A truncated or unreadable file raises CorruptCheckpoint.

    data: the file's bytes, already read (lib.core.state_io.read_bytes_hashed), loaded instead of reading `path`
    again, so that a hash of them names exactly the weights loaded; `path` then only names the file in messages."""
    path = Path(path)
    trusted = os.environ.get(TRUST_ENV) == "1" if trusted is None else trusted
    source = (lambda: io.BytesIO(data)) if data is not None else (lambda: path)
    try:
        with torch.serialization.safe_globals(SAFE_GLOBALS):
            return torch.load(source(), map_location=map_location, weights_only=not trusted)
    except pickle.UnpicklingError as e:
        # the weights-only unpickler fails alike on a forbidden object and on bytes that are no pickle at all
        try:
            held = [g for g in torch.serialization.get_unsafe_globals_in_checkpoint(source())
                    if g not in ALLOWED_NAMES]
        except Exception:
            held = []
        if not held:
            raise CorruptCheckpoint(f"checkpoint {path} is truncated or corrupt (its data is no checkpoint)") from e
        raise DataError(f"refusing to load {path}: besides weights and settings it holds {', '.join(held)}, which "
                        f"could run code when loaded. Load only files you made; for one you did, set {TRUST_ENV}=1"
                        ) from None
    except (RuntimeError, EOFError, ValueError, OSError) as e:
        if isinstance(e, FileNotFoundError):
            raise
        first = (str(e).strip().splitlines() or [""])[0][:200]
        raise CorruptCheckpoint(f"checkpoint {path} is truncated or corrupt ({type(e).__name__}: {first})") from e


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
