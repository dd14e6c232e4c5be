"""BlockSparseActivations (arXiv 2311.16883): block-sparse copies of saved dense-layer inputs."""

from sparsify_fx.passes.block_sparse.rewrite import BlockSparseActivations

__all__ = ["BlockSparseActivations"]
