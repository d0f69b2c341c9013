"""``MODELS`` registry and ``create_model``: the one way to build a ``RetrievalModel``.

Names: ``"lite0-minilm"`` (offline two-tower default), ``"lite0"`` (image only), ``"timm/<timm model name>"``,
``"open_clip/<open_clip config>"``. Builders are registered by ``metrank.encoders.timm_model`` and
``metrank.encoders.clip_model``; prefixed names go to the ``"timm"`` / ``"open_clip"`` builder with ``arch`` set.
"""

from __future__ import annotations

from typing import Any

from metrank.encoders.model import RetrievalModel
from metrank.errors import ConfigError
from metrank.registry import Registry

MODELS: Registry[RetrievalModel] = Registry("model")
PREFIXED = ("timm", "open_clip")

Pretrained = bool | str | None


def create_model(name: str, pretrained: Pretrained = True, **kwargs: Any) -> RetrievalModel:
    """Build model ``name``; ``pretrained`` is ``True`` (offline package weights where they exist), ``False``/
    ``None`` (random init), or for ``timm/``/``open_clip/`` names a local checkpoint path or an open_clip tag.

    Extra keyword arguments go to the builder (``embed_dim``, ``image_size``, ``pooling``, ``freeze_image`` ...)
    and are recorded in ``model.config`` so ``load_checkpoint`` can rebuild the model. The model is returned in
    eval mode (call ``.train()`` to fine-tune).
    """
    prefix, _, arch = name.partition("/")
    if arch:
        if prefix not in PREFIXED:
            raise ConfigError(
                f"unknown model prefix {prefix!r} in {name!r}; valid: "
                f"{', '.join(p + '/<name>' for p in PREFIXED)} or one of {', '.join(named_models())}"
            )
        builder, kwargs = MODELS.get(prefix), {"arch": arch, **kwargs}
    elif name in PREFIXED:
        raise ConfigError(f"model name {name!r} needs an architecture: {name}/<name>")
    else:
        try:
            builder = MODELS.get(name)
        except ValueError:
            raise ConfigError(
                f"unknown model {name!r}; valid names: {', '.join(named_models())}, "
                "timm/<timm model name>, open_clip/<open_clip config>"
            ) from None
    model = builder(pretrained=pretrained, **kwargs)
    model.config = {"name": name, "kwargs": {k: v for k, v in kwargs.items() if k != "arch"}}
    return model.eval()


def named_models() -> list[str]:
    """Registered model names without an architecture suffix."""
    return [n for n in MODELS.names() if n not in PREFIXED]
