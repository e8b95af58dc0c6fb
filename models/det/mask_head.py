"""FCN mask head of Mask R-CNN (He et al., ICCV 2017), from torchvision's parts.

    convs      4 x (conv3x3 256 -> 256, ReLU)          (R, 256, 14, 14)     torchvision MaskRCNNHeads
    predictor  deconv 2x2 stride 2 -> 256, ReLU         (R, 256, 28, 28)     torchvision MaskRCNNPredictor
               conv1x1 256 -> K                         (R, K, 28, 28)       one mask logit map per class

Class-specific: the map of the RoI's (ground-truth or predicted) class is the one that counts; the loss is
binary cross-entropy against the ground-truth mask cropped to the RoI and resampled to 28 x 28
(torchvision's maskrcnn_loss), the prediction sigmoid(logit) of that class, pasted into the image at test time.
"""
import torch
import torch.nn as nn
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor


class FCNMaskHead(nn.Module):
    """4 convs + deconv + per-class 1x1 conv: RoI features (R, C, 14, 14) -> mask logits (R, K, 28, 28).

    Args:
        in_channels: channels of the RoI features (the FPN width).
        num_classes: classes including background (K; channel 0, background, is never read).
        conv_channels: width of the 4 convs and the deconv.
        num_convs: number of 3x3 convs.
    """

    def __init__(self, *, in_channels: int = 256, num_classes: int, conv_channels: int = 256,
                 num_convs: int = 4) -> None:
        super().__init__()
        self.convs = MaskRCNNHeads(in_channels, [conv_channels] * num_convs, 1)
        self.predictor = MaskRCNNPredictor(conv_channels, conv_channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.predictor(self.convs(x))  # (R, C, 14, 14) -> (R, K, 28, 28)
