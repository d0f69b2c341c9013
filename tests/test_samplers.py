"""Batch samplers: epoch coverage, determinism, rank disjointness, replacement rules, id uniqueness, hard batches."""

from collections import Counter

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from metrank.samplers import SAMPLERS, HardBatchSampler, PKBatchSampler, UniqueIdBatchSampler, create_sampler


def flat(batches):
    return [i for b in batches for i in b]


def test_pk_epoch_sees_every_sample_once_in_p_by_k_batches():
    labels = np.repeat(np.arange(12), 8)
    sampler = PKBatchSampler(labels, p=4, k=4, seed=0)
    batches = list(sampler)
    assert len(batches) == len(sampler) == 12 * 8 // 16
    assert sorted(flat(batches)) == list(range(len(labels)))
    for b in batches:
        assert sorted(Counter(labels[b]).values()) == [4, 4, 4, 4]
    # balanced data: each pass of 12 / 4 = 3 batches visits every class exactly once
    for start in range(0, len(batches), 3):
        classes = [c for b in batches[start : start + 3] for c in set(labels[b])]
        assert sorted(classes) == list(range(12))


def test_pk_deterministic_by_seed_and_reshuffled_per_epoch():
    labels = np.repeat(np.arange(10), 6)
    a, b, c = (PKBatchSampler(labels, p=5, k=3, seed=s) for s in (1, 1, 2))
    assert list(a) == list(b)
    assert list(a) != list(c)
    first = list(a)
    a.set_epoch(1)
    second = list(a)
    assert second != first and sorted(flat(second)) == sorted(flat(first))
    a.set_epoch(0)
    assert list(a) == first


def test_pk_ranks_are_disjoint_and_cover_the_global_epoch():
    labels = np.repeat(np.arange(20), 4)
    full = list(PKBatchSampler(labels, p=4, k=4, seed=3, rank=0, world_size=1))
    r0 = list(PKBatchSampler(labels, p=4, k=4, seed=3, rank=0, world_size=2))
    r1 = list(PKBatchSampler(labels, p=4, k=4, seed=3, rank=1, world_size=2))
    assert len(r0) == len(r1) == len(full) // 2 == 2
    assert not set(flat(r0)) & set(flat(r1))
    assert sorted(map(tuple, r0 + r1)) == sorted(map(tuple, full[:4]))  # odd batch dropped for equal lengths
    padded = [list(PKBatchSampler(labels, p=4, k=4, seed=3, rank=r, world_size=2, drop_last=False)) for r in (0, 1)]
    assert len(padded[0]) == len(padded[1]) == 3


def test_pk_small_classes_use_replacement_or_raise():
    labels = np.array([0] * 2 + [1] * 6 + [2] * 5 + [3] * 4 + [4] * 3)
    batches = list(PKBatchSampler(labels, p=2, k=4, seed=0, drop_last=False))
    assert sorted(set(flat(batches))) == list(range(len(labels)))  # every item, leftovers in smaller batches
    for b in batches:
        for c, items in _groups(b, labels).items():
            assert len(items) % 4 == 0
            if c in (0, 4):
                assert len(set(items)) == len(np.flatnonzero(labels == c))  # drawn with replacement
            else:
                assert len(set(items)) == 4  # a group never repeats an item
    with pytest.raises(ValueError, match=r"fewer than k=4 items \(e\.g\. \[0, 4\]\)"):
        PKBatchSampler(labels, p=2, k=4, allow_replacement=False)


def _groups(batch, labels):
    out = {}
    for i in batch:
        out.setdefault(int(labels[i]), []).append(i)
    return out


def test_pk_hierarchical_batches_come_from_one_super_class():
    classes_per_super, supers = 8, 4
    labels = np.repeat(np.arange(classes_per_super * supers), 4)
    super_labels = labels // classes_per_super
    hier = list(PKBatchSampler(labels, p=4, k=4, seed=0, super_labels=super_labels))
    plain = list(PKBatchSampler(labels, p=4, k=4, seed=0))
    one_super = [len(set(super_labels[b])) == 1 for b in hier]
    assert all(one_super) and len(hier) == len(plain) == 8
    assert np.mean([len(set(super_labels[b])) == 1 for b in plain]) < 0.5
    with pytest.raises(ValueError, match="span several super-classes"):
        PKBatchSampler(labels, p=4, k=4, super_labels=np.arange(len(labels)) % 2)


def test_pk_works_as_dataloader_batch_sampler():
    labels = torch.arange(6).repeat_interleave(4)
    loader = DataLoader(TensorDataset(torch.arange(24), labels), batch_sampler=PKBatchSampler(labels, p=3, k=4))
    seen = torch.cat([x for x, _ in loader])
    assert sorted(seen.tolist()) == list(range(24))


