"""ActivationMemory: the custom ops against dense autograd, the pass on small models, and the
saved-tensor memory it frees (with and without DropIT)."""

from __future__ import annotations

import copy
import dataclasses
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from conftest import grads_of as _grads
from sparsify_fx.passes.activation_memory.rewrite import (
    GRAD_ERROR_BOUNDS,
    ActMemActivation,
    ActMemAttention,
    ActMemBatchNorm,
    ActMemLayerNorm,
    ActMemReLU,
    ActMemScale,
    pack_bits,
    unpack_bits,
)
from sparsify_fx.passes.kernels.bitpack import unpack_bits_as

import sparsify_fx as sfx
from benchmarks.memory import saved_tensor_bytes

BF16_UNIT = 2.0**-9  # bf16 round-to-nearest relative error


# ---------------------------------------------------------------- bit masks and ReLU


def test_pack_bits_exhaustive_roundtrip():
    patterns = torch.tensor([[(v >> i) & 1 for i in range(8)] for v in range(256)], dtype=torch.bool)
    packed = pack_bits(patterns)
    assert packed.dtype == torch.uint8 and packed.numel() == 256
    assert torch.equal(packed, torch.arange(256).to(torch.uint8))
    assert torch.equal(unpack_bits(packed, patterns.shape), patterns)
    odd = torch.rand(3, 5, 7) > 0.5  # numel not a multiple of 8
    assert pack_bits(odd).numel() == 14
    assert torch.equal(unpack_bits(pack_bits(odd), odd.shape), odd)


def test_elementwise_unpack_matches_table():
    """The GPU's shift-and-mask unpacking (run here on the CPU) gives the table's bits."""
    from sparsify_fx.passes.kernels.bitpack import _bits_elementwise

    packed = torch.arange(256).to(torch.uint8)
    table = unpack_bits(packed, [256, 8])
    assert torch.equal(_bits_elementwise(packed), table)
    assert torch.equal(_bits_elementwise(packed, invert=True), ~table)
    odd = torch.rand(3, 5, 7) > 0.5
    flat = _bits_elementwise(pack_bits(odd)).view(-1)[: odd.numel()]
    assert torch.equal(flat.view(odd.shape), odd)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("invert", [False, True])
def test_unpack_on_cuda_matches_cpu(invert):
    mask = torch.rand(3, 5, 7) > 0.5
    packed = pack_bits(mask)
    assert torch.equal(unpack_bits(packed.cuda(), mask.shape).cpu(), mask)
    want = unpack_bits_as(packed, mask.shape, torch.bfloat16, invert)
    assert torch.equal(unpack_bits_as(packed.cuda(), mask.shape, torch.bfloat16, invert).cpu(), want)


@pytest.mark.parametrize("slope", [0.0, 0.1])
@pytest.mark.parametrize("shape", [(7, 13), (2, 3, 5, 5)])
def test_relu_bitmask_grads_exactly_dense(slope, shape):
    x = torch.randn(*shape)
    x.view(-1)[::5] = 0.0  # ties at the kink must follow the dense rule
    x.requires_grad_()
    dense = (lambda: F.relu(x)) if slope == 0.0 else (lambda: F.leaky_relu(x, slope))
    ref, (ref_g,), _ = _grads(dense, x)
    op = ActMemReLU(slope).train()
    out, (g,), _ = _grads(lambda: op(x), x)
    assert torch.equal(out, ref)
    assert torch.equal(g, ref_g)


