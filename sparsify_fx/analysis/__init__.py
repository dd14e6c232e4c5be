"""Analyses over the canonical graph: shapes, saved-tensor liveness, repeated blocks, slice groups."""

__all__: list[str] = []
