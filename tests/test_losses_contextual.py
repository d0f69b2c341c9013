"""ContextualLoss against a line-by-line loop re-implementation of the reference algorithm (Liao et al., ICML 2023),
a hand-computed case, float64 gradcheck of the smooth terms and the straight-through step's documented backward."""

import math

import pytest
import torch
import torch.nn.functional as F

from metrank.losses import LOSSES
from metrank.losses.contextual import ContextualLoss, StraightThroughStep, knn_membership, margin_contrastive

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def loop_step(x: torch.Tensor, threshold: float, gain: float) -> torch.Tensor:
    """1[x >= threshold] forward, d/dx = gain backward (written as hard + gain * (x - stop_grad(x)))."""
    hard = 1.0 if x.item() >= threshold else 0.0
    return hard + gain * (x - x.detach())


def loop_contextual_loss(
    x, labels, k=4, eps=0.05, lam=0.4, gamma=0.1, s_reg=0.25, m_pos=0.75, m_neg=0.6, gain=10.0, n_query=None
):
    """The reference algorithm with explicit loops over scalar tensors (differentiable through ``x``).

    ``n_query``: keep only the block rows < n_query, columns >= n_query (the ref_emb form); None = whole batch.
    """
    n = x.shape[0]
    y = labels.tolist()
    S = [[(x[i] * x[j]).sum() for j in range(n)] for i in range(n)]
    D = [[torch.clamp(2.0 - 2.0 * S[i][j], min=0.0) for j in range(n)] for i in range(n)]
    vk, vh = [], []
    for i in range(n):
        row = sorted(D[i][j].item() for j in range(n))
        vk.append(row[k - 1])
        vh.append(row[k // 2 - 1])
    Nk = [[loop_step(-D[i][j] + eps, -vk[i], gain) for j in range(n)] for i in range(n)]
    Nh = [[loop_step(-D[i][j] + eps, -vh[i], gain) for j in range(n)] for i in range(n)]
    size_in = [sum(Nk[i][j] for j in range(n)).detach() for i in range(n)]
    size_out = [sum(1.0 - Nk[i][j] for j in range(n)).detach() for i in range(n)]
    W = [[None] * n for _ in range(n)]
    for i in range(n):
        for j in range(n):
            inter_in = sum(Nk[i][m] * Nk[j][m] for m in range(n)) / size_in[i]
            inter_out = sum((1.0 - Nk[i][m]) * (1.0 - Nk[j][m]) for m in range(n)) / size_out[i]
            W[i][j] = 0.5 * (inter_in + inter_out) * Nk[i][j]
    R = [[Nh[i][j] * Nh[j][i] for j in range(n)] for i in range(n)]
    J = [
        [sum(R[i][m] * W[m][j] for m in range(n)) / sum(R[i][m] for m in range(n)) for j in range(n)] for i in range(n)
    ]
    w = [[0.5 * (J[i][j] + J[j][i]) for j in range(n)] for i in range(n)]
    rows = range(n) if n_query is None else range(n_query)
    cols = range(n) if n_query is None else range(n_query, n)
    ctx, pos, neg, n_pos, n_neg, total_s = 0.0, 0.0, 0.0, 0, 0, 0.0
    for i in rows:
        for j in cols:
            total_s = total_s + S[i][j]
            if y[i] == y[j]:
                if i != j:
                    ctx = ctx + (1.0 - w[i][j]) ** 2
                hinge = m_pos - S[i][j]
                if hinge.item() > 0:
                    pos, n_pos = pos + hinge, n_pos + 1
            else:
                ctx = ctx + w[i][j] ** 2
                hinge = S[i][j] - m_neg
                if hinge.item() > 0:
                    neg, n_neg = neg + hinge, n_neg + 1
    n_pairs = len(rows) * len(cols)
    con = (pos / n_pos if n_pos else 0.0) + (neg / n_neg if n_neg else 0.0)
    reg = (total_s / n_pairs - s_reg) ** 2
    return lam * ctx / n_pairs + (1 - lam - gamma) * con + gamma * reg


def pk_batch(p, k, dim, seed, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(p, dim, generator=g, dtype=dtype)
    raw = centers.repeat_interleave(k, 0) + 0.9 * torch.randn(p * k, dim, generator=g, dtype=dtype)
    return raw, torch.arange(p).repeat_interleave(k)


@pytest.mark.parametrize("seed", [0, pytest.param(1, marks=pytest.mark.slow), pytest.param(2, marks=pytest.mark.slow)])
def test_matches_loop_reference_value_and_gradient(seed):  # the scalar-loop autograd reference takes seconds
    raw, labels = pk_batch(4, 4, 6, seed)
    raw.requires_grad_(True)
    loss = ContextualLoss()(F.normalize(raw, dim=1), labels)
    (grad,) = torch.autograd.grad(loss, raw)
    raw_ref = raw.detach().clone().requires_grad_(True)
    ref = loop_contextual_loss(F.normalize(raw_ref, dim=1), labels)
    (grad_ref,) = torch.autograd.grad(ref, raw_ref)
    assert loss.item() == pytest.approx(ref.item(), rel=1e-10, abs=1e-12)
    assert torch.allclose(grad, grad_ref, rtol=1e-7, atol=1e-10)
    assert grad.abs().max() > 0


def test_nondefault_hyperparameters_match_loop_reference():
    raw, labels = pk_batch(3, 6, 5, seed=7)
    kw = dict(k=6, eps=0.1, lam=0.6, gamma=0.2, s_reg=0.1, gain=5.0)
    loss = ContextualLoss(lam=0.6, gamma=0.2, k=6, eps=0.1, s_reg=0.1, pos_margin=0.8, neg_margin=0.5, gain=5.0)
    x = F.normalize(raw, dim=1)
    ref = loop_contextual_loss(x, labels, m_pos=0.8, m_neg=0.5, **kw)
    assert loss(x, labels).item() == pytest.approx(ref.item(), rel=1e-10)


def test_ref_emb_uses_union_and_query_reference_block():
    raw, labels = pk_batch(3, 4, 5, seed=3)
    x = F.normalize(raw, dim=1)
    queries, refs = x[0::2], x[1::2]
    q_labels, r_labels = labels[0::2], labels[1::2]
    value = ContextualLoss(k=4)(queries, q_labels, ref_emb=refs, ref_labels=r_labels)
    ref = loop_contextual_loss(torch.cat([queries, refs]), torch.cat([q_labels, r_labels]), k=4, n_query=len(queries))
    assert value.item() == pytest.approx(ref.item(), rel=1e-10)


def test_hand_computed_contrastive_and_regulariser():
    # unit vectors at 0, 60, 90 and 180 degrees; classes {0, 1} and {2, 3}
    angles = torch.tensor([0.0, 60.0, 90.0, 180.0], dtype=torch.float64) * math.pi / 180
    x = torch.stack([angles.cos(), angles.sin()], 1)
    labels = torch.tensor([0, 0, 1, 1])
    # positives: S01 = 0.5 -> hinge 0.25 (twice), S23 = 0 -> 0.75 (twice); self-pairs S = 1 inactive
    # negatives: only S12 = cos 30 = 0.866 exceeds 0.6 (twice)
    con = (2 * 0.25 + 2 * 0.75) / 4 + (math.cos(math.pi / 6) - 0.6)
    mean_s = (4 + 2 * (0.5 + 0.0 - 1.0 + math.cos(math.pi / 6) - 0.5 + 0.0)) / 16
    reg = (mean_s - 0.25) ** 2
    sim = x @ x.T
    same = (labels[:, None] == labels[None, :]).double()
    assert margin_contrastive(sim, same, 0.75, 0.6).item() == pytest.approx(con, rel=1e-12)
    loss = ContextualLoss(lam=0.0, gamma=0.1, k=2)(x, labels)
    assert loss.item() == pytest.approx(0.9 * con + 0.1 * reg, rel=1e-12)


def test_no_active_hinge_gives_zero_contrastive_term():
    sim = torch.tensor([[1.0, 0.9], [0.9, 1.0]], dtype=torch.float64)
    same = torch.ones(2, 2, dtype=torch.float64)
    assert margin_contrastive(sim, same, 0.75, 0.6).item() == 0.0


def test_gradcheck_contrastive_and_regulariser_float64():
    raw, labels = pk_batch(3, 2, 4, seed=5)
    loss = ContextualLoss(lam=0.0, gamma=0.3, k=2)
    raw.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda r: loss(F.normalize(r, dim=1), labels), (raw,), eps=1e-6, atol=1e-6)


def test_gradcheck_contextual_term_given_similarity_weights():
    # L_ctx is smooth in the contextual similarity w; check its gradient through margin/label weighting
    g = torch.Generator().manual_seed(0)
    w = torch.rand(5, 5, generator=g, dtype=torch.float64).requires_grad_(True)
    same = (torch.tensor([0, 0, 1, 1, 1])[:, None] == torch.tensor([0, 0, 1, 1, 1])[None, :]).double()
    off = 1 - torch.eye(5, dtype=torch.float64)

    def l_ctx(w):
        return ((same * (1 - w) ** 2 + (1 - same) * w**2) * off).sum() / 25

    assert torch.autograd.gradcheck(l_ctx, (w,))


def test_straight_through_step_backward_is_the_gain():
    x = torch.tensor([-1.0, 0.2, 0.5, 3.0], dtype=torch.float64, requires_grad=True)
    threshold = torch.tensor([0.5], dtype=torch.float64, requires_grad=True)
    out = StraightThroughStep.apply(x, threshold, 10.0)
    assert out.tolist() == [0.0, 0.0, 1.0, 1.0]
    upstream = torch.tensor([1.0, -2.0, 0.5, 3.0], dtype=torch.float64)
    out.backward(upstream)
    assert torch.equal(x.grad, 10.0 * upstream)
    assert threshold.grad is None  # the threshold is a constant (detached k-th distance)


def test_knn_membership_counts_and_gradient_sign():
    d = torch.tensor(
        [[0.0, 0.1, 0.5, 0.9], [0.1, 0.0, 0.2, 0.3], [0.5, 0.2, 0.0, 0.12], [0.9, 0.3, 0.12, 0.0]],
        dtype=torch.float64,
        requires_grad=True,
    )
    nk = knn_membership(d, k=2, eps=0.05, gain=10.0)
    # row 2: two nearest are 0.0, 0.12 -> threshold 0.17 keeps d <= 0.17 -> {2, 3}; row 1 keeps {0, 1} only
    assert nk.tolist() == [[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 1, 1], [0, 0, 1, 1]]
    nk.sum().backward()
    assert torch.equal(d.grad, torch.full_like(d, -10.0))  # d N / d D = -gain


def test_batch_order_invariance():
    raw, labels = pk_batch(4, 4, 6, seed=11)
    x = F.normalize(raw, dim=1)
    perm = torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))
    loss = ContextualLoss()
    assert loss(x[perm], labels[perm]).item() == pytest.approx(loss(x, labels).item(), rel=1e-12)


