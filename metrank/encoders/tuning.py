"""Which part of a tower trains: ``heads`` / ``last_n`` / ``lora`` / ``full``, and the block split behind ``last_n``.

A backbone is read as ``stem -> blocks[0..n-1] -> tail`` (:class:`BlockSplit`). With ``last_n`` = k, the stem and
the first ``n - k`` blocks are the frozen *prefix*, the last ``k`` blocks and the tail train. ``prefix(x, k)``
returns the activations entering block ``n - k`` (plus what the later blocks need, e.g. the attention mask) and
``suffix(state, k)`` finishes the forward to the pooled features, so the trainer can cache the prefix once when
the transform is deterministic: ``suffix(prefix(x, k), k) == backbone(x)``, exactly (the same operations in the same
order). Splits exist for timm EfficientNet/MobileNet-style CNNs (``conv_stem``/``blocks``/``conv_head``), timm ViTs
(``patch_embed``/``blocks``/``norm``) and Hugging Face BERT-style text encoders inside open_clip's ``HFTextEncoder``.

LoRA (Hu et al., ICLR 2022, "LoRA: Low-Rank Adaptation of Large Language Models") comes from PEFT:
``peft.inject_adapter_in_model`` adds ``W x + (alpha / r) B A x`` to each targeted ``Linear``/``Conv2d``; the adapters
stay separate modules (checkpoints keep them as adapters and record the LoRA settings in ``model.config["tuning"]``,
so :func:`metrank.encoders.load_checkpoint` re-injects them before loading the weights).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from metrank.errors import ConfigError

TOWERS = ("image", "text")
# default LoRA targets per architecture family: module-name suffixes of Linear / pointwise Conv2d layers
LORA_DEFAULTS = {
    "efficientnet": ["conv_pw", "conv_pwl", "conv_head"],
    "vit": ["qkv", "proj", "fc1", "fc2"],
    "bert": ["query", "key", "value", "dense"],
    "open_clip_text": ["in_proj", "out_proj", "c_fc", "c_proj"],
}

# parameter-name prefixes (relative to the backbone) of the stem, per family: what runs before the first block
STEM_PREFIXES = {
    "efficientnet": ("conv_stem.", "bn1."),
    "vit": ("patch_embed.", "cls_token", "reg_token", "pos_embed", "norm_pre."),
    "bert": ("transformer.embeddings.",),
}


@dataclass
class BlockSplit:
    """``stem -> blocks -> tail`` view of a backbone (see the module docstring). ``kind`` names the family."""

    kind: str
    backbone: Any  # a timm model or open_clip HFTextEncoder: its submodules are read by name
    checkpointing: bool = False

    # --------------------------------------------------------------------------------------------- structure
    @property
    def blocks(self) -> Any:
        if self.kind == "bert":
            return self.backbone.transformer.encoder.layer
        return self.backbone.blocks

    @property
    def n_blocks(self) -> int:
        return len(self.blocks)

    def tail_modules(self) -> list[nn.Module]:
        b = self.backbone
        if self.kind == "efficientnet":
            return [b.conv_head, b.bn2, b.global_pool]
        if self.kind == "vit":
            return [b.norm, b.fc_norm, b.head_drop] + ([b.attn_pool] if getattr(b, "attn_pool", None) else [])
        return [b.pooler]

    def trainable_modules(self, k: int) -> list[nn.Module]:
        """The last ``k`` blocks and the tail."""
        self.check_blocks(k)
        return [self.blocks[i] for i in range(self.n_blocks - k, self.n_blocks)] + self.tail_modules()

    def block_prefix(self) -> str:
        """Parameter-name prefix of the blocks (relative to the backbone): ``blocks.`` / ``...encoder.layer.``."""
        return "transformer.encoder.layer." if self.kind == "bert" else "blocks."

    def layer_of(self, name: str) -> int:
        """Layer id of a backbone parameter (``name`` relative to the backbone, LoRA adapters included), BEiT style:
        0 = the stem (what runs before block 0), ``i + 1`` = block ``i``, ``n + 1`` = the tail after the last block."""
        if name.startswith(self.block_prefix()):
            return int(name[len(self.block_prefix()) :].split(".", 1)[0]) + 1
        if name.startswith(STEM_PREFIXES[self.kind]):
            return 0
        return self.n_blocks + 1

    def check_blocks(self, k: int) -> None:
        if not 1 <= k <= self.n_blocks:
            raise ConfigError(
                f"last_n blocks={k} but this {self.kind} backbone has {self.n_blocks} blocks; use blocks in "
                f"1..{self.n_blocks} (or mode: full to train the stem too)"
            )

    # ------------------------------------------------------------------------------------------------ forward
    def prefix(self, x: torch.Tensor, k: int) -> tuple[torch.Tensor, ...]:
        """Activations entering block ``n - k``: ``(hidden,)`` for images, ``(hidden, attention_mask)`` for text."""
        self.check_blocks(k)
        b = self.backbone
        if self.kind == "efficientnet":
            state: tuple[torch.Tensor, ...] = (b.bn1(b.conv_stem(x)),)
        elif self.kind == "vit":
            state = (b.norm_pre(b.patch_drop(b._pos_embed(b.patch_embed(x)))),)
        else:
            mask = (x != b.config.pad_token_id).long()
            state = (b.transformer.embeddings(input_ids=x), mask)
        return self._run(state, 0, self.n_blocks - k)

    def suffix(self, state: tuple[torch.Tensor, ...], k: int) -> torch.Tensor:
        """Pooled backbone features from the prefix state (the last ``k`` blocks and the tail)."""
        (hidden, *rest) = self._run(tuple(state), self.n_blocks - k, self.n_blocks)
        b = self.backbone
        if self.kind == "efficientnet":
            return b.forward_head(b.bn2(b.conv_head(hidden)), pre_logits=True)
        if self.kind == "vit":
            return b.forward_head(b.norm(hidden), pre_logits=True)
        return b.proj(b.pooler(SimpleNamespace(last_hidden_state=hidden), rest[0]))

    def _run(self, state: tuple[torch.Tensor, ...], start: int, stop: int) -> tuple[torch.Tensor, ...]:
        hidden, *rest = state
        extended = None
        if self.kind == "bert" and start < stop:
            mask = rest[0]
            # the encoder's own mask builder (eager: additive float; sdpa: boolean [B, 1, L, L]), as BertModel uses it
            extended, _ = self.backbone.transformer._create_attention_masks(
                attention_mask=mask,
                encoder_attention_mask=None,
                embedding_output=hidden,
                encoder_hidden_states=None,
                cache=None,
            )
        for i in range(start, stop):
            block = self.blocks[i]
            args = (hidden,) if extended is None else (hidden, extended)
            if self.checkpointing and torch.is_grad_enabled() and any(p.requires_grad for p in block.parameters()):
                hidden = checkpoint(block, *args, use_reentrant=False)
            else:
                hidden = block(*args)
            if isinstance(hidden, tuple):
                hidden = hidden[0]
        return (hidden, *rest)


def block_split(backbone: nn.Module, checkpointing: bool = False) -> BlockSplit | None:
    """The :class:`BlockSplit` of a backbone, or ``None`` when its architecture has no split here."""
    if hasattr(backbone, "conv_stem") and hasattr(backbone, "blocks") and hasattr(backbone, "conv_head"):
        return BlockSplit("efficientnet", backbone, checkpointing)
    if hasattr(backbone, "patch_embed") and hasattr(backbone, "blocks") and hasattr(backbone, "_pos_embed"):
        return BlockSplit("vit", backbone, checkpointing)
    encoder = getattr(getattr(backbone, "transformer", None), "encoder", None)
    if hasattr(encoder, "layer") and hasattr(backbone, "pooler"):
        return BlockSplit("bert", backbone, checkpointing)
    return None


def require_split(backbone: nn.Module, tower: str, checkpointing: bool = False) -> BlockSplit:
    split = block_split(backbone, checkpointing)
    if split is None:
        raise ConfigError(
            f"model.{tower}.mode=last_n: no block split for a {type(backbone).__name__} backbone (supported: timm "
            "EfficientNet/MobileNet-style CNNs, timm ViTs, BERT-style text encoders); use mode: lora or full"
        )
    return split


def default_lora_targets(backbone: nn.Module) -> list[str]:
    """LoRA targets for the backbone's family (:data:`LORA_DEFAULTS`); empty when none is known."""
    split = block_split(backbone)
    if split is not None:
        return list(LORA_DEFAULTS[split.kind])
    names = {name.rsplit(".", 1)[-1] for name, _ in backbone.named_modules()}
    return [t for t in LORA_DEFAULTS["open_clip_text"] if t in names]


