"""The block format behind :class:`BlockSparseActivations`: a saved ``[rows, cols]`` input cut
into ``block x block`` tiles, the tiles kept by score (``selection="sample"``: with probability
by norm, stored scaled by ``1/p`` so the weight gradient is unbiased; ``"topk"``: the paper's
strongest tiles), and the weight gradient computed from the kept tiles (PyTorch ops, or the
Triton kernel on CUDA)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
from sparsify_fx.passes.block_sparse.triton_kernel import bsc_weight_grad_triton, kernel_for
from sparsify_fx.passes.kernels.cache import eager

__all__ = ["BlockGrid", "CompressedBlocks", "block_grid", "compress_blocks", "decompress_blocks",
           "block_sparse_weight_grad"]

#: grad_out at least this many blocks wide takes one GEMM per kept block instead of gathers
_PER_BLOCK_MIN_WIDTH = 32
_INT16_LIMIT = 32767


@dataclass(frozen=True)
class BlockGrid:
    """How a ``[rows, cols]`` matrix is cut into ``b x b`` blocks and how many are kept.

    ``n_r`` / ``n_c`` count *full* block rows / columns; ``rem_r`` / ``rem_c`` are the sizes
    of the partial bottom / right strips (0 when the size divides evenly).
    """

    rows: int
    cols: int
    block: int
    n_r: int
    n_c: int
    rem_r: int
    rem_c: int
    k_full: int
    k_bottom: int
    k_right: int
    k_corner: int
    index_dtype: torch.dtype

    @property
    def total_blocks(self) -> int:
        return (self.n_r + (self.rem_r > 0)) * (self.n_c + (self.rem_c > 0))

    @property
    def kept_blocks(self) -> int:
        return self.k_full + self.k_bottom + self.k_right + self.k_corner

    def kept_elements(self) -> int:
        b = self.block
        return (self.k_full * b * b + self.k_bottom * self.rem_r * b
                + self.k_right * b * self.rem_c + self.k_corner * self.rem_r * self.rem_c)

    def index_bytes(self) -> int:
        per_index = torch.empty((), dtype=self.index_dtype).element_size()
        return per_index * (self.k_full + self.k_bottom + self.k_right) + 4 * (self.n_c + 1)

    def compressed_bytes(self, itemsize: int) -> int:
        """Exact bytes of the stored copy: kept values plus all index tensors."""
        return self.kept_elements() * itemsize + self.index_bytes()


def _kept(n: int, density: float) -> int:
    # round() first: 0.7 * 10 is 7.000000000000001 in floating point, which ceil makes 8
    return min(n, math.ceil(round(density * n, 9))) if n else 0


def block_grid(rows: int, cols: int, block: int, density: float) -> BlockGrid:
    """The block layout of a ``[rows, cols]`` input and how many blocks of each kind are kept."""
    # not divmod: SymInts (torch.compile's dynamic shapes, the fake kernel) lack it
    n_r, rem_r = rows // block, rows % block
    n_c, rem_c = cols // block, cols % block
    largest = max(n_r, n_c) + 1
    return BlockGrid(
        rows, cols, block, n_r, n_c, rem_r, rem_c,
        k_full=_kept(n_r * n_c, density),
        k_bottom=_kept(n_c if rem_r else 0, density),
        k_right=_kept(n_r if rem_c else 0, density),
        # the corner is a single partial block: ceil(density * 1) keeps it at any density
        k_corner=1 if rem_r and rem_c else 0,
        index_dtype=torch.int16 if largest <= _INT16_LIMIT else torch.int32,
    )


class CompressedBlocks(NamedTuple):
    """The kept blocks of a ``[rows, cols]`` matrix (see the module docstring for the format)."""

    values: torch.Tensor  # (k_full, b, b), BSC order: by block column, then block row
    col_ptr: torch.Tensor  # (n_c + 1,) int32
    row_idx: torch.Tensor  # (k_full,) block-row index of each full block
    bottom_values: torch.Tensor  # (k_bottom, rows % b, b)
    bottom_cols: torch.Tensor  # (k_bottom,) block-column index
    right_values: torch.Tensor  # (k_right, b, cols % b)
    right_rows: torch.Tensor  # (k_right,) block-row index
    corner: torch.Tensor  # (rows % b, cols % b), kept whole

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self)


def _score(blocks: torch.Tensor, norm: str) -> torch.Tensor:
    """One score per block of a ``(n, ...)`` stack (made contiguous: reductions over strided
    block views run ~10x slower on CPU)."""
    # at least float32 accumulation: a half-precision sum of b*b squares overflows/ties easily
    # (float64 inputs keep float64: vector_norm refuses to narrow)
    dtype = torch.promote_types(blocks.dtype, torch.float32)
    flat = blocks.reshape(blocks.shape[0], math.prod(blocks.shape[1:]))
    if norm == "l1":
        return flat.abs().sum(1, dtype=dtype)
    return torch.linalg.vector_norm(flat, 2, dim=1, dtype=dtype)


def _top(scores: torch.Tensor, k: int) -> torch.Tensor:
    n = scores.numel()
    if k >= n:
        return torch.arange(n, device=scores.device)
    if k == 0:
        return torch.empty(0, dtype=torch.long, device=scores.device)
    # sorted indices keep the gathers below sequential and give BSC order for free
    return torch.topk(scores, k, sorted=False).indices.sort().values


def _sample(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Exactly ``k`` of ``n`` blocks, block ``i`` with probability ``p_i = min(1, c s_i)``
    (``sum p = k``), and ``1 / p_i`` per drawn block (ascending indices; no host sync).

    Systematic sampling: ``k`` points ``u, u+1, ...`` on the cumulative sum of ``p`` each land
    in one block's interval; every interval is at most 1 long, so no block is drawn twice.
    """
    n = scores.numel()
    s = scores.to(torch.float64)
    # a block holding inf/nan outscores all finite ones together, so it is kept (p ~ 1), as
    # top-k keeps it: the gradient shows the non-finite input instead of masking it
    finite = torch.isfinite(s)
    s = torch.where(finite, s, 0.0)
    s = torch.where(finite, s, s.sum() * (n + 1) + 1.0)
    # every block gets a nonzero chance (all-zero scores: uniform), so k distinct ones exist
    s = s + (s.max() * 1e-6 + 1e-30)
    # water-filling: the largest scores saturate at p = 1 first; t saturated blocks leave
    # c = (k - t) / (sum of the rest), the first t where the next block is unsaturated holds
    sorted_s, order = s.sort(descending=True)
    tail = sorted_s.flip(0).cumsum(0).flip(0)[:k]
    c = (k - torch.arange(k, device=s.device, dtype=s.dtype)) / tail
    first = (c * sorted_s[:k] <= 1).to(torch.int8).argmax()
    p = torch.empty_like(s)
    p[order] = (c[first] * sorted_s).clamp(max=1.0)
    cum = p.cumsum(0)
    cum = cum * (k / cum[-1])
    points = torch.rand((), dtype=s.dtype, device=s.device) + torch.arange(k, dtype=s.dtype, device=s.device)
    idx = torch.searchsorted(cum, points, right=True).clamp(max=n - 1)
    return idx, p.index_select(0, idx).reciprocal()


