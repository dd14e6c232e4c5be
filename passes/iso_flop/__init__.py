"""Sparse Iso-FLOP Transformations (Sparse-IFT, arXiv 2303.11525): replace a dense Linear /
Conv by a *sparse* layer family with the same counted FLOPs but more capacity.

For a dense layer ``W`` of shape ``[D_out, D_in]`` (``D_in = c_in * kh * kw`` for convs) and
sparsity ``s``:

* ``parallel``: ``n = round(1 / (1 - s))`` sparse branches of ``W``'s shape, each at density
  ``1 - s``, summed. A conv followed by a BatchNorm gets one BatchNorm per branch, summed
  after normalisation (RepVGG-style, folded into one conv in eval); otherwise the branches
  share the input, so the op runs once on the sum of their masked weights.
* ``factorized``: ``W -> V @ U`` with hidden width ``d = ceil(D_in D_out / ((1-s)(D_in+D_out)))``;
  ``U`` is the original op (kxk conv / linear) to ``d`` outputs, ``V`` a 1x1 conv / linear.
* ``doped``: a sparse full matrix plus a dense rank-``r`` product ``B @ A`` with
  ``r = floor(s D_in D_out / (D_in + D_out))``, applied to the input when that is cheaper.
* ``wide``: in ``dense -> elementwise ops / BatchNorm -> dense`` chains, the inner width is
  multiplied by ``k = sqrt(1 / (1 - s))``; each widened layer is masked to the dense layer's
  number of weights (density ``1 - s`` when both of its dims are widened).

Masks are boolean buffers applied in forward (``weight * mask``), so weights outside the mask
get zero gradient. By default (``dynamic=True``) they evolve during training by RigL, run
inside the rewritten modules: every ``update_every`` training forwards each masked weight
drops its smallest ``|w|`` and grows the largest dense ``|grad|`` (the schedule's step counter
is a buffer, so it survives ``state_dict`` and resumption; updates are deterministic and
identical on DDP ranks). :class:`RigL` is the same update stepped by hand.

The replaced layer's own weight stays a live part of the replacement (parallel's branch 0,
doped's sparse matrix, wide's kept block, one factor's leading block of factorized), so every
original parameter gets a gradient and plain DDP works.

``sparsify`` verifies every rewrite with a function-preserving initialisation (exact for every
kind with ``init="random"``), then each module draws the configured init (``init="random"``,
the default and the paper's setting: uniform random masks, kaiming-uniform new weights).
``init="preserve"`` keeps the dense function for fine-tuning: exact for ``parallel`` (when
``round(1/(1-s)) * (1-s) >= 1``) and ``wide``; best-effort for ``factorized`` and ``doped``;
each Rewrite records ``details["exact"]`` and the measured ``details["divergence"]``.

Modules: ``config`` (the config and the width formulas), ``masks`` (masked weights),
``layers`` (the replacement modules), ``build`` (their weights from a dense layer),
``chain`` (the wide chains), ``flops`` (counts and divergence), ``rewrite`` (the pass),
``rigl`` (mask updates in training).
"""

from sparsify_fx.passes.iso_flop import rewrite  # noqa: F401  (registers the pass)
from sparsify_fx.passes.iso_flop.config import (
    ISO_FLOP_KINDS,
    IsoFLOP,
    doped_rank,
    hidden_width,
    parallel_branches,
    wide_factor,
)
from sparsify_fx.passes.iso_flop.layers import (
    FactorNorm,
    SparseDoped,
    SparseFactorized,
    SparseParallel,
    SparseParallelBN,
    SparseWide,
)
from sparsify_fx.passes.iso_flop.masks import MaskedWeight, apply_masks_, masked_weights
from sparsify_fx.passes.iso_flop.rigl import RigL

__all__ = [
    "IsoFLOP",
    "ISO_FLOP_KINDS",
    "MaskedWeight",
    "SparseParallel",
    "SparseParallelBN",
    "FactorNorm",
    "SparseFactorized",
    "SparseDoped",
    "SparseWide",
    "RigL",
    "apply_masks_",
    "masked_weights",
    "hidden_width",
    "doped_rank",
    "parallel_branches",
    "wide_factor",
]