def test_relu_saves_one_bit_per_element():
    x = torch.randn(4, 16, 8, 8, requires_grad=True)
    y = x * 2  # not an input, so only what the op saves is counted
    op = ActMemReLU().train()
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        op(y)
    assert [(t.dtype, t.numel()) for t in saved] == [(torch.uint8, y.numel() // 8)]


@pytest.mark.parametrize("recipe", ["actmem", "dropit:keep=0.1,skip_first_last=False+actmem"])
def test_relu_mask_only_where_the_consumer_does_not_keep_the_output(recipe):
    """ReLU -> Conv: the dense Conv keeps the ReLU's output for its weight gradient and ReLU's
    backward reads that same tensor, so a 1-bit mask would be held beside it. With DropIT first
    the Conv keeps a compressed copy and the mask is what frees the output."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1),
                          nn.ReLU(), nn.Flatten(), nn.Linear(16 * 8 * 8, 4))
    x = torch.randn(2, 3, 8, 8)
    fast = sfx.sparsify(model, recipe, example_inputs=(x,))
    report = sfx.explain(fast)
    masks = [r for r in report.rewrites if r.pass_name == "actmem" and r.op == "relu"]
    refused = [s for s in report.skipped if s.pass_name == "actmem" and "1-bit mask would add bytes" in s.reason]
    if recipe == "actmem":
        assert not masks and len(refused) == 2, (masks, refused)
        assert saved_tensor_bytes(fast, (x,)) <= saved_tensor_bytes(model, (x,))
    else:
        assert len(masks) == 2 and not refused


# ---------------------------------------------------------------- GELU / SiLU


@pytest.mark.parametrize("storage", ["bf16", "int8"])
@pytest.mark.parametrize("kind,approximate", [("gelu", "none"), ("gelu", "tanh"), ("silu", "none")])
def test_pointwise_grad_error_within_documented_bound(kind, approximate, storage):
    x = (torch.randn(8, 333) * 3).requires_grad_()
    dense = (lambda: F.gelu(x, approximate=approximate)) if kind == "gelu" else (lambda: F.silu(x))
    ref, (ref_g,), g = _grads(dense, x)
    op = ActMemActivation(kind, storage, block=64, approximate=approximate).train()
    out, (got,), _ = _grads(lambda: op(x), x)
    assert torch.equal(out, ref)  # forward is the dense op
    bound = GRAD_ERROR_BOUNDS[(kind, storage)] * g.abs().max().item()
    if storage == "int8":
        bound *= x.detach().abs().max().item()  # block absmax <= global absmax
    torch.testing.assert_close(got, ref_g, rtol=0.0, atol=bound + 1e-6)
    assert (got - ref_g).abs().max() > 0  # it really used the compressed copy


# ---------------------------------------------------------------- BatchNorm / LayerNorm


def _bn_grad_bounds(x, w, g, dims):
    """Documented per-element bound on grad_x, and per-channel bound on grad_weight."""
    shape = [1, -1] + [1] * (x.dim() - 2)
    mean = x.mean(dims, keepdim=True)
    invstd = (x.var(dims, unbiased=False, keepdim=True) + 1e-5).rsqrt()
    x_hat = (x - mean) * invstd
    gx, ga = (g * x_hat).abs(), g.abs()
    scale = gx.mean(dims, keepdim=True) + ga.mean(dims, keepdim=True)
    bound_x = 2 * BF16_UNIT * w.abs().view(shape) * invstd * (x_hat.abs() + 1) * scale
    bound_w = BF16_UNIT * (gx.sum(dims) + ga.sum(dims))
    return bound_x, bound_w


@pytest.mark.parametrize("shape", [(8, 6), (4, 6, 9), (4, 6, 5, 5)])
def test_batchnorm_grads_within_bound_and_running_stats_identical(shape):
    x = (torch.randn(*shape) * 3 + 5).requires_grad_()  # |mean| >> std on purpose
    ref_bn = nn.BatchNorm2d(6) if len(shape) == 4 else nn.BatchNorm1d(6)
    with torch.no_grad():
        ref_bn.weight.uniform_(0.5, 1.5)
        ref_bn.bias.normal_()
    bn = copy.deepcopy(ref_bn)
    ref, ref_g, g = _grads(lambda: ref_bn(x), x, ref_bn.weight, ref_bn.bias)
    op = ActMemBatchNorm(bn.momentum, bn.eps, "bf16", 256).train()
    args = (bn.weight, bn.bias, bn.running_mean, bn.running_var, bn.num_batches_tracked)
    out, got, _ = _grads(lambda: op(x, *args), x, bn.weight, bn.bias)
    assert torch.equal(out, ref)
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        assert torch.equal(getattr(bn, name), getattr(ref_bn, name)), name
    dims = [d for d in range(x.dim()) if d != 1]
    bound_x, bound_w = _bn_grad_bounds(x.detach(), ref_bn.weight.detach(), g, dims)
    assert ((got[0] - ref_g[0]).abs() <= bound_x + 1e-5).all()
    assert ((got[1] - ref_g[1]).abs() <= bound_w + 1e-5).all()
    torch.testing.assert_close(got[0], ref_g[0], rtol=0.0, atol=bound_x.max().item() + 1e-5)
    torch.testing.assert_close(got[1], ref_g[1], rtol=0.0, atol=bound_w.max().item() + 1e-5)
    torch.testing.assert_close(got[2], ref_g[2], rtol=1e-6, atol=1e-5)  # grad_bias never reads x


def test_batchnorm_momentum_none_cumulative_average():
    ref_bn = nn.BatchNorm2d(4, momentum=None)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), copy.deepcopy(ref_bn))
    ref = nn.Sequential(copy.deepcopy(model[0]), ref_bn)
    fast = sfx.sparsify(model, sfx.ActivationMemory(), example_inputs=(torch.randn(2, 3, 6, 6),))
    fast.train()
    ref.train()
    for _ in range(3):
        x = torch.randn(2, 3, 6, 6)
        torch.testing.assert_close(fast(x), ref(x), rtol=0.0, atol=0.0)
    for name, buf in ref_bn.named_buffers():
        assert torch.equal(model[1].get_buffer(name), buf), name


def test_layernorm_grads_within_bound():
    ref_ln = nn.LayerNorm(48)
    with torch.no_grad():
        ref_ln.weight.uniform_(0.5, 1.5)
        ref_ln.bias.normal_()
    x = (torch.randn(3, 10, 48) * 2 + 3).requires_grad_()
    ref, ref_g, g = _grads(lambda: ref_ln(x), x, ref_ln.weight, ref_ln.bias)
    op = ActMemLayerNorm((48,), ref_ln.eps, "bf16", 256).train()
    out, got, _ = _grads(lambda: op(x, ref_ln.weight, ref_ln.bias), x, ref_ln.weight, ref_ln.bias)
    assert torch.equal(out, ref)
    xd = x.detach()
    rstd = (xd.var(-1, unbiased=False, keepdim=True) + ref_ln.eps).rsqrt()
    x_hat = (xd - xd.mean(-1, keepdim=True)) * rstd
    gw = g * ref_ln.weight.detach()
    bound_x = 2 * BF16_UNIT * rstd * x_hat.abs() * (gw * x_hat).abs().mean(-1, keepdim=True)
    bound_w = BF16_UNIT * (g * x_hat).abs().sum((0, 1))
    assert ((got[0] - ref_g[0]).abs() <= bound_x + 1e-5).all()
    torch.testing.assert_close(got[0], ref_g[0], rtol=0.0, atol=bound_x.max().item() + 1e-5)
    torch.testing.assert_close(got[1], ref_g[1], rtol=0.0, atol=bound_w.max().item() + 1e-5)
    torch.testing.assert_close(got[2], ref_g[2], rtol=1e-6, atol=1e-5)


# ---------------------------------------------------------------- the pass on models


class ConvChain(nn.Module):
    """stem -> (ReLU -> Conv -> BN) x 3 -> head: the DropIT ConvNet trap in miniature."""

    def __init__(self, width: int = 16):
        super().__init__()
        self.stem = nn.Conv2d(3, width, 3, padding=1)
        self.convs = nn.ModuleList(nn.Conv2d(width, width, 3, padding=1) for _ in range(3))
        self.bns = nn.ModuleList(nn.BatchNorm2d(width) for _ in range(3))
        self.relu = nn.ReLU(inplace=True)
        self.head = nn.Linear(width, 4)

    def forward(self, x):
        x = self.stem(x)
        for conv, bn in zip(self.convs, self.bns, strict=True):
            x = bn(conv(self.relu(x)))
        return self.head(self.relu(x).mean((2, 3)))


def _train_bytes(model, x):
    model.train()
    return saved_tensor_bytes(model, (x,), count_inputs=False)


def test_memory_dropit_trap_and_actmem_fix():
    model, x = ConvChain(), torch.randn(4, 3, 16, 16)
    dense = _train_bytes(model, x)
    dropit = _train_bytes(sfx.sparsify(model, sfx.DropIT(keep=0.1), example_inputs=(x,)), x)
    both_model = sfx.sparsify(model, [sfx.DropIT(keep=0.1), sfx.ActivationMemory()], example_inputs=(x,))
    both = _train_bytes(both_model, x)
    # the trap: ReLU keeps its output (the conv's input) and BN keeps its input
    assert dropit > 0.9 * dense
    # with the chain rewritten, DropIT's compressed copy is the only holder
    assert both < 0.4 * dropit
    # and the gradients still flow to every parameter
    both_model(x).sum().backward()
    assert all(p.grad is not None for p in model.parameters())


def test_resnet18_eval_exact_train_close_and_state_dict():
    model = torchvision.models.resnet18(num_classes=10)
    x = torch.randn(2, 3, 32, 32)
    fast = sfx.sparsify(model, sfx.ActivationMemory(), example_inputs=(x,))
    ops = sorted({r.op for r in sfx.explain(fast).rewrites})
    assert ops == ["batch_norm", "max_pool2d", "relu"]
    assert sorted(fast.state_dict()) == sorted(model.state_dict())
    assert not any(True for _ in fast.get_submodule("sfx_ops").parameters())
    assert not any(True for _ in fast.get_submodule("sfx_ops").buffers())
    report = sfx.verify(model, fast, (x,), rtol=0.0, atol=0.0)
    assert report.ok and report.max_abs_err == 0.0
    model.eval()
    fast.eval()
    with torch.no_grad():
        assert torch.equal(fast(x), model(x))
    # one training step: same forward, running stats and gradients close to dense
    ref = copy.deepcopy(model).train()
    fast.train()
    x = torch.randn(4, 3, 32, 32)
    out, ref_out = fast(x), ref(x)
    assert torch.equal(out, ref_out)
    out.square().mean().backward()
    ref_out.square().mean().backward()
    for (name, p), q in zip(model.named_parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, rtol=0.05, atol=0.02 * q.grad.abs().max().item() + 1e-6, msg=name)
    for (name, b), c in zip(model.named_buffers(), ref.buffers(), strict=True):
        assert torch.equal(b, c), name


@pytest.mark.slow
def test_vit_eval_exact():
    model = torchvision.models.vit_b_16(image_size=32, num_classes=10)
    x = torch.randn(1, 3, 32, 32)
    fast = sfx.sparsify(model, sfx.ActivationMemory(), example_inputs=(x,))
    assert {"layer_norm", "gelu"} <= {r.op for r in sfx.explain(fast).rewrites}
    assert sfx.verify(model, fast, (x,), rtol=0.0, atol=0.0).ok


def test_transformer_block_gelu_layernorm_rewritten_and_trained():
    block = nn.Sequential(nn.LayerNorm(32), nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 32), nn.SiLU())
    x = torch.randn(2, 5, 32)
    fast = sfx.sparsify(block, sfx.ActivationMemory(), example_inputs=(x,))
    assert sorted(r.op for r in sfx.explain(fast).rewrites) == ["gelu", "layer_norm", "silu"]
    fast.train()
    assert _train_bytes(fast, x) < _train_bytes(block, x)
    ref = copy.deepcopy(block)
    fast(x).sum().backward()
    ref(x).sum().backward()
    for p, q in zip(block.parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-2, atol=1e-3)


# ---------------------------------------------------------------- config and selection


@pytest.mark.parametrize(
    "kwargs,field",
    [
        ({"relu": "bf16"}, "relu"),
        ({"gelu": "fp8"}, "gelu"),
        ({"silu": None}, "silu"),
        ({"batchnorm": "fp8"}, "batchnorm"),
        ({"scale": "recompute"}, "scale"),
        ({"layernorm": 1}, "layernorm"),
        ({"block_size": 8}, "block_size"),
        ({"block_size": 64.0}, "block_size"),
    ],
)
def test_config_validation_names_field_and_value(kwargs, field):
    with pytest.raises(sfx.ConfigError, match=f"ActivationMemory.{field}") as info:
        sfx.ActivationMemory(**kwargs)
    assert repr(next(iter(kwargs.values()))) in str(info.value)


def test_include_matching_nothing_rewrites_nothing_and_says_why():
    model, x = ConvChain(), torch.randn(2, 3, 8, 8)
    fast = sfx.sparsify(model, sfx.ActivationMemory(include="no_such_layer*"), example_inputs=(x,))
    report = sfx.explain(fast)
    assert report.rewrites == []
    skips = [s for s in report.skipped if s.pass_name == "actmem"]
    assert len(skips) == 7  # 3 BN + 4 ReLU call sites
    assert all("not matched by include" in s.reason for s in skips)


def test_off_options_and_inplace_with_other_users_are_reported():
    class Shared(nn.Module):
        def forward(self, x):
            y = x * 2
            z = F.relu(y, inplace=True)
            return z + y  # y is read after the in-place ReLU

    x = torch.randn(3, 4)
    fast = sfx.sparsify(Shared(), sfx.ActivationMemory(), example_inputs=(x,))
    (skip,) = [s for s in sfx.explain(fast).skipped if s.pass_name == "actmem"]
    assert "other users" in skip.reason
    fast = sfx.sparsify(ConvChain(), sfx.ActivationMemory(relu="off", batchnorm="off"), example_inputs=(x.new_zeros(1, 3, 4, 4),))
    reasons = {s.reason for s in sfx.explain(fast).skipped if s.pass_name == "actmem"}
    assert reasons == {"relu='off'", "batchnorm='off'"}


# ---------------------------------------------------------------- GELU/SiLU -> Linear, recomputed


class _Mlp(nn.Module):
    def __init__(self, act: nn.Module, dropout: float = 0.0):
        super().__init__()
        self.fc, self.act, self.drop, self.out = nn.Linear(16, 64), act, nn.Dropout(dropout), nn.Linear(64, 16)

    def forward(self, x):
        return x + self.out(self.drop(self.act(self.fc(x))))


@pytest.mark.parametrize("act", [nn.GELU(), nn.GELU(approximate="tanh"), nn.SiLU()], ids=["gelu", "gelu_tanh", "silu"])
@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16"])
def test_recomputed_activation_linear_gives_dense_gradients_and_frees_its_output(act, autocast):
    torch.manual_seed(0)
    model = nn.Sequential(_Mlp(act), _Mlp(copy.deepcopy(act)))
    ref = copy.deepcopy(model)
    x = torch.randn(4, 8, 16)
    kind = "silu" if isinstance(act, nn.SiLU) else "gelu"
    fast = sfx.sparsify(model, sfx.ActivationMemory(**{kind: "recompute"}, layernorm="off"), example_inputs=(x,))
    rewrites = sfx.explain(fast).rewrites
    assert [r.details["storage"] for r in rewrites] == ["recompute", "recompute"]
    # the activation output (4*8*64 fp32 per block) is no longer held; its input still is
    saved_ref, saved = saved_tensor_bytes(ref.train(), (x,)), saved_tensor_bytes(fast.train(), (x,))
    assert saved_ref - saved == 2 * 4 * 8 * 64 * 4
    untouched = sfx.sparsify(ref, sfx.ActivationMemory(**{kind: "off"}), example_inputs=(x,))  # shapes only
    assert sfx.memory_plan(fast).total_bytes == sfx.memory_plan(untouched).total_bytes - 2 * 4 * 8 * 64 * 4
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        xr, xf = x.clone().requires_grad_(), x.clone().requires_grad_()
        out_ref, g_ref, _ = _grads(lambda: ref(xr), xr, *ref.parameters())
        out, g, _ = _grads(lambda: fast(xf), xf, *model.parameters())
    tol = dict(rtol=1e-5, atol=1e-6) if not autocast else dict(rtol=1e-2, atol=1e-3)
    torch.testing.assert_close(out, out_ref, **tol)
    for a, b in zip(g, g_ref):
        torch.testing.assert_close(a, b, **tol)
    fast.eval(), ref.eval()
    with torch.no_grad():
        torch.testing.assert_close(fast(x), ref(x), rtol=0, atol=0)


def test_recompute_skips_non_linear_consumers_and_real_dropout():
    class TwoUsers(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc, self.out = nn.Linear(8, 8), nn.Linear(8, 8)

        def forward(self, x):
            h = F.gelu(self.fc(x))
            return self.out(h) + h

    x = torch.randn(2, 8)
    fast = sfx.sparsify(TwoUsers(), sfx.ActivationMemory(gelu="recompute"), example_inputs=(x,))
    skip = [s for s in fast.sfx_record.skips if s.op == "gelu"]
    assert len(skip) == 1 and "needs one consumer" in skip[0].reason
    fast = sfx.sparsify(_Mlp(nn.GELU(), dropout=0.5), sfx.ActivationMemory(gelu="recompute"), example_inputs=(x.new_ones(2, 16),))
    skip = [s for s in fast.sfx_record.skips if s.op == "gelu"]
    assert len(skip) == 1 and "needs a Linear consumer" in skip[0].reason and "drop" in skip[0].reason


def test_recompute_is_only_for_activations_and_norms():
    for name in ("scale", "attention"):
        with pytest.raises(sfx.ConfigError, match=name):
            sfx.ActivationMemory(**{name: "recompute"})
    assert sfx.ActivationMemory(silu="recompute").silu == "recompute"
    assert sfx.ActivationMemory(batchnorm="recompute").batchnorm == "recompute"


# ---------------------------------------------------------------- BatchNorm -> ReLU -> Conv, recomputed


class _PreActNet(nn.Module):
    """DenseNet's ``norm -> relu -> conv``, then ``norm -> hardtanh(0, 4) -> conv`` (grouped,
    strided, biased convs; one BatchNorm with momentum=None), a BatchNorm feeding an add, and a
    ReLU feeding a pool."""

    def __init__(self, width: int = 8, momentum: float | None = None):
        super().__init__()
        self.stem = nn.Conv2d(3, width, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(width, momentum=momentum)
        self.conv1 = nn.Conv2d(width, width, 3, padding=1, groups=2)
        self.bn2, self.conv2 = nn.BatchNorm2d(width), nn.Conv2d(width, 2 * width, 3, stride=2, bias=False)
        self.clip = nn.Hardtanh(0.0, 4.0)  # a clipped ReLU, as ReLU6 is
        self.bn3 = nn.BatchNorm2d(2 * width)
        self.head = nn.Linear(2 * width, 3)

    def forward(self, x):
        x = self.stem(x)
        x = self.conv1(F.relu(self.bn1(x)))
        y = self.conv2(self.clip(self.bn2(x)))
        y = F.relu(self.bn3(y) + y)
        return self.head(F.max_pool2d(y, 2).mean((2, 3)))


@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", ["resnet18", "mobilenet_v2", "preact"])
def test_bn_relu_conv_recompute_gives_dense_grads_and_buffers_and_frees_the_relu_output(case, autocast):
    torch.manual_seed(0)
    if case == "resnet18":
        model, x = torchvision.models.resnet18(num_classes=5), torch.randn(2, 3, 32, 32)
        fused = 8  # conv1 -> bn1 -> relu -> conv2 in each basic block
    elif case == "mobilenet_v2":
        # BN -> ReLU6 (an nn.ReLU6 module, in place) -> conv: the stem, and expand and depthwise
        # in each inverted residual (the first has no expansion)
        model, x = torchvision.models.mobilenet_v2(num_classes=5, dropout=0.0), torch.randn(2, 3, 32, 32)
        fused = 34
    else:
        model, x = _PreActNet(), torch.randn(4, 3, 12, 12)
        fused = 2
    ref = copy.deepcopy(model)
    fast = sfx.sparsify(model, sfx.ActivationMemory(relu="off", batchnorm="recompute", maxpool="off"),
                        example_inputs=(x,))
    rewrites = sfx.explain(fast).rewrites
    assert len(rewrites) == fused and {(r.op, r.details["storage"]) for r in rewrites} == {("batch_norm", "recompute")}
    assert sorted(fast.state_dict()) == sorted(ref.state_dict())
    # the ReLU output (the conv's input) is the tensor freed, and only it
    freed = sum(r.saved_bytes_before for r in rewrites)
    assert freed > 0
    assert saved_tensor_bytes(ref.train(), (x,)) - saved_tensor_bytes(fast.train(), (x,)) == freed
    for step in range(2):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out_ref, g_ref, _ = _grads(lambda: ref(x).float(), *ref.parameters(), seed=step)
            out, g, _ = _grads(lambda: fast(x).float(), *model.parameters(), seed=step)
        # forward runs the dense ops: bit-identical; backward rebuilds the ReLU output
        assert torch.equal(out, out_ref)
        tol = dict(rtol=1e-5, atol=1e-6) if not autocast else dict(rtol=2e-2, atol=2e-3)
        for (name, _), a, b in zip(ref.named_parameters(), g, g_ref, strict=True):
            torch.testing.assert_close(a, b, **tol, msg=name)
        for (name, b), c in zip(ref.named_buffers(), model.buffers(), strict=True):
            assert torch.equal(b, c), name  # running stats and num_batches_tracked, momentum=None too
    ref.eval(), fast.eval()
    with torch.no_grad():
        assert torch.equal(fast(x), ref(x))


def test_bn_relu_conv_recompute_reports_every_batchnorm_it_keeps():
    x = torch.randn(4, 3, 12, 12)
    fast = sfx.sparsify(_PreActNet(), sfx.ActivationMemory(relu="off", batchnorm="recompute"), example_inputs=(x,))
    skips = {s.node: s.reason for s in sfx.explain(fast).skipped if s.op == "batch_norm"}
    assert list(skips) == ["bn3"] and "the BatchNorm feeds" in skips["bn3"] and "add" in skips["bn3"]
    # a ReLU feeding a pool, and a ReLU with two consumers
    stem = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten())
    fast = sfx.sparsify(stem, sfx.ActivationMemory(batchnorm="recompute"), example_inputs=(x,))
    (skip,) = [s for s in sfx.explain(fast).skipped if s.op == "batch_norm"]
    assert "the ReLU feeds" in skip.reason and "call_module[target=3]" in skip.reason  # the MaxPool2d

    class TwoUsers(nn.Module):
        def __init__(self):
            super().__init__()
            self.bn, self.conv = nn.BatchNorm2d(3), nn.Conv2d(3, 3, 1)

        def forward(self, x):
            r = F.relu(self.bn(x))
            return self.conv(r) + r

    fast = sfx.sparsify(TwoUsers(), sfx.ActivationMemory(batchnorm="recompute"), example_inputs=(x,))
    (skip,) = [s for s in sfx.explain(fast).skipped if s.op == "batch_norm"]
    assert "2 consumers" in skip.reason


def test_bn_relu_conv_recompute_compiled_matches_eager():
    torch.manual_seed(0)
    # (momentum=None reads num_batches_tracked as a Python float: nn.BatchNorm itself does not
    # compile into one graph then)
    model, x = _PreActNet(momentum=0.1), torch.randn(4, 3, 12, 12)
    _assert_compiled_matches_eager(
        sfx.sparsify(model, sfx.ActivationMemory(relu="off", batchnorm="recompute"), example_inputs=(x,)), x)


def _assert_compiled_matches_eager(fast: nn.Module, x: torch.Tensor) -> None:
    """``fast``'s gradients under ``torch.compile(backend="aot_eager", fullgraph=True)`` equal
    eager's (one graph: no op of ours breaks it)."""
    twin = copy.deepcopy(fast)
    _, g_eager, _ = _grads(lambda: fast(x), *fast.parameters())
    compiled = torch.compile(twin, backend="aot_eager", fullgraph=True)
    _, g_compiled, _ = _grads(lambda: compiled(x), *twin.parameters())
    for a, b in zip(g_compiled, g_eager, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16"])
def test_recomputed_layernorm_linear_gives_dense_gradients_on_transformers(autocast):
    from benchmarks.bench_budget import GPT

    torch.manual_seed(0)
    cases = [
        (GPT(vocab=64, d=32, layers=2, heads=2, ctx=16), torch.randint(0, 64, (2, 16))),
        (torchvision.models.VisionTransformer(16, 4, 2, 2, 32, 64, num_classes=5), torch.randn(2, 3, 16, 16)),
    ]
    recipe = sfx.ActivationMemory(relu="off", gelu="recompute", layernorm="recompute")
    for model, x in cases:
        ref = copy.deepcopy(model)
        fast = sfx.sparsify(model, recipe, example_inputs=(x,))
        ops = sorted({r.op for r in sfx.explain(fast).rewrites})
        assert ops == ["gelu", "layer_norm"], ops
        freed = sum(r.saved_bytes_before for r in sfx.explain(fast).rewrites)
        assert saved_tensor_bytes(ref.train(), (x,)) - saved_tensor_bytes(fast.train(), (x,)) == freed
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out_ref, g_ref, _ = _grads(lambda: ref(x).float(), *ref.parameters())
            out, g, _ = _grads(lambda: fast(x).float(), *model.parameters())
        tol = dict(rtol=1e-5, atol=1e-6) if not autocast else dict(rtol=2e-2, atol=2e-3)
        torch.testing.assert_close(out, out_ref, **tol)
        for (name, _), a, b in zip(ref.named_parameters(), g, g_ref):
            torch.testing.assert_close(a, b, **tol, msg=name)


@pytest.mark.parametrize("affine", [True, False], ids=["affine", "plain"])
def test_recomputed_layernorm_linear_gradients_are_the_dense_ones_bit_for_bit(affine):
    """The exact LayerNorm -> Linear re-runs the forward's own LayerNorm kernel in backward, so
    the Linear's weight gradient reads the very tensor the dense Linear kept (rebuilding it from
    the saved statistics with four elementwise ops rounded differently)."""
    from sparsify_fx.passes.activation_memory.modules import ActMemLnLinear

    torch.manual_seed(0)
    ln, fc = nn.LayerNorm(48, elementwise_affine=affine), nn.Linear(48, 80)
    if affine:
        nn.init.normal_(ln.weight), nn.init.normal_(ln.bias)
    op = ActMemLnLinear((48,), ln.eps, store="exact").train()
    x = (torch.randn(3, 20, 48) * 3 + 1).requires_grad_()
    params = [x, *ln.parameters(), *fc.parameters()]
    out_ref, g_ref, _ = _grads(lambda: fc(ln(x)), *params)
    out, g_op, _ = _grads(lambda: op(x, ln.weight, ln.bias, fc.weight, fc.bias), *params)
    assert len(g_op) == (5 if affine else 3) and all(g is not None for g in g_op)
    torch.testing.assert_close(out, out_ref, rtol=0, atol=0)
    for a, b in zip(g_op, g_ref, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("inner", ["eager", "aot_eager"])
@pytest.mark.parametrize("storage", ["recompute", "recompute-bf16"])
def test_bn_relu_conv_fuses_dynamo_functional_batch_norm_like_the_module(storage, inner):
    """Under ``torch.compile`` Dynamo inlines BatchNorm as ``F.batch_norm`` (the average factor
    computed, ``num_batches_tracked`` counted by its own op): ``sfx.backend`` fuses it with its
    ReLU and Conv as ``sfx.sparsify`` does the modules, with the same gradients and running
    statistics, step after step."""
    torch.manual_seed(0)
    model = _PreActNet(momentum=0.1)  # (momentum=None does not compile into one graph)
    twin = copy.deepcopy(model)
    recipe = sfx.ActivationMemory(relu="off", batchnorm=storage)
    x = torch.randn(4, 3, 12, 12)
    ref = sfx.sparsify(model, recipe, example_inputs=(x,)).train()
    to_inner = sfx.backend(recipe, inner=inner)
    compiled = torch.compile(twin, backend=to_inner)
    for step in range(3):
        _, g_ref, _ = _grads(lambda: ref(x), *model.parameters(), seed=step)
        _, g, _ = _grads(lambda: compiled(x), *twin.parameters(), seed=step)
        for (name, _), a, b in zip(model.named_parameters(), g, g_ref, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)
    for (name, a), b in zip(model.named_buffers(), twin.buffers(), strict=True):
        torch.testing.assert_close(b, a, rtol=1e-6, atol=0, msg=name)
    rewrites = [r for results in to_inner.results for res in results for r in res.rewrites if r.op == "batch_norm"]
    by_storage = sorted(r.details["storage"] for r in rewrites)
    # bn1 and bn2 fuse; bn3 feeds an add: dense when exact, bf16 otherwise
    assert by_storage == ([storage] * 2 if storage == "recompute" else ["bf16", storage, storage]), by_storage


# ---------------------------------------------------------------- the fusions keeping bf16 inputs


def _fused_bf16_case(case: str):
    torch.manual_seed(0)
    if case == "resnet18":
        return torchvision.models.resnet18(num_classes=5), torch.randn(2, 3, 32, 32)
    if case == "preact":
        return _PreActNet(), torch.randn(4, 3, 12, 12)
    if case == "vit":
        model = torchvision.models.VisionTransformer(16, 4, 2, 2, 32, 64, num_classes=5)
        nn.init.normal_(model.heads.head.weight, std=0.02)  # zero-initialised: no gradient upstream of it
        return model, torch.randn(2, 3, 16, 16)
    from benchmarks.bench_budget import GPT

    return GPT(vocab=64, d=32, layers=2, heads=2, ctx=16), torch.randint(0, 64, (2, 16))


_FUSED_BF16 = sfx.ActivationMemory(relu="off", gelu="recompute-bf16", silu="recompute-bf16",
                                   layernorm="recompute-bf16", batchnorm="recompute-bf16", maxpool="off")


@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", ["resnet18", "preact", "vit", "gpt"])
def test_fused_bf16_keeps_bf16_inputs_and_gives_near_dense_gradients(case, autocast):
    model, x = _fused_bf16_case(case)
    ref = copy.deepcopy(model)
    fast = sfx.sparsify(model, _FUSED_BF16, example_inputs=(x,))
    rewrites = sfx.explain(fast).rewrites
    fused = [r for r in rewrites if r.details["storage"] == "recompute-bf16"]
    # ViT / GPT: 2 LayerNorms + GELU per block, and GPT's final LayerNorm before its LM head
    expected = {"resnet18": 8, "preact": 2, "vit": 6, "gpt": 7}[case]
    assert len(fused) == expected
    # the ops that do not fuse store bf16 (ResNet's bn2 / downsample BatchNorms, preact's bn3)
    assert {r.details["storage"] for r in rewrites} <= {"recompute-bf16", "bf16"}
    assert sorted(fast.state_dict()) == sorted(ref.state_dict())
    # each rewrite stops keeping its dense tensors and keeps a bf16 copy of one instead: the
    # autograd graph holds that much less, and every norm (all are rewritten here) keeps a bf16
    # x_hat without its mean (fp32: 4 bytes per BatchNorm channel / LayerNorm row)
    change = sum(r.saved_bytes_before - r.saved_bytes_after for r in rewrites)
    rows = []
    hooks = [m.register_forward_hook(lambda m, i, o: rows.append(i[0].numel() // m.normalized_shape[-1]))
             for m in ref.modules() if isinstance(m, nn.LayerNorm)]
    with torch.no_grad():
        ref.eval()(x)
    for h in hooks:
        h.remove()
    means = 4 * (sum(m.num_features for m in ref.modules() if isinstance(m, nn.BatchNorm2d)) + sum(rows))
    assert change > 0
    assert saved_tensor_bytes(ref.train(), (x,)) - saved_tensor_bytes(fast.train(), (x,)) == change + means
    # the liveness analysis counts every copy kept, the bf16 ones of the fused ops (whose nodes
    # took the name of the Linear / Conv they replaced) too: what the memory budget plans with
    (plan,) = sfx.explain(fast).memory_plans().values()
    assert plan.compressed_bytes == sum(r.saved_bytes_after for r in rewrites)
    differs = False
    for step in range(2):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out_ref, g_ref, _ = _grads(lambda: ref(x).float(), *ref.parameters(), seed=step)
            out, g, _ = _grads(lambda: fast(x).float(), *model.parameters(), seed=step)
        if not autocast:
            assert torch.equal(out, out_ref)  # forward runs the dense ops
        for (name, _), a, b in zip(ref.named_parameters(), g, g_ref, strict=True):
            if b is None:
                assert a is None, name
                continue
            # bf16 copies of the normalised inputs: each gradient within a few bf16 ulps of
            # its magnitude (a bias just before a BatchNorm has a gradient of pure rounding)
            assert (a - b).norm() <= 0.03 * b.norm() + 1e-5, name
            differs |= not torch.equal(a, b)
        for (name, b), c in zip(ref.named_buffers(), model.buffers(), strict=True):
            assert torch.equal(b, c), name
    if not autocast:
        assert differs  # the bf16 copies are really what backward read
    ref.eval(), fast.eval()
    with torch.no_grad():
        if case == "vit":  # the eval module takes MultiheadAttention's fused fast path, the graph does not
            torch.testing.assert_close(fast(x), ref(x), rtol=1e-5, atol=1e-6)
        else:
            assert torch.equal(fast(x), ref(x))


def test_fused_bf16_stores_bf16_where_it_cannot_fuse():
    x = torch.randn(4, 3, 12, 12)
    fast = sfx.sparsify(_PreActNet(), _FUSED_BF16, example_inputs=(x,))
    by_node = {r.node: r.details["storage"] for r in sfx.explain(fast).rewrites if r.op == "batch_norm"}
    assert by_node == {"bn1": "recompute-bf16", "bn2": "recompute-bf16", "bn3": "bf16"}
    # the fused Conv's kernel, which the budget planner prices its bf16 weight gradient by
    assert {r.node: r.details.get("kernel") for r in sfx.explain(fast).rewrites if r.op == "batch_norm"} == {
        "bn1": [3, 3], "bn2": [3, 3], "bn3": None}
    assert not [s for s in sfx.explain(fast).skipped if s.op == "batch_norm"]
    assert sfx.ActivationMemory(layernorm="recompute-bf16").layernorm == "recompute-bf16"
    with pytest.raises(sfx.ConfigError, match="scale"):
        sfx.ActivationMemory(scale="recompute-bf16")


@pytest.mark.parametrize("weight_grad", ["input", "bf16"])
@pytest.mark.parametrize("case", ["preact", "gpt"])
def test_fused_bf16_compiled_matches_eager(case, weight_grad):
    model, x = _fused_bf16_case(case)
    if case == "preact":
        model = _PreActNet(momentum=0.1)  # (momentum=None does not compile into one graph)
    config = dataclasses.replace(_FUSED_BF16, weight_grad=weight_grad)
    _assert_compiled_matches_eager(sfx.sparsify(model, config, example_inputs=(x,)), x)


@pytest.mark.parametrize("case", ["resnet18", "preact", "vit", "gpt"])
def test_fused_bf16_weight_grad_on_bf16_operands_changes_only_the_fused_weights(case):
    """weight_grad="bf16" (passes/kernels/bf16_matmul.py) rounds grad_out for the fused Linear / Conv
    weight gradients only: every other gradient is the "input" mode's bit for bit."""
    model, x = _fused_bf16_case(case)
    runs = {}
    for mode in ("input", "bf16"):
        fast = sfx.sparsify(model, dataclasses.replace(_FUSED_BF16, weight_grad=mode, dense="bf16"),
                            example_inputs=(x,))
        rewrites = sfx.explain(fast).rewrites
        assert {r.details.get("weight_grad") for r in rewrites if r.details["storage"] == "recompute-bf16"} == {mode}
        state = {k: v.clone() for k, v in model.state_dict().items()}
        _, grads, _ = _grads(lambda fast=fast: fast(x).float(), *model.parameters(), seed=0)
        model.load_state_dict(state)  # the same running statistics for the second run
        runs[mode] = dict(zip((n for n, _ in model.named_parameters()), grads, strict=True))
    # the weights a fused op or a bf16-input op multiplies: a Linear / Conv weight (2-D or more)
    multiplied = {n for n, p in model.named_parameters() if p.dim() >= 2 and "pos_embedding" not in n
                  and "class_token" not in n and "emb" not in n}
    changed = set()
    for name, a in runs["bf16"].items():
        b = runs["input"][name]
        if b is None:
            assert a is None, name
        elif name in multiplied:
            assert (a - b).norm() <= 2.0**-6 * b.norm() + 1e-6, name  # a few bf16 roundings
            changed |= {name} if not torch.equal(a, b) else set()
        else:
            assert torch.equal(a, b), name
    assert changed  # the bf16 operands are really what the weight gradients read


# ---------------------------------------------------------------- max pooling keeping its indices


@pytest.mark.parametrize("shape,kernel,stride,padding,dilation,ceil,channels_last", [
    ((2, 3, 9, 9), 3, 2, 1, 1, False, False),  # ResNet's stem pool
    ((2, 3, 9, 9), 3, 2, 1, 1, True, False),
    ((2, 4, 10, 12), 2, 2, 0, 1, False, True),
    ((3, 11, 13), 3, 1, 1, 2, False, False),  # unbatched, dilated
    ((1, 2, 190, 190), 3, 2, 1, 1, False, False),  # a plane over 32768 elements: int32 indices
])
def test_max_pool_keeps_narrow_indices_and_gives_the_dense_gradient(shape, kernel, stride, padding, dilation, ceil,
                                                                    channels_last):
    from sparsify_fx.passes.activation_memory.max_pool import ActMemMaxPool2d

    torch.manual_seed(0)
    x = torch.randn(shape)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    x.requires_grad_()
    op = ActMemMaxPool2d(kernel, stride, padding, dilation, ceil).train()
    out, (grad,), g = _grads(lambda: op(x), x)
    ref, (ref_grad,), _ = _grads(lambda: F.max_pool2d(x, kernel, stride, padding, dilation, ceil), x)
    assert torch.equal(out, ref) and torch.equal(grad, ref_grad)
    assert grad.is_contiguous(memory_format=torch.channels_last) == ref_grad.is_contiguous(
        memory_format=torch.channels_last)
    # what autograd keeps: the indices alone, int16 (int32 past 2^15 elements per plane)
    held = {}
    pack = lambda t: held.setdefault(t.data_ptr(), (t.dtype, t.numel())) and t  # noqa: E731
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        op(x.detach().requires_grad_())
    wide = shape[-1] * shape[-2] > 2**15
    assert list(held.values()) == [(torch.int32 if wide else torch.int16, ref.numel())]
    op.eval()
    with torch.no_grad():
        assert torch.equal(op(x), F.max_pool2d(x, kernel, stride, padding, dilation, ceil))


def test_max_pool_frees_resnets_stem_output_exactly():
    """With the ReLU keeping a 1-bit mask, nothing else holds the pooled ReLU output: the
    saving is its bytes and the int64 indices, less the int16 ones; gradients are dense."""
    torch.manual_seed(0)
    model, x = torchvision.models.resnet18(num_classes=5), torch.randn(2, 3, 32, 32)
    exact = dict(relu="bitmask", batchnorm="recompute", scale="off")
    without = sfx.sparsify(model, sfx.ActivationMemory(**exact, maxpool="off"), example_inputs=(x,))
    fast = sfx.sparsify(model, sfx.ActivationMemory(**exact), example_inputs=(x,))
    (pool,) = [r for r in sfx.explain(fast).rewrites if r.op == "max_pool2d"]
    relu_out = 2 * 64 * 16 * 16 * 4
    pooled = 2 * 64 * 8 * 8
    assert (pool.module, pool.details["storage"]) == ("maxpool", "indices")
    assert (pool.saved_bytes_before, pool.saved_bytes_after) == (relu_out + 8 * pooled, 2 * pooled)
    freed = saved_tensor_bytes(without.train(), (x,)) - saved_tensor_bytes(fast.train(), (x,))
    assert freed == relu_out + 8 * pooled - 2 * pooled
    plan = sfx.memory_plan(fast, sfx.compressed_bytes_of(sfx.explain(fast).rewrites))
    assert plan.total_bytes == saved_tensor_bytes(fast, (x,))
    _, g, _ = _grads(lambda: fast(x), *model.parameters(), seed=1)
    _, g_ref, _ = _grads(lambda: without(x), *model.parameters(), seed=1)
    for (name, _), a, b in zip(model.named_parameters(), g, g_ref, strict=True):
        assert torch.equal(a, b), name


def test_max_pool_reports_what_it_leaves():
    class Pools(nn.Module):
        def __init__(self):
            super().__init__()
            self.keeps_indices = nn.MaxPool2d(2, return_indices=True)
            self.pool = nn.MaxPool2d(2)

        def forward(self, x):
            y, idx = self.keeps_indices(x)
            return self.pool(y) + idx.float().mean()

    x = torch.randn(2, 3, 8, 8, requires_grad=True)
    fast = sfx.sparsify(Pools(), sfx.ActivationMemory(), example_inputs=(x,))
    skips = {s.module: s.reason for s in sfx.explain(fast).skipped if s.op == "max_pool2d"}
    assert "return_indices=True" in skips["keeps_indices"]
    assert [r.module for r in sfx.explain(fast).rewrites if r.op == "max_pool2d"] == ["pool"]
    off = sfx.sparsify(Pools(), sfx.ActivationMemory(maxpool="off"), example_inputs=(x,))
    assert not [r for r in sfx.explain(off).rewrites if r.op == "max_pool2d"]
    with pytest.raises(sfx.ConfigError, match="maxpool must be 'indices' or 'off'"):
        sfx.ActivationMemory(maxpool="int8")


# ---------------------------------------------------------------- scale by a parameter


@pytest.mark.parametrize("storage", ["bf16", "int8"])
@pytest.mark.parametrize("scale_shape,x_shape", [((6,), (4, 5, 6)), ((6, 1, 1), (3, 6, 4, 4)), ((), (7, 9))],
                         ids=["channel_last", "channel_first", "scalar"])
def test_scale_grad_x_exact_and_grad_scale_within_bound(storage, scale_shape, x_shape):
    x = (torch.randn(x_shape) * 3).requires_grad_()
    alpha = torch.randn(scale_shape).requires_grad_()
    ref, (ref_gx, ref_ga), g = _grads(lambda: alpha * x, x, alpha)
    op = ActMemScale(storage, block=64).train()
    out, (gx, ga), _ = _grads(lambda: op(x, alpha), x, alpha)
    assert torch.equal(out, ref)
    assert torch.equal(gx, ref_gx)  # grad_out * alpha, as dense
    dims = [d for d in range(x.dim()) if d >= x.dim() - len(scale_shape) and scale_shape[d - x.dim()] > 1]
    other = [d for d in range(x.dim()) if d not in dims]
    if storage == "bf16":
        bound = BF16_UNIT * (g * x.detach()).abs().sum(other).reshape(scale_shape)
    else:
        bound = x.detach().abs().max() / 254 * g.abs().sum(other).reshape(scale_shape)
    assert ((ga - ref_ga).abs() <= bound + 1e-6).all()
    assert (ga - ref_ga).abs().max() > 0  # it really read the compressed copy


class _LayerScaleBlock(nn.Module):
    def __init__(self, dim: int = 32):
        super().__init__()
        self.pre = nn.Linear(dim, dim)
        self.alpha = nn.Parameter(torch.ones(dim))
        self.fc = nn.Linear(dim, dim)
        self.gamma = nn.Parameter(torch.full((dim,), 0.1))
        self.register_buffer("fixed", torch.full((dim,), 2.0))

    def forward(self, x):
        h = self.pre(x)
        h = h + self.gamma * self.fc(self.alpha * h)
        return h * self.fixed


def test_scale_pass_frees_the_dense_operand_and_skips_buffers():
    model, x = _LayerScaleBlock(), torch.randn(4, 16, 32)
    fast = sfx.sparsify(model, sfx.ActivationMemory(), example_inputs=(x,))
    report = sfx.explain(fast)
    assert sorted(r.op for r in report.rewrites) == ["scale", "scale"]
    assert any("not a trainable parameter" in s.reason for s in report.skipped if s.op == "scale")
    # alpha's product kept h and gamma's kept fc's output: both now bf16 (h is also the
    # residual, but the add keeps nothing); fc keeps its input dense
    dense, rewritten = _train_bytes(model, x), _train_bytes(fast, x)
    h_bytes = x.numel() * 4
    assert dense == 3 * h_bytes and rewritten == h_bytes + 2 * (h_bytes // 2)
    plan = sfx.memory_plan(fast)
    # pre keeps the input, fc keeps alpha * h; h * buffer keeps nothing
    assert sorted(t.holders[0] for t in plan.still_dense()) == ["linear", "linear_1"]
    with torch.no_grad():
        model.eval(), fast.eval()
        torch.testing.assert_close(fast(x), model(x), rtol=0, atol=0)
    model.train(), fast.train()
    ref = copy.deepcopy(model)
    fast(x).sum().backward()
    ref(x).sum().backward()
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        if name in ("alpha", "gamma"):  # reductions over the bf16 copy (bound tested above)
            torch.testing.assert_close(p.grad, q.grad, rtol=0, atol=2e-2 * q.grad.abs().max().item())
        else:  # every other gradient flows through the exact grad_x
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-6, atol=1e-6)


def test_scale_off_frozen_and_broadcasting_products_are_reported():
    class Frozen(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.ones(8), requires_grad=False)
            self.grow = nn.Parameter(torch.ones(3, 8))

        def forward(self, x):
            return (self.w * x) + (x * self.grow).sum(0)

    x = torch.randn(8)
    report = sfx.explain(sfx.sparsify(Frozen(), sfx.ActivationMemory(), example_inputs=(x,)))
    reasons = " | ".join(s.reason for s in report.skipped if s.op == "scale")
    assert "not a trainable parameter" in reasons and "broadcasts" in reasons
    report = sfx.explain(sfx.sparsify(_LayerScaleBlock(), sfx.ActivationMemory(scale="off"),
                                      example_inputs=(torch.randn(2, 32),)))
    assert not report.rewrites and any(s.reason == "scale='off'" for s in report.skipped)


# ---------------------------------------------------------------- scaled dot-product attention


class _Attention(nn.Module):
    """qkv projection -> SDPA -> output projection, as torchvision ViT / GPT-2 spell it."""

    def __init__(self, dim: int = 64, heads: int = 4, causal: bool = False, **sdpa_kwargs):
        super().__init__()
        self.qkv, self.out = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.heads, self.causal, self.sdpa_kwargs = heads, causal, sdpa_kwargs

    def forward(self, x):
        b, n, d = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal, **self.sdpa_kwargs)
        return self.out(a.transpose(1, 2).reshape(b, n, d))


def _bf16_exact(module: nn.Module) -> None:
    # weights and inputs representable in bf16 make q, k, v (one Linear of them) close to
    # bf16-exact, so what remains of the gradient error is the backward's own arithmetic
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(p.bfloat16().float())


@pytest.mark.parametrize("storage,bound", [("bf16", 2e-2), ("int8", 6e-2)])
def test_attention_keeps_only_compressed_qkv_and_trains_close_to_dense(storage, bound):
    torch.manual_seed(0)
    model, x = _Attention(causal=True), torch.randn(2, 12, 64)
    fast = sfx.sparsify(model, sfx.ActivationMemory(attention=storage), example_inputs=(x,))
    (rewrite,) = [r for r in sfx.explain(fast).rewrites if r.op == "attention"]
    qkv_numel = 3 * x.numel()
    # SDPA kept q, k, v and its output; the op keeps q, k, v compressed and nothing else
    assert rewrite.saved_bytes_before == 4 * (qkv_numel + x.numel())
    expected_after = 2 * qkv_numel if storage == "bf16" else 3 * math.ceil(x.numel() / 256) * (256 + 4)
    assert rewrite.saved_bytes_after == expected_after
    plan = sfx.memory_plan(fast)
    assert not [t for t in plan.still_dense() if "scaled_dot_product" in " ".join(t.holders)]
    # measured on the whole model: at least q, k, v's fp32 bytes minus the compressed copies
    # are freed (the output stays held here: the output projection keeps the same storage)
    assert _train_bytes(model, x) - _train_bytes(fast, x) >= 4 * qkv_numel - expected_after
    # measured on the op alone: exactly the compressed bytes are saved, nothing else
    q, k, v = (torch.randn(2, 4, 12, 16, requires_grad=True) * 1 for _ in range(3))
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        ActMemAttention(True, None, storage, 256).train()(q, k, v)
    assert sum(t.numel() * t.element_size() for t in saved) == expected_after
    _eval_exact_and_grads_close(model, fast, x, bound)


def _eval_exact_and_grads_close(model: nn.Module, fast: nn.Module, x: torch.Tensor, bound: float) -> None:
    """``fast``'s eval output is ``model``'s bit for bit; its training gradients (which land on
    ``model``'s parameters) are within ``bound`` of the largest dense gradient entry (q, k, v
    rounded to bf16 / int8)."""
    with torch.no_grad():
        model.eval(), fast.eval()
        torch.testing.assert_close(fast(x), model(x), rtol=0, atol=0)
    model.train(), fast.train()
    ref = copy.deepcopy(model)
    fast(x).square().sum().backward()
    ref(x).square().sum().backward()
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=0, atol=bound * q.grad.abs().max().item(),
                                   msg=lambda m, name=name: f"{name}: {m}")


def _sdpa_calls(monkeypatch) -> list[int]:
    calls: list[int] = []
    real = F.scaled_dot_product_attention

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", counting)
    return calls


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("scale", [None, 0.3])
def test_attention_backward_matches_autograd_on_exact_inputs(causal, scale, monkeypatch):
    """Both forms: forward bit-identical; on q, k, v that bf16 storage does not round, dense
    autograd's gradients. The recompute form keeps only the compressed q, k, v and re-runs the
    attention once in backward; ``keep_output`` also keeps the output and one float per row
    and re-runs nothing (the same flash backward on the same operands, output and
    log-sum-exp)."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, 7, 16).bfloat16().float().requires_grad_() for _ in range(3))
    kw = {"is_causal": causal, "scale": scale}
    g = torch.randn(2, 3, 7, 16)
    ref = F.scaled_dot_product_attention(q, k, v, **kw)
    ref_grads = torch.autograd.grad(ref, (q, k, v), g)
    for keep, reruns in ((True, 0), (False, 1)):
        op = ActMemAttention(causal, scale, "bf16", 256, keep_output=keep).train()
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
            out = op(q, k, v)
        stored = 3 * 2 * q.numel() + ((4 * q.numel() + 4 * 2 * 3 * 7) if keep else 0)
        assert sum(t.numel() * t.element_size() for t in saved) == stored
        calls = _sdpa_calls(monkeypatch)
        grads = torch.autograd.grad(out, (q, k, v), g)
        monkeypatch.undo()
        assert len(calls) == reruns
        torch.testing.assert_close(out, ref, rtol=0, atol=0)
        for name, a, b in zip("qkv", grads, ref_grads):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=lambda m, name=name: f"grad_{name}: {m}")


def test_attention_keeping_its_output_under_another_sdpa_kernel_keeps_that_forward():
    """Under ``sdpa_kernel(MATH)`` the op's forward is the math kernel's, bit for bit (the
    flash kernel only gives the log-sum-exp its backward reads); gradients stay close."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, 9, 16).bfloat16().float().requires_grad_() for _ in range(3))
    g = torch.randn(2, 3, 9, 16)
    with sdpa_kernel(SDPBackend.MATH):
        ref = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        out = ActMemAttention(True, None, "bf16", 256, keep_output=True).train()(q, k, v)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    for a, b in zip(torch.autograd.grad(out, (q, k, v), g), torch.autograd.grad(ref, (q, k, v), g)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_attention_output_keep_costs_the_log_sum_exp_where_the_projection_holds_the_output():
    """In a model the output projection holds the attention's output (a view of the same
    storage): keeping it for the flash backward adds only the log-sum-exp, measured and
    planned; where the projection keeps a bf16 copy instead (``dense="bf16"``), it adds the
    output too. Gradients stay as close to dense as the recompute form's."""
    torch.manual_seed(0)
    model, x = _Attention(causal=True), torch.randn(2, 12, 64)
    lse = 4 * 2 * 4 * 12  # fp32, one per (batch, head, query)
    out_bytes = 4 * x.numel()
    for dense, extra in (("off", lse), ("bf16", lse + out_bytes)):
        rec = sfx.sparsify(model, sfx.ActivationMemory(attention="bf16", dense=dense), example_inputs=(x,))
        keep = sfx.sparsify(model, sfx.ActivationMemory(attention="bf16", attention_output="keep", dense=dense),
                            example_inputs=(x,))
        (r,) = [r for r in sfx.explain(keep).rewrites if r.op == "attention"]
        assert r.details["output"] == "keep" and r.saved_bytes_after == 2 * 3 * x.numel() + lse
        assert _train_bytes(keep, x) - _train_bytes(rec, x) == extra
        planned = [sfx.memory_plan(m, sfx.compressed_bytes_of(sfx.explain(m).rewrites)).total_bytes
                   for m in (keep, rec)]
        assert planned[0] - planned[1] == extra
    _eval_exact_and_grads_close(model, keep, x, 2e-2)
    with pytest.raises(sfx.ConfigError, match="attention_output"):
        sfx.ActivationMemory(attention="bf16", attention_output="bf16")


class _AttentionOverwritesItsOutput(_Attention):
    def forward(self, x):
        b, n, d = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal)
        a += v  # captured in place, as the model runs it
        return self.out(a.transpose(1, 2).reshape(b, n, d))


def test_attention_output_overwritten_in_place_is_not_kept():
    """The kept output would be what ``+=`` overwrote: backward would find it modified. (The
    model trains under the math kernel, which keeps the probabilities, not the output.)"""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    torch.manual_seed(0)
    model, x = _AttentionOverwritesItsOutput(causal=True), torch.randn(2, 12, 64)
    fast = sfx.sparsify(model, sfx.ActivationMemory(attention="bf16", attention_output="keep"), example_inputs=(x,))
    (r,) = [r for r in sfx.explain(fast).rewrites if r.op == "attention"]
    assert r.details.get("output") != "keep"
    with sdpa_kernel(SDPBackend.MATH):
        _eval_exact_and_grads_close(model, fast, x, 2e-2)


def test_attention_is_opt_in_and_masked_attention_or_dropout_off_is_reported():
    x = torch.randn(2, 6, 64)
    report = sfx.explain(sfx.sparsify(_Attention(), sfx.ActivationMemory(), example_inputs=(x,)))
    assert any(s.reason == "attention='off'" for s in report.skipped if s.op == "attention")
    mask = torch.ones(6, 6, dtype=torch.bool).tril()
    for model, config, why in (
            (_Attention(attn_mask=mask), sfx.ActivationMemory(attention="bf16"), "attn_mask given"),
            (_Attention(dropout_p=0.1), sfx.ActivationMemory(attention_dropout="off"), "attention_dropout='off'")):
        # verify=False: the dropout model is random in eval too (SDPA's dropout_p ignores the mode)
        report = sfx.explain(sfx.sparsify(model, config, example_inputs=(x,), verify=False))
        assert not [r for r in report.rewrites if r.op == "attention"]
        assert any(why in s.reason for s in report.skipped if s.op == "attention"), report.skipped
    with pytest.raises(sfx.ConfigError, match="attention_dropout"):
        sfx.ActivationMemory(attention_dropout="bf16")


# ---------------------------------------------------------------- attention with dropout


def _saved_shapes(module: nn.Module, x: torch.Tensor, amp: bool) -> list[tuple[tuple[int, ...], torch.dtype]]:
    saved = []

    def pack(t):
        saved.append((tuple(t.shape), t.dtype))
        return t
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp), \
            torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        module(x)
    return saved


@pytest.mark.parametrize("amp", [False, True], ids=["fp32", "bf16-autocast"])
@pytest.mark.parametrize("mask", [None, "float", "bool"])
def test_attention_with_dropout_keeps_no_scores_and_the_plan_holds(amp, mask):
    """On a CPU, SDPA with dropout runs the math path and keeps three [b, heads, L, L] tensors
    (and fp32 copies of bf16 q, k, v); the rewrite keeps q, k, v and a seed. The plan (made
    under the same autocast) matches what autograd holds, before and after."""
    torch.manual_seed(0)
    n = 48
    masks = {None: None, "float": torch.randn(2, 1, n, n), "bool": torch.rand(n, n) > 0.2}
    model, x = _Attention(dropout_p=0.1, attn_mask=masks[mask]).train(), torch.randn(2, n, 64)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
        fast = sfx.sparsify(model, sfx.ActivationMemory(), example_inputs=(x,), verify=False)
    (r,) = [r for r in sfx.explain(fast).rewrites if r.op == "attention"]
    assert r.details["storage"] == "exact" and r.details["dropout_p"] == 0.1

    def scores(saved):  # per-head [b, heads, n, n] tensors (not the [b, 1, n, n] mask)
        return [s for s, _ in saved if s[-2:] == (n, n) and math.prod(s[:-2]) == 2 * 4]
    assert len(scores(_saved_shapes(model, x, amp))) == 3  # (what the rewrite removes is there in dense)
    saved = _saved_shapes(fast, x, amp)
    assert not scores(saved), saved
    dense, after = _amp_bytes(model, fast, x, amp)
    report = sfx.explain(fast)
    assert after < 0.5 * dense
    if not amp:  # (a plan made under autocast is MemoryBudget's, tested there)
        torch.testing.assert_close(float(report.held_bytes_after), float(after), rtol=0.05, atol=0)
        torch.testing.assert_close(float(report.held_bytes_before), float(dense), rtol=0.05, atol=0)


def _amp_bytes(model: nn.Module, fast: nn.Module, x: torch.Tensor, amp: bool) -> tuple[int, int]:
    out = []
    for m in (model, fast):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            out.append(saved_tensor_bytes(m, (x,), count_inputs=True))
    return out[0], out[1]


@pytest.mark.parametrize("dtype, storage", [(torch.float32, "exact"), (torch.float32, "bf16"),
                                            (torch.bfloat16, "exact")])
def test_attention_dropout_gradients_match_autograd_with_the_same_mask(dtype, storage):
    from sparsify_fx.passes.activation_memory.attention_dropout import (
        _keep_scaled,
        _probs,
        actmem_sdpa_dropout,
    )

    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, 11, 8, dtype=dtype).requires_grad_() for _ in range(3))
    mask = torch.randn(2, 1, 11, 11, dtype=dtype)
    seed = torch.tensor(77)
    out = actmem_sdpa_dropout(q, k, v, mask, seed, 0.3, True, 0.4, storage, 16)[0]
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v), grad)
    # the math path written with autograd, on the dropout mask the seed draws
    leaves = [t.detach().float().requires_grad_() for t in (q, k, v)]
    if storage == "bf16":  # the backward sees the stored bf16 q, k, v
        leaves = [t.detach().bfloat16().float().requires_grad_() for t in (q, k, v)]
    probs, _ = _probs(leaves[0], leaves[1], mask, True, 0.4)
    ref = (probs * _keep_scaled(seed, probs, 0.3)) @ leaves[2]
    want = torch.autograd.grad(ref, leaves, grad.float())
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    if storage == "exact":
        torch.testing.assert_close(out.float(), ref, rtol=tol, atol=tol)
    assert out.dtype == dtype and all(g.dtype == dtype for g in got)
    for g, w in zip(got, want):
        torch.testing.assert_close(g.float(), w, rtol=tol, atol=tol)


