"""Every torchvision classification model x every exact recipe: capture, rewrite, eval outputs
equal to the original, one training step with finite gradients for every parameter."""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch.utils._pytree import tree_leaves

import sparsify_fx as sfx

ALL_MODELS = torchvision.models.list_models(module=torchvision.models)

# smallest inputs the architectures allow; constructor kwargs that make them possible
_KWARGS = {
    "vit_b_16": {"image_size": 32}, "vit_b_32": {"image_size": 64},
    "vit_l_16": {"image_size": 32}, "vit_l_32": {"image_size": 64},
    "vit_h_14": {"image_size": 28},
    "googlenet": {"init_weights": False}, "inception_v3": {"init_weights": False},
}
_SIZE = {"vit_b_16": 32, "vit_l_16": 32, "vit_h_14": 28, "inception_v3": 299, "maxvit_t": 224}
_BATCH = {"maxvit_t": 1, "inception_v3": 2}
# slowest on 2 CPU cores (seconds each); `-m "not slow"` skips them locally, CI runs them
SLOW = {"regnet_y_128gf", "vit_h_14", "regnet_y_32gf", "maxvit_t", "vit_l_16", "vit_l_32",
        "regnet_y_16gf", "efficientnet_b7", "vgg19_bn", "vgg16_bn", "swin_v2_b", "swin_b"}


def _params(names):
    return [pytest.param(n, marks=pytest.mark.slow) if n in SLOW else n for n in names]


def test_zoo_list_is_complete():
    assert len(ALL_MODELS) >= 80


RECIPES = {
    "dropit": "dropit:keep=0.1",
    "dropit_actmem": "dropit:keep=0.1+actmem",
    "bsr": "bsr:density=0.5,block_size=16",
    "sliceout": "sliceout:p=0.5",
}
# SliceOut finds no sliceable group in some architectures (every inner channel feeds a
# residual add, a concat or a grouped conv) and BSR no eligible layer in others (no Linear
# or stride-1 1x1 conv besides the first/last): they must then say why
MAY_REWRITE_NOTHING = {"sliceout", "bsr"}


@pytest.mark.parametrize("recipe", list(RECIPES))
@pytest.mark.parametrize("name", _params(ALL_MODELS))
def test_zoo(name, recipe):
    torch.manual_seed(0)
    model = torchvision.models.get_model(name, weights=None, **_KWARGS.get(name, {}))
    size = _SIZE.get(name, 64)
    x = torch.randn(_BATCH.get(name, 2), 3, size, size)
    fast = sfx.sparsify(model, RECIPES[recipe], example_inputs=(x,))  # verify=True
    report = sfx.explain(fast)
    assert report.verification.startswith("ok"), report.verification
    if recipe in MAY_REWRITE_NOTHING:
        assert report.rewrites or (report.skipped and all(s.reason for s in report.skipped))
    else:
        assert report.rewrites, f"nothing rewritten: {[s.reason for s in report.skipped][:5]}"
    assert set(fast.state_dict()) == set(model.state_dict())
    with torch.no_grad():
        model.eval()
        fast.eval()
        torch.testing.assert_close(_logits(fast(x)), _logits(model(x)), rtol=1e-4, atol=1e-5)
    fast.train()
    outputs = [t for t in tree_leaves(fast(x)) if isinstance(t, torch.Tensor)]
    sum(t.float().pow(2).mean() for t in outputs).backward()  # aux heads included
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, f"no gradient for {missing[:5]}"
    bad = [n for n, p in model.named_parameters() if p.grad is not None and not torch.isfinite(p.grad).all()]
    assert not bad, f"non-finite gradients for {bad[:5]}"


def _logits(out):
    if isinstance(out, torch.Tensor):
        return out
    return out[0]  # GoogLeNet / Inception train-mode namedtuples: main logits first
