"""The canonical graph form: op knowledge, node-meta keys, readers and editing helpers."""

__all__: list[str] = []
