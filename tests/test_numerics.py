"""Numerical hygiene of the compressed forms (issue #9).

* NaN / Inf in an activation are propagated, not masked: where the dense op's gradient is
  non-finite, the compressed op's is too (DropIT keeps non-finite inputs, BSR keeps the blocks
  holding them, ActivationMemory's int8 stores them as a NaN code, bf16 keeps them).
* Compression creates no inf / NaN where the dense op had none: an inf in an int8 block does
  not spoil its neighbours, float32 values beyond bfloat16's range saturate instead of rounding
  to inf, and fp16 activations near 65504 round-trip through int8 without overflowing.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from sparsify_fx.passes.activation_memory.rewrite import NONFINITE_CODE, compress, decompress

import sparsify_fx as sfx

INF, NAN = float("inf"), float("nan")
ops = torch.ops.sparsify_fx


def _poke(kind: str, x: torch.Tensor) -> torch.Tensor:
    x = x.clone()
    if kind == "nan":
        x[3, 5] = NAN
    elif kind == "inf":
        x[3, 5] = INF
    elif kind == "-inf":
        x[2, 7] = -INF
    elif kind == "nan-row":
        x[4].fill_(NAN)
    return x


def _run(fn, x: torch.Tensor, *params: torch.Tensor, grad: torch.Tensor | None = None):
    x = x.clone().requires_grad_()
    params = [p.clone().requires_grad_() for p in params]
    out = fn(x, *params)
    out.backward(torch.ones_like(out) if grad is None else grad)
    return {"out": out.detach(), "grad_x": x.grad, **{f"grad_p{i}": p.grad for i, p in enumerate(params)}}


def _same_non_finite(dense: dict, compressed: dict, where: str) -> None:
    """Every tensor: non-finite exactly where the dense op's is (no NaN lost, none created)."""
    for key, d in dense.items():
        c = compressed[key]
        lost = torch.isfinite(c) & ~torch.isfinite(d)
        created = ~torch.isfinite(c) & torch.isfinite(d)
        assert not lost.any(), f"{where} {key}: {int(lost.sum())} non-finite value(s) masked by compression"
        assert not created.any(), f"{where} {key}: {int(created.sum())} non-finite value(s) created by compression"


POKES = ["nan", "inf", "-inf", "nan-row"]

# compressed form -> (compressed op, dense reference); inputs x [16, 32], weight [8, 32]
LINEAR_FORMS = {
    "dropit-threshold": lambda x, w: ops.dropit_linear(x, w, None, 0.1, 64, "threshold", False)[0],
    "dropit-topk": lambda x, w: ops.dropit_linear(x, w, None, 0.1, 64, "topk", False)[0],
    "bsr-l2": lambda x, w: ops.block_sparse_dense(x, w, None, 4, 0.25, "l2", "sample", "linear", [])[0],
    "bsr-l1": lambda x, w: ops.block_sparse_dense(x, w, None, 4, 0.25, "l1", "sample", "linear", [])[0],
}


@pytest.mark.parametrize("poke", POKES)
@pytest.mark.parametrize("form", list(LINEAR_FORMS))
def test_dense_layer_compression_propagates_non_finite_inputs(form, poke):
    torch.manual_seed(0)
    x, w = _poke(poke, torch.randn(16, 32)), torch.randn(8, 32)
    dense = _run(lambda x, w: F.linear(x, w), x, w)
    compressed = _run(LINEAR_FORMS[form], x, w)
    if form == "dropit-topk" and poke == "nan-row":
        # 32 NaN in a 64-element chunk that keeps 7: the kept values are all NaN (NaN ranks
        # first), so grad_weight is non-finite, but only in the 7 columns that fit
        assert not (~torch.isfinite(compressed["grad_p0"]) & torch.isfinite(dense["grad_p0"])).any()
        assert int(torch.isnan(compressed["grad_p0"]).any(0).sum()) == 7
        return
    # grad_weight is where a dropped NaN would vanish; forward and grad_input are exact
    _same_non_finite(dense, compressed, form)


def test_dropit_keeps_non_finite_inputs_beyond_the_sampled_cut_off():
    # more non-finite elements than the kept fraction: they fill the whole capacity, in flat
    # order, so grad_weight is still non-finite (the dense one is non-finite in every column)
    x = torch.randn(16, 32)
    x[:, :4] = NAN
    x[:, 4:8] = INF
    w = torch.randn(8, 32, requires_grad=True)
    ops.dropit_linear(x, w, None, 0.05, 64, "threshold", False)[0].sum().backward()
    assert not torch.isfinite(w.grad).all()
    assert torch.isnan(w.grad[:, :4]).all()


