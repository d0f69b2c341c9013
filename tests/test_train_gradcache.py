"""GradCache (metrank.training.gradcache) against the full-batch gradient, in float64 on a real (small) two-tower
model: whole towers, feature dropout (its masks must be replayed per chunk), InfoNCE with a learnable scale."""

from __future__ import annotations

import pytest
import torch

from metrank.encoders import create_model
from metrank.errors import InputError
from metrank.losses import CrossModalLoss, InfoNCELoss
from metrank.training.gradcache import grad_cache_backward
from metrank.training.towers import Tower, TrainModule


def two_tower(dropout: float) -> tuple[TrainModule, torch.Tensor, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    model = create_model("lite0-minilm", pretrained=False, embed_dim=16, image_size=32, context_length=8).double()
    image = Tower(model, "image", "full", feature_dropout=dropout)
    text = Tower(model, "text", "full", feature_dropout=dropout)
    names = [n for n, _ in model.named_parameters()]
    module = TrainModule(model, image, text, CrossModalLoss(InfoNCELoss()).double(), "image_text", None, names)
    module.train()
    pixels = torch.randn(10, 3, 32, 32, dtype=torch.float64)
    tokens = model.tokenize([f"caption number {i} of a small test batch" for i in range(10)])
    ids = torch.tensor([0, 1, 2, 3, 4, 5, 6, 7, 0, 9])  # rows 0 and 8 share an image id
    return module, pixels, tokens, ids


def grads(module: TrainModule) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}


@pytest.mark.slow
@pytest.mark.parametrize("chunk", [3, 10])
def test_grad_cache_gradients_equal_the_full_batch_gradients(chunk, one_torch_thread):
    module, pixels, tokens, ids = two_tower(dropout=0.2)
    torch.manual_seed(1)
    full = module(pixels, tokens, ids)
    full.backward()
    reference = grads(module)
    module.zero_grad(set_to_none=True)

    torch.manual_seed(1)
    loss = grad_cache_backward(
        module.embed_images, module.embed_texts, module.loss_of, pixels, tokens, ids, chunk, torch.device("cpu")
    )
    got = grads(module)
    assert loss.item() == pytest.approx(full.item(), abs=1e-12)
    assert set(got) == set(reference) and "loss.loss.logit_scale" in got
    for name, g in reference.items():
        torch.testing.assert_close(got[name], g, rtol=0, atol=1e-8, msg=name)


def test_a_loss_that_does_not_reach_the_embeddings_cannot_be_chunked():
    scale = torch.nn.Parameter(torch.tensor(2.0))

    def detached_loss(image_emb, text_emb, ids):  # e.g. a loss computed on detached copies
        return scale * (image_emb.detach() @ text_emb.detach().T).sum()

    def embed(rows):
        return rows * 1.0

    rows = torch.randn(4, 3, requires_grad=True)
    with pytest.raises(InputError, match="cannot be split into chunks; use this loss without train.grad_cache"):
        grad_cache_backward(embed, embed, detached_loss, rows, rows, torch.arange(4), 2, torch.device("cpu"))
