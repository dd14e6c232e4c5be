"""Triton kernel for the block-sparse weight gradient of :mod:`sparsify_fx.passes.block_sparse.rewrite` (GPU path).

``grad_wᵀ[j-block] = Σ_{kept (i, j)} x_ijᵀ @ grad_out[i-rows]``, computed straight from the
BSC arrays (``values``, ``col_ptr``, ``row_idx``): one program per (block column, tile of
output features) walks its column's kept blocks, loads each ``b x b`` block and the ``b`` rows
of ``grad_out`` it pairs with, and accumulates in fp32 registers. Nothing is gathered or
copied first; the CPU path (per-column GEMMs of gathered ``grad_out`` slices) has to move
``kept_blocks * b * out`` elements to get the same result.

Only the full ``b x b`` blocks go through the kernel; the partial bottom/right strips and the
corner are small and stay on the PyTorch path. ``b`` must be a power of two in 16..128
(``tl.dot`` needs tiles of at least 16; 256 would not fit the registers).

Triton is optional: :func:`triton_available` says whether this path can run, and nothing is
imported until it is asked for. With ``TRITON_INTERPRET=1`` the same kernel runs on CPU
tensors through Triton's interpreter; the tests use that to check it without a GPU.
"""

from __future__ import annotations

import functools
import os

import torch

__all__ = [
    "TRITON_BLOCKS", "TRITON_DTYPES", "triton_available", "kernel_for", "bsc_weight_grad_triton",
    "launch_config", "launch",
]

#: block sides the kernel supports
TRITON_BLOCKS = (16, 32, 64, 128)
#: value dtypes it supports (it accumulates in fp32, so float64 stays on the exact torch path)
TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@functools.cache
def triton_available() -> bool:
    """Whether ``import triton`` works here (cached; the import is slow)."""
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception:  # ImportError, or a broken install that fails on import
        return False
    return True


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def kernel_for(device: torch.device | str, block: int, dtype: torch.dtype | None = None) -> tuple[str, str]:
    """Which weight-gradient path a layer on ``device`` with ``b = block`` runs, and why.

    Returns ``("triton" | "torch", reason)``. The Triton kernel is picked wherever it can run:
    on an H100 (ResMLP-12's fc1/fc2, batch 64, fp32) it took 0.43x (d = 0.25) to 0.70x (d = 0.5)
    of cuBLAS's fp32 GEMM of the whole input, where the PyTorch path took 1.8-3.6x at b = 64 and
    7-200x at b = 32 (one launch per block; ``benchmarks/bench_bsr_kernel.py``).
    ``kernel="dense"`` (rebuild the input, one GEMM) is never picked here: it holds a dense
    input in backward again, and in fp32 it measured 0.35-0.42 ms against the kernel's 0.13-0.22.
    """
    device = torch.device(device)
    if dtype is not None and dtype not in TRITON_DTYPES:
        return "torch", f"{dtype}: the Triton kernel takes {[str(t) for t in TRITON_DTYPES]}"
    if block not in TRITON_BLOCKS:
        return "torch", f"block_size={block}: the Triton kernel needs one of {TRITON_BLOCKS}"
    if device.type != "cuda" and not (_interpreting() and device.type == "cpu"):
        return "torch", f"{device.type} tensors: the Triton kernel runs on CUDA"
    if not triton_available():
        return "torch", "triton is not installed"
    where = "CUDA tensors" if device.type == "cuda" else "TRITON_INTERPRET=1 (CPU interpreter)"
    return "triton", f"{where} and triton available: fused BSC x dense kernel"


@functools.cache
def _kernel():
    # defined on first use so that importing this module never imports triton
    import triton
    import triton.language as tl

    @triton.jit
    def bsc_weight_grad(
        values_ptr, col_ptr_ptr, row_idx_ptr, g_ptr, out_ptr,
        out_features, stride_g, stride_out, stride_split,
        B: tl.constexpr, BLOCK_O: tl.constexpr, SPLIT: tl.constexpr, IEEE: tl.constexpr,
        UPCAST: tl.constexpr,
    ):
        col = tl.program_id(0)
        tile = tl.program_id(1)
        part = tl.program_id(2)
        first = tl.load(col_ptr_ptr + col)
        last = tl.load(col_ptr_ptr + col + 1)
        # split-K: part p of SPLIT takes its share of the column's blocks and writes its own
        # partial sum (summed by the caller): a column's serial walk no longer bounds the time
        share = (last - first + SPLIT - 1) // SPLIT
        start = first + part * share
        offs_b = tl.arange(0, B)
        offs_o = tile * BLOCK_O + tl.arange(0, BLOCK_O)
        o_mask = offs_o[None, :] < out_features
        acc = tl.zeros((B, BLOCK_O), dtype=tl.float32)
        # 64-bit block offsets: k * b * b overflows int32 past 131072 blocks of 128 x 128
        block_ptr = values_ptr + start.to(tl.int64) * B * B
        # the last part's range can run past the column's end: those steps are masked (a
        # scalar min() of loaded values does not run in every Triton version's interpreter)
        # (masks as vectors: the interpreter takes no scalar mask)
        for k in range(start, start + share):
            valid = (k + offs_b * 0) < last
            row = tl.load(row_idx_ptr + k + offs_b * 0, mask=valid, other=0).to(tl.int64)
            # x_ijᵀ: element (c, i) of the transposed block is values[k, i, c]
            x_t = tl.load(block_ptr + offs_b[None, :] * B + offs_b[:, None], mask=valid[None, :], other=0.0)
            block_ptr += B * B
            g = tl.load(g_ptr + (row * B + offs_b)[:, None] * stride_g + offs_o[None, :],
                        mask=o_mask & valid[:, None], other=0.0)
            if IEEE:
                # fp32 inputs: full-precision products, as torch.mm gives (not TF32)
                acc += tl.dot(x_t.to(g.dtype), g, input_precision="ieee")
            elif UPCAST:
                # the interpreter's dot reads bf16 bits as garbage: products in fp32 there
                acc += tl.dot(x_t.to(g.dtype).to(tl.float32), g.to(tl.float32), input_precision="ieee")
            else:
                acc += tl.dot(x_t.to(g.dtype), g)
        out_rows = col.to(tl.int64) * B + offs_b
        out_ptr += part.to(tl.int64) * stride_split
        tl.store(out_ptr + out_rows[:, None] * stride_out + offs_o[None, :],
                 acc.to(out_ptr.dtype.element_ty), mask=o_mask)

    return triton, bsc_weight_grad


