import math
from collections import Counter

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from lib.core.errors import DataError
from lib.data.samplers import ContextPKSampler, PKSampler, weighted_sampler

# 11 classes: sizes 1..11, so several have fewer than K=4 images.
LABELS = [f"c{c:02d}" for c in range(11) for _ in range(c + 1)]


def _classes(batch, labels=LABELS):
    return Counter(labels[i] for i in batch)


def test_batches_are_p_classes_times_k_images():
    # many seeds, so that batches straddling two shuffled decks of classes are exercised
    batches = []
    for seed in range(10):
        sampler = PKSampler(LABELS, p=3, k=4, seed=seed)
        batches += list(sampler)
        assert len(batches) == (seed + 1) * len(sampler)
    assert len(sampler) == max(math.ceil(11 / 3), round(len(LABELS) / 12))
    for batch in batches:
        counts = _classes(batch)
        assert len(batch) == 12 and len(counts) == 3 and set(counts.values()) == {4}
        for label in counts:  # a class with >= K images gives K distinct ones
            members = [i for i in batch if LABELS[i] == label]
            assert len(set(members)) == min(4, LABELS.count(label))


def test_every_class_visited_in_the_first_ceil_n_over_p_batches():
    for epoch in range(5):
        sampler = PKSampler(LABELS, p=3, k=4, seed=epoch, batches_per_epoch=4)
        sampler.set_epoch(epoch)
        seen = {LABELS[i] for batch in sampler for i in batch}
        assert seen == set(LABELS)  # includes the 1-image class c00


def test_same_seed_and_epoch_reproduce_and_other_epochs_differ():
    a, b = PKSampler(LABELS, 3, 4, seed=7), PKSampler(LABELS, 3, 4, seed=7)
    np.random.seed(0), torch.manual_seed(0)
    first = list(a)
    np.random.seed(1), torch.manual_seed(1)  # global RNG state must not matter
    assert list(b) == first
    a.set_epoch(1)
    assert list(a) != first
    a.set_epoch(0)
    assert list(a) == first
    assert list(PKSampler(LABELS, 3, 4, seed=8)) != first


def test_sampler_leaves_global_rng_untouched():
    state = np.random.get_state()[1].copy(), torch.get_rng_state()
    list(PKSampler(LABELS, 3, 4)), list(ContextPKSampler(LABELS, [lab[-1] for lab in LABELS], 3, 4))
    assert (np.random.get_state()[1] == state[0]).all() and torch.equal(torch.get_rng_state(), state[1])


def test_p_larger_than_class_count_uses_all_classes():
    sampler = PKSampler(["a", "a", "b"], p=5, k=2)
    assert sampler.p == 2
    assert all(sorted(_classes(batch, ["a", "a", "b"]).values()) == [2, 2] for batch in sampler)


def test_works_as_dataloader_batch_sampler():
    data = TensorDataset(torch.arange(len(LABELS)))
    loader = DataLoader(data, batch_sampler=PKSampler(LABELS, 2, 3))
    assert [tuple(x.shape) for (x,) in loader] == [(6,)] * len(loader)


def test_missing_label_names_the_row():
    with pytest.raises(DataError, match="item 2"):
        PKSampler(["a", "b", None], 2, 2)


# Contexts: A has 6 classes, B 4, C 1, D 2 (each class at one context).
CTX_OF_CLASS = ["A"] * 6 + ["B"] * 4 + ["C"] + ["D"] * 2
CTX_LABELS = [f"k{c:02d}" for c in range(13) for _ in range(3)]
CTX = [CTX_OF_CLASS[int(label[1:])] for label in CTX_LABELS]
CLASSES_AT = Counter(CTX_OF_CLASS)


def _context_counts(batch):
    return Counter(CTX_OF_CLASS[int(label[1:])] for label in _classes(batch, CTX_LABELS))


def test_context_batches_take_as_many_classes_of_one_context_as_it_has():
    sampler = ContextPKSampler(CTX_LABELS, CTX, p=4, k=2, seed=3, batches_per_epoch=40)
    for batch in sampler:
        counts = _context_counts(batch)
        assert sum(counts.values()) == 4 and len(batch) == 8
        # some context contributes all it can: P classes, or every class it has
        assert any(n == min(4, CLASSES_AT[c]) for c, n in counts.items())


def test_context_sampler_visits_every_class_and_reproduces():
    for seed in range(5):
        sampler = ContextPKSampler(CTX_LABELS, CTX, p=4, k=2, seed=seed)
        # default length: at least the visiting bound sum(ceil(n_c / P)) = 2 + 1 + 1 + 1
        assert len(sampler) == max(5, round(len(CTX_LABELS) / 8))
        batches = list(sampler)
        assert len(batches) == len(sampler)
        assert {CTX_LABELS[i] for b in batches for i in b} == set(CTX_LABELS)
        assert list(ContextPKSampler(CTX_LABELS, CTX, p=4, k=2, seed=seed)) == batches


def test_context_weights_steer_batches_after_the_visiting_phase():
    sampler = ContextPKSampler(CTX_LABELS, CTX, p=4, k=2, seed=0, batches_per_epoch=30)
    sampler.set_context_weights({"A": 1.0, "B": 0.0, "C": 0.0, "D": 0.0})
    leading = [_context_counts(b).most_common(1)[0] for b in sampler]
    assert all(lead == ("A", 4) for lead in leading[5:])  # the first 5 batches may visit other contexts
    with pytest.raises(ValueError, match="unknown context"):
        sampler.set_context_weights({"Z": 1.0})


def test_weighted_sampler_balances_classes_and_is_seeded():
    labels = ["a"] * 900 + ["b"] * 100
    draws = list(weighted_sampler(labels, seed=5))
    assert len(draws) == 1000 and draws == list(weighted_sampler(labels, seed=5))
    share_b = sum(labels[i] == "b" for i in draws) / len(draws)
    assert 0.42 < share_b < 0.58  # 0.1 without weighting


def test_class_seen_at_two_contexts_counts_for_both():
    labels = ["x", "x", "y", "z", "w"]
    contexts = ["A", "B", "A", "B", "B"]
    sampler = ContextPKSampler(labels, contexts, p=2, k=1, seed=0)
    assert [sorted(sampler.classes[c] for c in at) for at in sampler.classes_at] == [["x", "y"], ["w", "x", "z"]]
    assert {labels[i] for batch in sampler for i in batch} == set(labels)
