"""The read-free paths the custom ops take on accelerators (passes/kernels/sync.py), checked on CPU.

``sparsify_fx.passes.kernels.sync.sync_free`` is patched to say yes, so the CPU runs the code a GPU would. A
training step is profiled and must contain no op that reads a value back to the host
(``.item()``, ``bool(t)``, ``nonzero``, boolean-mask indexing); its gradients must equal the
CPU path's wherever the two are specified to agree.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torchvision
from conftest import SmallCNN
from sparsify_fx.passes import dropit
from sparsify_fx.passes.activation_memory.rewrite import compress as actmem_compress
from sparsify_fx.passes.dropit import compress_threshold, decompress_threshold
from sparsify_fx.passes.kernels import sync
from torch.profiler import ProfilerActivity, profile

import sparsify_fx as sfx

#: ops that wait for the device and copy a value to the host
_READS = {"aten::_local_scalar_dense", "aten::item", "aten::is_nonzero", "aten::nonzero", "aten::masked_select"}


@pytest.fixture
def read_free(monkeypatch):
    monkeypatch.setattr(sync, "sync_free", lambda device: True)


def _reads(fn) -> dict[str, int]:
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return {e.key: e.count for e in prof.key_averages() if e.key in _READS}


def _inputs():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(4, 16, 24, 24, generator=gen)
    with_nonfinite = torch.randn(3000, generator=gen)
    with_nonfinite[[5, 700, 2999]] = torch.tensor([float("nan"), float("inf"), -float("inf")])
    return [x, x.relu(), torch.randn(37, 130, generator=gen), with_nonfinite, torch.ones(1000), torch.randn(3)]


@pytest.mark.parametrize("keep", [0.1, 0.5])
def test_static_selection_equals_the_exact_one_when_it_fits(keep, monkeypatch):
    for x in _inputs():
        exact = compress_threshold(x, keep)
        monkeypatch.setattr(sync, "sync_free", lambda device: True)
        static = compress_threshold(x, keep)
        monkeypatch.undo()
        kept = int(decompress_threshold(*exact, x.shape).ne(0).sum())
        assert kept <= exact[0].numel()  # the precondition: nothing was over capacity
        for a, b in zip(static, exact):
            torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)


def test_static_selection_over_capacity_keeps_the_first_in_flat_order(read_free):
    # the sample sees only small values, so far more than the capacity passes its cut-off
    x = torch.linspace(1.0, 2.0, 262144)
    x[dropit._sample_index(x.numel(), x.device)] = 0.01
    assert not _reads(lambda: compress_threshold(x, 0.1))
    values, bitmap = compress_threshold(x, 0.1)
    restored = decompress_threshold(values, bitmap, x.shape)
    kept = restored.ne(0).nonzero().squeeze(1)
    assert kept.numel() == values.numel()  # bitmap and values agree: filled to capacity
    passing = (x > 0.01).nonzero().squeeze(1)
    torch.testing.assert_close(kept, passing[: values.numel()], rtol=0, atol=0)
    torch.testing.assert_close(restored[kept], x[kept], rtol=0, atol=0)


def test_bf16_storage_reads_nothing_and_saturates_like_the_cpu_path(monkeypatch):
    x = torch.tensor([1.0, -3.4e38, 3.4e38, float("inf"), float("nan"), 1e-3])
    exact = actmem_compress(x, "bf16", 64)[0]
    monkeypatch.setattr(sync, "sync_free", lambda device: True)
    assert not _reads(lambda: actmem_compress(x, "bf16", 64))
    torch.testing.assert_close(actmem_compress(x, "bf16", 64)[0], exact, rtol=0, atol=0, equal_nan=True)


def _grads(model: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    for p in model.parameters():
        p.grad = None
    model(x).float().pow(2).mean().backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _vit():
    return torchvision.models.VisionTransformer(image_size=16, patch_size=4, num_layers=2, num_heads=2,
                                                hidden_dim=32, mlp_dim=64, num_classes=5)


@pytest.mark.parametrize("name, factory, shape, recipe", [
    ("cnn", SmallCNN, (4, 3, 16, 16), "dropit:keep=0.1,skip_first_last=False+actmem"),
    ("cnn-int8", SmallCNN, (4, 3, 16, 16), "dropit:keep=0.3+actmem:batchnorm=int8,silu=int8"),
    ("vit", _vit, (2, 3, 16, 16), "dropit:keep=0.1+actmem:attention=bf16"),
])
def test_training_step_reads_nothing_back(name, factory, shape, recipe, monkeypatch):
    torch.manual_seed(0)
    model = factory()
    x = torch.randn(*shape)
    fast = sfx.sparsify(model, recipe, example_inputs=(x,)).train()
    assert sfx.explain(fast).rewrites, name
    # the CPU path has reads (the test would pass vacuously if it had none)
    assert _reads(lambda: _grads(fast, x)), name
    exact = _grads(fast, x)
    monkeypatch.setattr(sync, "sync_free", lambda device: True)
    reads = _reads(lambda: _grads(fast, x))
    assert not reads, f"{name}: host reads in a read-free training step: {reads}"
    # random activations stay within the 1.04x capacity, so both paths keep the same elements
    got = _grads(fast, x)
    assert got.keys() == exact.keys()
    for n in exact:
        torch.testing.assert_close(got[n], exact[n], rtol=1e-5, atol=1e-6, msg=lambda m, n=n: f"{name} {n}: {m}")