def apply_lora(backbone: nn.Module, tower: str, r: int, alpha: float, dropout: float, targets: Sequence[str]) -> None:
    """Inject PEFT LoRA adapters into ``backbone`` in place (on the modules whose names end with a target)."""
    from peft import LoraConfig, inject_adapter_in_model

    if r < 1:
        raise ConfigError(f"model.{tower}.lora_r must be >= 1, got {r}")
    layers = [
        name
        for name, m in backbone.named_modules()
        if isinstance(m, (nn.Linear, nn.Conv2d)) and any(name == t or name.endswith("." + t) for t in targets)
    ]
    if not targets or not layers:
        kinds = sorted({name.rsplit(".", 1)[-1] for name, m in backbone.named_modules() if isinstance(m, nn.Linear)})
        raise ConfigError(
            f"model.{tower}.mode=lora: no Linear/Conv2d layer of the {type(backbone).__name__} backbone matches "
            f"lora_targets={list(targets)}; set model.{tower}.lora_targets to layer names such as {kinds[:8]}"
        )
    depthwise = [n for n in layers if getattr(backbone.get_submodule(n), "groups", 1) != 1]
    if depthwise:
        raise ConfigError(
            f"model.{tower}.lora_targets hit grouped (depthwise) convolutions {depthwise[:3]}, which LoRA does not "
            "support; target pointwise layers (e.g. conv_pw, conv_pwl)"
        )
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=layers)  # type: ignore[arg-type]
    inject_adapter_in_model(config, backbone)


