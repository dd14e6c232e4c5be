"""BlockSparseActivations: block compression, the custom op against autograd, and the pass."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from conftest import mlp
from sparsify_fx.passes.block_sparse.rewrite import (
    BlockSparseConv1x1,
    BlockSparseLinear,
    block_grid,
    block_sparse_weight_grad,
    compress_blocks,
    decompress_blocks,
)

import sparsify_fx as sfx

_EXAMPLES = Path(__file__).parent.parent / "examples"


def _load_resmlp():
    spec = importlib.util.spec_from_file_location("resmlp_example", _EXAMPLES / "resmlp.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _grads(fn, *tensors):
    for t in tensors:
        t.grad = None
    out = fn()
    out.backward(torch.randn_like(out, generator=torch.Generator().manual_seed(1)))
    return out.detach(), [t.grad.clone() if t.grad is not None else None for t in tensors]


def _block_mask(dense: torch.Tensor, block: int) -> torch.Tensor:
    """Per-element mask of the blocks that contain at least one stored element."""
    rows, cols = dense.shape
    nz = (dense != 0).float()
    pooled = F.max_pool2d(nz[None, None], block, block, ceil_mode=True)[0, 0]
    return pooled.repeat_interleave(block, 0).repeat_interleave(block, 1)[:rows, :cols].bool()


# ---------------------------------------------------------------- compression


@pytest.mark.parametrize("rows,cols,block,density", [
    (64, 64, 16, 0.5), (37, 50, 16, 0.5), (37, 50, 16, 0.25), (5, 7, 16, 0.5), (48, 33, 8, 0.75),
])
@pytest.mark.parametrize("norm", ["l1", "l2"])
def test_round_trip_kept_blocks_exact_rest_zero(rows, cols, block, density, norm):
    x = torch.randn(rows, cols)
    blocks = compress_blocks(x, block, density, norm)
    dense = decompress_blocks(blocks, rows, cols, block)
    kept = _block_mask(dense, block)
    torch.testing.assert_close(dense[kept], x[kept], rtol=0, atol=0)
    assert (dense[~kept] == 0).all()
    grid = block_grid(rows, cols, block, density)
    # stored bytes are exactly the real elements of kept blocks plus the index tensors
    assert blocks.nbytes() == grid.compressed_bytes(4)
    assert grid.kept_elements() == int(kept.sum())


def test_keeps_the_strongest_blocks():
    x = torch.full((32, 32), 0.01)
    x[16:, :16] = 5.0  # one strong block out of four
    blocks = compress_blocks(x, 16, 0.25, "l1")
    dense = decompress_blocks(blocks, 32, 32, 16)
    torch.testing.assert_close(dense, torch.where(x == 5.0, x, torch.zeros(())), rtol=0, atol=0)
    assert blocks.values.shape == (1, 16, 16)
    assert blocks.row_idx.dtype == torch.int16 and blocks.col_ptr.dtype == torch.int32


@pytest.mark.parametrize("rows,cols,block,density", [(64, 48, 16, 0.5), (37, 50, 16, 0.25), (100, 85, 16, 0.75)])
def test_sampled_blocks_are_unbiased_exact_count_and_same_bytes(rows, cols, block, density):
    # "sample": exactly as many blocks as top-k (same stored bytes), each a kept block of x
    # scaled by 1/p; the average over draws is x itself (top-k's average is its own subset)
    torch.manual_seed(0)
    x = torch.randn(rows, cols) * torch.rand(1, cols) * 3
    grid = block_grid(rows, cols, block, density)
    draws = 4000
    mean = torch.zeros_like(x)
    for _ in range(draws):
        blocks = compress_blocks(x, block, density, "l2", "sample")
        assert blocks.nbytes() == grid.compressed_bytes(4)
        assert all((t[1:] > t[:-1]).all() for t in (blocks.bottom_cols.long(), blocks.right_rows.long()))
        mean += decompress_blocks(blocks, rows, cols, block)
    mean /= draws
    assert float((mean - x).abs().mean()) < 0.05 * float(x.abs().mean())
    topk = decompress_blocks(compress_blocks(x, block, density), rows, cols, block)
    assert float((topk - x).abs().mean()) > 0.1 * float(x.abs().mean())


def test_sampling_always_keeps_dominant_blocks_unscaled():
    x = torch.full((64, 64), 0.01)
    x[16:32, :16] = 50.0  # one dominant block: its probability saturates at 1
    for _ in range(20):
        dense = decompress_blocks(compress_blocks(x, 16, 0.25, "l1", "sample"), 64, 64, 16)
        torch.testing.assert_close(dense[16:32, :16], x[16:32, :16], rtol=0, atol=0)
        assert int((dense != 0).sum()) == 4 * 16 * 16  # 4 of 16 blocks, no more


def test_sampled_weight_grad_is_unbiased_through_the_pass():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.LayerNorm(64), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 4))
    x = torch.randn(64, 32)
    dense_grad = torch.autograd.grad(model(x).square().sum(), model[2].weight)[0]
    fast = sfx.sparsify(model, sfx.BlockSparseActivations(block_size=16, density=0.5), example_inputs=(x,))
    assert sfx.explain(fast).rewrites[0].details["selection"] == "sample"
    mean = sum(torch.autograd.grad(fast(x).square().sum(), model[2].weight)[0] for _ in range(800)) / 800
    assert float((mean - dense_grad).norm() / dense_grad.norm()) < 0.1
    topk = sfx.sparsify(model, sfx.BlockSparseActivations(block_size=16, density=0.5, selection="topk"),
                        example_inputs=(x,))
    biased = torch.autograd.grad(topk(x).square().sum(), model[2].weight)[0]
    assert float((biased - dense_grad).norm() / dense_grad.norm()) > 0.2


@pytest.mark.parametrize("rows,cols,block", [(37, 50, 16), (64, 48, 16), (10, 70, 32)])
def test_weight_grad_equals_dense_product_of_kept_blocks(rows, cols, block):
    x = torch.randn(rows, cols)
    g = torch.randn(rows, 11)
    blocks = compress_blocks(x, block, 0.5)
    dense = decompress_blocks(blocks, rows, cols, block)
    grad = block_sparse_weight_grad(blocks, g, rows, cols, block)
    torch.testing.assert_close(grad, dense.t() @ g, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("out", [7, 600])  # 600 >= 32 blocks of 16: one GEMM per kept block
@pytest.mark.parametrize("density", [0.05, 0.5, 1.0])
def test_weight_grad_per_block_column_equals_dense_product_of_kept_blocks(density, out):
    # 6 x 5 full blocks plus partial strips; at 5 % density most block columns keep nothing
    x, g = torch.randn(100, 85), torch.randn(100, out)
    x[:, 16:32] *= 50  # one block column wins every kept slot at low density
    blocks = compress_blocks(x, 16, density)
    counts = blocks.col_ptr[1:] - blocks.col_ptr[:-1]
    if density < 0.1:
        assert (counts == 0).sum() >= 3
    got = block_sparse_weight_grad(blocks, g, 100, 85, 16)
    want = decompress_blocks(blocks, 100, 85, 16).t() @ g
    # fp32 sums of up to 100 products of a 50x-scaled column: absolute slack scaled by the largest
    atol = 1e-6 * float(want.abs().max())
    torch.testing.assert_close(got, want, rtol=1e-5, atol=atol)
    # the [out, cols] layout a Linear's weight takes, written directly (contiguous)
    got_t = block_sparse_weight_grad(blocks, g, 100, 85, 16, transposed=True)
    assert got_t.shape == (out, 85) and got_t.is_contiguous()
    torch.testing.assert_close(got_t, want.t(), rtol=1e-5, atol=atol)


# ---------------------------------------------------------------- custom op vs autograd


@pytest.mark.parametrize("shape", [(37, 50), (3, 37, 50), (2, 4, 5, 50)])
@pytest.mark.parametrize("kind", ["linear", "matmul"])
def test_density1_matches_dense_autograd(shape, kind):
    x = torch.randn(*shape, requires_grad=True)
    w = torch.randn(11, 50, requires_grad=True) if kind == "linear" else torch.randn(50, 11, requires_grad=True)
    b = torch.randn(11, requires_grad=True)
    if kind == "linear":
        ref, ref_g = _grads(lambda: F.linear(x, w, b), x, w, b)
        out, g = _grads(lambda: BlockSparseLinear(16, 1.0, "l2", "linear").train()(x, w, b), x, w, b)
    else:
        ref, ref_g = _grads(lambda: torch.matmul(x, w), x, w)
        out, g = _grads(lambda: BlockSparseLinear(16, 1.0, "l2", "matmul").train()(x, w), x, w)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    for got, want in zip(g, ref_g, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("density", [0.1, 0.5, 0.8])
def test_grad_input_and_bias_exact_any_density(density):
    x = torch.randn(3, 37, 50, requires_grad=True)
    w = torch.randn(20, 50, requires_grad=True)
    b = torch.randn(20, requires_grad=True)
    ref, ref_g = _grads(lambda: F.linear(x, w, b), x, w, b)
    out, g = _grads(lambda: BlockSparseLinear(16, density, "l1").train()(x, w, b), x, w, b)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    torch.testing.assert_close(g[0], ref_g[0], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(g[2], ref_g[2], rtol=1e-6, atol=1e-6)
    # grad_W is the dense formula applied to the kept blocks (flattened leading dims)
    x2 = x.detach().reshape(-1, 50)
    kept = decompress_blocks(compress_blocks(x2, 16, density, "l1"), 111, 50, 16)
    grad_out = torch.randn_like(out, generator=torch.Generator().manual_seed(1)).reshape(-1, 20)
    torch.testing.assert_close(g[1], grad_out.t() @ kept, rtol=1e-5, atol=1e-5)
    if density < 1:
        assert not torch.allclose(g[1], ref_g[1])


def test_addmm_and_conv1x1_density1_match_autograd():
    x = torch.randn(37, 50, requires_grad=True)
    w = torch.randn(50, 11, requires_grad=True)
    b = torch.randn(11, requires_grad=True)
    ref, ref_g = _grads(lambda: torch.addmm(b, x, w), x, w, b)
    out, g = _grads(lambda: BlockSparseLinear(16, 1.0, "l2", "addmm").train()(x, w, b), x, w, b)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    for got, want in zip(g, ref_g, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)

    xc = torch.randn(2, 12, 5, 7, requires_grad=True)
    wc = torch.randn(9, 12, 1, 1, requires_grad=True)
    bc = torch.randn(9, requires_grad=True)
    ref, ref_g = _grads(lambda: F.conv2d(xc, wc, bc), xc, wc, bc)
    out, g = _grads(lambda: BlockSparseConv1x1(8, 1.0, "l2", (1, 1)).train()(xc, wc, bc), xc, wc, bc)
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)
    for got, want in zip(g, ref_g, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_eval_and_no_grad_run_the_dense_op():
    x, w, b = torch.randn(3, 37, 50), torch.randn(11, 50, requires_grad=True), torch.randn(11)
    op = BlockSparseLinear(16, 0.25, "l2")
    torch.testing.assert_close(op.eval()(x, w, b), F.linear(x, w, b), rtol=0, atol=0)
    with torch.no_grad():
        torch.testing.assert_close(op.train()(x, w, b), F.linear(x, w, b), rtol=0, atol=0)


@pytest.mark.parametrize("selection", ["sample", "topk"])
def test_op_survives_fake_tensor_tracing(selection):
    x, w = torch.randn(37, 50), torch.randn(11, 50)
    torch.library.opcheck(torch.ops.sparsify_fx.block_sparse_dense.default,
                          (x, w, None, 16, 0.5, "l2", selection, "linear", []),
                          test_utils=("test_schema", "test_faketensor"))


# ---------------------------------------------------------------- config


@pytest.mark.parametrize("kwargs,field", [
    ({"block_size": 0}, "block_size"),
    ({"block_size": 16.0}, "block_size"),
    ({"density": 0.0}, "density"),
    ({"density": 1.5}, "density"),
    ({"norm": "linf"}, "norm"),
    ({"selection": "random"}, "selection"),
    ({"skip_first_last": "yes"}, "skip_first_last"),
])
def test_config_validation_names_field_and_value(kwargs, field):
    with pytest.raises(sfx.ConfigError, match=f"BlockSparseActivations.{field}") as info:
        sfx.BlockSparseActivations(**kwargs)
    assert repr(next(iter(kwargs.values()))) in str(info.value)


def test_config_is_frozen_and_registered():
    config = sfx.BlockSparseActivations(block_size=16, density=0.25)
    with pytest.raises(AttributeError):
        config.density = 0.5  # type: ignore[misc]
    assert "bsr" in sfx.registered()
    assert sfx.parse_recipe("bsr:block_size=16,density=0.25") == [config]


# ---------------------------------------------------------------- the pass


def test_include_matching_nothing_rewrites_nothing_and_says_why():
    model = mlp(width=32)
    x = torch.randn(8, 8)
    fast = sfx.sparsify(model, sfx.BlockSparseActivations(block_size=16, include="nothing.*"),
                        example_inputs=(x,))
    report = sfx.explain(fast)
    assert report.rewrites == []
    assert len(report.skipped) == 4
    assert all("not matched by include" in s.reason for s in report.skipped)


def test_convs_other_than_1x1_are_skipped_with_a_reason():
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 1),
                          nn.ReLU(), nn.Conv2d(16, 16, 1, stride=2), nn.ReLU(),
                          nn.Conv2d(16, 16, 3, padding=1), nn.Flatten(), nn.Linear(16 * 16, 4))
    x = torch.randn(2, 3, 8, 8)
    fast = sfx.sparsify(model, sfx.BlockSparseActivations(block_size=8), example_inputs=(x,))
    report = sfx.explain(fast)
    assert [(r.module, r.op) for r in report.rewrites] == [("2", "conv2d(1x1)")]
    reasons = {s.module: s.reason for s in report.skipped}
    assert "stride" in reasons["4"] and "not 1x1" in reasons["6"]
    assert "first/last" in reasons["0"] and "first/last" in reasons["8"]
    fast.train()
    fast(x).sum().backward()
    assert all(p.grad is not None for p in model.parameters())


def _saved_bytes(model: nn.Module, x: torch.Tensor) -> int:
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        key = t.untyped_storage().data_ptr()
        if key not in params:
            storages[key] = t.untyped_storage().nbytes()
        return t  # kept referenced: no address reuse while the forward runs

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(x)
    del out
    return sum(storages.values())


def test_tiny_resmlp_end_to_end():
    resmlp = _load_resmlp()
    model = resmlp.resmlp(depth=2, dim=64, image_size=32, patch=8)
    x = torch.randn(4, 3, 32, 32)
    config = sfx.BlockSparseActivations(block_size=16, density=0.25)
    fast = sfx.sparsify(model, config, example_inputs=(x,))
    report = sfx.explain(fast)
    assert len(report.rewrites) == 6  # 2 x (token_mix, fc1, fc2); patch_embed + head stay dense
    assert {s.module for s in report.skipped} == {"patch_embed", "head"}
    assert all(r.saved_bytes_after < r.saved_bytes_before for r in report.rewrites)
    assert set(fast.state_dict()) == set(model.state_dict())

    model.eval(), fast.eval()
    with torch.no_grad():
        torch.testing.assert_close(fast(x), model(x), rtol=0, atol=0)

    fast.train()
    loss = F.cross_entropy(fast(x), torch.randint(0, 10, (4,)))
    loss.backward()
    for name, p in model.named_parameters():  # parameters are shared with the rewrite
        assert p.grad is not None and torch.isfinite(p.grad).all(), name

    model.train()
    dense_bytes, sparse_bytes = _saved_bytes(model, x), _saved_bytes(fast, x)
    assert sparse_bytes < dense_bytes
    # the rewritten layers' inputs shrink to ~density; the rest of the graph is unchanged
    saved_by_rewrites = report.saved_bytes_before - report.saved_bytes_after
    assert dense_bytes - sparse_bytes == pytest.approx(saved_by_rewrites, rel=0.05)


def test_autocast_bf16_runs_in_bf16_and_grads_match_dense_at_density1():
    x = torch.randn(2, 8, 32, requires_grad=True)
    w = torch.randn(24, 32, requires_grad=True)
    b = torch.randn(24, requires_grad=True)
    op = BlockSparseLinear(block=8, density=1.0, norm="l2").train()

    def grads(fn):
        for t in (x, w, b):
            t.grad = None
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = fn()
        out.float().pow(2).sum().backward()
        return out, [t.grad.clone() for t in (x, w, b)]

    ref, ref_g = grads(lambda: F.linear(x, w, b))
    out, g = grads(lambda: op(x, w, b))
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    for a, r in zip(g, ref_g):
        assert a.dtype == torch.float32  # flows back to the fp32 parameter through the cast
        # bf16 products summed in a different order: compare relative to the gradient's norm
        assert float((a - r).norm() / r.norm()) < 1e-2
