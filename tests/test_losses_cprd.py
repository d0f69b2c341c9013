"""CPRD and logit distillation against loop / numpy references; the teachers (cache, cross-encoder, dual encoder)."""

import itertools
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from metrank.losses import LOSSES, CrossModalLoss, InfoNCELoss
from metrank.losses.cprd import CPRDLoss, LogitDistillationLoss, ranking_chain, valid_prefix
from metrank.losses.teachers import CachedTeacher, CrossAttentionTeacher, TowerScoreTeacher

pytestmark = pytest.mark.usefixtures("one_torch_thread")


class TableTeacher:
    """A frozen teacher given as a score table: score(image row id, text row id) = table[image, text]."""

    def __init__(self, table: torch.Tensor) -> None:
        self.table, self.calls, self.pairs = table, 0, 0

    def __call__(self, images: torch.Tensor, texts: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        self.pairs += len(images)
        return self.table[images, texts]


def paired_batch(n, dim, seed, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    img = torch.randn(n, dim, generator=g, dtype=dtype)
    txt = img + 0.8 * torch.randn(n, dim, generator=g, dtype=dtype)
    table = torch.randn(n, n, generator=g, dtype=dtype) + 3 * torch.eye(n, dtype=dtype)
    return F.normalize(img, dim=1), F.normalize(txt, dim=1), table


def loop_distillation(
    img,
    txt,
    ids,
    table,
    k,
    tau,
    kind="cprd",
    fn_threshold=None,
    min_gap=0.0,
    max_length=None,
    teacher_tau=1.0,
    normalise="all",
    distinct=True,
    text_ids=None,
    queries=None,
):
    """The paper's formula, written out per query and direction.

    The K hardest negatives by student score (walking them hardest first; with ``distinct`` an image id already
    taken is skipped for a caption query, a caption id for an image query); then the chain (CPRD) or the KL (logit
    KD). CPRD: sort the K by teacher score, drop the false negatives, keep c_1 .. c_{J*-1}; each kept c_j contributes
    ``-log(exp(s_j/tau) / sum_{k=j}^{K} exp(s_k/tau))`` ("all") or the sum over kept k >= j only ("prefix").
    """
    S = (img @ txt.T).detach().numpy()
    T = table.numpy()
    ids = ids.tolist()
    n, total = len(ids), 0.0
    queries = range(n) if queries is None else queries
    for i2t in (True, False):
        for q in queries:
            student = (lambda j: S[q, j]) if i2t else (lambda j: S[j, q])
            teacher = (lambda j: T[q, j]) if i2t else (lambda j: T[j, q])
            if not distinct:
                group = list(range(n))
            elif i2t:
                group = list(range(n)) if text_ids is None else text_ids.tolist()
            else:
                group = ids
            negatives, taken = [], set()
            for j in sorted((j for j in range(n) if ids[j] != ids[q]), key=lambda j: -student(j)):
                if group[j] not in taken and len(negatives) < k:
                    taken.add(group[j])
                    negatives.append(j)
            if kind == "kd":
                t = np.array([teacher(j) for j in negatives]) / teacher_tau
                s = np.array([student(j) for j in negatives]) / tau
                p_t = np.exp(t - t.max()) / np.exp(t - t.max()).sum()
                log_p_s = s - s.max() - np.log(np.exp(s - s.max()).sum())
                total += float((p_t * (np.log(p_t) - log_p_s)).sum())
                continue
            by_teacher = sorted(negatives, key=lambda j: -teacher(j))
            false_neg = [
                teacher(j) >= T[q, q] or (fn_threshold is not None and teacher(j) >= fn_threshold) for j in by_teacher
            ]
            ranked = [j for j, fn in zip(by_teacher, false_neg) if not fn]  # false negatives sort first
            kept = []
            for j in ranked:
                if kept and teacher(kept[-1]) - teacher(j) < min_gap:
                    break
                if max_length is not None and len(kept) == max_length:
                    break
                kept.append(j)
            tail = ranked if normalise == "all" else kept
            for a, j in enumerate(kept):
                denominator = sum(math.exp(student(c) / tau) for c in tail[a:])
                total += -student(j) / tau + math.log(denominator)
    return total / (2 * len(queries))


def test_chain_normalisations_hand_computed():
    # teacher order c1 > c2 > c3 with student logits a, b, c; only c1, c2 kept (max_length=2)
    a, b, c = 0.3, 0.9, -0.2
    student = torch.tensor([[a, b, c]], dtype=torch.float64)
    keep = torch.tensor([[True, True, False]])
    paper = -a + math.log(math.exp(a) + math.exp(b) + math.exp(c)) - b + math.log(math.exp(b) + math.exp(c))
    prefix = -a + math.log(math.exp(a) + math.exp(b))
    assert ranking_chain(student, keep, 1.0).item() == pytest.approx(paper, rel=1e-12)
    assert ranking_chain(student, keep, 1.0, normalise="prefix").item() == pytest.approx(prefix, rel=1e-12)
    # a dropped false negative at the head is in no denominator
    keep_fn = torch.tensor([[False, True, False]])
    expected = -b + math.log(math.exp(b) + math.exp(c))
    assert ranking_chain(student, keep_fn, 1.0).item() == pytest.approx(expected, rel=1e-12)


def test_chain_hand_computed_k3():
    # teacher order of the 3 candidates: c1 = #1 (0.9), c2 = #2 (0.5), c3 = #0 (0.1); student s = (0.5, 0.2, 0.4)
    student = torch.tensor([[0.5, 0.2, 0.4]], dtype=torch.float64)
    teacher = torch.tensor([[0.1, 0.9, 0.5]], dtype=torch.float64)
    order = teacher.argsort(1, descending=True)
    keep = valid_prefix(teacher.gather(1, order), torch.tensor([1.0], dtype=torch.float64))
    value = ranking_chain(student.gather(1, order), keep, temperature=0.5).item()
    a, b, c = 0.2 / 0.5, 0.4 / 0.5, 0.5 / 0.5  # student logits in teacher order
    expected = -math.log(math.exp(a) / (math.exp(a) + math.exp(b) + math.exp(c))) - math.log(
        math.exp(b) / (math.exp(b) + math.exp(c))
    )
    assert value == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize(
    "scores, pos, kw, expected",
    [
        ([0.9, 0.7, 0.5, 0.2], 1.0, {}, [1, 1, 1, 1]),
        ([0.9, 0.7, 0.5, 0.2], 0.8, {}, [0, 1, 1, 1]),  # >= true pair: false negative
        ([0.9, 0.7, 0.5, 0.2], 0.8, {"fn_threshold": 0.6}, [0, 0, 1, 1]),  # above the threshold
        ([0.9, 0.85, 0.5, 0.2], 1.0, {"min_gap": 0.1}, [1, 0, 0, 0]),  # c1, c2 indistinguishable
        ([0.9, 0.7, 0.65, 0.2], 1.0, {"min_gap": 0.1}, [1, 1, 0, 0]),
        ([0.9, 0.85, 0.5, 0.45], 0.88, {"min_gap": 0.1}, [0, 1, 1, 0]),  # gap before the prefix is irrelevant
        ([0.9, 0.7, 0.5, 0.2], 1.0, {"max_length": 2}, [1, 1, 0, 0]),
        ([0.9, 0.7, 0.5, 0.2], 0.1, {}, [0, 0, 0, 0]),  # all false negatives
    ],
)
def test_valid_prefix_rule(scores, pos, kw, expected):
    keep = valid_prefix(torch.tensor([scores]), torch.tensor([pos]), **kw)
    assert keep.int().tolist() == [expected]


@pytest.mark.parametrize(
    "kw",
    [
        {},
        {"fn_threshold": 0.5},
        {"min_gap": 0.3},
        {"max_length": 2},
        {"min_gap": 0.3, "normalise": "prefix"},
        {"max_length": 2, "normalise": "prefix"},
        {"distinct": False},
    ],
)
def test_cprd_matches_loop_reference(kw):
    img, txt, table = paired_batch(12, 8, seed=1)
    # shared ids (several captions of one image: its image row repeats) are never negatives of each other
    ids = torch.tensor([0, 0, 1, 2, 3, 3, 3, 4, 5, 5, 6, 7])
    img = img[[0, 0, 2, 3, 4, 4, 4, 7, 8, 8, 10, 11]]  # rows of one id hold the same image embedding
    loss = CPRDLoss(TableTeacher(table), k=4, lam=0.7, **kw)
    rows = torch.arange(12)
    value = loss(img, txt, ids, images=rows, texts=rows)
    tau = 1.0 / loss.itc.loss.scale.item()
    itc = CrossModalLoss(InfoNCELoss())(img, txt, ids)
    expected = itc.item() + 0.7 * loop_distillation(img, txt, ids, table, 4, tau, **kw)
    assert value.item() == pytest.approx(expected, rel=1e-9)


def test_distinct_changes_the_candidates_when_an_image_repeats():
    img, txt, table = paired_batch(12, 8, seed=1)
    ids = torch.tensor([0, 0, 1, 2, 3, 3, 3, 4, 5, 5, 6, 7])
    img = img[[0, 0, 2, 3, 4, 4, 4, 7, 8, 8, 10, 11]]
    rows = torch.arange(12)
    values = [
        CPRDLoss(TableTeacher(table), k=4, temperature=0.1, distinct=d).distillation(img, txt, ids, rows, rows)
        for d in (True, False)
    ]
    assert abs(values[0].item() - values[1].item()) > 1e-3  # the loop reference test pins both values


def test_memory_queue_mines_beyond_the_batch():
    img, txt, table = paired_batch(12, 8, seed=8)
    ids = torch.arange(12)  # 12 distinct pairs
    text_ids = 100 + torch.arange(12)
    rows = torch.arange(12)
    loss = CPRDLoss(TableTeacher(table), k=5, temperature=0.2, memory_size=8)
    first, second = rows[:6], rows[6:]
    # the first batch alone: 5 negatives exist; then the second batch mines among itself + the queued first batch
    value1 = loss.distillation(img[first], txt[first], ids[first], first, first, text_ids[first])
    assert len(loss.memory) == 6
    value2 = loss.distillation(img[second], txt[second], ids[second], second, second, text_ids[second])
    assert len(loss.memory) == 8 and torch.equal(loss.memory["ids"], ids[4:])  # FIFO: the oldest two dropped
    expected1 = loop_distillation(img, txt, ids, table, 5, 0.2, queries=first.tolist(), text_ids=text_ids)
    # candidates of batch 2 = all 12 rows (loop walks every row); batch 1's restricted to its own rows
    expected2 = loop_distillation(img, txt, ids, table, 5, 0.2, queries=second.tolist(), text_ids=text_ids)
    sub = loop_distillation(img[first], txt[first], ids[first], table[:6, :6], 5, 0.2)
    assert value1.item() == pytest.approx(sub, rel=1e-9)
    assert value2.item() == pytest.approx(expected2, rel=1e-9)
    assert expected1 != pytest.approx(sub)  # beyond-batch candidates matter for these data
    loss.eval()
    loss.distillation(img[second], txt[second], ids[second], second, second, text_ids[second])
    assert torch.equal(loss.memory["ids"], ids[4:])  # eval mode does not enqueue
    with pytest.raises(ValueError, match="text_ids"):
        loss.distillation(img[second], txt[second], ids[second], second, second)


def test_logit_distillation_matches_numpy_kl():
    img, txt, table = paired_batch(9, 6, seed=2)
    ids = torch.arange(9)
    loss = LogitDistillationLoss(TableTeacher(table), k=3, temperature=0.2, teacher_temperature=0.5)
    rows = torch.arange(9)
    value = loss.distillation(img, txt, ids, images=rows, texts=rows)
    expected = loop_distillation(img, txt, ids, table, 3, 0.2, kind="kd", teacher_tau=0.5)
    assert value.item() == pytest.approx(expected, rel=1e-9)
    assert LOSSES.get("logit_kd") is LogitDistillationLoss


@pytest.mark.parametrize("cls", [CPRDLoss, LogitDistillationLoss])
def test_gradcheck_float64(cls):
    img, txt, table = paired_batch(6, 4, seed=3)
    ids, rows = torch.arange(6), torch.arange(6)
    loss = cls(TableTeacher(table), k=3, temperature=0.3)

    def f(a, b):
        return loss(F.normalize(a, dim=1), F.normalize(b, dim=1), ids, images=rows, texts=rows)

    a, b = img.clone().requires_grad_(True), txt.clone().requires_grad_(True)
    assert torch.autograd.gradcheck(f, (a, b), eps=1e-6, atol=1e-6)


def test_batch_order_invariance():
    img, txt, table = paired_batch(10, 8, seed=4)
    ids, rows = torch.arange(10) // 2, torch.arange(10)
    loss = CPRDLoss(TableTeacher(table), k=3)
    perm = torch.randperm(10, generator=torch.Generator().manual_seed(0))
    base = loss(img, txt, ids, images=rows, texts=rows)
    permuted = loss(img[perm], txt[perm], ids[perm], images=rows[perm], texts=rows[perm])
    assert permuted.item() == pytest.approx(base.item(), rel=1e-12)


def test_chain_decreases_as_student_order_matches_teacher():
    keep = torch.ones(1, 3, dtype=torch.bool)
    target = torch.tensor([[3.0, 2.0, 1.0]], dtype=torch.float64)  # teacher order
    values = [ranking_chain(alpha * target, keep, 1.0).item() for alpha in np.linspace(-2, 2, 9)]
    assert all(later < earlier for earlier, later in zip(values, values[1:]))
    by_order = {p: ranking_chain(target[:, list(p)], keep, 1.0).item() for p in itertools.permutations(range(3))}
    assert min(by_order, key=by_order.get) == (0, 1, 2)


def test_cached_teacher_hits_and_same_scores():
    img, txt, table = paired_batch(8, 6, seed=5)
    ids, rows = torch.arange(8), torch.arange(8)
    plain = CPRDLoss(TableTeacher(table), k=3, temperature=0.1)
    inner = TableTeacher(table)
    cached = CachedTeacher(inner)
    loss = CPRDLoss(cached, k=3, temperature=0.1)
    first = loss(img, txt, ids, images=rows, texts=rows, text_ids=rows)
    assert (inner.calls, cached.hits) == (1, 0) and cached.misses == inner.pairs
    again = loss(img, txt, ids, images=rows, texts=rows, text_ids=rows)
    assert inner.calls == 1 and cached.hits == cached.misses  # every pair served from the cache
    assert first.item() == again.item() == pytest.approx(plain(img, txt, ids, images=rows, texts=rows).item())
    direct = cached(rows, rows.flip(0), torch.stack([rows, rows.flip(0)], 1))
    assert torch.allclose(direct, table[rows, rows.flip(0)].float())
    with pytest.raises(ValueError, match="text_ids"):
        loss(img, txt, ids, images=rows, texts=rows)
    inner2 = TableTeacher(table)
    wrapped = CPRDLoss(inner2, k=3, temperature=0.1, cache_teacher=True)
    assert isinstance(wrapped.teacher, CachedTeacher) and wrapped.teacher.teacher is inner2
    assert wrapped(img, txt, ids, images=rows, texts=rows, text_ids=rows).item() == pytest.approx(first.item())
    wrapped(img, txt, ids, images=rows, texts=rows, text_ids=rows)
    assert inner2.calls == 1


def test_bad_inputs_raise_value_error():
    img, txt, table = paired_batch(6, 4, seed=6)
    rows = torch.arange(6)
    loss = CPRDLoss(TableTeacher(table), k=3)
    with pytest.raises(ValueError, match="teacher needs its inputs"):
        loss(img, txt, rows)
    with pytest.raises(ValueError, match="negatives"):
        CPRDLoss(TableTeacher(table), k=6)(img, txt, rows, images=rows, texts=rows)
    with pytest.raises(ValueError, match="one score per pair"):
        CPRDLoss(lambda i, t: torch.zeros(2), k=3)(img, txt, rows, images=rows, texts=rows)
    with pytest.raises(ValueError, match="temperature"):
        CPRDLoss(TableTeacher(table), itc=torch.nn.Identity())


def test_cross_attention_teacher_learns_matching_and_drives_cprd():
    torch.manual_seed(0)
    n, n_img, n_txt, dim = 64, 4, 3, 16
    image_tokens = torch.randn(n, n_img, dim)
    # caption tokens are noisy mixtures of their image's tokens; the last caption token is padding
    text_tokens = image_tokens[:, :n_txt] + 0.3 * torch.randn(n, n_txt, dim)
    mask = torch.ones(n, n_txt, dtype=torch.bool)
    mask[:, -1] = False
    teacher = CrossAttentionTeacher(dim, dim, width=32, depth=1, heads=2)
    opt = torch.optim.Adam(teacher.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(0)
    ids = torch.arange(n)
    for _step in range(60):
        batch = torch.randperm(n, generator=gen)[:32]
        loss = teacher.itm_loss(image_tokens[batch], (text_tokens[batch], mask[batch]), ids[batch], generator=gen)
        opt.zero_grad()
        loss.backward()
        opt.step()
    opt.zero_grad()
    teacher.eval()
    with torch.no_grad():
        pos = teacher(image_tokens, (text_tokens, mask))
        neg = teacher(image_tokens, (text_tokens.roll(1, 0), mask))
        padded = text_tokens.clone()
        padded[:, -1] = 100.0  # padding must not change the score
        assert torch.allclose(teacher(image_tokens, (padded, mask)), pos, atol=1e-5)
    assert (pos > neg).float().mean() > 0.9
    # as a (frozen) CPRD teacher: gradients reach the student only
    student_img = F.normalize(torch.randn(16, 8), dim=1).requires_grad_(True)
    student_txt = F.normalize(torch.randn(16, 8), dim=1)
    cprd = CPRDLoss(teacher, k=4)
    value = cprd(student_img, student_txt, ids[:16], images=image_tokens[:16], texts=(text_tokens[:16], mask[:16]))
    value.backward()
    assert torch.isfinite(value) and student_img.grad.abs().sum() > 0
    assert all(p.grad is None for p in teacher.parameters())
    assert list(cprd.parameters()) == list(cprd.itc.parameters())


def test_tower_score_teacher_is_frozen_cosine():
    class DualEncoder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.image, self.text = torch.nn.Linear(5, 4), torch.nn.Embedding(10, 4)

        def encode_image(self, pixels):
            return F.normalize(self.image(pixels), dim=-1)

        def encode_text(self, tokens):
            return F.normalize(self.text(tokens), dim=-1)

    torch.manual_seed(0)
    model = DualEncoder()
    teacher = TowerScoreTeacher(model)
    pixels, tokens = torch.randn(6, 5), torch.randint(0, 10, (6,))
    expected = F.cosine_similarity(model.image(pixels), model.text(tokens), dim=-1)
    assert torch.allclose(teacher(pixels, tokens), expected, atol=1e-6)
    assert not any(p.requires_grad for p in teacher.parameters())
