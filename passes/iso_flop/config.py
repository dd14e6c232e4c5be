"""IsoFLOP's configuration and the Sparse-IFT width formulas (arXiv 2303.11525, section 3)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from sparsify_fx import ConfigError, PassConfig, check_range

__all__ = [
    "IsoFLOP",
    "ISO_FLOP_KINDS",
    "parallel_branches",
    "hidden_width",
    "doped_rank",
    "wide_factor",
    "widened_width",
]

ISO_FLOP_KINDS = ("wide", "parallel", "factorized", "doped")
_INITS = ("preserve", "random")


@dataclass(frozen=True)
class IsoFLOP(PassConfig):
    """Replace dense Linear / Conv layers by sparse iso-FLOP families (Sparse-IFT).

    Args:
        kind: ``"wide"``, ``"parallel"``, ``"factorized"`` or ``"doped"``.
        sparsity: fraction of zero weights in each sparse factor, in [0, 1).
        init: ``"preserve"`` (start from the dense weights; exact for parallel and wide) or
            ``"random"`` (kaiming-uniform weights and uniform random masks, the paper's setting).
        skip_first_last: keep the model's first and last dense layers dense (the paper's
            default: stem and head stay dense).
        seed: seed of the random masks / weights (identical on every rank).

    Example:
        >>> import torch, sparsify_fx as sfx
        >>> m = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 16),
        ...                         torch.nn.ReLU(), torch.nn.Linear(16, 2))
        >>> fast = sfx.sparsify(m, sfx.IsoFLOP(kind="parallel", sparsity=0.5),
        ...                     example_inputs=(torch.randn(4, 8),))
        >>> [(r.module, r.flops_before, r.flops_after) for r in sfx.explain(fast).rewrites]
        [('2', 2048, 2048)]
    """

    kind: str = "parallel"
    sparsity: float = 0.5
    init: str = "preserve"
    skip_first_last: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.kind not in ISO_FLOP_KINDS:
            raise ConfigError(f"IsoFLOP.kind must be one of {list(ISO_FLOP_KINDS)}, got {self.kind!r}")
        check_range(self, "sparsity", self.sparsity, 0.0, 1.0, high_open=True)
        if self.init not in _INITS:
            raise ConfigError(f"IsoFLOP.init must be one of {list(_INITS)}, got {self.init!r}")
        if not isinstance(self.skip_first_last, bool):
            raise ConfigError(f"IsoFLOP.skip_first_last must be a bool, got {self.skip_first_last!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ConfigError(f"IsoFLOP.seed must be an int, got {self.seed!r}")


# ---------------------------------------------------------------- formulas


def parallel_branches(sparsity: float) -> int:
    """``round(1 / (1 - s))`` branches (Python rounding: half to even)."""
    return max(1, round(1.0 / (1.0 - sparsity)))


def hidden_width(d_in: int, d_out: int, sparsity: float) -> int:
    """Factorized hidden width ``ceil(D_in D_out / ((1 - s)(D_in + D_out)))``."""
    # the epsilon keeps exact products (s=0.5 -> 1/(1-s) = 2.0000000000000004) from ceiling up
    return max(1, math.ceil(d_in * d_out / ((1.0 - sparsity) * (d_in + d_out)) - 1e-9))


def doped_rank(d_in: int, d_out: int, sparsity: float) -> int:
    """Doped low-rank width ``floor(s D_in D_out / (D_in + D_out))``."""
    return int(math.floor(sparsity * d_in * d_out / (d_in + d_out) + 1e-9))


def wide_factor(sparsity: float) -> float:
    """Widening factor ``k = sqrt(1 / (1 - s))``."""
    return math.sqrt(1.0 / (1.0 - sparsity))


def widened_width(n: int, sparsity: float) -> int:
    return max(n, round(n * wide_factor(sparsity)))