ACTIVATIONS = {
    "relu-bitmask": (lambda x: ops.actmem_relu(x, 0.0)[0], F.relu),
    "leaky-bitmask": (lambda x: ops.actmem_relu(x, 0.1)[0], lambda x: F.leaky_relu(x, 0.1)),
    "gelu-bf16": (lambda x: ops.actmem_gelu(x, "none", "bf16", 16)[0], F.gelu),
    "gelu-tanh-int8": (lambda x: ops.actmem_gelu(x, "tanh", "int8", 16)[0], lambda x: F.gelu(x, approximate="tanh")),
    "gelu-int8": (lambda x: ops.actmem_gelu(x, "none", "int8", 16)[0], F.gelu),
    "silu-bf16": (lambda x: ops.actmem_silu(x, "bf16", 16)[0], F.silu),
    "silu-int8": (lambda x: ops.actmem_silu(x, "int8", 16)[0], F.silu),
}


@pytest.mark.parametrize("poke", POKES)
@pytest.mark.parametrize("form", list(ACTIVATIONS))
def test_activation_compression_propagates_non_finite_inputs(form, poke):
    torch.manual_seed(0)
    x = _poke(poke, torch.randn(16, 32))
    compressed_fn, dense_fn = ACTIVATIONS[form]
    _same_non_finite(_run(dense_fn, x), _run(compressed_fn, x), form)


@pytest.mark.parametrize("storage", ["bf16", "int8"])
@pytest.mark.parametrize("poke", POKES)
def test_scale_compression_propagates_non_finite_inputs(poke, storage):
    torch.manual_seed(0)
    x = _poke(poke, torch.randn(16, 32))
    alpha, grad = torch.randn(32), torch.randn(16, 32)
    dense = _run(lambda x, a: x * a, x, alpha, grad=grad)
    compressed = _run(lambda x, a: ops.actmem_scale(x, a, storage, 16)[0], x, alpha, grad=grad)
    _same_non_finite(dense, compressed, f"scale-{storage}")


@pytest.mark.parametrize("storage", ["bf16", "int8"])
@pytest.mark.parametrize("poke", POKES)
@pytest.mark.parametrize("norm", ["layer_norm", "batch_norm"])
def test_norm_compression_propagates_non_finite_inputs(norm, poke, storage):
    torch.manual_seed(0)
    x = _poke(poke, torch.randn(16, 32))
    w, b = torch.rand(32) + 0.5, torch.randn(32)
    grad = torch.randn(16, 32)
    if norm == "layer_norm":
        dense = _run(lambda x, w, b: F.layer_norm(x, [32], w, b), x, w, b, grad=grad)
        compressed = _run(lambda x, w, b: ops.actmem_layer_norm(x, [32], w, b, 1e-5, storage, 16)[0], x, w, b,
                          grad=grad)
    else:
        def dense_bn(x, w, b):
            return F.batch_norm(x, torch.zeros(32), torch.ones(32), w, b, True)

        def compressed_bn(x, w, b):
            return ops.actmem_batch_norm(x, w, b, torch.zeros(32), torch.ones(32), 0.1, 1e-5, storage, 16)[0]

        dense, compressed = _run(dense_bn, x, w, b, grad=grad), _run(compressed_bn, x, w, b, grad=grad)
    _same_non_finite(dense, compressed, f"{norm}-{storage}")


def test_int8_stores_non_finite_values_as_a_code_and_scales_by_the_finite_ones():
    x = torch.tensor([1.0, -2.0, INF, 0.5, NAN, -INF, 4.0, 0.0] * 2)
    payload, scale = compress(x, "int8", 16)
    assert scale.item() == pytest.approx(4.0 / 127)  # the largest finite magnitude, not inf
    assert (payload.view(-1)[[2, 4, 5]] == NONFINITE_CODE).all()
    back = decompress(payload, scale, x.shape, x.dtype)
    finite = torch.isfinite(x)
    assert torch.isnan(back[~finite]).all()
    torch.testing.assert_close(back[finite], x[finite], rtol=0, atol=4.0 / 254)


# ---------------------------------------------------------------- no overflow created