def test_attention_dropout_drops_at_its_rate_and_is_reproducible():
    from sparsify_fx.passes.activation_memory.attention_dropout import ActMemAttentionDropout

    module = ActMemAttentionDropout(0.25, False, None, "exact", 256)
    n = 64
    q = torch.zeros(4, 2, n, 8, requires_grad=True)  # uniform probabilities 1/n
    v = torch.eye(n).expand(4, 2, n, n)  # the output is the dropped probability matrix
    torch.manual_seed(3)
    a = module(q, q, v)
    torch.manual_seed(3)
    b = module(q, q, v)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    dropped = (a == 0).float().mean().item()
    assert abs(dropped - 0.25) < 0.02, dropped
    kept = a[a != 0]
    torch.testing.assert_close(kept, torch.full_like(kept, 1 / n / 0.75), rtol=1e-6, atol=0)
    c = module(q, q, v)  # the next draw differs
    assert not torch.equal(a, c)


def test_attention_dropout_compiled_backward_matches_eager():
    """Under torch.compile (aot_eager) the backward op is traced like any op: the same
    gradients as eager for the same seed."""
    torch.manual_seed(0)
    model, x = _Attention(dropout_p=0.2), torch.randn(2, 9, 64)
    fast = sfx.sparsify(model, sfx.ActivationMemory(), example_inputs=(x,), verify=False)
    torch.manual_seed(5)
    fast(x).square().sum().backward()
    eager = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    compiled = torch.compile(model, backend=sfx.backend([sfx.ActivationMemory()], inner="aot_eager"))
    torch.manual_seed(5)
    compiled(x).square().sum().backward()
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, eager[name], rtol=1e-4, atol=1e-5,
                                   msg=lambda m, name=name: f"{name}: {m}")


