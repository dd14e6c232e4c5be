"""The Triton weight-gradient kernel of BlockSparseActivations (passes/block_sparse/triton_kernel.py).

Without a GPU the kernel runs in Triton's interpreter (``TRITON_INTERPRET=1``, CPU tensors),
in a subprocess because the variable is read when kernels are defined. The CUDA tests run the
compiled kernel and skip without CUDA.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from sparsify_fx.passes.block_sparse.rewrite import block_sparse_weight_grad, compress_blocks
from sparsify_fx.passes.block_sparse.triton_kernel import kernel_for, triton_available

import sparsify_fx as sfx

_ROOT = Path(__file__).resolve().parent.parent
needs_triton = pytest.mark.skipif(not triton_available(), reason="triton is not installed")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

# (rows, cols, out, block, density): partial strips on both sides, empty block columns
# (density 0.1 of a 5 x 4 grid keeps 2 blocks), out not a multiple of the kernel's tile
_CASES = [
    (64, 64, 40, 16, 0.5),
    (70, 100, 130, 32, 0.3),
    (37, 50, 20, 16, 0.25),
    (128, 64, 300, 64, 0.5),
    (80, 64, 24, 16, 0.1),
    (48, 48, 16, 16, 1.0),
]


def _interpreted(body: str) -> None:
    """Run ``body`` in a fresh interpreter with TRITON_INTERPRET=1; fail with its output."""
    env = {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1"}
    script = "import torch\n" + textwrap.dedent(body)
    proc = subprocess.run([sys.executable, "-c", script], cwd=_ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
    if proc.returncode and "only 0-dimensional arrays can be converted to Python scalars" in proc.stderr:
        # Triton < 3.9's interpreter passes a loaded scalar to range() as a 1-element array,
        # which numpy >= 2.5 refuses to convert (seen: triton 3.6 + numpy 2.5.2)
        import numpy
        import triton
        pytest.skip(f"Triton {triton.__version__}'s interpreter does not run with numpy {numpy.__version__}")
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]


def test_kernel_choice_says_why_the_torch_path_runs():
    assert kernel_for("cpu", 32)[0] == "torch" or os.environ.get("TRITON_INTERPRET") == "1"
    kernel, why = kernel_for("cuda", 24)
    assert kernel == "torch" and "block_size=24" in why
    kernel, why = kernel_for("cuda", 32, torch.float64)
    assert kernel == "torch" and "float64" in why
    if not triton_available():
        assert kernel_for("cuda", 32) == ("torch", "triton is not installed")


def test_report_names_the_kernel_of_each_rewrite():
    m = nn.Sequential(nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4))
    fast = sfx.sparsify(m, sfx.BlockSparseActivations(block_size=16), example_inputs=(torch.randn(8, 32),))
    (rewrite,) = sfx.explain(fast).rewrites
    expected = kernel_for("cpu", 16, torch.float32)
    assert (rewrite.details["kernel"], rewrite.details["kernel_reason"]) == expected


@needs_triton
def test_interpreted_kernel_equals_torch_path_fp32_fp16_bf16():
    _interpreted(f"""
        from sparsify_fx.passes.block_sparse.rewrite import block_sparse_weight_grad, compress_blocks, decompress_blocks
        from sparsify_fx.passes.block_sparse.triton_kernel import kernel_for
        assert kernel_for("cpu", 32)[0] == "triton"
        gen = torch.Generator().manual_seed(0)
        for rows, cols, out, b, density in {_CASES!r}:
            for dtype, tol in ((torch.float32, 1e-5), (torch.float16, 2e-3), (torch.bfloat16, 1.6e-2)):
                x = torch.randn(rows, cols, generator=gen).to(dtype)
                g = torch.randn(rows, out, generator=gen).to(dtype)
                blocks = compress_blocks(x, b, density)
                got = block_sparse_weight_grad(blocks, g, rows, cols, b, kernel="triton")
                assert got.dtype == dtype and got.shape == (cols, out)
                # against the float64 product of the kept blocks: the kernel accumulates in
                # fp32 and rounds once, the torch path rounds per strip, so each is checked
                # against the exact value rather than against the other
                exact = decompress_blocks(blocks, rows, cols, b).double().t() @ g.double()
                for kernel in ("triton", "torch", "dense"):
                    for transposed in (False, True):
                        res = block_sparse_weight_grad(blocks, g, rows, cols, b, kernel=kernel, transposed=transposed)
                        res = res.t() if transposed else res
                        torch.testing.assert_close(res.double(), exact, rtol=tol, atol=tol * float(exact.abs().max()),
                                                   msg=f"{{kernel}} {{(rows, cols, out, b, density, dtype, transposed)}}")
        # a non-contiguous grad_out (a transposed view) is read correctly
        x, g = torch.randn(64, 64, generator=gen), torch.randn(50, 64, generator=gen).t()
        blocks = compress_blocks(x, 16, 0.5)
        torch.testing.assert_close(block_sparse_weight_grad(blocks, g, 64, 64, 16, kernel="triton"),
                                   block_sparse_weight_grad(blocks, g, 64, 64, 16, kernel="torch"),
                                   rtol=1e-5, atol=1e-5)
    """)


@needs_triton
def test_interpreted_kernel_split_k_sums_every_part_once():
    """Every split of a column's blocks (more parts than blocks, too: empty parts write zeros)
    gives the same product; the default launch config is one of them."""
    _interpreted(f"""
        from sparsify_fx.passes.block_sparse.rewrite import compress_blocks, decompress_blocks
        from sparsify_fx.passes.block_sparse.triton_kernel import launch, launch_config
        gen = torch.Generator().manual_seed(1)
        for rows, cols, out, b, density in {_CASES!r}:
            x = torch.randn(rows, cols, generator=gen)
            g = torch.randn(rows, out, generator=gen)
            blocks = compress_blocks(x, b, density)
            n_r, n_c = rows // b, cols // b
            # the kernel's part: full blocks only (the partial strips are the caller's)
            full = decompress_blocks(blocks, rows, cols, b).double()[:n_r * b, :n_c * b]
            exact = torch.zeros(cols, out, dtype=torch.float64)
            exact[:n_c * b] = full.t() @ g[:n_r * b].double()
            default = launch_config(n_c, out, blocks.values.shape[0], b, x.device)
            for config in ({{"BLOCK_O": 32, "SPLIT": 1}}, {{"BLOCK_O": 64, "SPLIT": 2}},
                           {{"BLOCK_O": 32, "SPLIT": 3}}, {{"BLOCK_O": 128, "SPLIT": 16}}, default):
                got = launch(blocks.values, blocks.col_ptr, blocks.row_idx, g, cols, config)
                assert got.dtype == torch.float32 and got.shape == (cols, out), config
                torch.testing.assert_close(got.double(), exact, rtol=1e-5, atol=1e-5 * float(exact.abs().max()),
                                           msg=f"{{config}} {{(rows, cols, out, b, density)}}")
    """)


@needs_triton
def test_interpreted_kernel_trains_the_op_like_the_torch_path_eager_and_compiled():
    """The whole op (forward, saved blocks, backward) on the kernel, in eager and through
    torch.compile (the kernel is its own custom op, so fake-tensor tracing never launches it)."""
    _interpreted("""
        import torch.nn as nn
        import sparsify_fx as sfx
        from sparsify_fx.passes.block_sparse import blocks as block_sparse

        def grads(run, model, x):
            for p in model.parameters():
                p.grad = None
            run(x).pow(2).mean().backward()
            return {n: p.grad.clone() for n, p in model.named_parameters()}

        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(40, 64), nn.ReLU(), nn.Linear(64, 48), nn.ReLU(), nn.Linear(48, 8))
        x = torch.randn(70, 40)
        # top-k keeps the same blocks on every step (sampling would draw others per forward)
        config = sfx.BlockSparseActivations(block_size=16, density=0.5, selection="topk")
        fast = sfx.sparsify(model, config, example_inputs=(x,))
        (rewrite,) = sfx.explain(fast).rewrites
        assert rewrite.details["kernel"] == "triton", rewrite.details
        launched = []
        real = block_sparse.bsc_weight_grad_triton
        block_sparse.bsc_weight_grad_triton = lambda *a: launched.append(1) or real(*a)
        got = grads(fast, fast, x)
        assert launched, "the Triton path did not run"
        launched.clear()
        original = block_sparse.kernel_for
        block_sparse.kernel_for = lambda *a: ("torch", "forced")
        ref = grads(fast, fast, x)
        assert not launched
        block_sparse.kernel_for = original
        for name in ref:
            torch.testing.assert_close(got[name], ref[name], rtol=1e-5, atol=1e-6, msg=lambda m, name=name: f"{name}: {m}")

        compiled = torch.compile(model, backend=sfx.backend([config], inner="aot_eager"))
        comp = grads(compiled, model, x)
        assert launched, "the compiled backward did not run the Triton op"
        for name in ref:
            torch.testing.assert_close(comp[name], ref[name], rtol=1e-5, atol=1e-6, msg=lambda m, name=name: f"{name}: {m}")
    """)


@needs_cuda
@needs_triton
@pytest.mark.parametrize("block", [16, 32, 64, 128])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_kernel_equals_torch_path(block, dtype):
    gen = torch.Generator(device="cuda").manual_seed(0)
    rows, cols, out = 3 * block + 5, 4 * block + 3, 700
    x = torch.randn(rows, cols, device="cuda", generator=gen).to(dtype)
    g = torch.randn(rows, out, device="cuda", generator=gen).to(dtype)
    blocks = compress_blocks(x, block, 0.5)
    assert kernel_for(x.device, block, dtype)[0] == "triton"
    ref = block_sparse_weight_grad(blocks, g, rows, cols, block, kernel="torch")
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    for kernel in ("triton", "dense", None):
        got = block_sparse_weight_grad(blocks, g, rows, cols, block, kernel=kernel)
        torch.testing.assert_close(got.float(), ref.float(), rtol=tol, atol=tol * 10, msg=lambda m: f"{kernel}: {m}")
        got_t = block_sparse_weight_grad(blocks, g, rows, cols, block, kernel=kernel, transposed=True)
        torch.testing.assert_close(got_t.float(), ref.float().t(), rtol=tol, atol=tol * 10, msg=lambda m: f"{kernel}ᵀ: {m}")


@needs_cuda
@needs_triton
def test_cuda_op_density1_matches_dense_autograd():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 256), nn.GELU(), nn.Linear(256, 128), nn.GELU(), nn.Linear(128, 10)).cuda()
    x = torch.randn(96, 64, device="cuda")
    fast = sfx.sparsify(model, sfx.BlockSparseActivations(block_size=32, density=1.0), example_inputs=(x,))
    assert all(r.details["kernel"] == "triton" for r in sfx.explain(fast).rewrites)
    for m in (model, fast):
        for p in m.parameters():
            p.grad = None
    model(x).pow(2).mean().backward()
    ref = {n: p.grad.clone() for n, p in model.named_parameters()}
    for p in model.parameters():
        p.grad = None
    fast(x).pow(2).mean().backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, ref[n], rtol=1e-4, atol=1e-5, msg=n)


def test_torch_path_is_the_reference_the_kernel_is_checked_against():
    """Guards the reference itself: at density 1 the torch path is the dense product."""
    x, g = torch.randn(70, 50), torch.randn(70, 30)
    blocks = compress_blocks(x, 16, 1.0)
    torch.testing.assert_close(block_sparse_weight_grad(blocks, g, 70, 50, 16, kernel="torch"), x.t() @ g,
                               rtol=1e-5, atol=1e-5)
