"""Pass infrastructure: configs, the registry, recipes, results and the transactional manager."""

__all__: list[str] = []
