"""Benchmark scripts and measuring tools; they use the public API only and never run in tests
except for the small measuring helpers (``benchmarks.memory``)."""

__all__: list[str] = []
