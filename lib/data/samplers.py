"""Batch samplers for metric learning: P classes × K images (plain and context-grouped); inverse-frequency sampling.

pytorch-metric-learning's MPerClassSampler is not reused: it draws from a global RNG (no seed, no set_epoch for exact
resume), does not guarantee every class per epoch, and knows nothing of contexts.
"""

import math

import numpy as np
import pandas as pd
import torch
from torch.utils.data import Sampler, WeightedRandomSampler

from lib.core.errors import DataError


def _factorize(values, what: str) -> tuple[np.ndarray, np.ndarray]:
    """(codes per item, sorted unique values); missing values are a DataError naming the first bad row."""
    codes, uniques = pd.factorize(pd.Series(values), sort=True)
    if len(codes) == 0:
        raise DataError(f"no {what}s given: the sampler needs at least one image")
    if (codes < 0).any():
        raise DataError(f"{what} is missing for item {int(np.flatnonzero(codes < 0)[0])} (0-based row)")
    return codes, np.asarray(uniques)


def _group(values: np.ndarray, by: np.ndarray) -> list[np.ndarray]:
    """values split by their key 0..max(by) (every key present), in key order."""
    order = np.argsort(by, kind="stable")
    return np.split(values[order], np.flatnonzero(np.diff(by[order])) + 1)


class PKSampler(Sampler[list[int]]):
    """Batches of P classes × K images each, as lists of dataset indices (pass as DataLoader(batch_sampler=...)).

    Epoch length: by default max(ceil(n_classes / P), round(n_images / (P·K))) batches, i.e. about one pass over
    the images but never fewer batches than it takes to show every class once; classes are dealt from shuffled
    decks so every class appears in the first ceil(n_classes / P) batches. A class with fewer than K images gives
    all of them plus repeats. Batches depend only on (seed, epoch): call `set_epoch` before each epoch, as with
    DistributedSampler, and a resumed run sees the same batches. An explicit `batches_per_epoch` is
    obeyed even when it is too short to show every class.

    Under DDP (`world` processes), every rank builds the same plan of P·world-class steps from (seed, epoch) and
    takes its own block of about P of each step's classes: ranks never share a class (so never an image) within a
    step, together they draw exactly what one process with p = P·world draws, and the epoch visits every class.
    """

    def __init__(self, labels, p: int, k: int, seed: int = 0, batches_per_epoch: int | None = None,
                 rank: int = 0, world: int = 1):
        if p < 1 or k < 1:
            raise ValueError(f"p and k must be >= 1, got p={p}, k={k}")
        if not 0 <= rank < world:
            raise ValueError(f"rank must be in [0, world), got rank={rank}, world={world}")
        self.class_of, self.classes = _factorize(labels, "label")
        self.n_classes = len(self.classes)
        if self.n_classes < world:
            raise DataError(f"{world} processes need at least {world} classes (one per process per step); the "
                            f"train split has {self.n_classes}")
        self.indices_of = _group(np.arange(len(self.class_of)), by=self.class_of)
        self.p, self.k = min(p * world, self.n_classes), k  # p: classes per step, all ranks together
        self.rank, self.world = rank, world
        self.seed, self.epoch = seed, 0
        one_pass = round(len(self.class_of) / (self.p * self.k))
        self.batches_per_epoch = batches_per_epoch or max(math.ceil(self.n_classes / self.p), one_pass)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.batches_per_epoch

    def __iter__(self):
        for batch, mine in self.steps():
            yield batch[mine]

    def steps(self):
        """(the step's batch over all ranks, the slice of it that is this rank's) for each step of the epoch."""
        rng = np.random.default_rng([self.seed, self.epoch])
        for classes in self._batch_classes(rng):
            # every rank draws every class's K images, so the generator stays in step across ranks
            batch = [int(i) for c in classes for i in self._draw_k(rng, self.indices_of[c])]
            share = np.array_split(np.arange(len(classes)), self.world)[self.rank]
            yield batch, slice(int(share[0]) * self.k, (int(share[-1]) + 1) * self.k)

    def _draw_k(self, rng: np.random.Generator, indices: np.ndarray) -> np.ndarray:
        if len(indices) >= self.k:
            return rng.choice(indices, self.k, replace=False)
        return np.concatenate([rng.permutation(indices), rng.choice(indices, self.k - len(indices))])

    def _batch_classes(self, rng: np.random.Generator) -> list[list[int]]:
        """P distinct classes per batch, dealt in order from a stream of shuffled decks of all classes."""
        deck, pos = np.empty(0, dtype=int), 0
        batches = []
        for _ in range(len(self)):
            batch = deck[pos:pos + self.p]
            pos += len(batch)
            if len(batch) < self.p:
                fresh = rng.permutation(self.n_classes)
                # Classes already in this batch go to the back of the new deck, so a batch never repeats a class.
                repeat = np.isin(fresh, batch)
                deck, pos = np.concatenate([fresh[~repeat], fresh[repeat]]), self.p - len(batch)
                batch = np.concatenate([batch, deck[:pos]])
            batches.append(batch.tolist())
        return batches