def test_attention_rewrite_on_vit_eval_exact_and_memory_below_dropit_actmem():
    torch.manual_seed(0)
    model = torchvision.models.VisionTransformer(image_size=32, patch_size=8, num_layers=3, num_heads=4,
                                                 hidden_dim=64, mlp_dim=128).train()
    x = torch.randn(2, 3, 32, 32)
    base = sfx.sparsify(model, [sfx.DropIT(keep=0.1), sfx.ActivationMemory()], example_inputs=(x,), verify=False)
    fast = sfx.sparsify(model, [sfx.DropIT(keep=0.1), sfx.ActivationMemory(attention="bf16")], example_inputs=(x,))
    assert len([r for r in sfx.explain(fast).rewrites if r.op == "attention"]) == 3
    assert _train_bytes(fast, x) < _train_bytes(base, x)
    model.eval(), fast.eval()
    with torch.no_grad():
        torch.testing.assert_close(fast(x), model(x), rtol=0, atol=0)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("output", ["recompute", "keep"])
def test_attention_compiled_backward_matches_eager(causal, output):
    """Under torch.compile the backward takes the written-out formulas (no nested autograd), or
    with the output kept the flash backward: the same gradients as the eager path's."""
    torch.manual_seed(0)
    model, x = _Attention(causal=causal), torch.randn(2, 9, 64)
    _bf16_exact(model)
    config = sfx.ActivationMemory(attention="bf16", attention_output=output)
    fast = sfx.sparsify(model, config, example_inputs=(x,))
    fast(x).square().sum().backward()
    eager = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    compiled = torch.compile(model, backend=sfx.backend([config], inner="aot_eager"))
    compiled(x).square().sum().backward()
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, eager[name], rtol=1e-4, atol=1e-5,
                                   msg=lambda m, name=name: f"{name}: {m}")



