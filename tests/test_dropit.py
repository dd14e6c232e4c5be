"""DropIT: the custom ops against autograd, and the pass on small models."""

from __future__ import annotations

import functools
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from conftest import SmallCNN, mlp
from sparsify_fx.passes import dropit
from sparsify_fx.passes.dropit import (
    DropITConv,
    DropITLinear,
    compress,
    compress_threshold,
    compress_topk,
    compressed_bytes,
    decompress,
    decompress_threshold,
    decompress_topk,
)
from sparsify_fx.passes.kernels import cpu as cpu_kernels

import sparsify_fx as sfx


def _grads(fn, *tensors):
    for t in tensors:
        t.grad = None
    out = fn()
    g = torch.randn_like(out, generator=torch.Generator().manual_seed(1))
    out.backward(g)
    return out.detach(), [t.grad.clone() if t.grad is not None else None for t in tensors]


@pytest.mark.parametrize("shape", [(6, 10), (2, 5, 10), (3, 4, 2, 10)])
def test_linear_op_keep1_matches_autograd(shape):
    x = torch.randn(*shape, requires_grad=True)
    w = torch.randn(7, 10, requires_grad=True)
    b = torch.randn(7, requires_grad=True)
    ref, ref_g = _grads(lambda: F.linear(x, w, b), x, w, b)
    op = DropITLinear(keep=1.0, chunk=64).train()
    out, g = _grads(lambda: op(x, w, b), x, w, b)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    for a, r in zip(g, ref_g):
        torch.testing.assert_close(a, r, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("selection", ["threshold", "topk"])
@pytest.mark.parametrize("keep", [0.05, 0.3, 0.7])
def test_linear_op_grad_input_and_bias_exact_any_keep(keep, selection):
    x = torch.randn(4, 3, 32, requires_grad=True)
    w = torch.randn(16, 32, requires_grad=True)
    b = torch.randn(16, requires_grad=True)
    _, ref_g = _grads(lambda: F.linear(x, w, b), x, w, b)
    _, g = _grads(lambda: DropITLinear(keep, 128, selection=selection).train()(x, w, b), x, w, b)
    torch.testing.assert_close(g[0], ref_g[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(g[2], ref_g[2], rtol=1e-5, atol=1e-6)
    # grad_W comes from the kept entries only: it must equal the gradient of the
    # explicitly sparsified input, and differ from the dense one
    values, idx = compress(x, keep, 128, selection)
    x_sparse = decompress(values, idx, list(x.shape), 128, selection)
    expected = (torch.randn_like(F.linear(x, w, b), generator=torch.Generator().manual_seed(1))
                .reshape(-1, 16).t() @ x_sparse.reshape(-1, 32))
    torch.testing.assert_close(g[1], expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(g[1], ref_g[1], rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("kind", ["matmul", "addmm"])
def test_transposed_weight_ops(kind):
    x = torch.randn(6, 10, requires_grad=True)
    w = torch.randn(10, 7, requires_grad=True)  # GPT-2 Conv1D layout: [in, out]
    b = torch.randn(7, requires_grad=True)
    if kind == "matmul":
        ref, ref_g = _grads(lambda: x @ w, x, w)
        out, g = _grads(lambda: DropITLinear(1.0, 64, "matmul").train()(x, w), x, w)
    else:
        ref, ref_g = _grads(lambda: torch.addmm(b, x, w), x, w, b)
        out, g = _grads(lambda: DropITLinear(1.0, 64, "addmm").train()(x, w, b), x, w, b)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    for a, r in zip(g, ref_g):
        torch.testing.assert_close(a, r, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "ndim,groups,stride,padding,dilation",
    [(1, 1, 2, 1, 1), (2, 1, 1, 1, 1), (2, 4, 2, 0, 1), (2, 8, 1, 2, 2), (3, 2, 1, 1, 1)],
)
def test_conv_op_keep1_matches_autograd(ndim, groups, stride, padding, dilation):
    spatial = (9,) * ndim
    x = torch.randn(2, 8, *spatial, requires_grad=True)
    w = torch.randn(8, 8 // groups, *(3,) * ndim, requires_grad=True)
    b = torch.randn(8, requires_grad=True)
    conv = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[ndim]
    ref, ref_g = _grads(lambda: conv(x, w, b, stride, padding, dilation, groups), x, w, b)
    op = DropITConv(1.0, 256, [stride] * ndim, [padding] * ndim, [dilation] * ndim, groups).train()
    out, g = _grads(lambda: op(x, w, b), x, w, b)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    for a, r in zip(g, ref_g):
        torch.testing.assert_close(a, r, rtol=1e-4, atol=1e-5)


def test_conv_op_grad_input_exact_small_keep():
    x = torch.randn(2, 4, 8, 8, requires_grad=True)
    w = torch.randn(6, 4, 3, 3, requires_grad=True)
    _, ref_g = _grads(lambda: F.conv2d(x, w, None, 1, 1), x, w)
    _, g = _grads(lambda: DropITConv(0.1, 128, [1, 1], [1, 1], [1, 1], 1).train()(x, w), x, w)
    torch.testing.assert_close(g[0], ref_g[0], rtol=1e-5, atol=1e-5)


def test_compression_keeps_largest_per_chunk_and_int16():
    x = torch.randn(1000)
    values, idx = compress_topk(x, 0.1, 100)
    assert idx.dtype == torch.int16 and values.shape == (10, 10)
    restored = decompress_topk(values, idx, x.shape, 100)
    for c in range(10):
        chunk = x[c * 100:(c + 1) * 100].abs()
        kept = restored[c * 100:(c + 1) * 100] != 0
        assert kept.sum() == 10
        assert chunk[kept].min() >= chunk[~kept].max()
    # a tail shorter than a chunk is padded, never read past the tensor
    values, idx = compress_topk(torch.randn(250), 0.5, 100)
    assert decompress_topk(values, idx, (250,), 100).shape == (250,)


def test_eval_mode_and_no_grad_run_the_dense_op():
    x, w, b = torch.randn(3, 5), torch.randn(4, 5, requires_grad=True), torch.randn(4)
    op = DropITLinear(0.1, 64)
    op.eval()
    torch.testing.assert_close(op(x, w, b), F.linear(x, w, b), rtol=0, atol=0)
    op.train()
    with torch.no_grad():
        torch.testing.assert_close(op(x, w, b), F.linear(x, w, b), rtol=0, atol=0)


def test_pass_on_mlp_rewrites_inner_layers_and_reports_first_last():
    model = mlp(depth=4)
    x = torch.randn(5, 8)
    fast = sfx.sparsify(model, sfx.DropIT(keep=0.25), example_inputs=(x,))
    report = sfx.explain(fast)
    assert sorted(r.module for r in report.rewrites) == ["2", "4"]
    skipped = {s.module: s.reason for s in report.skipped}
    assert "skip_first_last" in skipped["0"] and "skip_first_last" in skipped["6"]
    assert report.verification.startswith("ok")
    for r in report.rewrites:
        assert r.saved_bytes_after < r.saved_bytes_before


def test_pass_skip_first_last_false_and_include_exclude():
    model = mlp(depth=4)
    x = torch.randn(5, 8)
    fast = sfx.sparsify(model, sfx.DropIT(keep=0.5, skip_first_last=False, exclude="4"), (x,))
    rewritten = sorted(r.module for r in sfx.explain(fast).rewrites)
    assert rewritten == ["0", "2", "6"]
    fast = sfx.sparsify(model, sfx.DropIT(keep=0.5, include=["nothing.*"]), (x,))
    report = sfx.explain(fast)
    assert report.rewrites == []
    assert all("include" in s.reason or "first/last" in s.reason for s in report.skipped)
    assert len(report.skipped) == 4


def test_pass_trains_and_shares_parameters_on_cnn():
    model = SmallCNN()
    x = torch.randn(2, 3, 12, 12)
    fast = sfx.sparsify(model, sfx.DropIT(keep=0.2, skip_first_last=False), (x,))
    ops = {r.op for r in sfx.explain(fast).rewrites}
    assert ops == {"conv2d", "linear"}
    assert set(fast.state_dict()) == set(model.state_dict())
    fast.train()
    fast(x).sum().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    # the optimizer of the original model updates the rewritten one (shared parameters)
    before = fast.get_parameter("pw.weight").detach().clone()
    torch.optim.SGD(model.parameters(), lr=0.1).step()
    assert not torch.equal(before, fast.get_parameter("pw.weight"))


def test_frozen_weight_is_skipped_with_reason():
    model = mlp(depth=4)
    model[2].weight.requires_grad_(False)
    fast = sfx.sparsify(model, sfx.DropIT(keep=0.5), (torch.randn(2, 8),))
    reasons = {s.module: s.reason for s in sfx.explain(fast).skipped}
    assert "does not require grad" in reasons["2"]


def test_gpt2_style_conv1d_addmm_is_rewritten():
    class Conv1D(nn.Module):  # transformers' GPT-2 projection: weight is [in, out]
        def __init__(self, nf, nx):
            super().__init__()
            self.weight = nn.Parameter(torch.randn(nx, nf) * 0.02)
            self.bias = nn.Parameter(torch.zeros(nf))

        def forward(self, x):
            size_out = x.size()[:-1] + (self.weight.size(-1),)
            x = torch.addmm(self.bias, x.view(-1, x.size(-1)), self.weight)
            return x.view(size_out)

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.inp = nn.Linear(8, 8)
            self.c_fc = Conv1D(32, 8)
            self.c_proj = Conv1D(8, 32)
            self.proj = nn.Parameter(torch.randn(8, 8))
            self.out = nn.Linear(8, 2)

        def forward(self, x):
            h = self.c_proj(F.gelu(self.c_fc(self.inp(x))))
            return self.out(h @ self.proj)

    model = Block()
    x = torch.randn(2, 5, 8)
    fast = sfx.sparsify(model, sfx.DropIT(keep=0.3), (x,))
    ops = {r.module: r.op for r in sfx.explain(fast).rewrites}
    assert ops == {"c_fc": "addmm", "c_proj": "addmm", "": "matmul"}
    fast.train()
    fast(x).sum().backward()
    assert all(p.grad is not None for p in model.parameters())


def test_config_validation():
    with pytest.raises(sfx.ConfigError, match="DropIT.keep"):
        sfx.DropIT(keep=0.0)
    with pytest.raises(sfx.ConfigError, match="DropIT.keep"):
        sfx.DropIT(keep=1.5)
    with pytest.raises(sfx.ConfigError, match="chunk_size"):
        sfx.DropIT(chunk_size=40000)
    with pytest.raises(sfx.ConfigError, match="include"):
        sfx.DropIT(include=3)
    from dataclasses import FrozenInstanceError

    with pytest.raises(FrozenInstanceError):
        sfx.DropIT(keep=0.1).keep = 0.2


def test_rewritten_module_deepcopies_pickles_and_state_dict_roundtrips():
    import copy
    import io

    import torchvision

    model = torchvision.models.resnet18()
    x = torch.randn(2, 3, 32, 32)
    fast = sfx.sparsify(model, sfx.DropIT(keep=0.1), (x,))
    buf = io.BytesIO()
    torch.save(fast, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    clone = copy.deepcopy(fast)
    for m in (fast, loaded, clone, model):
        m.eval()
    ref = fast(x)
    torch.testing.assert_close(loaded(x), ref, rtol=0, atol=0)
    torch.testing.assert_close(clone(x), ref, rtol=0, atol=0)
    assert len(sfx.explain(loaded).rewrites) == 19
    fresh = torchvision.models.resnet18()
    fresh.load_state_dict(fast.state_dict())
    fresh.eval()
    torch.testing.assert_close(fresh(x), model(x), rtol=0, atol=0)


# ---------------------------------------------------------------- threshold selection


def _check_threshold_selection(x: torch.Tensor, keep: float):
    values, bitmap = compress_threshold(x, keep)
    restored = decompress_threshold(values, bitmap, x.shape)
    kept = restored != 0
    # every kept element is restored exactly, nothing else is
    torch.testing.assert_close(restored[kept], x[kept], rtol=0, atol=0)
    # the kept set is a top-k set for its size: no dropped element is larger than a kept one
    if kept.any() and (~kept).any():
        assert x[kept].abs().min() >= x[~kept].abs().max()
    cap = values.numel()
    assert cap == math.ceil(1.06 * keep * x.numel()) or cap == x.numel()
    assert bitmap.dtype == torch.uint8 and bitmap.numel() == math.ceil(x.numel() / 8)
    assert int(kept.sum()) <= cap
    return int(kept.sum()) / x.numel()


@pytest.mark.parametrize("keep", [0.02, 0.1, 0.5])
def test_threshold_selection_is_top_set_and_hits_keep(keep):
    x = torch.randn(4, 64, 28, 28)
    ratio = _check_threshold_selection(x, keep)
    # the strided-sample quantile lands within a few percent of the asked ratio
    assert abs(ratio - keep) <= 0.06 * keep, ratio


def test_threshold_selection_relu_zeros_are_never_kept():
    x = torch.randn(2, 16, 20, 20).relu()  # half exact zeros
    ratio = _check_threshold_selection(x, 0.1)
    assert 0.09 <= ratio <= 0.104


def test_threshold_selection_overflow_is_refined_to_the_capacity():
    # the sample sees only the small values; the large ones sit between sample points, so
    # the sampled cut-off lets far more than keep * numel through and must be raised
    x = torch.linspace(1.0, 2.0, 262144)
    x[dropit._sample_index(x.numel(), x.device)] = 0.01
    values, bitmap = compress_threshold(x, 0.1)
    restored = decompress_threshold(values, bitmap, x.shape)
    kept = restored != 0
    assert int(kept.sum()) == values.numel()  # filled to capacity, not beyond
    assert x[kept].min() >= x[~kept].max()


def test_threshold_selection_ties_and_degenerate_inputs():
    for x in (torch.ones(1000), torch.zeros(1000), torch.randn(3), torch.randn(1)):
        _check_threshold_selection(x, 0.1)
    ones = torch.ones(1000)
    values, bitmap = compress_threshold(ones, 0.1)
    restored = decompress_threshold(values, bitmap, ones.shape)
    assert int((restored != 0).sum()) <= values.numel()


def test_threshold_gradient_error_close_to_exact_topk():
    # the weight gradient from the sampled threshold is as good as from an exact top-k
    x = torch.randn(8, 32, 16, 16)
    g = torch.randn(8 * 16 * 16, 24)
    x2 = x.permute(0, 2, 3, 1).reshape(-1, 32)
    dense = g.t() @ x2
    errs = {}
    for sel in ("threshold", "topk"):
        v, i = compress(x, 0.1, 16384, sel)
        xs = decompress(v, i, list(x.shape), 16384, sel).permute(0, 2, 3, 1).reshape(-1, 32)
        errs[sel] = float((g.t() @ xs - dense).norm() / dense.norm())
    assert errs["threshold"] <= errs["topk"] * 1.05, errs


@pytest.mark.parametrize("selection", ["threshold", "topk"])
def test_fake_kernel_shapes_match_real(selection):
    from torch._subclasses.fake_tensor import FakeTensorMode

    x, w = torch.randn(2, 8, 10, 10), torch.randn(4, 8, 3, 3)
    real = torch.ops.sparsify_fx.dropit_conv(x, w, None, [1, 1], [1, 1], [1, 1], 1, 0.1, 1024, selection)
    with FakeTensorMode() as mode:
        fx_, fw = mode.from_tensor(x), mode.from_tensor(w)
        fake = torch.ops.sparsify_fx.dropit_conv(fx_, fw, None, [1, 1], [1, 1], [1, 1], 1, 0.1, 1024, selection)
    assert [tuple(t.shape) for t in real] == [tuple(t.shape) for t in fake]
    assert [t.dtype for t in real] == [t.dtype for t in fake]
    payload = sum(t.numel() * t.element_size() for t in real[1:])
    assert payload == compressed_bytes(x.numel(), 4, 0.1, 1024, selection)


def test_autocast_bf16_saves_bf16_and_grads_match_dense_at_keep1():
    x = torch.randn(6, 16, requires_grad=True)
    w = torch.randn(8, 16, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref, ref_g = _grads(lambda: F.linear(x, w), x, w)
        out, g = _grads(lambda: DropITLinear(1.0, 64).train()(x, w), x, w)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    for a, r in zip(g, ref_g):
        assert a.dtype == torch.float32
        torch.testing.assert_close(a, r, rtol=2e-2, atol=2e-2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, values, _ = torch.ops.sparsify_fx.dropit_linear(x.bfloat16(), w.bfloat16(), None, 0.5, 64, "threshold", False)
    assert values.dtype == torch.bfloat16


@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_autocast_backward_keeps_the_fp32_weight_not_a_bf16_copy(kind):
    """Under bf16 autocast a dense Linear / Conv keeps autocast's bf16 copy of its weight for
    backward (2 bytes a parameter each step); the DropIT op re-casts the fp32 parameter in
    backward instead, with the same gradients."""
    torch.manual_seed(0)
    if kind == "linear":
        model, x = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 4)), \
            torch.randn(8, 16)
    else:
        model, x = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1),
                                 nn.ReLU(), nn.Conv2d(16, 4, 1)), torch.randn(2, 3, 8, 8)
    fast = sfx.sparsify(model, sfx.DropIT(keep=1.0, skip_first_last=False), example_inputs=(x,))
    weights = {tuple(p.shape) for p in model.parameters() if p.dim() > 1}
    weights |= {s[::-1] for s in weights if len(s) == 2}  # a Linear keeps W.t()
    saved = {}

    def step(m):
        shapes = []

        def pack(t):
            shapes.append((tuple(t.shape), t.dtype))
            return t

        m.train().zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = m(x)
        out.float().square().sum().backward()
        saved[m] = shapes
        return [p.grad.clone() for p in model.parameters()]

    ref = step(model)
    got = step(fast)
    assert any(s in weights and d == torch.bfloat16 for s, d in saved[model])  # what is saved
    assert not any(s in weights and d == torch.bfloat16 for s, d in saved[fast]), saved[fast]
    for a, r in zip(got, ref):
        assert a.dtype == torch.float32
        torch.testing.assert_close(a, r, rtol=2e-2, atol=2e-2)
    # and the memory plan counts autocast's weight copies for the dense graph only
    def copies(gm):
        return (sfx.memory_plan(gm, autocast=torch.bfloat16).total_bytes
                - sfx.memory_plan(gm, autocast=None).total_bytes)

    dense_graph = sfx.capture(model, (x,)).graph_module
    sfx.ShapeRecorder(dense_graph).run(x)
    assert copies(sfx.explain(fast).graph_modules[""]) == 0
    assert copies(dense_graph) > 0


# ---------------------------------------------------------------- fused CPU kernels

ROOT = Path(__file__).resolve().parents[1]
needs_kernels = pytest.mark.skipif(
    cpu_kernels.load() is None, reason=f"C++ kernels unavailable: {cpu_kernels.unavailable_reason()}")


def _kernel_inputs():
    gen = torch.Generator().manual_seed(3)
    chunk = 1 << 16
    sizes = [1, 7, 8, 9, 511, 513, chunk - 1, chunk + 9, 3 * chunk + 5]
    for n in sizes:
        for dtype in cpu_kernels.DTYPES:
            x = torch.randn(n, generator=gen).to(dtype)
            if n > 20:
                x[[3, n // 2, n - 1]] = torch.tensor([float("nan"), float("inf"), -float("inf")]).to(dtype)
            yield x
    yield torch.randn(4, 32, 20, 20, generator=gen).relu()  # half exact zeros


@needs_kernels
@pytest.mark.parametrize("keep", [0.1, 0.5])
def test_fused_kernels_equal_the_torch_path(keep, monkeypatch):
    """Bit-identical values and bitmaps (NaN / inf kept, ties dropped, chunk and byte tails),
    and the same dense tensor back, whichever side compressed."""
    for x in _kernel_inputs():
        fused = compress_threshold(x, keep)
        with monkeypatch.context() as m:
            m.setattr(cpu_kernels, "for_tensors", lambda *t, **k: None)
            ref = compress_threshold(x, keep)
            restored_ref = decompress_threshold(*fused, x.shape)
        assert fused[0].dtype == x.dtype and fused[1].dtype == torch.uint8
        for a, b in zip(fused, ref):
            torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True, msg=lambda m: f"{x.dtype} {x.shape}: {m}")
        torch.testing.assert_close(decompress_threshold(*fused, x.shape), restored_ref, rtol=0, atol=0, equal_nan=True)


@needs_kernels
@pytest.mark.parametrize("keep", [0.01, 0.1, 0.5, 0.99])
def test_sample_cutoff_is_the_torch_paths_cutoff(keep):
    """The C++ gather and nth_element give kthvalue's value
    on the PyTorch path's gathered sample, NaN ranked as inf, clamped to the largest finite."""
    kernels = cpu_kernels.load()
    for x in _kernel_inputs():
        flat = x.reshape(-1)
        n = flat.numel()
        sample = flat[dropit._sample_index(n, flat.device)].abs().nan_to_num_(nan=float("inf"))
        ref = dropit._cutoff(sample, keep)
        m = sample.numel()
        dropped = m - min(m, math.ceil(keep * m))
        if ref is None:
            assert dropped == 0
            continue
        got = kernels.sample_cutoff(flat, dropit._sample_index(n, flat.device), dropped)
        assert got == float(ref), (x.dtype, n, got, float(ref))


@functools.cache
def _extension_errors_reach_python() -> bool:
    """Whether a C++ error thrown in the kernels reaches Python as a RuntimeError here. On the
    lent H100's image (torch 2.11 built by gcc-toolset-13, the extension by the system's g++
    13.3) any exception thrown from a cpp_extension-built extension, a one-line TORCH_CHECK too, kills
    the process with SIGSEGV: probed in a child process, so that only the checks below skip."""
    probe = ("import torch\nfrom sparsify_fx.passes.kernels import cpu as cpu_kernels\ntry:\n"
             "    cpu_kernels.load().sample_cutoff(torch.randn(10), torch.arange(10), 11)\n"
             "except RuntimeError:\n    print('raised')\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env, timeout=600)
    return done.returncode == 0 and "raised" in done.stdout


@needs_kernels
def test_sample_cutoff_refuses_bad_arguments():
    if not _extension_errors_reach_python():
        pytest.skip("a C++ exception thrown in a torch extension kills the process on this machine")
    kernels = cpu_kernels.load()
    with pytest.raises(RuntimeError, match="dropped"):
        kernels.sample_cutoff(torch.randn(100), torch.arange(100), 101)
    with pytest.raises(RuntimeError, match="out of"):
        kernels.sample_cutoff(torch.randn(100), torch.arange(101), 3)


@needs_kernels
def test_fused_kernels_refuse_inconsistent_buffers():
    if not _extension_errors_reach_python():
        pytest.skip("a C++ exception thrown in a torch extension kills the process on this machine")
    kernels = cpu_kernels.load()
    x = torch.randn(1000)
    bits, counts = kernels.threshold_bits(x, 0.5)
    with pytest.raises(RuntimeError, match="exceed the capacity"):
        kernels.compact(x, bits, counts, int(counts.sum()) - 1)
    with pytest.raises(RuntimeError, match="values holds"):
        kernels.expand(x[: int(counts.sum()) - 1].contiguous(), bits, 1000)


def test_kernels_can_be_switched_off_and_say_so(monkeypatch):
    monkeypatch.setenv("SPARSIFY_FX_CPU_KERNELS", "0")
    cpu_kernels.load.cache_clear()
    try:
        assert cpu_kernels.load() is None
        assert "SPARSIFY_FX_CPU_KERNELS=0" in cpu_kernels.unavailable_reason()
        x = torch.randn(5000)
        values, bitmap = compress_threshold(x, 0.1)  # the PyTorch path
        assert int(decompress_threshold(values, bitmap, x.shape).ne(0).sum()) <= values.numel()
    finally:
        monkeypatch.delenv("SPARSIFY_FX_CPU_KERNELS")
        cpu_kernels.load.cache_clear()


@needs_kernels
def test_a_cpu_training_step_takes_the_kernels_at_every_lookup(monkeypatch):
    """Every saved tensor of DropIT and ActivationMemory goes through the kernels both ways on
    an fp32 CPU step: a lookup that falls back (a bitmap's dtype refused, say) only costs time,
    so no numerical test would see it."""
    from conftest import SmallCNN

    looked_up = []
    real = cpu_kernels.for_tensors

    def recording(*tensors, **kw):
        found = real(*tensors, **kw)
        looked_up.append((found is not None, [t.dtype for t in tensors], "bits" in kw))
        return found

    torch.manual_seed(0)
    model = sfx.sparsify(SmallCNN(), "dropit:keep=0.1+actmem", example_inputs=(torch.randn(1, 3, 16, 16),)).train()
    x = torch.randn(4, 3, 16, 16)
    monkeypatch.setattr(cpu_kernels, "for_tensors", recording)
    model(x).sum().backward()
    assert any(bits for _, _, bits in looked_up), "no backward lookup with a bitmap ran"
    assert len(looked_up) >= 4 and all(found for found, _, _ in looked_up), looked_up
