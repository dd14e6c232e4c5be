"""The sparsify-fx command line (demo / inspect / verify / bench) and its MODEL specs."""

from sparsify_fx.cli.main import main

__all__ = ["main"]