class ContextPKSampler(PKSampler):
    """P×K batches whose P classes come from one context where possible (several individuals seen at the same
    site per batch: the hard negatives re-identification must separate); when the context has fewer than P
    classes the batch is filled from other contexts, whole contexts at a time.

    The first batches of an epoch visit every class (a context is picked only while it has unvisited classes,
    its unvisited classes go first); later batches pick a context with probability proportional to
    weight × its number of classes (weights default 1; change with `set_context_weights` for hard-context
    mining). A class seen at several contexts belongs to each; its K images are drawn from all its images.
    """

    def __init__(self, labels, contexts, p: int, k: int, seed: int = 0, batches_per_epoch: int | None = None,
                 rank: int = 0, world: int = 1):
        context_of, self.contexts = _factorize(contexts, "context")
        super().__init__(labels, p, k, seed, batches_per_epoch, rank, world)
        if len(context_of) != len(self.class_of):
            raise DataError(f"got {len(self.class_of)} labels but {len(context_of)} contexts; need one per image")
        pairs = np.unique(np.stack([context_of, self.class_of]), axis=1)  # (context, class), sorted by context
        self.classes_at = _group(pairs[1], by=pairs[0])
        self.contexts_of = _group(pairs[0], by=pairs[1])
        self.context_weights = np.ones(len(self.contexts))
        if batches_per_epoch is None:
            # A context is the visiting choice at most ceil(n_c / P) times, so this many batches visit every class.
            visiting = sum(math.ceil(len(c) / self.p) for c in self.classes_at)
            self.batches_per_epoch = max(self.batches_per_epoch, visiting)

    def set_context_weights(self, weights: dict) -> None:
        """Relative sampling weight per context value (unnamed contexts keep their weight)."""
        position = {v: i for i, v in enumerate(self.contexts)}
        for context, weight in weights.items():
            if context not in position:
                raise ValueError(f"unknown context {context!r}; known: {list(self.contexts)[:10]}...")
            if weight < 0:
                raise ValueError(f"context weight must be >= 0, got {weight} for {context!r}")
            self.context_weights[position[context]] = weight

    def _batch_classes(self, rng: np.random.Generator) -> list[list[int]]:
        visited = np.zeros(self.n_classes, dtype=bool)
        n_at = np.array([len(c) for c in self.classes_at], dtype=float)
        unvisited_at = n_at.copy()
        batches = []
        for _ in range(len(self)):
            pool = unvisited_at > 0 if unvisited_at.any() else np.ones(len(n_at), dtype=bool)
            context = _weighted_choice(rng, self.context_weights * n_at * pool, fallback=pool)
            batch = self._fill(rng, context, visited)
            for cls in batch:
                if not visited[cls]:
                    visited[cls] = True
                    unvisited_at[self.contexts_of[cls]] -= 1
            batches.append(batch)
        return batches

    def _fill(self, rng: np.random.Generator, context: int, visited: np.ndarray) -> list[int]:
        """Unvisited then visited classes of `context`, then other contexts in random order, same rule in each."""
        others = rng.permutation([c for c in range(len(self.classes_at)) if c != context])
        batch: list[int] = []
        for c in [context, *others]:
            candidates = rng.permutation(self.classes_at[c])
            for cls in candidates[np.argsort(visited[candidates], kind="stable")]:
                if cls not in batch:
                    batch.append(int(cls))
                    if len(batch) == self.p:
                        return batch
        return batch


def _weighted_choice(rng: np.random.Generator, weights: np.ndarray, fallback: np.ndarray) -> int:
    """Index drawn with probability ∝ weights; uniform over `fallback` when all weights are zero."""
    if weights.sum() <= 0:
        weights = fallback.astype(float)
    return int(rng.choice(len(weights), p=weights / weights.sum()))


def weighted_sampler(labels, seed: int = 0) -> WeightedRandomSampler:
    """One draw per image, each image weighted 1 / (its class size): classes come up equally often."""
    class_of, _ = _factorize(labels, "label")
    weights = 1.0 / np.bincount(class_of)[class_of]
    return WeightedRandomSampler(torch.as_tensor(weights, dtype=torch.double), num_samples=len(class_of),
                                 replacement=True, generator=torch.Generator().manual_seed(seed))