# ---------------------------------------------------------------- fused CPU kernels

from sparsify_fx.passes.kernels import cpu as cpu_kernels  # noqa: E402

needs_kernels = pytest.mark.skipif(
    cpu_kernels.load() is None, reason=f"C++ kernels unavailable: {cpu_kernels.unavailable_reason()}")


def _with_nonfinite(*shape, dtype=torch.float32, seed=0):
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * 3
    flat = x.view(-1)
    flat[[0, flat.numel() // 2, flat.numel() - 1]] = torch.tensor([float("nan"), float("inf"), -float("inf")])
    flat[1] = -0.0
    return x.to(dtype)


def _op_and_grads(x, slope, kernels_on: bool, monkeypatch):
    with monkeypatch.context() as m:
        if not kernels_on:
            m.setattr(cpu_kernels, "for_tensors", lambda *t, **k: None)
        xr = x.clone().requires_grad_()
        out, bits = torch.ops.sparsify_fx.actmem_relu(xr, slope)
        g = torch.randn(x.shape, generator=torch.Generator().manual_seed(1)).to(x.dtype)
        g.view(-1)[2] = float("nan")
        out.backward(g)
        return out.detach(), bits, xr.grad


@needs_kernels
@pytest.mark.parametrize("slope", [0.0, 0.1])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_fused_relu_equals_the_torch_path(slope, dtype, monkeypatch):
    for shape in [(3,), (2, 5, 7), (4, 8, 129, 130)]:  # byte and chunk tails
        x = _with_nonfinite(*shape, dtype=dtype)
        fused = _op_and_grads(x, slope, True, monkeypatch)
        ref = _op_and_grads(x, slope, False, monkeypatch)
        for a, b in zip(fused, ref):
            torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True, msg=lambda m: f"{shape} {dtype}: {m}")


@needs_kernels
@pytest.mark.parametrize("slope", [0.0, 0.1])
def test_in_place_relu_writes_over_its_input_with_the_same_values_bits_and_grads(slope, monkeypatch):
    """``nn.ReLU(inplace=True)`` stays in place on the eager path: the kernel writes over the
    input; output, mask and gradient are the out-of-place op's, bit for bit."""
    x = _with_nonfinite(4, 8, 129, 130)
    out_of_place = _op_and_grads(x, slope, True, monkeypatch)
    g = torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
    g.view(-1)[2] = float("nan")
    leaf = x.clone().requires_grad_()
    h = leaf * 1.0  # not a leaf: the model's in-place ReLU reads an intermediate
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = ActMemReLU(slope, inplace=True).train()(h)
    assert out.data_ptr() == h.data_ptr()  # no new activation
    assert [t.dtype for t in saved] == [torch.uint8]
    torch.testing.assert_close(saved[0], out_of_place[1], rtol=0, atol=0)
    out.backward(g)
    torch.testing.assert_close(out.detach(), out_of_place[0], rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(leaf.grad, out_of_place[2], rtol=0, atol=0, equal_nan=True)
    # where the kernels do not apply it runs out of place, as before
    with monkeypatch.context() as m:
        m.setattr(cpu_kernels, "for_tensors", lambda *t, **k: None)
        h = x.clone().requires_grad_() * 1.0
        assert ActMemReLU(slope, inplace=True).train()(h).data_ptr() != h.data_ptr()


def test_resnet_residual_relu_runs_in_place_and_grads_match_dense():
    model = torchvision.models.resnet18(num_classes=10)
    x = torch.randn(2, 3, 64, 64)
    # exact; DropIT at keep=1.0 first, so the convolutions no longer keep the ReLUs' outputs
    # dense and each ReLU gets its mask
    recipe = [sfx.DropIT(keep=1.0, skip_first_last=False), sfx.ActivationMemory(batchnorm="recompute")]
    fast = sfx.sparsify(model, recipe, example_inputs=(x,))
    relus = {name: m for name, m in fast.named_modules() if isinstance(m, ActMemReLU)}
    assert sum(m.inplace for m in relus.values()) >= 8  # one after each residual +=
    same = []
    for m in relus.values():
        if m.inplace:
            m.register_forward_hook(lambda mod, args, out: same.append(out.data_ptr() == args[0].data_ptr()))
    ref = copy.deepcopy(model)
    fast.train(), ref.train()
    fast(x).square().sum().backward()
    ref(x).square().sum().backward()
    assert same and all(same) == (cpu_kernels.load() is not None)
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-5, msg=lambda m, name=name: f"{name}: {m}")


@needs_kernels
def test_fused_batchnorm_storage_equals_the_torch_path(monkeypatch):
    """The bf16 normalised input is bit-identical: rounding, saturation near fp32's maximum
    (a finite value that would round to inf), inf and NaN stored as NaN."""
    x = _with_nonfinite(4, 6, 9, 11)
    x[1, 2, 3, 4] = 3.4e38
    x[2, 3] = 1e30  # a channel whose normalised values are huge
    args = (torch.ones(6), torch.zeros(6), torch.zeros(6), torch.ones(6), 0.1, 1e-5, "bf16", 64)
    fused = torch.ops.sparsify_fx.actmem_batch_norm(x, *args)
    with monkeypatch.context() as m:
        m.setattr(cpu_kernels, "for_tensors", lambda *t, **k: None)
        ref = torch.ops.sparsify_fx.actmem_batch_norm(x, *args)
    assert fused[1].dtype == torch.bfloat16
    for a, b in zip(fused, ref):
        torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)
    # and one that exercises the saturation itself: a normalised value past bf16's range
    kernels = cpu_kernels.load()
    big = torch.tensor([[[3.39e38, -3.4e38, 1.0, float("inf")]]]).float()
    got = kernels.normalize_bf16(big, torch.zeros(1), torch.ones(1))
    assert torch.isfinite(got[..., :3]).all() and torch.isnan(got[..., 3]).all()