@pytest.mark.parametrize("form", ["gelu-bf16", "silu-bf16"])
def test_bf16_saturates_float32_values_beyond_its_range(form):
    # 3.4e38 is a finite float32 but rounds to inf in bfloat16: gelu_backward(g, inf) is NaN
    x = torch.tensor([[3.4e38, -3.4e38, 1e5, -1e5, 3.0e38, 1.0]])
    compressed_fn, dense_fn = ACTIVATIONS[form]
    dense, compressed = _run(dense_fn, x), _run(compressed_fn, x)
    assert torch.isfinite(dense["grad_x"]).all()
    _same_non_finite(dense, compressed, form)
    torch.testing.assert_close(compressed["grad_x"], dense["grad_x"], rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("storage", ["bf16", "int8"])
def test_large_float32_activations_give_finite_gradients(storage):
    # values far beyond fp16's 65504: nothing in the compressed forms goes through fp16
    torch.manual_seed(0)
    x = torch.randn(16, 32) * 1e6
    x[0, 0] = 1e30
    for compressed_fn, dense_fn in (
        (lambda x: ops.actmem_gelu(x, "none", storage, 16)[0], F.gelu),
        (lambda x: ops.actmem_silu(x, storage, 16)[0], F.silu),
        (lambda x: ops.actmem_layer_norm(x, [32], None, None, 1e-5, storage, 16)[0], lambda x: F.layer_norm(x, [32])),
    ):
        dense, compressed = _run(dense_fn, x), _run(compressed_fn, x)
        _same_non_finite(dense, compressed, storage)


@pytest.mark.parametrize("form", list(LINEAR_FORMS))
def test_dense_layer_compression_of_large_values_stays_finite(form):
    torch.manual_seed(0)
    x, w = torch.randn(16, 32) * 1e6, torch.randn(8, 32)
    x[1, 1] = 3e38 / 64  # large, but the dense grad_weight (a sum of 16 products) stays finite
    dense, compressed = _run(lambda x, w: F.linear(x, w), x, w), _run(LINEAR_FORMS[form], x, w)
    assert torch.isfinite(dense["grad_p0"]).all()
    _same_non_finite(dense, compressed, form)


def test_int8_round_trip_of_fp16_values_near_65504_does_not_overflow():
    x = torch.tensor([65504.0, -65504.0, 65000.0, 1.0] * 8, dtype=torch.float16)
    payload, scale = compress(x, "int8", 16)
    back = decompress(payload, scale, x.shape, torch.float16)
    assert torch.isfinite(back).all()
    torch.testing.assert_close(back.float(), x.float(), rtol=0, atol=65504 / 254)


@pytest.mark.parametrize("recipe", ["dropit:keep=0.5,skip_first_last=False", "bsr:block_size=4,skip_first_last=False",
                                    "actmem:gelu='int8',layernorm='int8',batchnorm='int8',block_size=16", "actmem"])
def test_fp16_model_near_the_fp16_limit_trains_finite(recipe):
    # an fp16 model whose activations reach ~6e4: the compressed forms must not overflow where
    # the dense model does not
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.BatchNorm1d(32), nn.GELU(), nn.Linear(32, 32), nn.LayerNorm(32),
                          nn.GELU(), nn.Linear(32, 4))
    with torch.no_grad():
        model[0].weight.mul_(2000.0)
    x = torch.randn(8, 16) * 2.0
    reference = nn.Sequential(*[m for m in model]).half()  # shares the (converted) parameters
    model = model.half()
    xh = x.half()
    reference.train()
    out_ref = reference(xh)
    assert torch.isfinite(out_ref).all()
    (out_ref.float().square().mean()).backward()
    dense_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    assert all(torch.isfinite(g).all() for g in dense_grads.values())
    model.zero_grad()
    fast = sfx.sparsify(model, recipe, (xh,), verify=False)
    fast.train()
    out = fast(xh)
    assert torch.isfinite(out).all()
    out.float().square().mean().backward()
    for name, p in model.named_parameters():
        assert torch.isfinite(p.grad).all(), name


@pytest.mark.parametrize("recipe", [
    [sfx.DropIT(keep=0.1, skip_first_last=False), sfx.ActivationMemory(gelu="int8", layernorm="int8", block_size=16)],
    [sfx.DropIT(keep=0.1, selection="topk", chunk_size=64, skip_first_last=False), sfx.ActivationMemory()],
    [sfx.BlockSparseActivations(block_size=4, density=0.25, skip_first_last=False)],
    [sfx.MemoryBudget(fraction=0.2)],
], ids=["dropit+actmem-int8", "dropit-topk+actmem", "bsr", "budget"])
def test_nan_in_one_sample_reaches_the_same_gradients_as_in_the_dense_model(recipe):
    """Through a whole rewritten model: every parameter whose dense gradient has a NaN has one
    (the exact pattern can be wider than what a fixed capacity keeps), and no other does."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.GELU(), nn.LayerNorm(16),
                          nn.Linear(16, 4))
    x = torch.randn(4, 8)
    fast = sfx.sparsify(model, recipe, (x,))
    x = x.clone()
    x[1, 2] = NAN
    reference = nn.Sequential(*model)  # the same parameters, run densely
    reference(x).sum().backward()
    dense = {n: (~torch.isfinite(p.grad)).any().item() for n, p in model.named_parameters()}
    assert any(dense.values()) and not all(dense.values())  # LayerNorm's bias stays finite
    model.zero_grad()
    fast.train()
    fast(x).sum().backward()
    assert {n: (~torch.isfinite(p.grad)).any().item() for n, p in model.named_parameters()} == dense
