"""Reports on a rewritten module: explain, graph diff, the HTML page."""

__all__: list[str] = []