def bsc_weight_grad_triton(
    values: torch.Tensor, col_ptr: torch.Tensor, row_idx: torch.Tensor, grad_out2: torch.Tensor,
    cols: int,
) -> torch.Tensor:
    """``[cols, out]`` with rows of block column ``j`` set to ``Σ x_ijᵀ @ grad_out[i-rows]``.

    Rows past ``n_c * b`` (the partial right strip, which the caller adds) are zero.

    Args:
        values: ``(k, b, b)`` kept full blocks in BSC order.
        col_ptr: ``(n_c + 1,)`` int32 offsets of each block column's blocks in ``values``.
        row_idx: ``(k,)`` block-row index of each block (int16 or int32).
        grad_out2: ``[rows, out]`` gradient of the layer's output.
        cols: the input's feature count (``>= n_c * b``).
    """
    # a custom op of its own: under torch.compile the backward is traced with fake tensors,
    # which a Triton launch cannot read; the op's fake kernel gives the traced shape instead
    return torch.ops.sparsify_fx.bsc_weight_grad_triton(values, col_ptr, row_idx, grad_out2, cols)


@functools.cache
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def launch_config(n_c: int, out_features: int, n_blocks: int, b: int, device: torch.device) -> dict:
    """Tile width, split-K factor and warps for one launch (shapes only: no device sync).

    One program per (block column, output tile) leaves most of an H100 idle on Linear-sized
    layers (12 block columns x 12 tiles = 144 programs for 132 SMs, each walking ~200 blocks in
    series), so each column's blocks are split into parts summed afterwards, until there are
    about six programs per SM, keeping at least 8 blocks per part. On an H100 (ResMLP-12 and
    ViT-B/16 Linear shapes, ``benchmarks/bench_bsr_kernel.py``) the fp32 sweep's best was
    split 8 on ResMLP-12's fc1/fc2 (this rule's choice there) and split 4 on ViT's first MLP
    layer (this rule: 2); bf16's best was split 2-8.
    """
    block_o = 64 if b >= 64 else 128
    programs = n_c * -(-out_features // block_o)
    sms = _sm_count(device.index if device.index is not None else torch.cuda.current_device()) \
        if device.type == "cuda" else 4
    per_column = max(1, n_blocks // max(n_c, 1))
    split = 1
    while split * programs < 6 * sms and per_column // (split * 2) >= 8:
        split *= 2
    return {"BLOCK_O": block_o, "SPLIT": split, "num_warps": 4}


def launch(
    values: torch.Tensor, col_ptr: torch.Tensor, row_idx: torch.Tensor, grad_out2: torch.Tensor,
    cols: int, config: dict | None = None,
) -> torch.Tensor:
    """Run the kernel with ``config`` (default :func:`launch_config`); benchmarks sweep it."""
    b = values.shape[-1]
    n_c = col_ptr.numel() - 1
    out_features = grad_out2.shape[1]
    if n_c == 0 or out_features == 0:
        return grad_out2.new_zeros(cols, out_features)
    if grad_out2.stride(1) != 1:
        grad_out2 = grad_out2.contiguous()
    config = config or launch_config(n_c, out_features, values.shape[0], b, grad_out2.device)
    split = config["SPLIT"]
    triton, kernel = _kernel()
    # the partials are fp32 (summed before the one rounding to the output dtype)
    out = grad_out2.new_zeros(split, cols, out_features, dtype=torch.float32 if split > 1 else None)
    grid = (n_c, triton.cdiv(out_features, config["BLOCK_O"]), split)
    kernel[grid](
        values.contiguous(), col_ptr, row_idx.to(torch.int32), grad_out2, out,
        out_features, grad_out2.stride(0), out.stride(1), out.stride(0),
        B=b, BLOCK_O=config["BLOCK_O"], SPLIT=split, IEEE=grad_out2.dtype == torch.float32,
        UPCAST=_interpreting(), num_warps=config.get("num_warps", 4),
        num_stages=config.get("num_stages", 3),
    )
    return out[0] if split == 1 else out.sum(0).to(grad_out2.dtype)


@torch.library.custom_op("sparsify_fx::bsc_weight_grad_triton", mutates_args=())
def _bsc_weight_grad_op(
    values: torch.Tensor, col_ptr: torch.Tensor, row_idx: torch.Tensor, grad_out2: torch.Tensor, cols: int
) -> torch.Tensor:
    return launch(values, col_ptr, row_idx, grad_out2, cols)


@_bsc_weight_grad_op.register_fake
def _(values, col_ptr, row_idx, grad_out2, cols):
    return grad_out2.new_empty(cols, grad_out2.shape[1])
