"""Each built-in recipe on a handful of representative torchvision models: eval-exact,
one training step with finite gradients for every parameter, state_dict keys kept."""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch.utils._pytree import tree_leaves

import sparsify_fx as sfx

MODELS = {
    "resnet18": ({}, 32),
    "mobilenet_v3_small": ({}, 32),
    "convnext_tiny": ({}, 32),
    "vit_b_16": ({"image_size": 32}, 32),
    "efficientnet_b0": ({}, 32),
}
RECIPES = [
    "dropit:keep=0.1+actmem",
    "bsr:density=0.5,block_size=16",
    "sliceout:p=0.5",
    "budget:fraction=0.25",
    "budget:fraction=0.2,exact_only=True",
]


@pytest.mark.parametrize("recipe", RECIPES)
@pytest.mark.parametrize("name", list(MODELS))
def test_recipe_on_model(name, recipe):
    torch.manual_seed(0)
    kwargs, size = MODELS[name]
    model = torchvision.models.get_model(name, weights=None, **kwargs)
    x = torch.randn(2, 3, size, size)
    fast = sfx.sparsify(model, recipe, example_inputs=(x,))  # raises on an eval mismatch
    report = sfx.explain(fast)
    assert report.verification.startswith("ok")
    assert set(fast.state_dict()) >= set(model.state_dict())
    fast.train()
    loss = sum(t.float().pow(2).mean() for t in tree_leaves(fast(x)) if isinstance(t, torch.Tensor))
    loss.backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), pname
