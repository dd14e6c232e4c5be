"""Capture: any nn.Module to canonical torch.fx GraphModules (trace, submodules, export, Dynamo)."""

__all__: list[str] = []