def lora_settings(spec: Any, backbone: nn.Module) -> dict[str, Any]:
    """The LoRA settings of a tower config (defaults resolved), as stored in ``model.config["tuning"]``."""
    targets = list(spec.lora_targets) if spec.lora_targets is not None else default_lora_targets(backbone)
    return {"r": spec.lora_r, "alpha": float(spec.lora_alpha), "dropout": float(spec.lora_dropout), "targets": targets}


def tower_backbone(model: Any, tower: str) -> Any:
    """The backbone of ``tower`` ("image" / "text") of a ``RetrievalModel``."""
    return model.image_backbone if tower == "image" else model.text_backbone


def tower_head(model: Any, tower: str) -> Any:
    """The projection head of ``tower`` of a ``RetrievalModel``."""
    return model.image_projection if tower == "image" else model.text_projection


def apply_tuning(model: Any, tuning: dict[str, Any]) -> None:
    """Re-apply the recorded structural changes (LoRA adapters) of ``model.config["tuning"]`` to a fresh model."""
    for tower, settings in tuning.items():
        lora = settings.get("lora")
        if lora:
            apply_lora(tower_backbone(model, tower), tower, lora["r"], lora["alpha"], lora["dropout"], lora["targets"])
    model.config = {**model.config, "tuning": tuning}


def trainable_parameter_names(model: nn.Module, tower: str, mode: str, blocks: int = 0) -> list[str]:
    """Full parameter names (in ``model.named_parameters()``) that train for ``tower`` in ``mode``."""
    head = tower_head(model, tower)
    backbone = tower_backbone(model, tower)
    prefix_of = {id(m): name for name, m in model.named_modules()}
    modules: list[nn.Module] = [head]
    if mode == "full":
        modules.append(backbone)
    elif mode == "last_n":
        modules += require_split(backbone, tower).trainable_modules(blocks)
    names = [f"{prefix_of[id(m)]}.{n}" for m in modules for n, _ in m.named_parameters()]
    if mode == "lora":
        base = prefix_of[id(backbone)]
        names += [f"{base}.{n}" for n, _ in backbone.named_parameters() if "lora_" in n]
    return list(dict.fromkeys(names))