@needs_kernels
def test_bf16_copy_kernels_equal_the_torch_path(monkeypatch):
    """``to_bf16`` (any layout whose last dim is contiguous: attention's q, k, v are strided
    views of one projection) and LayerNorm's ``normalize_rows_bf16`` give the PyTorch path's
    values and layout: rounding, saturation of finite values past bf16's range, inf / NaN as NaN."""
    from sparsify_fx.passes.activation_memory.ops import _to_bf16, ln_payload

    x = _with_nonfinite(4, 10, 3, 2, 16)
    x[0, 1, 0, 0, 5], x[0, 1, 0, 0, 6] = 3.4e38, -3.3961e38
    with monkeypatch.context() as m:
        m.setattr(cpu_kernels, "for_strided", lambda t: None)
        m.setattr(cpu_kernels, "for_tensors", lambda *t, **k: None)
        views = [x, x.permute(2, 0, 3, 1, 4)[1], x[..., 3:11], x.transpose(-1, -2)]
        refs = [_to_bf16(t) for t in views]
        rows = _with_nonfinite(3, 5, 32) + 2.0
        _, mean, rstd = torch.ops.aten.native_layer_norm(rows, [32], None, None, 1e-5)
        ln_ref = ln_payload(rows, mean, rstd, "bf16", 0)[0]
    for t, ref in zip(views, refs):
        # (the transposed view has a strided last dim: the PyTorch path serves it)
        assert (cpu_kernels.for_strided(t) is None) == (t.stride(-1) != 1)
        got = _to_bf16(t)
        assert got.dtype == torch.bfloat16 and got.stride() == ref.stride()
        torch.testing.assert_close(got, ref, rtol=0, atol=0, equal_nan=True)
    assert torch.isfinite(refs[0][0, 1, 0, 0, 5:7]).all()
    torch.testing.assert_close(ln_payload(rows, mean, rstd, "bf16", 0)[0], ln_ref, rtol=0, atol=0, equal_nan=True)


