"""CPRD - contrastive partial ranking distillation - and the logit (KL) distillation baseline.

Chen et al., "How to Make Cross Encoder a Good Teacher for Efficient Image-Text Retrieval?", CVPR 2024.

A dual-encoder student learns the order a (cross-encoder) teacher gives to the student's *hard* negatives. Per
query (each image for image->text, each text for text->image) of a paired batch:

1. mine the K hardest negatives by student similarity among the batch (and the memory queue, ``memory_size``);
   rows sharing the query's id are never negatives, and with ``distinct=True`` (default) each image fills at most
   one of a caption's K slots (several captions of one image in a batch repeat its image row) and each caption id
   at most one of an image's;
2. the teacher scores the K pairs and the true pair; sort the negatives by teacher score, c_1 > ... > c_K;
3. keep the *valid prefix* c_1 .. c_{J*-1}: drop the negatives the teacher scores as matches (score >= the true
   pair's score, or >= ``fn_threshold``; they sort first), then stop at the first consecutive teacher gap below
   ``min_gap`` (the teacher order is no longer informative) and after ``max_length`` negatives;
4. chain of contrastive terms over the kept negatives, sharing the InfoNCE temperature tau. The paper's form
   (``normalise="all"``, default) normalises each kept negative against *every* teacher-lower negative of the K,
   kept or not (the easy tail still acts as negatives, only its internal order is ignored):
   ``L_q = -sum_{j < J*} log( exp(s_{c_j}/tau) / sum_{k=j}^{K} exp(s_{c_k}/tau) )``.
   ``normalise="prefix"`` sums the denominator over the kept prefix only (``sum_{k=j}^{J*-1}``): a Plackett-Luce
   likelihood of the kept order alone, which ignores the negatives after the prefix.

Reduction: ``L_cprd`` is the mean of ``L_q`` (a sum over the query's chain terms) over the n queries of both
directions (2n in all; queries without a kept negative contribute 0), so it is on InfoNCE's per-query scale; the
paper writes the sum over queries. ``L = L_itc + lam * L_cprd``. :class:`LogitDistillationLoss` replaces steps 3-4
by ``KL(softmax(t/tau_t) || softmax(s/tau))`` over the same K candidates, with the same reduction.

Paired form: ``loss(image_emb, text_emb, ids, images=None, texts=None, text_ids=None)``; row i of the two
embedding matrices is a matching pair, ``ids`` the image id of each row, ``images``/``texts`` the teacher's inputs
for the same rows (anything :func:`metrank.losses.teachers.take_rows` indexes; tensors or tuples of tensors with a
memory queue), ``text_ids`` the caption id of each row (needed for a :class:`metrank.losses.teachers.CachedTeacher`,
which caches by (id, text id): valid when rows sharing an id show the same image; where an id groups several images,
e.g. one emoji drawn by two vendors, score without the cache). Teacher scores are computed without gradient; the teacher is not a submodule
of the loss (its parameters stay out of ``loss.parameters()``). The distillation term uses this rank's queries
against this rank's batch plus the (global) queue; the InfoNCE term handles DDP itself.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from metrank.errors import InputError
from metrank.losses.base import LOSSES, PairedLoss
from metrank.losses.cross_modal import CrossModalLoss
from metrank.losses.infonce import InfoNCELoss
from metrank.losses.memory import MemoryQueue
from metrank.losses.teachers import CachedTeacher, Teacher, take_rows
from metrank.pairs import topk_distinct
from metrank.validation import check_choice

NORMALISATIONS = ("all", "prefix")
_FILL = -1e9  # finite stand-in for -inf: keeps masked log-sum-exp gradients free of NaN


def _members(batch: Any, name: str) -> tuple[torch.Tensor, ...]:
    if isinstance(batch, torch.Tensor):
        return (batch,)
    if isinstance(batch, tuple) and all(isinstance(t, torch.Tensor) for t in batch):
        return batch
    raise InputError(
        f"with a memory queue the teacher's {name} must be a tensor or a tuple of tensors (one row per batch item), "
        f"got {type(batch).__name__}"
    )


def _input_fields(images: Any, texts: Any) -> dict[str, torch.Tensor]:
    """The teacher inputs as named queue fields ``images0, images1, ..., texts0, ...``."""
    fields = {f"images{i}": t for i, t in enumerate(_members(images, "images"))}
    fields.update({f"texts{i}": t for i, t in enumerate(_members(texts, "texts"))})
    return fields


def _join_inputs(batch: Any, memory: MemoryQueue, name: str) -> Any:
    """The batch's teacher inputs followed by the queued ones, in the batch's structure (tensor or tuple)."""
    joined = tuple(torch.cat([t, memory[f"{name}{i}"].to(t.device)]) for i, t in enumerate(_members(batch, name)))
    return joined[0] if isinstance(batch, torch.Tensor) else joined


def valid_prefix(
    teacher_sorted: torch.Tensor,
    teacher_pos: torch.Tensor,
    fn_threshold: float | None = None,
    min_gap: float = 0.0,
    max_length: int | None = None,
) -> torch.Tensor:
    """Mask [n, K] of the kept negatives given teacher scores sorted descending per row (step 3 of the module doc).

    A negative is a false negative when its teacher score is >= the true pair's score ``teacher_pos`` or
    >= ``fn_threshold``; the kept run starts after them and ends before the first gap ``t_j - t_{j+1} < min_gap`` and after ``max_length`` items.
    """
    false_neg = teacher_sorted >= teacher_pos[:, None]
    if fn_threshold is not None:
        false_neg |= teacher_sorted >= fn_threshold
    keep = ~false_neg
    gaps = teacher_sorted[:, :-1] - teacher_sorted[:, 1:]
    # the run breaks after position j when the next item is too close to it
    breaks = F.pad(gaps < min_gap, (0, 1), value=True)
    started = keep.cumsum(1) > 0
    ended_before = F.pad((breaks & keep).cumsum(1)[:, :-1] > 0, (1, 0), value=False)
    keep = keep & started & ~ended_before
    if max_length is not None:
        keep &= keep.cumsum(1) <= max_length
    return keep


def ranking_chain(
    student_sorted: torch.Tensor, keep: torch.Tensor, temperature: float, normalise: str = "all"
) -> torch.Tensor:
    """Per row, ``sum over kept j of -log(exp(s_j/tau) / sum_{k>=j} exp(s_k/tau))`` (step 4 of the module doc).

    ``student_sorted`` [n, K] holds student similarities in teacher order, ``keep`` the valid prefix
    (:func:`valid_prefix`: contiguous, after the false negatives). ``normalise="all"`` sums the denominator over
    every position from j to K (the paper's formula), ``"prefix"`` over the kept positions only.
    """
    check_choice(normalise, NORMALISATIONS, "normalise")
    in_denominator = keep if normalise == "prefix" else keep.cumsum(1) > 0  # from the first kept position on
    logits = student_sorted / temperature
    tail_lse = logits.masked_fill(~in_denominator, _FILL).flip(1).logcumsumexp(1).flip(1)
    return ((tail_lse - logits) * keep).sum(1)


class _HardNegativeDistillation(PairedLoss):
    """Shared part of CPRD and logit distillation: InfoNCE + mining + teacher scoring; subclasses define
    ``distill(student [n, K], teacher [n, K], teacher_pos [n]) -> per-query loss [n]``."""

    teacher: Teacher | CachedTeacher
    _infonce: InfoNCELoss | None

    def __init__(
        self,
        teacher: Teacher,
        k: int,
        lam: float,
        itc: nn.Module | None,
        temperature: float | None,
        distinct: bool = True,
        memory_size: int = 0,
        cache_teacher: bool = False,
    ) -> None:
        super().__init__()
        if k < 1:
            raise InputError(f"k (hard negatives per query) must be >= 1, got {k}")
        if temperature is not None and temperature <= 0:
            raise InputError(f"temperature must be > 0, got {temperature}")
        if memory_size < 0:
            raise InputError(f"memory_size must be >= 0 (0 = in-batch negatives only), got {memory_size}")
        scorer = CachedTeacher(teacher) if cache_teacher and not isinstance(teacher, CachedTeacher) else teacher
        self.__dict__["teacher"] = scorer  # not a submodule: the student optimiser must not see its parameters
        self.k, self.lam, self.temperature, self.distinct = int(k), lam, temperature, bool(distinct)
        self.itc = CrossModalLoss(InfoNCELoss()) if itc is None else itc
        infonce = next((m for m in self.itc.modules() if isinstance(m, InfoNCELoss)), None)
        self.__dict__["_infonce"] = infonce  # a view into self.itc, not a second submodule
        if temperature is None and infonce is None:
            raise InputError("itc holds no InfoNCELoss to share the temperature with; pass temperature=")
        self.memory = MemoryQueue(memory_size) if memory_size else None

    def student_temperature(self) -> float:
        """The fixed ``temperature`` or the InfoNCE module's current one (1 / logit scale, detached)."""
        if self.temperature is not None:
            return self.temperature
        assert self._infonce is not None  # checked in __init__
        return 1.0 / float(self._infonce.scale.detach())

    def forward(
        self,
        image_emb: torch.Tensor,
        text_emb: torch.Tensor,
        ids: torch.Tensor,
        images: Any = None,
        texts: Any = None,
        text_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        self.check_pairs(image_emb, text_emb, ids)
        if images is None or texts is None:
            raise InputError("the teacher needs its inputs: pass images= and texts= (one row per batch item)")
        if isinstance(self.teacher, CachedTeacher) and text_ids is None:
            raise InputError("a CachedTeacher caches by (image id, text id): pass text_ids= (caption id per row)")
        itc = self.itc(image_emb, text_emb, ids)
        return itc + self.lam * self.distillation(image_emb, text_emb, ids, images, texts, text_ids)

    def distillation(
        self,
        image_emb: torch.Tensor,
        text_emb: torch.Tensor,
        ids: torch.Tensor,
        images: Any,
        texts: Any,
        text_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The distillation term alone, averaged over the queries of both directions (then, in training mode, the
        batch joins the memory queue if there is one)."""
        ids = ids.to(image_emb.device)
        dtype = torch.promote_types(image_emb.dtype, torch.float32)
        n, k = image_emb.shape[0], self.k
        rows = torch.arange(n, device=image_emb.device)
        has_text_ids = text_ids is not None
        if text_ids is None:
            if self.memory is not None:
                raise InputError("with a memory queue pass text_ids= (caption id per row) to tell captions apart")
            text_ids = torch.full_like(ids, -1)
        text_ids = text_ids.to(ids.device)
        ref = self._references(image_emb, text_emb, ids, text_ids, images, texts)
        image_all, text_all = ref["image"].to(dtype), ref["text"].to(dtype)
        sim_i2t = image_emb.to(dtype) @ text_all.T  # [n, M]: the batch's images against batch + queued texts
        sim_t2i = text_emb.to(dtype) @ image_all.T
        negative = ids[:, None] != ref["ids"][None, :]
        m = negative.shape[1]
        # candidate groups: one slot per caption id (i2t) and per image id (t2i); every row its own without distinct
        plain = torch.arange(m, device=ids.device)
        i2t_groups = ref["text_ids"] if self.distinct and has_text_ids else plain
        t2i_groups = ref["ids"] if self.distinct else plain
        i2t = topk_distinct(sim_i2t.detach(), negative, i2t_groups, k)
        t2i = topk_distinct(sim_t2i.detach(), negative, t2i_groups, k)
        # one teacher call for the n true pairs and the 2 n K candidate pairs: (image row, text row) of the refs
        image_rows = torch.cat([rows, rows.repeat_interleave(k), t2i.flatten()])
        text_rows = torch.cat([rows, i2t.flatten(), rows.repeat_interleave(k)])
        scores = self._teacher_scores(
            ref["images"], ref["texts"], image_rows, text_rows, ref["ids"], ref["text_ids"]
        ).to(sim_i2t.device)
        pos, t_i2t, t_t2i = scores[:n], scores[n : n + n * k].view(n, k), scores[n + n * k :].view(n, k)
        per_query = torch.cat(
            [self.distill(sim_i2t.gather(1, i2t), t_i2t, pos), self.distill(sim_t2i.gather(1, t2i), t_t2i, pos)]
        )
        if self.memory is not None and self.training:
            self.memory.push(image=image_emb, text=text_emb, ids=ids, text_ids=text_ids, **_input_fields(images, texts))
        return per_query.mean()

    def _references(
        self,
        image_emb: torch.Tensor,
        text_emb: torch.Tensor,
        ids: torch.Tensor,
        text_ids: torch.Tensor,
        images: Any,
        texts: Any,
    ) -> dict[str, Any]:
        """The candidate set: this batch's rows first (so row i of the batch is reference i), then the queue."""
        ref = {"image": image_emb, "text": text_emb, "ids": ids, "text_ids": text_ids, "images": images, "texts": texts}
        if self.memory is None or not len(self.memory):
            return ref
        queued = {name: self.memory[name] for name in ("image", "text", "ids", "text_ids")}
        for name in ("image", "text", "ids", "text_ids"):
            ref[name] = torch.cat([ref[name], queued[name].to(ref[name])])
        ref["images"] = _join_inputs(images, self.memory, "images")
        ref["texts"] = _join_inputs(texts, self.memory, "texts")
        return ref

    def _teacher_scores(
        self,
        images: Any,
        texts: Any,
        image_rows: torch.Tensor,
        text_rows: torch.Tensor,
        ids: torch.Tensor,
        text_ids: torch.Tensor,
    ) -> torch.Tensor:
        """Teacher scores of the pairs (images[image_rows[p]], texts[text_rows[p]]), each distinct pair scored once."""
        n = max(int(image_rows.max()), int(text_rows.max())) + 1
        codes, inverse = (image_rows.cpu() * n + text_rows.cpu()).unique(return_inverse=True)
        pairs = torch.stack([codes // n, codes % n], 1)
        with torch.no_grad():
            if isinstance(self.teacher, CachedTeacher):
                keys = torch.stack([ids.cpu()[pairs[:, 0]], text_ids.cpu()[pairs[:, 1]]], 1)
                scores = self.teacher(images, texts, keys, pairs[:, 0], pairs[:, 1])
            else:
                scores = self.teacher(take_rows(images, pairs[:, 0]), take_rows(texts, pairs[:, 1]))
        if scores.shape != (len(pairs),):
            raise InputError(
                f"the teacher must return one score per pair, shape ({len(pairs)},), got {tuple(scores.shape)}"
            )
        if not torch.isfinite(scores).all():
            raise InputError("the teacher returned NaN or inf scores")
        return scores.detach().to(torch.promote_types(scores.dtype, torch.float32))[inverse.to(scores.device)]

    def distill(self, student: torch.Tensor, teacher: torch.Tensor, teacher_pos: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


@LOSSES.register("cprd")
class CPRDLoss(_HardNegativeDistillation):
    """InfoNCE + contrastive partial ranking distillation of the teacher's order of the K hardest negatives.

    ``L = L_itc + lam * L_cprd`` (Chen et al., CVPR 2024; formula and paired calling form in the module doc).

    Args:
        teacher: scores (image, text) pairs, see :class:`metrank.losses.teachers.Teacher`.
        k: hard negatives mined per query. lam: weight of the ranking term.
        itc: the paired contrastive loss ``itc(image_emb, text_emb, ids)``; default
            ``CrossModalLoss(InfoNCELoss())`` (CLIP loss, learnable temperature shared with the chain, DDP-aware).
        temperature: fixed chain temperature instead of the InfoNCE one.
        fn_threshold, min_gap, max_length: the valid-prefix rule (:func:`valid_prefix`).
        normalise: ``"all"`` (the paper's denominator over every teacher-lower negative of the K) or ``"prefix"``
            (over the kept prefix only), see :func:`ranking_chain`.
        distinct: one candidate slot per image id (text->image) and per caption id (image->text, when
            ``text_ids`` are given).
        memory_size: mine the K negatives among this batch plus up to this many earlier pairs (XBM queue,
            :class:`metrank.losses.memory.MemoryQueue`; needs ``text_ids`` and tensor teacher inputs).
        cache_teacher: wrap a frozen teacher in :class:`metrank.losses.teachers.CachedTeacher` (each (image id,
            text id) pair scored once over training; needs ``text_ids``).
    """

    def __init__(
        self,
        teacher: Teacher,
        k: int = 8,
        lam: float = 1.0,
        itc: nn.Module | None = None,
        temperature: float | None = None,
        fn_threshold: float | None = None,
        min_gap: float = 0.0,
        max_length: int | None = None,
        normalise: str = "all",
        distinct: bool = True,
        memory_size: int = 0,
        cache_teacher: bool = False,
    ) -> None:
        super().__init__(teacher, k, lam, itc, temperature, distinct, memory_size, cache_teacher)
        self.normalise = check_choice(normalise, NORMALISATIONS, "normalise")
        if min_gap < 0:
            raise InputError(f"min_gap must be >= 0, got {min_gap}")
        if max_length is not None and max_length < 2:
            raise InputError(f"max_length must be >= 2 (a chain needs two negatives) or None, got {max_length}")
        self.fn_threshold, self.min_gap, self.max_length = fn_threshold, min_gap, max_length

    def distill(self, student: torch.Tensor, teacher: torch.Tensor, teacher_pos: torch.Tensor) -> torch.Tensor:
        order = teacher.argsort(1, descending=True)
        keep = valid_prefix(teacher.gather(1, order), teacher_pos, self.fn_threshold, self.min_gap, self.max_length)
        return ranking_chain(student.gather(1, order), keep, self.student_temperature(), self.normalise)


@LOSSES.register("logit_kd")
class LogitDistillationLoss(_HardNegativeDistillation):
    """InfoNCE + logit distillation baseline: ``KL(softmax(t / teacher_temperature) || softmax(s / tau))`` per query
    over the same K hardest negatives CPRD uses (teacher scores t, student similarities s, tau the InfoNCE
    temperature); ``L = L_itc + lam * L_kd``. No T^2 factor. ``distinct``, ``memory_size`` and ``cache_teacher``
    as for :class:`CPRDLoss`."""

    def __init__(
        self,
        teacher: Teacher,
        k: int = 8,
        lam: float = 1.0,
        itc: nn.Module | None = None,
        temperature: float | None = None,
        teacher_temperature: float = 1.0,
        distinct: bool = True,
        memory_size: int = 0,
        cache_teacher: bool = False,
    ) -> None:
        super().__init__(teacher, k, lam, itc, temperature, distinct, memory_size, cache_teacher)
        if teacher_temperature <= 0:
            raise InputError(f"teacher_temperature must be > 0, got {teacher_temperature}")
        self.teacher_temperature = teacher_temperature

    def distill(self, student: torch.Tensor, teacher: torch.Tensor, teacher_pos: torch.Tensor) -> torch.Tensor:
        log_p_teacher = (teacher / self.teacher_temperature).log_softmax(1)
        log_p_student = (student / self.student_temperature()).log_softmax(1)
        return (log_p_teacher.exp() * (log_p_teacher - log_p_student)).sum(1)
