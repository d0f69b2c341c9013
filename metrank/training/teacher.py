"""The cross-encoder teacher of the distillation losses (``cprd``, ``logit_kd``), configured in ``loss.teacher``.

The teacher is :class:`metrank.losses.teachers.CrossAttentionTeacher` over the *frozen* pooled features of the two
towers (image features [n, F_image], caption features [n, F_text]): either loaded from ``loss.teacher.checkpoint``
or trained first on the training split with its image-text matching loss (ALBEF-style ITM: the true pairs against
one negative caption per image and one negative image per caption) and written to ``<output.dir>/teacher.pt``.
A checkpoint records the feature sizes and the backbones it was trained on; loading it for other features is an error.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from metrank import distributed
from metrank.atomic import atomic_torch_save, load_torch_file
from metrank.errors import ConfigError, StateError
from metrank.losses.teachers import CrossAttentionTeacher
from metrank.training.config import TeacherConfig

FORMAT = "metrank.teacher.v1"


def train_teacher(
    cfg: TeacherConfig,
    image_feats: torch.Tensor,
    text_feats: torch.Tensor,
    ids: torch.Tensor,
    seed: int,
    device: torch.device,
) -> CrossAttentionTeacher:
    """Fit a teacher on paired rows (row i of ``image_feats``/``text_feats`` match; ``ids`` the image id per row)."""
    generator = torch.Generator().manual_seed(seed)
    teacher = CrossAttentionTeacher(image_feats.shape[1], text_feats.shape[1], width=cfg.width, depth=cfg.depth)
    teacher.to(device).train()
    optimizer = torch.optim.AdamW(teacher.parameters(), lr=cfg.lr)
    n = len(ids)
    for _ in range(cfg.epochs):
        order = torch.randperm(n, generator=generator)
        batches = [order[i : i + cfg.batch_size] for i in range(0, n, cfg.batch_size)]
        for rows in batches:
            if len(ids[rows].unique()) < 2:
                continue
            loss = teacher.itm_loss(
                image_feats[rows].to(device), text_feats[rows].to(device), ids[rows].to(device), generator=generator
            )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    return teacher.eval().requires_grad_(False)


def save_teacher(path: Path, teacher: CrossAttentionTeacher, cfg: TeacherConfig, source: dict[str, Any]) -> None:
    atomic_torch_save(
        {
            "format": FORMAT,
            "state_dict": teacher.state_dict(),
            "width": cfg.width,
            "depth": cfg.depth,
            "source": source,
        },
        path,
    )


def load_teacher(path: str | Path, source: dict[str, Any], device: torch.device) -> CrossAttentionTeacher:
    """Load a teacher written by :func:`save_teacher`; ``source`` (feature sizes, backbone fingerprints) must match."""
    payload = load_torch_file(Path(path), "teacher checkpoint")
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise StateError(f"{str(path)!r} is not a metrank teacher checkpoint (written by metrank train for cprd)")
    if payload["source"] != source:
        diff = {k: (payload["source"].get(k), v) for k, v in source.items() if payload["source"].get(k) != v}
        raise ConfigError(
            f"teacher checkpoint {str(path)!r} was trained on other features than this student's data ({diff}); "
            "set loss.teacher.checkpoint=null to train a teacher on this training split first"
        )
    dims = source["image_dim"], source["text_dim"]
    teacher = CrossAttentionTeacher(*dims, width=payload["width"], depth=payload["depth"])
    teacher.load_state_dict(payload["state_dict"])
    return teacher.to(device).eval().requires_grad_(False)


def build_teacher(
    cfg: TeacherConfig,
    image_feats: torch.Tensor,
    text_feats: torch.Tensor,
    ids: torch.Tensor,
    source: dict[str, Any],
    out_dir: Path,
    seed: int,
    device: torch.device,
) -> CrossAttentionTeacher:
    """The configured teacher: loaded from ``cfg.checkpoint`` or trained here (rank 0 writes ``teacher.pt``)."""
    if cfg.checkpoint is not None:
        return load_teacher(cfg.checkpoint, source, device)
    teacher = train_teacher(cfg, image_feats, text_feats, ids, seed, device)
    if distributed.rank() == 0:
        save_teacher(out_dir / "teacher.pt", teacher, cfg, source)
    return teacher
