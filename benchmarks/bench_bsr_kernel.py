"""GPU benchmark of BSR's weight-gradient kernel: Triton vs the PyTorch path vs the dense GEMM.

For Linear shapes of ResMLP-12 and ViT-B/16 at GPU batch sizes, every ``density x block x dtype``
is timed (``triton.testing.do_bench``, median) three ways:

* ``dense``: ``xᵀ @ grad_out``, the dense layer's weight gradient (cuBLAS);
* ``torch``: :func:`sparsify_fx.passes.block_sparse.rewrite.block_sparse_weight_grad` with ``kernel="torch"``;
* ``triton``: the same with the Triton kernel and its default launch config;
* ``rebuilt``: ``kernel="dense"``, the input rebuilt dense from its blocks and one cuBLAS GEMM;

and the kernel's launch configs (tile width, split-K, warps) are swept, each checked against
the float64 product of the kept blocks before it is timed. Prints a table and writes
``results/bench_bsr_kernel.json``. Needs CUDA and triton.

    python -m benchmarks.bench_bsr_kernel
"""

from __future__ import annotations

import argparse
import itertools
import json
from pathlib import Path

import torch
from sparsify_fx.passes.block_sparse.rewrite import (
    block_sparse_weight_grad,
    compress_blocks,
    decompress_blocks,
)
from sparsify_fx.passes.block_sparse.triton_kernel import launch, launch_config, triton_available

__all__ = ["SHAPES", "main"]

_ROOT = Path(__file__).resolve().parent.parent

#: name -> (rows = tokens, in features, out features)
SHAPES = {
    "resmlp12 fc1 (b64)": (64 * 196, 384, 1536),
    "resmlp12 fc2 (b64)": (64 * 196, 1536, 384),
    "vit_b_16 mlp1 (b32)": (32 * 197, 768, 3072),
    "vit_b_16 mlp2 (b32)": (32 * 197, 3072, 768),
}
SWEEP = [
    {"BLOCK_O": o, "SPLIT": s, "num_warps": w}
    for o, s, w in itertools.product((64, 128), (1, 2, 4, 8, 16), (4,))
]


def _bench(fn) -> float:
    from triton.testing import do_bench

    return do_bench(fn, warmup=10, rep=50, return_mode="median")


def _case(shape: str, density: float, block: int, dtype: torch.dtype) -> dict:
    rows, cols, out = SHAPES[shape]
    gen = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(rows, cols, device="cuda", generator=gen).to(dtype)
    g = torch.randn(rows, out, device="cuda", generator=gen).to(dtype)
    blocks = compress_blocks(x, block, density)
    n_r, n_c = rows // block, cols // block
    full = decompress_blocks(blocks, rows, cols, block).double()[: n_r * block, : n_c * block]
    exact = full.t() @ g[: n_r * block].double()
    scale = float(exact.abs().max())
    tol = 1e-4 if dtype == torch.float32 else 1e-2

    whole = decompress_blocks(blocks, rows, cols, block).double().t() @ g.double()

    def check(got: torch.Tensor, what: str, ref: torch.Tensor = exact) -> float:
        err = float((got[: ref.shape[0]].double() - ref).abs().max()) / scale
        if not err <= tol:
            raise AssertionError(f"{shape} d={density} b={block} {dtype} {what}: error {err:.2e} > {tol}")
        return err

    row = {"shape": shape, "rows": rows, "cols": cols, "out": out, "density": density,
           "block": block, "dtype": str(dtype).removeprefix("torch.")}
    xt = x.t()
    row["dense_ms"] = _bench(lambda: xt @ g)
    row["torch_ms"] = _bench(lambda: block_sparse_weight_grad(blocks, g, rows, cols, block, kernel="torch"))
    row["triton_ms"] = _bench(lambda: block_sparse_weight_grad(blocks, g, rows, cols, block, kernel="triton"))
    row["rebuilt_dense_ms"] = _bench(lambda: block_sparse_weight_grad(blocks, g, rows, cols, block, kernel="dense"))
    for kernel in ("triton", "dense", "torch"):
        got = block_sparse_weight_grad(blocks, g, rows, cols, block, kernel=kernel)
        # the torch path rounds each GEMM's partial sums to the dtype: bf16's error adds up
        row[f"{kernel}_err"] = check(got, kernel, whole) if kernel != "torch" else \
            float((got.double() - whole).abs().max()) / scale
    default = launch_config(n_c, out, blocks.values.shape[0], block, x.device)
    row["default_config"] = default
    sweep = []
    for config in SWEEP:
        got = launch(blocks.values, blocks.col_ptr, blocks.row_idx, g, cols, config)
        err = check(got, str(config))
        ms = _bench(lambda config=config: launch(blocks.values, blocks.col_ptr, blocks.row_idx, g, cols, config))
        sweep.append({**config, "ms": ms, "err": err})
    row["sweep"] = sweep
    best = min(sweep, key=lambda r: r["ms"])
    row["best_config"], row["best_ms"] = {k: best[k] for k in ("BLOCK_O", "SPLIT", "num_warps")}, best["ms"]
    row["kernel_default_ms"] = _bench(lambda: launch(blocks.values, blocks.col_ptr, blocks.row_idx, g, cols))
    return row


def _table(rows: list[dict]) -> str:
    head = (f"{'shape':<20} {'dtype':<8} {'d':>4} {'b':>3} {'dense ms':>8} {'torch ms':>8} {'triton ms':>9} "
            f"{'triton/dense':>12} {'rebuilt ms':>10} {'best ms':>7} {'best config':<28}")
    lines = [head, "-" * len(head)]
    for r in rows:
        cfg = r["best_config"]
        lines.append(
            f"{r['shape']:<20} {r['dtype']:<8} {r['density']:>4} {r['block']:>3} {r['dense_ms']:>8.3f} "
            f"{r['torch_ms']:>8.3f} {r['triton_ms']:>9.3f} {r['triton_ms'] / r['dense_ms']:>12.2f} "
            f"{r['rebuilt_dense_ms']:>10.3f} "
            f"{r['best_ms']:>7.3f} O={cfg['BLOCK_O']} S={cfg['SPLIT']} w={cfg['num_warps']}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--densities", nargs="+", type=float, default=[0.25, 0.5])
    parser.add_argument("--blocks", nargs="+", type=int, default=[32, 64])
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    parser.add_argument("--out", type=Path, default=_ROOT / "results" / "bench_bsr_kernel.json")
    args = parser.parse_args(argv)
    if not (torch.cuda.is_available() and triton_available()):
        raise SystemExit("bench_bsr_kernel needs CUDA and triton")
    rows = []
    for shape, dtype, density, block in itertools.product(args.shapes, args.dtypes, args.densities, args.blocks):
        rows.append(_case(shape, density, block, getattr(torch, dtype)))
        print(_table(rows[-1:]).splitlines()[-1], flush=True)
    print(_table(rows))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"torch": torch.__version__, "gpu": torch.cuda.get_device_name()}
    args.out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
