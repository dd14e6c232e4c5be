"""torch.compile integration: the sparsify_fx Dynamo backend."""

__all__: list[str] = []