def test_half_precision_is_computed_in_float32():
    raw, labels = pk_batch(4, 4, 8, seed=2, dtype=torch.float32)
    x = F.normalize(raw, dim=1)
    loss = ContextualLoss()
    assert loss(x.half(), labels).dtype == torch.float32
    assert loss(x.half(), labels).item() == pytest.approx(loss(x.half().float(), labels).item(), rel=1e-5)


def test_k_larger_than_samples_per_class_raises():
    raw, labels = pk_batch(4, 3, 6, seed=0)
    with pytest.raises(ValueError, match="at least k samples of every class"):
        ContextualLoss(k=4)(F.normalize(raw, dim=1), labels)
    with pytest.raises(ValueError, match="k must be >= 2"):
        ContextualLoss(k=1)


def test_bad_inputs_raise_value_error():
    raw, labels = pk_batch(2, 4, 6, seed=0)
    with pytest.raises(ValueError, match="L2-normalised"):
        ContextualLoss()(raw, labels)
    with pytest.raises(ValueError, match="indices_tuple"):
        ContextualLoss()(F.normalize(raw, dim=1), labels, indices_tuple=(labels, labels, labels))


def test_registered_and_trains_a_linear_embedding():
    loss = LOSSES.create("contextual", k=4)
    raw, labels = pk_batch(4, 4, 8, seed=4, dtype=torch.float32)
    proj = torch.nn.Linear(8, 8)
    opt = torch.optim.SGD(proj.parameters(), lr=0.5)
    first = None
    for _ in range(30):
        value = loss(F.normalize(proj(raw), dim=1), labels)
        first = value.item() if first is None else first
        opt.zero_grad()
        value.backward()
        opt.step()
    assert value.item() < first
