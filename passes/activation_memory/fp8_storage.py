"""fp8 storage of a saved activation: e4m3 (or e5m2) values with one fp32 scale per row.

Under bf16 autocast the activations a backward keeps are already 2 bytes per element, so the
bf16 storage forms have nothing left to halve; fp8 halves them again. Each row (the last
dimension) is scaled by ``absmax / fmax`` (``fmax``: 448 for e4m3, 57344 for e5m2) before the
cast, so the row's largest value lands on the format's largest and no value saturates.

Error bound (round to nearest): an element ``x`` stored and restored is off by at most
``|x| * 2^-(m+1)`` (``m``: the format's mantissa bits, 3 for e4m3, 2 for e5m2), i.e.
``2^-4 |x|`` for e4m3 and ``2^-3 |x|`` for e5m2, plus, for values near the row's subnormal
range (below ``absmax * 2^-6 / 448`` for e4m3), an absolute ``absmax * 2^-9 / 448``. A gradient
computed from the restored tensor (a weight gradient ``sum g x``) then carries at most
``2^-4 sum|g x|`` (+ the subnormal term) with e4m3. ``tests/test_budget_autocast.py`` checks
both bounds on random data.

Not yet used by ``MemoryBudget``'s choices (a follow-up: an op module keeping a Linear's input
this way, priced by the calibration).
"""

from __future__ import annotations

import torch

__all__ = ["FP8_FORMATS", "fp8_compress", "fp8_decompress", "fp8_relative_bound"]

#: format name -> (dtype, mantissa bits)
FP8_FORMATS: dict[str, tuple[torch.dtype, int]] = {
    "e4m3": (torch.float8_e4m3fn, 3),
    "e5m2": (torch.float8_e5m2, 2),
}


def fp8_relative_bound(fmt: str = "e4m3") -> float:
    """Relative error bound of one stored element, outside the subnormal range."""
    return 2.0 ** -(FP8_FORMATS[fmt][1] + 1)


def fp8_compress(x: torch.Tensor, fmt: str = "e4m3") -> tuple[torch.Tensor, torch.Tensor]:
    """(fp8 values, fp32 scale per row): ``x ~= values.float() * scale``."""
    dtype, _ = FP8_FORMATS[fmt]
    fmax = torch.finfo(dtype).max
    absmax = x.detach().abs().amax(dim=-1, keepdim=True).float()
    # (an all-zero row keeps scale 1; inf / NaN rows are not finite anyway: they stay NaN)
    scale = torch.where(absmax > 0, absmax / fmax, torch.ones_like(absmax))
    return (x.float() / scale).to(dtype), scale


def fp8_decompress(values: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return (values.float() * scale).to(dtype)