def test_unique_id_batches_never_repeat_an_image_and_cover_the_epoch():
    rng = np.random.default_rng(0)
    ids = np.repeat(np.arange(40), rng.integers(1, 8, 40))  # 1..7 captions per image, like COCO
    keep_all = UniqueIdBatchSampler(ids, batch_size=8, seed=0, drop_last=False)
    batches = list(keep_all)
    assert sorted(flat(batches)) == list(range(len(ids)))
    assert all(len(set(ids[b])) == len(b) for b in batches)
    dropped = UniqueIdBatchSampler(ids, batch_size=8, seed=0, drop_last=True)
    full = list(dropped)
    assert all(len(b) == 8 and len(set(ids[b])) == 8 for b in full)
    assert len(flat(full)) == len(set(flat(full)))
    # the leftover is only the tail: images with many captions that cannot share a batch
    assert len(ids) - len(flat(full)) == sum(len(b) for b in batches if len(b) < 8)
    assert list(UniqueIdBatchSampler(ids, 8, seed=0)) == full
    other_epoch = UniqueIdBatchSampler(ids, 8, seed=0)
    other_epoch.set_epoch(1)
    assert list(other_epoch) != full


def test_unique_id_ranks_are_disjoint():
    ids = np.repeat(np.arange(30), 5)
    r0, r1 = (list(UniqueIdBatchSampler(ids, 10, seed=1, rank=r, world_size=2)) for r in (0, 1))
    assert len(r0) == len(r1) > 0
    assert not set(flat(r0)) & set(flat(r1))


def clustered_embeddings(n_clusters, classes_per_cluster, per_class, seed, dim=16):
    """Classes in the same cluster have nearby centroids; clusters are far apart."""
    g = torch.Generator().manual_seed(seed)
    n_classes = n_clusters * classes_per_cluster
    cluster_centers = torch.randn(n_clusters, dim, generator=g) * 5
    class_centers = cluster_centers.repeat_interleave(classes_per_cluster, 0) + torch.randn(n_classes, dim, generator=g)
    labels = torch.arange(n_classes).repeat_interleave(per_class)
    emb = class_centers[labels] + 0.1 * torch.randn(len(labels), dim, generator=g)
    perm = torch.randperm(n_classes, generator=g)  # cluster membership is not visible from the label order
    return emb, perm[labels].numpy(), {int(perm[c]): c // classes_per_cluster for c in range(n_classes)}


def test_hard_batches_group_nearest_classes_and_follow_updates():
    emb, labels, cluster_of = clustered_embeddings(6, 4, 5, seed=0)
    sampler = HardBatchSampler(emb, labels, p=4, k=3, seed=0)
    batches = list(sampler)
    assert len(batches) == len(sampler) == (24 * 2) // 4
    for b in batches:
        assert Counter(labels[b]).most_common()[-1][1] == 3 and len(set(labels[b])) == 4
        assert len({cluster_of[int(c)] for c in labels[b]}) == 1  # the 4 nearest classes = the cluster
    # new embeddings with a different grouping of the classes: batches follow it after update()
    g = torch.Generator().manual_seed(1)
    group_centers = torch.randn(6, 16, generator=g) * 5
    new_group = dict(enumerate(np.random.default_rng(0).permutation(np.repeat(np.arange(6), 4)).tolist()))
    emb2 = torch.stack([group_centers[new_group[int(c)]] for c in labels]) + 0.1 * torch.randn(
        len(labels), 16, generator=g
    )
    sampler.update(emb2)
    for b in sampler:
        assert len({new_group[int(c)] for c in labels[b]}) == 1


def test_hard_sampler_refreshes_via_embeddings_fn_and_splits_ranks():
    emb, labels, _ = clustered_embeddings(4, 4, 4, seed=2)
    calls = []

    def embeddings_fn():
        calls.append(1)
        return emb

    sampler = HardBatchSampler(embeddings_fn, labels, p=4, k=4, refresh_every=2, seed=0)
    batches = list(sampler)
    assert len(batches) == 4 and len(calls) == 1 + 1  # at construction, then before batch 2
    r0 = list(HardBatchSampler(emb, labels, p=4, k=4, seed=0, rank=0, world_size=2))
    r1 = list(HardBatchSampler(emb, labels, p=4, k=4, seed=0, rank=1, world_size=2))
    assert len(r0) == len(r1) == 2 and not set(flat(r0)) & set(flat(r1))
    assert r0 + r1 == [batches[0], batches[2], batches[1], batches[3]]


def test_registry_and_bad_arguments():
    assert SAMPLERS.names() == ["hard", "pk", "unique_id"]
    assert isinstance(create_sampler("pk", labels=[0, 0, 1, 1], p=2, k=2), PKBatchSampler)
    with pytest.raises(ValueError, match="unknown sampler"):
        create_sampler("nope")
    with pytest.raises(ValueError, match="only 2 classes"):
        PKBatchSampler([0, 0, 1, 1], p=3, k=2)
    with pytest.raises(ValueError, match="integers"):
        PKBatchSampler([0.5, 1.5], p=1, k=1)
    with pytest.raises(ValueError, match="rank must be"):
        UniqueIdBatchSampler([0, 1], 2, rank=2, world_size=2)
    with pytest.raises(ValueError, match="shape"):
        HardBatchSampler(torch.zeros(3, 4), [0, 0, 1, 1], p=2, k=2)
