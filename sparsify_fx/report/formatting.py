"""Bytes, FLOPs and ratios as the reports print them."""

from __future__ import annotations

__all__ = ["fmt_bytes", "fmt_flops", "ratio"]


def fmt_bytes(n: int | None) -> str:
    if n is None:
        return "?"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def ratio(before: int, after: int) -> str:
    return f" ({after / before:.3f}x)" if before else ""


def fmt_flops(n: int | None) -> str:
    if n is None:
        return "?"
    for unit, scale in (("GFLOP", 1e9), ("MFLOP", 1e6), ("KFLOP", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n} FLOP"
