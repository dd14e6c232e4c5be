"""Sparse Iso-FLOP Transformations (Sparse-IFT, arXiv 2303.11525): replace a dense Linear /
Conv by a *sparse* layer family with the same counted FLOPs but more capacity.

For a dense layer ``W`` of shape ``[D_out, D_in]`` (``D_in = c_in * kh * kw`` for convs) and
sparsity ``s``:

* ``parallel``: ``n = round(1 / (1 - s))`` sparse branches of ``W``'s shape, each at density
  ``1 - s``, summed (the branches share the input, so the sum of their outputs is the op
  applied once to the sum of their masked weights: that is how it is computed).
* ``factorized``: ``W -> V @ U`` with hidden width ``d = ceil(D_in D_out / ((1-s)(D_in+D_out)))``;
  ``U`` is the original op (kxk conv / linear) to ``d`` outputs, ``V`` a 1x1 conv / linear.
* ``doped``: a sparse full matrix plus a dense rank-``r`` product ``B @ A`` with
  ``r = floor(s D_in D_out / (D_in + D_out))``.
* ``wide``: in ``dense -> elementwise ops / BatchNorm -> dense`` chains, the inner width is
  multiplied by ``k = sqrt(1 / (1 - s))``; each widened layer is masked to the dense layer's
  number of weights (density ``1 - s`` when both of its dims are widened).

Masks are boolean buffers applied in forward (``weight * mask``), so weights outside the mask
get zero gradient and stay zero under SGD / Adam; :func:`apply_masks_` re-zeroes the stored
weights (after loading a checkpoint or after an optimizer with stale state). :class:`RigL`
updates the masks during training (drop smallest ``|w|``, grow largest dense ``|grad|``).

``init="preserve"`` starts from the dense weights: exact for ``parallel`` (when
``round(1/(1-s)) * (1-s) >= 1``) and ``wide``; best-effort for ``factorized`` (truncated SVD,
then magnitude masking) and ``doped`` (truncated SVD plus the residual's largest entries);
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
    SparseDoped,
    SparseFactorized,
    SparseParallel,
    SparseWide,
)
from sparsify_fx.passes.iso_flop.masks import MaskedWeight, apply_masks_, masked_weights
from sparsify_fx.passes.iso_flop.rigl import RigL

__all__ = [
    "IsoFLOP",
    "ISO_FLOP_KINDS",
    "MaskedWeight",
    "SparseParallel",
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
