"""``side``: a DiST / LST integration branch beside a frozen backbone.

A small network reads every block's token- or patch-level output (never the
backbone's gradients: the block outputs arrive detached) through one
down-projection per layer, and fuses them from shallow to deep:

    s_0 = down_0(h_0)
    s_l = block_l(resize(s_{l-1}) + down_l(h_l))      l = 1 .. L-1
    logits = fc(pool(norm(s_{L-1})))

- Token sequences (BERT family, decoders, ViT), h_l (B, T, D): down_l =
  LayerNorm (no affine) + Linear(D, d); block_l = one narrow pre-norm
  transformer layer of width d (padding masked); pool = padding-aware mean.
- CNN maps (EfficientNet), h_l (B, C_l, H_l, W_l): down_l = 1x1 conv + BN to
  d channels; the side state is average-pooled to each deeper map's size;
  block_l = depthwise 3x3 + BN + ReLU6 + 1x1 + BN, residual; pool = spatial mean.

``d`` = ``side_width`` x the backbone's width (its last block's D or C),
rounded to a multiple of 8 (at least 8).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


def side_width(backbone_width: int, fraction: float) -> int:
    return max(8, int(round(backbone_width * fraction / 8)) * 8)


class TokenSide(nn.Module):
    """Side network over (B, T, D_l) block outputs; ``mask`` (B, T) marks real tokens."""

    kind = "token_side"

    def __init__(self, dims: list[int], n_classes: int, width: int, dropout: float = 0.1):
        super().__init__()
        self.dims, self.n_classes, self.width, self.dropout = [int(d) for d in dims], int(n_classes), int(width), \
            float(dropout)
        heads = 4 if self.width % 4 == 0 and self.width >= 32 else 1
        self.down = nn.ModuleList(nn.Sequential(nn.LayerNorm(d, elementwise_affine=False), nn.Linear(d, self.width))
                                  for d in self.dims)
        self.blocks = nn.ModuleList(
            nn.TransformerEncoderLayer(self.width, heads, 2 * self.width, self.dropout, activation="gelu",
                                       batch_first=True, norm_first=True) for _ in self.dims[1:])
        self.norm = nn.LayerNorm(self.width)
        self.fc = nn.Linear(self.width, self.n_classes)

    def spec(self) -> dict:
        return {"kind": self.kind, "dims": self.dims, "n_classes": self.n_classes, "width": self.width,
                "dropout": self.dropout}

    def forward(self, feats: list[torch.Tensor], mask: torch.Tensor | None = None) -> torch.Tensor:
        if mask is None:
            mask = torch.ones(feats[0].shape[:2], dtype=torch.bool, device=feats[0].device)
        mask = mask.bool()
        _check(feats, self.dims)
        s = self.down[0](feats[0])
        for blk, down, h in zip(self.blocks, self.down[1:], feats[1:]):
            s = blk(s + down(h), src_key_padding_mask=~mask)
        s = self.norm(s)
        m = mask.to(s.dtype).unsqueeze(-1)
        return self.fc((s * m).sum(1) / m.sum(1).clamp_min(1.0))


class _DWBlock(nn.Module):
    def __init__(self, d: int):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(d, d, 3, 1, 1, groups=d, bias=False), nn.BatchNorm2d(d), nn.ReLU6(),
                                  nn.Conv2d(d, d, 1, bias=False), nn.BatchNorm2d(d))

    def forward(self, x):
        return x + self.body(x)


class ConvSide(nn.Module):
    """Side network over (B, C_l, H_l, W_l) block outputs (spatial sizes shrink or stay with depth)."""

    kind = "conv_side"

    def __init__(self, dims: list[int], n_classes: int, width: int, dropout: float = 0.1):
        super().__init__()
        self.dims, self.n_classes, self.width, self.dropout = [int(d) for d in dims], int(n_classes), int(width), \
            float(dropout)
        self.down = nn.ModuleList(nn.Sequential(nn.Conv2d(d, self.width, 1, bias=False), nn.BatchNorm2d(self.width))
                                  for d in self.dims)
        self.blocks = nn.ModuleList(_DWBlock(self.width) for _ in self.dims[1:])
        self.drop = nn.Dropout(self.dropout)
        self.fc = nn.Linear(self.width, self.n_classes)

    def spec(self) -> dict:
        return {"kind": self.kind, "dims": self.dims, "n_classes": self.n_classes, "width": self.width,
                "dropout": self.dropout}

    def forward(self, feats: list[torch.Tensor], mask=None) -> torch.Tensor:
        _check(feats, self.dims)
        s = self.down[0](feats[0])
        for blk, down, h in zip(self.blocks, self.down[1:], feats[1:]):
            h = down(h)
            if s.shape[-2:] != h.shape[-2:]:
                s = F.adaptive_avg_pool2d(s, h.shape[-2:])
            s = blk(s + h)
        return self.fc(self.drop(s.mean(dim=(2, 3))))


def _check(feats: list, dims: list[int]) -> None:
    if len(feats) != len(dims):  # zip() would silently read fewer layers
        raise ValueError(f"the side network reads {len(dims)} layers but got {len(feats)}")


def side_for(shapes: list[tuple], n_classes: int, fraction: float, dropout: float = 0.1) -> nn.Module:
    """The side network for block outputs of ``shapes`` (per-sample shapes, (T, D) or (C, H, W))."""
    if all(len(s) == 2 for s in shapes):
        dims = [s[1] for s in shapes]
        return TokenSide(dims, n_classes, side_width(dims[-1], fraction), dropout)
    if all(len(s) == 3 for s in shapes):
        dims = [s[0] for s in shapes]
        return ConvSide(dims, n_classes, side_width(dims[-1], fraction), dropout)
    from ..errors import UsageError
    raise UsageError("the side head needs token- or patch-level block outputs", value=[tuple(s) for s in shapes][:4],
                     allowed="every block returning (B, T, D) token sequences or (B, C, H, W) feature maps",
                     fix="use --head mix, select, best or last, which read pooled features")