@needs_kernels
@pytest.mark.parametrize("store", ["exact", "bf16"])
@pytest.mark.parametrize("upper", [None, 6.0])
def test_fused_bn_relu_conv_rebuild_agrees_with_the_torch_path(store, upper, monkeypatch):
    """The one-pass rebuild of the ReLU output (``affine_clamp``) gives the gradients of the
    PyTorch path's upcast, multiply, add and clamp to fp32 rounding (it may contract to FMA),
    with chunk tails, a bias-free BatchNorm and NaN passed through."""
    from sparsify_fx.passes.activation_memory.bn_relu_conv import ActMemBnReLUConv

    torch.manual_seed(0)
    x = torch.randn(3, 5, 33, 37) * 3
    x[1, 2, 3, 4] = float("nan")
    w = torch.rand(5) + 0.5  # bias-free: the op gets None for it
    conv = torch.randn(4, 5, 3, 3)

    def grads(kernels_on: bool):
        with monkeypatch.context() as m:
            if not kernels_on:
                m.setattr(cpu_kernels, "for_tensors", lambda *t, **k: None)
            op = ActMemBnReLUConv(0.1, 1e-5, [1, 1], [1, 1], [1, 1], 1, upper, store).train()
            xs, ws, cs = x.clone().requires_grad_(), w.clone().requires_grad_(), conv.clone().requires_grad_()
            out = op(xs, ws, None, torch.zeros(5), torch.ones(5), None, cs)
            out.backward(torch.ones_like(out))
            return out.detach(), xs.grad, ws.grad, cs.grad

    for a, b_ in zip(grads(True), grads(False), strict=True):
        torch.testing.assert_close(a, b_, rtol=1e-5, atol=1e-5, equal_nan=True)


