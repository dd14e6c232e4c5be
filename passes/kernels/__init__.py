"""Kernels and op plumbing shared by several passes: fused CPU kernels (C++ sources beside
this file), bit packing, bf16 weight gradients, the custom-op autograd bridge, caches."""

__all__: list[str] = []
