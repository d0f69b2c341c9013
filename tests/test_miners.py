"""Miners vs brute-force references and pytorch-metric-learning; memory at B = 1024; bad input."""

import itertools

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from pytorch_metric_learning import miners as pml_miners

from metrank.miners import MINERS, create_miner


def unit(n, d, seed):
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=1)


def labels_for(n, classes, seed):
    return torch.randint(0, classes, (n,), generator=torch.Generator().manual_seed(seed))


def distance_np(x, y, distance):
    x, y = x.numpy(), y.numpy()
    if distance == "euclidean":
        return np.sqrt(((x[:, None, :] - y[None, :, :]) ** 2).sum(-1))
    return 1.0 - x @ y.T


def brute_force_triplets(x, labels, ref, ref_labels, self_ref, margin, kind, distance):
    """Loop over every (a, p, n) and keep those whose d_an − d_ap matches the mining rule."""
    dist = distance_np(x, ref, distance)
    out = set()
    for a, p, n in itertools.product(range(len(x)), range(len(ref)), range(len(ref))):
        if (self_ref and a == p) or labels[a] != ref_labels[p] or labels[a] == ref_labels[n]:
            continue
        gap = dist[a, n] - dist[a, p]
        keep = {"all": gap <= margin, "semihard": 0 < gap <= margin, "hard": gap <= 0}[kind]
        if keep:
            out.add((a, p, n))
    return out


def as_set(indices):
    return set(zip(*(t.tolist() for t in indices)))


@pytest.mark.parametrize("distance", ["euclidean", "cosine"])
@pytest.mark.parametrize("name,kind", [("all", "all"), ("semi_hard", "semihard"), ("hard", "hard")])
def test_triplet_miners_match_brute_force(name, kind, distance):
    x, labels = unit(14, 5, 0), labels_for(14, 4, 1)
    got = as_set(create_miner(name, margin=0.3, distance=distance)(x, labels))
    want = brute_force_triplets(x, labels.tolist(), x, labels.tolist(), True, 0.3, kind, distance)
    assert got == want and len(want) > 0


@pytest.mark.parametrize("name,kind", [("semi_hard", "semihard"), ("hard", "hard")])
def test_triplet_miners_cross_modal_brute_force(name, kind):
    x, ref = unit(9, 4, 2), unit(11, 4, 3)
    labels, ref_labels = labels_for(9, 3, 4), labels_for(11, 3, 5)
    got = as_set(create_miner(name, margin=0.4)(x, labels, ref, ref_labels))
    assert got == brute_force_triplets(x, labels.tolist(), ref, ref_labels.tolist(), False, 0.4, kind, "euclidean")


@pytest.mark.parametrize("kind,name", [("semihard", "semi_hard"), ("hard", "hard"), ("all", "all")])
def test_triplet_miners_equal_pml(kind, name):
    x, labels = unit(40, 8, 6).float(), labels_for(40, 6, 7)
    ours = create_miner(name, margin=0.2)(x, labels)
    theirs = pml_miners.TripletMarginMiner(margin=0.2, type_of_triplets=kind)(x, labels)
    assert all(torch.equal(a, b) for a, b in zip(ours, theirs)) and len(ours[0]) > 0  # same triplets, same order


def test_batch_hard_matches_pml_and_brute_force():
    x, labels = unit(30, 6, 8).float(), labels_for(30, 5, 9)
    a, p, n = create_miner("batch_hard")(x, labels)
    assert all(torch.equal(u, v) for u, v in zip((a, p, n), pml_miners.BatchHardMiner()(x, labels)))
    dist, lab = distance_np(x.double(), x.double(), "euclidean"), labels.numpy()
    for anchor, pos, neg in zip(a.tolist(), p.tolist(), n.tolist()):
        same = (lab == lab[anchor]) & (np.arange(len(lab)) != anchor)
        assert dist[anchor, pos] == pytest.approx(dist[anchor][same].max())
        assert dist[anchor, neg] == pytest.approx(dist[anchor][lab != lab[anchor]].min())


def test_cross_modal_hardest_is_vsepp_max_violation():
    image, text = unit(8, 4, 10), unit(8, 4, 11)
    ids = torch.tensor([0, 0, 1, 2, 3, 3, 3, 4])
    a, p, n = create_miner("cross_modal_hardest")(image, ids, text, ids)
    sim = (image @ text.T).numpy()
    want = set()
    for i in range(8):
        neg = [j for j in range(8) if ids[j] != ids[i]]
        hardest = max(neg, key=lambda j: sim[i, j])
        want |= {(i, j, hardest) for j in range(8) if ids[j] == ids[i]}
    assert as_set((a, p, n)) == want