@needs_kernels
@pytest.mark.parametrize("storage", ["recompute", "recompute-bf16"])
def test_a_models_fused_bn_relu_conv_rebuilds_with_the_kernel(storage, monkeypatch):
    """In a model the BatchNorm's weight reaches backward as an ``nn.Parameter``: the kernels
    must still take it (were a Parameter not "eager", every bf16 rebuild would run the
    four-pass PyTorch path, unseen by the test above, which passes plain tensors)."""
    from sparsify_fx.passes.kernels import cache

    assert cache.eager(nn.Parameter(torch.ones(2)))
    calls: list[str] = []
    real = cpu_kernels.for_tensors

    class Counting:
        def __init__(self, kernels):
            self.kernels = kernels

        def __getattr__(self, name):
            calls.append(name)
            return getattr(self.kernels, name)

    def counting(*tensors, **kwargs):
        kernels = real(*tensors, **kwargs)
        return None if kernels is None else Counting(kernels)

    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=5)
    x = torch.randn(2, 3, 32, 32)
    fast = sfx.sparsify(model, sfx.ActivationMemory(relu="off", batchnorm=storage), example_inputs=(x,)).train()
    fused = sum(r.details["storage"] == storage for r in sfx.explain(fast).rewrites)
    assert fused == 8
    monkeypatch.setattr(cpu_kernels, "for_tensors", counting)
    fast(x).sum().backward()
    assert calls.count("affine_clamp") == fused


def _bn_grads(x, affine: bool, kernels_on: bool, monkeypatch, need_x=True):
    with monkeypatch.context() as m:
        if not kernels_on:
            m.setattr(cpu_kernels, "for_tensors", lambda *t, **k: None)
        gen = torch.Generator().manual_seed(4)
        c = x.shape[1]
        weight = (torch.rand(c, generator=gen) + 0.5).requires_grad_() if affine else None
        bias = torch.randn(c, generator=gen).requires_grad_() if affine else None
        xr = x.clone().requires_grad_(need_x)
        out = torch.ops.sparsify_fx.actmem_batch_norm(xr, weight, bias, torch.zeros(c), torch.ones(c), 0.1, 1e-5, "bf16", 64)
        g = torch.randn(x.shape, generator=gen)
        inputs = [t for t in (xr, weight, bias) if t is not None and t.requires_grad]
        return torch.autograd.grad(out[0], inputs, g)


@needs_kernels
@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("shape", [(4, 6, 9, 11), (3, 5, 300), (2, 7)])
def test_fused_batchnorm_backward_agrees_with_the_torch_path(shape, affine, monkeypatch):
    """Read straight from the bf16 copy: the same formula as the PyTorch path, summed in
    another order, so equal to fp32 rounding (not bit for bit)."""
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(2)) * 3 + 1
    fused = _bn_grads(x, affine, True, monkeypatch)
    ref = _bn_grads(x, affine, False, monkeypatch)
    assert len(fused) == len(ref) == (3 if affine else 1)
    for a, b in zip(fused, ref):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    # weight / bias only (the input needs no gradient): the grad_x pass is skipped
    fused_wb = _bn_grads(x, True, True, monkeypatch, need_x=False)
    ref_wb = _bn_grads(x, True, False, monkeypatch, need_x=False)
    for a, b in zip(fused_wb, ref_wb):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@needs_kernels
def test_fused_batchnorm_backward_takes_the_kernel_and_propagates_nan(monkeypatch):
    used = []
    real = cpu_kernels.for_tensors
    monkeypatch.setattr(cpu_kernels, "for_tensors", lambda *t, **k: used.append(real(*t, **k) is not None) or real(*t, **k))
    x = _with_nonfinite(2, 3, 5, 5)
    grad_x, grad_w, grad_b = _bn_grads(x, True, True, monkeypatch)
    assert used and all(used)
    # channel 0 holds the NaN: its statistics are NaN, so is its whole gradient, as in dense autograd
    assert torch.isnan(grad_x[:, 0]).all() and torch.isnan(grad_w[0])
    assert torch.isfinite(grad_b).all()


def test_global_hook_keeps_modules_as_canonicalize_does():
    """A global module hook runs on every module call: canonicalize keeps the layers as module
    calls, and ActivationMemory leaves them alone too (one ``has_hooks`` answers both)."""
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 3))
    x = torch.randn(2, 3, 10, 10)
    seen = []
    handle = nn.modules.module.register_module_forward_hook(lambda m, i, o: seen.append(type(m).__name__))
    try:
        fast = sfx.sparsify(model, sfx.ActivationMemory(batchnorm="bf16"), example_inputs=(x,))
        report = sfx.explain(fast)
        modules = {str(n.target) for n in fast.graph.nodes if n.op == "call_module"}
        assert {"0", "1", "2", "3"} <= modules  # canonicalize expanded none of them
        assert not [r for r in report.rewrites if r.module == "1"]
        skips = {s.module: s.reason for s in report.skipped if s.pass_name == "actmem"}
        assert "hooks" in skips["1"]
        seen.clear()
        fast(x)
        assert "BatchNorm2d" in seen
    finally:
        handle.remove()
