"""EfficientFormer + Semantic FPN: the segmentation model of the PETAH paper's ADE20K table.

    backbone.forward_pyramid(x)   four stage maps, strides 4 / 8 / 16 / 32      (B, C_i, H / s_i, W / s_i)
    decode_head(maps)             Semantic FPN (models/fpn.py)                  (B, K, H / 4, W / 4)
    bilinear upsampling           to the input size                             (B, K, H, W)

The state dict keys are `backbone.<EfficientFormer key>` and `decode_head.<SemanticFPN key>`, so a merged
export loads back into `EFSemanticFPN` with strict=True. The backbone's final norm and classifier are not used
by `forward_pyramid`; `ef_semantic_fpn` replaces them by nn.Identity so no dead parameter is trained or saved.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from .efficientformer import EfficientFormer
from .fpn import SemanticFPN


def stage_widths(backbone: EfficientFormer) -> list[int]:
    """Channels of EfficientFormer's four stage outputs (the stem's, then each downsample's)."""
    return [backbone.stem.conv2.out_channels] + [s.downsample.conv.out_channels for s in list(backbone.stages)[1:]]


class EFSemanticFPN(nn.Module):
    """EfficientFormer stage maps -> Semantic FPN -> logits upsampled to the input size.

    Args:
        backbone: EfficientFormer (its img_size is the training crop; the attention biases follow the token grid).
        decode_head: SemanticFPN over the four stage widths.
    """

    def __init__(self, *, backbone: EfficientFormer, decode_head: SemanticFPN) -> None:
        super().__init__()
        self.backbone = backbone
        self.decode_head = decode_head
        self.img_size = backbone.img_size[0]  # the square training input side
        self.stride = backbone.stride  # input sides must be multiples of this (32)
        self.data_cfg = backbone.data_cfg

    def segment(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) normalised images -> (B, K, H, W) logits."""
        logits = self.decode_head(self.backbone.forward_pyramid(x))  # (B, K, H/4, W/4)
        return F.interpolate(logits, size=x.shape[-2:], mode="bilinear", align_corners=False)  # (B, K, H, W)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.segment(x)


def ef_semantic_fpn(backbone: EfficientFormer, *, num_classes: int, channels: int = 256,
                    head_channels: int = 128) -> EFSemanticFPN:
    """Wrap a (pretrained) EfficientFormer with a new Semantic FPN head of `num_classes` outputs.

    The backbone's final norm is replaced by nn.Identity (forward_pyramid never reaches it).
    """
    backbone.norm = nn.Identity()
    head = SemanticFPN(in_channels=stage_widths(backbone), num_classes=num_classes, channels=channels,
                       head_channels=head_channels)
    return EFSemanticFPN(backbone=backbone, decode_head=head)