def test_topk_hardest_matches_sorted_similarities():
    x, ref = unit(7, 5, 12), unit(9, 5, 13)
    labels, ref_labels = torch.tensor([0, 1, 2, 3, 4, 5, 6]), torch.tensor([0, 1, 2, 3, 4, 5, 6, 0, 1])
    a, n = create_miner("topk_hardest", k=3)(x, labels, ref, ref_labels)
    assert torch.equal(a, torch.arange(7).repeat_interleave(3))
    sim = (x @ ref.T).numpy()
    for i, row in enumerate(n.view(7, 3).tolist()):
        neg = [j for j in range(9) if ref_labels[j] != labels[i]]
        assert row == sorted(neg, key=lambda j: -sim[i, j])[:3]


def test_topk_hardest_distinct_takes_one_row_per_reference_label():
    x, ref = unit(5, 4, 16), unit(12, 4, 17)
    labels, ref_labels = torch.arange(5), torch.arange(12) % 6  # every reference label appears twice
    a, n = create_miner("topk_hardest", k=3, distinct=True)(x, labels, ref, ref_labels)
    sim = (x @ ref.T).numpy()
    for i, row in enumerate(n.view(5, 3).tolist()):
        # loop reference: walk the negatives hardest first, skipping labels already taken
        taken, want = set(), []
        for j in sorted((j for j in range(12) if ref_labels[j] != labels[i]), key=lambda j: -sim[i, j]):
            if int(ref_labels[j]) not in taken:
                taken.add(int(ref_labels[j]))
                want.append(j)
        assert row == want[:3]


def test_topk_too_large_raises():
    x, labels = unit(6, 4, 14), torch.tensor([0, 0, 1, 1, 2, 2])
    create_miner("topk_hardest", k=4)(x, labels)  # every anchor has exactly 4 negatives
    with pytest.raises(ValueError, match="k=5 distinct negatives per query"):
        create_miner("topk_hardest", k=5)(x, labels)
    with pytest.raises(ValueError, match="has only 2"):  # 4 negative rows but only 2 distinct labels
        create_miner("topk_hardest", k=3, distinct=True)(x, labels)
    with pytest.raises(ValueError, match="positive integer"):
        create_miner("topk_hardest", k=0)


def test_bad_inputs_raise_clear_errors():
    miner = create_miner("semi_hard")
    x = unit(6, 4, 15)
    with pytest.raises(ValueError, match="length 5 but there are 6"):
        miner(x, torch.arange(5))
    with pytest.raises(ValueError, match="integer dtype"):
        miner(x, torch.arange(6).float())
    bad = x.clone()
    bad[2, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        miner(bad, torch.arange(6))
    with pytest.raises(ValueError, match="L2-normalised"):
        miner(x * 3, torch.arange(6))
    with pytest.raises(ValueError, match="ref_labels"):
        miner(x, torch.arange(6), ref_emb=unit(6, 4, 16))
    with pytest.raises(ValueError, match="valid names"):
        create_miner("semihard_typo")
    assert MINERS.names() == ["all", "batch_hard", "cross_modal_hardest", "hard", "semi_hard", "topk_hardest"]


def test_no_positive_pair_mines_nothing():
    x = unit(5, 4, 17)
    for name in ("semi_hard", "batch_hard", "cross_modal_hardest"):
        assert all(t.numel() == 0 for t in create_miner(name)(x, torch.arange(5)))


def _peak_rss_bytes(fn):
    """Peak resident memory added while ``fn`` runs (Linux: reset VmHWM via clear_refs, then read it)."""

    def read(field):
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field))

    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    base = read("VmRSS:")
    result = fn()
    return read("VmHWM:") - base, result


def test_semi_hard_mining_at_b1024_stays_far_below_b_cubed():
    x, labels = unit(1024, 512, 18).float(), torch.arange(256).repeat_interleave(4)
    miner = create_miner("semi_hard")
    miner(x[:64], labels[:64])  # warm up allocator / kernels outside the measurement
    peak, (a, p, n) = _peak_rss_bytes(lambda: miner(x, labels))
    assert len(a) > 0
    assert peak < 256 * 2**20, f"semi-hard mining at B=1024 used {peak / 2**20:.0f} MiB"  # a B³ mask is 1 GiB
