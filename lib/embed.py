"""Embedding extraction: a model and a dataset in, one float32 row per dataset row out (same order)."""
from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from lib.device import DeviceSettings


@torch.inference_mode()
def extract_embeddings(model: torch.nn.Module, dataset: Dataset, settings: DeviceSettings, batch_size: int = 64,
                       progress: bool = False, desc: str = "embed") -> np.ndarray:
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=settings.num_workers,
                        pin_memory=settings.pin_memory)
    was_training = model.training
    model.eval()
    memory_format = torch.channels_last if settings.channels_last else torch.contiguous_format
    out = []
    for x, _ in tqdm(loader, desc=desc, disable=not progress, leave=False):
        x = x.to(settings.device, non_blocking=True, memory_format=memory_format)
        with settings.autocast():
            out.append(model(x).float().cpu())
    model.train(was_training)
    return torch.cat(out).numpy() if out else np.zeros((0, 0), np.float32)
