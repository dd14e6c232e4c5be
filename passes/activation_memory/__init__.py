"""ActivationMemory: memory-saving replacements for what activations, norms and dense layers save."""

from sparsify_fx.passes.activation_memory.rewrite import ActivationMemory

__all__ = ["ActivationMemory"]
