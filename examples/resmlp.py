"""ResMLP (Touvron et al., arXiv 2105.03404), the model of the block-sparse activation paper.

A patch-embedding Linear, then ``depth`` residual blocks of
``Affine -> token-mixing Linear (across patches) -> LayerScale`` and
``Affine -> channel MLP (Linear, GELU, Linear) -> LayerScale``, a final Affine, mean
pooling over patches and a Linear head. Every layer is a Linear, so every saved input is a
candidate for :class:`sparsify_fx.BlockSparseActivations`.

Run as a script to sparsify a tiny ResMLP with BSR, verify it and print the report::

    python examples/resmlp.py
"""

from __future__ import annotations

import torch
import torch.nn as nn

__all__ = ["Affine", "ResMLPBlock", "ResMLP", "resmlp"]


class Affine(nn.Module):
    """ResMLP's normalisation: a per-channel ``alpha * x + beta`` (no statistics)."""

    def __init__(self, dim: int):
        super().__init__()
        self.alpha = nn.Parameter(torch.ones(dim))
        self.beta = nn.Parameter(torch.zeros(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.alpha * x + self.beta


class _ChannelMLP(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class ResMLPBlock(nn.Module):
    """One residual block: token mixing across patches, then a per-patch channel MLP."""

    def __init__(self, dim: int, num_patches: int, mlp_ratio: int = 4, init_scale: float = 0.1):
        super().__init__()
        self.norm1 = Affine(dim)
        self.token_mix = nn.Linear(num_patches, num_patches)
        self.norm2 = Affine(dim)
        self.mlp = _ChannelMLP(dim, mlp_ratio * dim)
        # LayerScale (the paper uses 0.1 at depth 12): residual branches start small
        self.ls1 = nn.Parameter(torch.full((dim,), init_scale))
        self.ls2 = nn.Parameter(torch.full((dim,), init_scale))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [batch, patches, dim]; token mixing is a Linear over the patch axis
        mixed = self.token_mix(self.norm1(x).transpose(1, 2)).transpose(1, 2)
        x = x + self.ls1 * mixed
        return x + self.ls2 * self.mlp(self.norm2(x))


class ResMLP(nn.Module):
    """ResMLP classifier over ``image_size x image_size`` images cut into ``patch x patch`` patches."""

    def __init__(
        self,
        depth: int = 12,
        dim: int = 384,
        image_size: int = 224,
        patch: int = 16,
        num_classes: int = 10,
        in_chans: int = 3,
        mlp_ratio: int = 4,
    ):
        super().__init__()
        if image_size % patch:
            raise ValueError(f"ResMLP image_size={image_size} must be a multiple of patch={patch}")
        num_patches = (image_size // patch) ** 2
        self.unfold = nn.Unfold(kernel_size=patch, stride=patch)
        self.patch_embed = nn.Linear(in_chans * patch * patch, dim)
        self.blocks = nn.Sequential(*[ResMLPBlock(dim, num_patches, mlp_ratio) for _ in range(depth)])
        self.norm = Affine(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        patches = self.unfold(images).transpose(1, 2)  # [batch, patches, C * patch * patch]
        x = self.blocks(self.patch_embed(patches))
        return self.head(self.norm(x).mean(dim=1))


def resmlp(
    depth: int = 12, dim: int = 384, image_size: int = 224, patch: int = 16, num_classes: int = 10
) -> ResMLP:
    """ResMLP-``depth`` (ResMLP-12 by default) for ``num_classes`` classes.

    Example:
        >>> import torch
        >>> m = resmlp(depth=1, dim=32, image_size=32, patch=8)
        >>> m(torch.randn(2, 3, 32, 32)).shape
        torch.Size([2, 10])
    """
    return ResMLP(depth=depth, dim=dim, image_size=image_size, patch=patch, num_classes=num_classes)


def _main() -> None:
    import sparsify_fx as sfx

    torch.manual_seed(0)
    model = resmlp(depth=2, dim=64, image_size=32, patch=8)
    images, labels = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
    fast = sfx.sparsify(model, sfx.BlockSparseActivations(block_size=16, density=0.5),
                        example_inputs=(images,))
    report = sfx.verify(model, fast, example_inputs=(images,))
    fast.train()
    loss = nn.functional.cross_entropy(fast(images), labels)
    loss.backward()
    finite = all(p.grad is not None and bool(torch.isfinite(p.grad).all()) for p in fast.parameters())
    print(sfx.explain(fast))
    print(f"eval outputs match the original: {report.ok}; training loss {loss.item():.4f}; "
          f"every gradient finite: {finite}")


if __name__ == "__main__":
    _main()
