"""Detection and instance segmentation: EfficientFormer + FPN + Cascade Mask R-CNN (PETAH Table 6)."""

from .detector import build_cascade_mask_rcnn  # noqa: F401
