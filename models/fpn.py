"""Semantic FPN (Kirillov et al., "Panoptic Feature Pyramid Networks", CVPR 2019) for the four stage maps of a
hierarchical backbone (EfficientFormer's `forward_pyramid`), as used for ADE20K in the EfficientFormer and PETAH
papers.

    norms          GroupNorm(1, C_i) per input map (the snap segmentation backbone normalises its outputs so)
    lateral_convs  1x1 conv C_i -> 256                         P_i = lateral_i(x_i)
    top-down       P_i += nearest_upsample(P_{i+1})            i = 2, 1, 0
    fpn_convs      3x3 conv 256 -> 256                         P_i = fpn_i(P_i)
    scale_heads    per level 1/1/2/3 x (3x3 conv, BN, ReLU, x2 bilinear except at stride 4) -> 128 at stride 4
    sum, Dropout2d(0.1), conv_seg 1x1 -> num_classes           logits (B, K, H/4, W/4)
"""
import torch
import torch.nn as nn
import torch.nn.functional as F


class ConvBNReLU(nn.Sequential):
    """3x3 conv (no bias) + BatchNorm + ReLU.

    Args:
        in_ch: input channels.
        out_ch: output channels.
    """

    def __init__(self, *, in_ch: int, out_ch: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_ch, out_ch, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(out_ch)
        self.act = nn.ReLU()


class Upsample2x(nn.Module):
    """x2 bilinear upsampling (align_corners=False), a module so the head is a plain nn.Sequential."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)


class SemanticFPN(nn.Module):
    """FPN neck + semantic segmentation head.

    Args:
        in_channels: channels of the input maps, finest first (strides 4, 8, 16, 32 for four maps).
        num_classes: output classes K.
        channels: FPN width.
        head_channels: width of the per-level head branches.
        dropout: Dropout2d before the classifier.
        input_norm: apply GroupNorm(1, C_i) to each input map first (as the snap segmentation backbone does).
    """

    def __init__(self, *, in_channels: list[int], num_classes: int, channels: int = 256, head_channels: int = 128,
                 dropout: float = 0.1, input_norm: bool = True) -> None:
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.in_channels = list(in_channels)
        self.num_classes = num_classes
        n = len(self.in_channels)
        self.norms = nn.ModuleList([nn.GroupNorm(1, c) if input_norm else nn.Identity() for c in self.in_channels])
        self.lateral_convs = nn.ModuleList([nn.Conv2d(c, channels, 1) for c in self.in_channels])
        self.fpn_convs = nn.ModuleList([nn.Conv2d(channels, channels, 3, padding=1) for _ in range(n)])
        heads = []
        for i in range(n):  # level i has stride 4 * 2**i and needs i upsamplings (at least one conv)
            layers = []
            for j in range(max(1, i)):
                layers.append(ConvBNReLU(in_ch=channels if j == 0 else head_channels, out_ch=head_channels))
                if i > 0:
                    layers.append(Upsample2x())
            heads.append(nn.Sequential(*layers))
        self.scale_heads = nn.ModuleList(heads)
        self.dropout = nn.Dropout2d(dropout)
        self.conv_seg = nn.Conv2d(head_channels, num_classes, 1)
        nn.init.normal_(self.conv_seg.weight, std=0.01)
        nn.init.zeros_(self.conv_seg.bias)

    def forward(self, feats: list[torch.Tensor]) -> torch.Tensor:
        """feats: maps (B, C_i, H_i, W_i), finest first -> logits (B, K, H_0, W_0)."""
        if len(feats) != len(self.in_channels):
            raise ValueError(f"SemanticFPN expects {len(self.in_channels)} maps, got {len(feats)}")
        for i, (f, c) in enumerate(zip(feats, self.in_channels)):
            if f.ndim != 4 or f.shape[1] != c:
                raise ValueError(f"SemanticFPN input {i}: expected (B, {c}, H, W), got {tuple(f.shape)}")
        lat = [conv(norm(f)) for f, norm, conv in zip(feats, self.norms, self.lateral_convs)]  # (B, 256, H_i, W_i)
        for i in range(len(lat) - 1, 0, -1):  # top-down: coarse to fine
            lat[i - 1] = lat[i - 1] + F.interpolate(lat[i], size=lat[i - 1].shape[-2:], mode="nearest")
        p = [conv(x) for conv, x in zip(self.fpn_convs, lat)]  # (B, 256, H_i, W_i)
        out = self.scale_heads[0](p[0])  # (B, 128, H_0, W_0)
        for i in range(1, len(p)):
            y = self.scale_heads[i](p[i])
            if y.shape[-2:] != out.shape[-2:]:  # odd sizes: x2 steps may miss by a pixel
                y = F.interpolate(y, size=out.shape[-2:], mode="bilinear", align_corners=False)
            out = out + y
        return self.conv_seg(self.dropout(out))  # (B, K, H_0, W_0)
