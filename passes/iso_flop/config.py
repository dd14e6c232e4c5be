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
_FACTOR_NORMS = (None, "bn", "bn_relu")


@dataclass(frozen=True)
class IsoFLOP(PassConfig):
    """Replace dense Linear / Conv layers by sparse iso-FLOP families (Sparse-IFT).

    Args:
        kind: ``"wide"``, ``"parallel"``, ``"factorized"`` or ``"doped"``.
        sparsity: fraction of zero weights in each sparse factor, in [0, 1).
        init: ``"random"`` (the paper's setting for training from scratch: uniform random
            masks at the layer's density, kaiming-uniform new weights; the replaced layer's
            own weight, a live part of the replacement, keeps its values) or ``"preserve"``
            (start from the dense weights, for fine-tuning a trained model; exact for parallel
            and wide). Either way sparsify verifies the rewrite with a function-preserving
            initialisation and draws ``"random"`` after verification.
        skip_first_last: keep the model's first and last dense layers dense (the paper's
            default: stem and head stay dense).
        seed: seed of the random masks / weights (identical on every rank).
        dynamic: evolve the masks during training by RigL (Evci et al. 2020), built into the
            rewritten module: no object to step. ``False`` keeps the masks static.
        update_every: training forwards between mask updates (RigL's delta T).
        drop_fraction: fraction of each layer's active weights replaced per update, in (0, 1].
        stop_at: training forward after which masks freeze; the drop fraction is annealed by a
            cosine from ``drop_fraction`` to 0 at ``stop_at``. The paper stops at 75% of
            training: pass ``int(0.75 * total_steps)``. ``None``: masks evolve throughout, at a
            constant ``drop_fraction`` (the total is not known at rewrite time).
        factorized_norm: ``kind="factorized"`` only: ``None``, ``"bn"`` or ``"bn_relu"``
            between the two factors (the paper's optional normalisation).

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
    init: str = "random"
    skip_first_last: bool = True
    seed: int = 0
    dynamic: bool = True
    update_every: int = 100
    drop_fraction: float = 0.3
    stop_at: int | None = None
    factorized_norm: str | None = None

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
        if not isinstance(self.dynamic, bool):
            raise ConfigError(f"IsoFLOP.dynamic must be a bool, got {self.dynamic!r}")
        if isinstance(self.update_every, bool) or not isinstance(self.update_every, int) or self.update_every < 1:
            raise ConfigError(f"IsoFLOP.update_every must be a positive int, got {self.update_every!r}")
        check_range(self, "drop_fraction", self.drop_fraction, 0.0, 1.0, low_open=True)
        if self.stop_at is not None and (
            isinstance(self.stop_at, bool) or not isinstance(self.stop_at, int) or self.stop_at < 1
        ):
            raise ConfigError(f"IsoFLOP.stop_at must be a positive int or None, got {self.stop_at!r}")
        if self.factorized_norm not in _FACTOR_NORMS:
            raise ConfigError(
                f"IsoFLOP.factorized_norm must be one of {list(_FACTOR_NORMS)}, got {self.factorized_norm!r}"
            )


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