def _select(scores: torch.Tensor, k: int, selection: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Indices (ascending) of the ``k`` kept blocks and their storage scale (None: 1)."""
    n = scores.numel()
    if selection == "topk" or k >= n or k == 0:
        return _top(scores, k), None
    return _sample(scores, k)


def _scaled(values: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
    if scale is None:
        return values
    shape = (-1,) + (1,) * (values.dim() - 1)
    return (values.to(scale.dtype) * scale.view(shape)).to(values.dtype)


def compress_blocks(
    x2: torch.Tensor, block: int, density: float, norm: str = "l2", selection: str = "topk",
) -> CompressedBlocks:
    """Keep ``density`` of the blocks of a 2-D ``[rows, cols]`` matrix, scored by ``norm``.

    ``selection="topk"`` keeps the strongest blocks as they are; ``"sample"`` draws blocks
    with probability proportional to their score (capped at 1) and stores each drawn block
    scaled by ``1 / p``, so ``decompress_blocks`` is an unbiased estimate of ``x2``.
    """
    x2 = x2.detach().contiguous()
    rows, cols = x2.shape
    g = block_grid(rows, cols, block, density)
    b, rf, cf = block, g.n_r * block, g.n_c * block

    # (n_c * n_r, b, b) blocks in column-major block order, so flat index = c * n_r + r (BSC).
    # One contiguous copy (transient, freed when the op returns) makes scoring and the gather
    # of kept blocks sequential: both ran ~10x slower on the strided view
    full = x2[:rf, :cf].view(g.n_r, b, g.n_c, b).permute(2, 0, 1, 3).reshape(-1, b, b)
    idx, scale = _select(_score(full, norm), g.k_full, selection)
    cols_of = torch.div(idx, max(g.n_r, 1), rounding_mode="floor")
    rows_of = idx - cols_of * g.n_r
    values = _scaled(full.index_select(0, idx), scale)
    del full
    col_ptr = torch.zeros(g.n_c + 1, dtype=torch.int32, device=x2.device)
    col_ptr[1:] = torch.bincount(cols_of, minlength=g.n_c).cumsum(0)

    bottom = x2[rf:, :cf].view(g.rem_r, g.n_c, b).permute(1, 0, 2)
    bottom_idx, bottom_scale = _select(_score(bottom, norm), g.k_bottom, selection)
    right = x2[:rf, cf:].view(g.n_r, b, g.rem_c)
    right_idx, right_scale = _select(_score(right, norm), g.k_right, selection)
    corner = x2[rf:, cf:].clone()
    return CompressedBlocks(
        values, col_ptr, rows_of.to(g.index_dtype),
        _scaled(bottom[bottom_idx], bottom_scale), bottom_idx.to(g.index_dtype),
        _scaled(right[right_idx], right_scale), right_idx.to(g.index_dtype),
        corner,
    )


def decompress_blocks(blocks: CompressedBlocks, rows: int, cols: int, block: int) -> torch.Tensor:
    """The dense ``[rows, cols]`` matrix with kept blocks in place and zeros elsewhere.

    Tests, benchmarks and the backward's explicit ``kernel="dense"`` path use it.
    """
    b = block
    n_r, n_c = rows // b, cols // b
    rf, cf = n_r * b, n_c * b
    dense = blocks.values.new_zeros(rows, cols)
    counts = (blocks.col_ptr[1:] - blocks.col_ptr[:-1]).long()
    # output_size: the length is known, so CUDA needs no device-to-host sync to size it
    cols_of = torch.repeat_interleave(torch.arange(n_c, device=dense.device), counts,
                                      output_size=blocks.values.shape[0])
    dense[:rf, :cf].view(n_r, b, n_c, b).permute(2, 0, 1, 3)[cols_of, blocks.row_idx.long()] = blocks.values
    dense[rf:, :cf].view(rows - rf, n_c, b).permute(1, 0, 2)[blocks.bottom_cols.long()] = blocks.bottom_values
    dense[:rf, cf:].view(n_r, b, cols - cf)[blocks.right_rows.long()] = blocks.right_values
    dense[rf:, cf:] = blocks.corner
    return dense


def _full_blocks_per_column(grad: torch.Tensor, blocks: CompressedBlocks, g_blocks: torch.Tensor) -> None:
    """Add every kept full block's ``x_ijᵀ @ grad_out[i-rows]`` into ``grad[j-rows]``, one GEMM
    per block column: the column's kept blocks side by side (``b x k_j b``) times their
    gathered ``b``-row slices of ``grad_out`` (``k_j b x out``, at most grad_out's size)."""
    # (One bmm per b x b block plus an index_add_ of the (k, b, out) products was 1.5-2.7x
    # slower on CPU.)
    n_r, b, out_features = g_blocks.shape
    ptr = blocks.col_ptr.tolist()
    row_idx = blocks.row_idx.long()
    for j in range(len(ptr) - 1):
        start, end = ptr[j], ptr[j + 1]
        if start == end:
            continue
        # (k, b_rows, b_cols) stacked is (k b, b): its transpose is the blocks side by side,
        # a view BLAS reads as is (no copy)
        x_t = blocks.values[start:end].to(g_blocks.dtype).reshape((end - start) * b, b).t()
        g_kept = g_blocks.index_select(0, row_idx[start:end]).reshape((end - start) * b, out_features)
        torch.mm(x_t, g_kept, out=grad[j * b:(j + 1) * b])


def _full_blocks_per_block(grad: torch.Tensor, blocks: CompressedBlocks, g_blocks: torch.Tensor) -> None:
    """The same sum, one in-place GEMM per kept block, reading ``grad_out`` where it lies.

    For a wide ``grad_out`` (fc1 of an MLP: out = 4 x in) the per-column gathers copy
    ``kept_blocks * b * out`` elements, more than one small GEMM per block costs (ResMLP-12 fc1,
    b = 32: 5.0 ms against 6.9 ms gathered, dense 5.1 ms).
    """
    b = g_blocks.shape[1]
    counts = (blocks.col_ptr[1:] - blocks.col_ptr[:-1]).tolist()
    # views made in bulk (unbind/split): per-block Python indexing cost as much as the GEMMs
    x_t = blocks.values.to(g_blocks.dtype).transpose(1, 2).unbind(0)
    g_rows = g_blocks.unbind(0)
    row_idx = blocks.row_idx.tolist()
    k = 0
    for target, count in zip(grad[:len(counts) * b].split(b), counts):
        for _ in range(count):
            target.addmm_(x_t[k], g_rows[row_idx[k]])
            k += 1


def block_sparse_weight_grad(
    blocks: CompressedBlocks, grad_out2: torch.Tensor, rows: int, cols: int, block: int,
    kernel: str | None = None, transposed: bool = False,
) -> torch.Tensor:
    """``x_sparseᵀ @ grad_out`` (shape ``[cols, out]``) from the kept blocks only.

    ``transposed=True`` returns its transpose, ``[out, cols]`` contiguous (a Linear's weight
    layout): the GEMMs write that layout directly instead of a copy transposing the result.

    ``kernel`` picks the full-block path: ``"triton"`` (:mod:`sparsify_fx.passes.block_sparse.triton_kernel`, CUDA),
    ``"torch"`` (per block column, or per block when ``grad_out`` is at least
    ``_PER_BLOCK_MIN_WIDTH`` blocks wide), or ``"dense"`` (the input rebuilt dense, zeros in the
    dropped blocks, for one GEMM; for comparison, never picked automatically: it materialises
    a dense input in backward); ``None`` takes
    :func:`sparsify_fx.passes.block_sparse.triton_kernel.kernel_for`'s choice. Traced calls
    (``torch.compile``) run ``"dense"`` where ``"torch"`` was asked or chosen. Every kept full block ``(i, j)`` adds ``x_ijᵀ @ grad_out[i-rows]`` to
    ``grad[j-rows]``; the partial strips are added after. Cost scales with the kept fraction:
    dropped blocks are never materialised, not even as zeros.
    """
    b = block
    n_r, n_c = rows // b, cols // b
    rf, cf = n_r * b, n_c * b
    g2 = grad_out2.contiguous()
    out_features = g2.shape[1]
    dtype = g2.dtype
    if kernel is None:
        kernel = kernel_for(blocks.values.device, b, g2.dtype)[0]
    if kernel == "torch" and not eager(g2):
        # the per-column GEMMs read the block counts back to the host, which a traced (fake)
        # tensor has not: the dense rebuild is the traceable form, a temporary of backward
        # (what forward saves stays compressed)
        kernel = "dense"
    if kernel == "dense":
        x = decompress_blocks(blocks, rows, cols, b).to(dtype)
        return g2.t() @ x if transposed else x.t() @ g2
    g_blocks = g2[:rf].view(n_r, b, out_features)
    if kernel == "triton":
        result = grad = bsc_weight_grad_triton(blocks.values, blocks.col_ptr, blocks.row_idx, g2, cols)
    else:
        if transposed:
            # every write below goes through this column-major view; BLAS writes it as is
            result = g2.new_zeros(out_features, cols)
            grad = result.t()
        else:
            result = grad = g2.new_zeros(cols, out_features)
        if blocks.values.shape[0]:
            if out_features >= _PER_BLOCK_MIN_WIDTH * b:
                _full_blocks_per_block(grad, blocks, g_blocks)
            else:
                _full_blocks_per_column(grad, blocks, g_blocks)
    if blocks.bottom_values.shape[0]:
        # every bottom block pairs with the same partial row strip of grad_out: one GEMM
        k, rem_r = blocks.bottom_values.shape[:2]
        x_t = blocks.bottom_values.to(dtype).transpose(1, 2).reshape(k * b, rem_r)
        grad[:cf].view(n_c, b, out_features).index_add_(
            0, blocks.bottom_cols.long(), (x_t @ g2[rf:]).view(k, b, out_features)
        )
    if blocks.right_values.shape[0]:
        x_r = blocks.right_values.to(dtype).reshape(-1, cols - cf)
        g_r = g_blocks.index_select(0, blocks.right_rows.long()).reshape(-1, out_features)
        grad[cf:] += x_r.t() @ g_r
    if blocks.corner.numel():
        grad[cf:] += blocks.corner.to(dtype).t() @ g2[rf:]
    if kernel == "triton" and transposed:
        return grad.t().contiguous()  # the kernel writes [cols, out]
    return result


# ---------------------------------------------------------------- custom op
