"""IsoFLOP (Sparse-IFT, arXiv 2303.11525): sparse wide / parallel / factorized / doped layers."""

from sparsify_fx.passes.iso_flop.rewrite import IsoFLOP

__all__ = ["IsoFLOP"]
