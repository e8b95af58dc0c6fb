"""Cascade Mask R-CNN with an EfficientFormer + FPN backbone (PETAH Table 6), assembled from torchvision's parts.

    transform   DetTransform                  normalise, pad the batch to a multiple of 32 (the data pipeline
                                              has already resized), results back to the original image size
    backbone    DetBackbone                   EfficientFormer -> GroupNorm -> FPN: P2-P6 (models/det_backbone.py)
    rpn         torchvision RegionProposalNetwork, 3 anchors per position: scale 8 x stride (32 .. 512 px on
                P2..P6), ratios 0.5 / 1 / 2; IoU pos 0.7 / neg 0.3, 256 anchors per image, half positive;
                2000 (train) / 1000 (test) proposals per level before and in all after NMS 0.7
    roi_heads   CascadeRoIHeads               3 stages, IoU 0.5 / 0.6 / 0.7, FCN mask heads (models/det_cascade.py)

    model(images)           -> list of {boxes (D, 4) xyxy, labels (D,), scores (D,), masks (D, 1, H, W) probs}
    model(images, targets)  -> dict of losses (training mode)

images: a list of (3, H, W) float tensors in [0, 1], any sizes; targets: {boxes (G, 4) xyxy, labels (G,) in
1..K-1, masks (G, H, W)} in the coordinates of those images. `original_sizes` (optional, inference): the sizes
the images had before the data pipeline resized them; boxes and masks are returned in those coordinates.
"""
from typing import Optional

import torch
import torch.nn as nn
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.rpn import RegionProposalNetwork, RPNHead
from torchvision.models.detection.transform import GeneralizedRCNNTransform

from .backbone import DetBackbone
from .cascade import (
    BOX_CODER_WEIGHTS,
    IOU_THRESHOLDS,
    STAGE_LOSS_WEIGHTS,
    CascadeRoIHeads,
)


class DetTransform(GeneralizedRCNNTransform):
    """torchvision's GeneralizedRCNNTransform without its resize (data_det.py resizes with transforms v2, keeping
    the ratio, so the boxes, masks and flips are transformed together with the image):
    normalise -> zero-pad every image to the batch's largest H, W rounded up to `size_divisible` -> ImageList;
    `postprocess` maps boxes back to the original sizes and pastes the 28x28 masks into full-size images.

    Args:
        mean, std: per-channel normalisation of the backbone's pretraining.
        size_divisible: the padded batch's H and W are multiples of this (32: EfficientFormer's total stride).
    """

    def __init__(self, *, mean: tuple[float, ...], std: tuple[float, ...], size_divisible: int = 32) -> None:
        super().__init__(min_size=800, max_size=1333, image_mean=list(mean), image_std=list(std),
                         size_divisible=size_divisible)

    def resize(self, image: torch.Tensor, target: Optional[dict] = None):
        return image, target  # already resized by the data pipeline


class CascadeMaskRCNN(nn.Module):
    """transform -> backbone -> RPN -> cascade RoI heads (torchvision's GeneralizedRCNN flow).

    Args:
        transform: DetTransform.
        backbone: DetBackbone (returns the FPN feature dict).
        rpn: torchvision RegionProposalNetwork.
        roi_heads: CascadeRoIHeads.
    """

    def __init__(self, *, transform: DetTransform, backbone: DetBackbone, rpn: RegionProposalNetwork,
                 roi_heads: CascadeRoIHeads) -> None:
        super().__init__()
        self.transform = transform
        self.backbone = backbone
        self.rpn = rpn
        self.roi_heads = roi_heads

    def forward(self, images: list[torch.Tensor], targets: Optional[list[dict[str, torch.Tensor]]] = None,
                original_sizes: Optional[list[tuple[int, int]]] = None):
        if self.training and targets is None:
            raise ValueError("CascadeMaskRCNN: training mode needs targets (boxes, labels, masks per image)")
        if original_sizes is None:
            original_sizes = [tuple(img.shape[-2:]) for img in images]
        image_list, targets = self.transform(images, targets)  # (B, 3, H_pad, W_pad), sizes before padding
        features = self.backbone(image_list.tensors)  # {"0".."3", "pool"}: (B, 256, H_pad / s, W_pad / s)
        proposals, rpn_losses = self.rpn(image_list, features, targets)  # B x (P, 4), detached
        detections, roi_losses = self.roi_heads(features, proposals, image_list.image_sizes, targets)
        if self.training:
            return {**{f"rpn.{k}": v for k, v in rpn_losses.items()}, **roi_losses}
        return self.transform.postprocess(detections, image_list.image_sizes, original_sizes)


def build_cascade_mask_rcnn(body: nn.Module, *, num_classes: int, fpn_channels: int = 256, fc_dim: int = 1024,
                            mask_channels: int = 256, rpn_batch_size_per_image: int = 256,
                            roi_batch_size_per_image: int = 512, num_stages: int = 3, with_mask: bool = True,
                            mean: tuple[float, ...] = (0.485, 0.456, 0.406),
                            std: tuple[float, ...] = (0.229, 0.224, 0.225)) -> CascadeMaskRCNN:
    """mmdetection's cascade_mask_rcnn_r50_fpn_1x_coco around an EfficientFormer `body`.

    Args:
        body: EfficientFormer (its heads are not used).
        num_classes: object classes + 1 (background); COCO: 81.
        fpn_channels, fc_dim, mask_channels: widths (256, 1024, 256; smaller for tiny CPU models).
        rpn_batch_size_per_image, roi_batch_size_per_image: sampled anchors / RoIs per image (256, 512).
        num_stages: cascade stages (3; 1 = a Mask R-CNN with class-agnostic regression).
        with_mask: mask heads (Cascade Mask R-CNN) or boxes only (Cascade R-CNN).
        mean, std: input normalisation (ImageNet's for the released EfficientFormer checkpoints).
    """
    if not 1 <= num_stages <= len(IOU_THRESHOLDS):
        raise ValueError(f"num_stages must be 1..{len(IOU_THRESHOLDS)}, got {num_stages}")
    backbone = DetBackbone(body=body, out_channels=fpn_channels)
    # one anchor size per level: 8 x stride (4, 8, 16, 32, 64), three aspect ratios
    anchors = AnchorGenerator(sizes=((32,), (64,), (128,), (256,), (512,)), aspect_ratios=((0.5, 1.0, 2.0),) * 5)
    rpn = RegionProposalNetwork(anchors, RPNHead(fpn_channels, 3), fg_iou_thresh=0.7, bg_iou_thresh=0.3,
                                batch_size_per_image=rpn_batch_size_per_image, positive_fraction=0.5,
                                pre_nms_top_n=dict(training=2000, testing=1000),
                                post_nms_top_n=dict(training=2000, testing=1000), nms_thresh=0.7)
    roi_heads = CascadeRoIHeads(num_classes=num_classes, in_channels=fpn_channels,
                                iou_thresholds=IOU_THRESHOLDS[:num_stages],
                                box_coder_weights=BOX_CODER_WEIGHTS[:num_stages],
                                stage_loss_weights=STAGE_LOSS_WEIGHTS[:num_stages],
                                batch_size_per_image=roi_batch_size_per_image, fc_dim=fc_dim, with_mask=with_mask,
                                mask_channels=mask_channels)
    return CascadeMaskRCNN(transform=DetTransform(mean=mean, std=std), backbone=backbone, rpn=rpn, roi_heads=roi_heads)
