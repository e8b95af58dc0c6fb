"""Detection backbone: EfficientFormer's four stage maps -> GroupNorm -> FPN with P2-P6.

    body     EfficientFormer.forward_pyramid        (B, 3, H, W) -> C2..C5: (B, C_i, H/2^(i+2), W/2^(i+2))
    norms    GroupNorm(1, C_i) per map               the snap EfficientFormer detection backbone normalises
                                                     each stage output so before the neck
    fpn      torchvision FeaturePyramidNetwork       lateral 1x1 conv C_i -> 256, top-down nearest x2 + sum,
                                                     3x3 conv 256 -> 256: P2..P5 (strides 4..32)
             + LastLevelMaxPool                      P6 = max_pool(P5, kernel 1, stride 2) (stride 64)

The output is torchvision's feature dict {"0": P2, "1": P3, "2": P4, "3": P5, "pool": P6}, what its
RegionProposalNetwork (all five levels) and MultiScaleRoIAlign (P2-P5, by name) read.
"""
from collections import OrderedDict

import torch
import torch.nn as nn
from torchvision.ops import FeaturePyramidNetwork
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool


def stage_widths(body: nn.Module) -> list[int]:
    """Channels of EfficientFormer's four stage outputs (the stem's, then each downsample's)."""
    return [body.stem.conv2.out_channels] + [s.downsample.conv.out_channels for s in list(body.stages)[1:]]


class DetBackbone(nn.Module):
    """EfficientFormer body + per-map GroupNorm + FPN (P2-P6).

    Args:
        body: an EfficientFormer; `forward_pyramid` stops before its final norm and heads, so the norm is
            replaced by nn.Identity here (no parameter without a gradient; build the body with num_classes=0).
        out_channels: FPN width (256 in every Cascade R-CNN config).
        input_norm: GroupNorm(1, C_i) on each stage map before the FPN.
    """

    def __init__(self, *, body: nn.Module, out_channels: int = 256, input_norm: bool = True) -> None:
        super().__init__()
        body.norm = nn.Identity()
        self.body = body
        self.in_channels = stage_widths(body)
        self.out_channels = out_channels  # read by torchvision-style heads
        self.norms = nn.ModuleList([nn.GroupNorm(1, c) if input_norm else nn.Identity() for c in self.in_channels])
        self.fpn = FeaturePyramidNetwork(self.in_channels, out_channels, extra_blocks=LastLevelMaxPool())
        self.amp_dtype = None  # e.g. torch.bfloat16: body + FPN under autocast, features returned in float32

    def forward(self, x: torch.Tensor) -> "OrderedDict[str, torch.Tensor]":
        # autocast stops here: anchors, box coding and RoI sampling need float32 coordinates (bf16 keeps 8 bits of
        # mantissa: a 1000-pixel coordinate would be off by up to 4 pixels)
        with torch.autocast(x.device.type, dtype=self.amp_dtype or torch.bfloat16, enabled=self.amp_dtype is not None):
            feats = self.body.forward_pyramid(x)  # 4 x (B, C_i, H_i, W_i), strides 4, 8, 16, 32
            feats = OrderedDict((str(i), norm(f)) for i, (f, norm) in enumerate(zip(feats, self.norms)))
            out = self.fpn(feats)  # {"0".."3": (B, 256, H_i, W_i), "pool": (B, 256, H/64, W/64)}
        return OrderedDict((k, v.float()) for k, v in out.items())
