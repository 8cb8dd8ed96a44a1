"""Checkpoints that survive a kill: fp32 weights, full training state, RNG states, written atomically."""
from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np
import torch


def fp32_state_dict(module: torch.nn.Module) -> dict:
    """Weights in fp32 whatever precision trained them, so any GPU (or the CPU) can load them."""
    return {k: (v.detach().float() if v.is_floating_point() else v.detach()).cpu() for k, v in module.state_dict().items()}


def save_checkpoint(path: str | os.PathLike, state: dict) -> None:
    """torch.save to a temp file in the same folder, then rename: a kill mid-write never leaves a broken file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: str | os.PathLike, map_location: str = "cpu") -> dict:
    # weights_only=False: checkpoints carry plain config dicts and RNG states, and they are our own files.
    return torch.load(path, map_location=map_location, weights_only=False)


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
