"""Cascade (Mask) R-CNN RoI heads (Cai & Vasconcelos, "Cascade R-CNN", CVPR 2018), the part torchvision lacks.

torchvision's RoIHeads is ONE stage: sample RoIs among the proposals at one IoU threshold, pool, classify and
regress. A cascade chains T such stages; stage t trains on the boxes stage t-1 regressed, sampled at a higher IoU:

    rois_1 = RPN proposals
    for t = 1..T:                          IoU threshold u_t = 0.5, 0.6, 0.7
        training: rois_t += ground-truth boxes; match at u_t (pos IoU >= u_t, neg < u_t);
                  sample 512 per image, 25% positive (torchvision Matcher + BalancedPositiveNegativeSampler)
        x_t = RoIAlign 7x7 (rois_t)        (R, 256, 7, 7)
        s_t, d_t = head_t(x_t)             2 fc of 1024 -> class logits (R, K), box deltas (R, 4)
        loss += w_t * (CE(s_t) + smoothL1(d_t - encode_t(gt, rois_t)) + BCE(mask_t))    w_t = 1, 0.5, 0.25
        rois_{t+1} = decode_t(d_t, rois_t), clipped, gradient stopped (training: the ground-truth RoIs dropped)

Regression is class-agnostic (one delta per RoI, not one per class), and each stage's box coder has tighter
target scaling because the deltas shrink as the boxes improve (torchvision BoxCoder weights = 1 / std):
(10, 10, 5, 5), (20, 20, 10, 10), (30, 30, 15, 15), i.e. stds 0.1/0.2, 0.05/0.1, 0.033/0.067 (dx,dy / dw,dh).

Test time (as mmdetection's Cascade Mask R-CNN): run the three stages on the refined boxes, AVERAGE the class
logits of the stages for each proposal (mmdetection averages the pre-softmax cls_score), softmax, take the LAST
stage's boxes; per class: score > 0.05, NMS 0.5, best 100 per image. Every stage has its own FCN mask head; at
test time all three run on the final boxes and their sigmoid probabilities are averaged.

With one stage (T = 1) and a predictor whose per-class deltas are all equal, this is exactly torchvision's
RoIHeads (tests/test_models_det.py checks boxes, scores, masks and losses against it).
"""
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torchvision.models.detection import _utils as det_utils
from torchvision.models.detection.faster_rcnn import TwoMLPHead
from torchvision.models.detection.roi_heads import maskrcnn_loss
from torchvision.ops import MultiScaleRoIAlign
from torchvision.ops import boxes as box_ops

from .mask_head import FCNMaskHead

# mmdetection cascade_mask_rcnn_r50_fpn_1x_coco
IOU_THRESHOLDS = (0.5, 0.6, 0.7)
BOX_CODER_WEIGHTS = ((10.0, 10.0, 5.0, 5.0), (20.0, 20.0, 10.0, 10.0), (30.0, 30.0, 15.0, 15.0))
STAGE_LOSS_WEIGHTS = (1.0, 0.5, 0.25)


class AgnosticBoxPredictor(nn.Module):
    """Class logits (R, K) and ONE class-agnostic box delta (R, 4) per RoI.

    Args:
        in_channels: width of the box head's last fc.
        num_classes: classes including background (index 0).
    """

    def __init__(self, *, in_channels: int, num_classes: int) -> None:
        super().__init__()
        self.cls_score = nn.Linear(in_channels, num_classes)
        self.bbox_pred = nn.Linear(in_channels, 4)
        nn.init.normal_(self.cls_score.weight, std=0.01)  # mmdetection's init of the two predictors
        nn.init.normal_(self.bbox_pred.weight, std=0.001)
        nn.init.zeros_(self.cls_score.bias)
        nn.init.zeros_(self.bbox_pred.bias)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.cls_score(x), self.bbox_pred(x)  # (R, K), (R, 4)


class CascadeStage(nn.Module):
    """One cascade stage: its RoI sampler (IoU threshold), box coder, 2-fc box head, predictor and mask head.

    Args:
        num_classes: classes including background.
        iou_threshold: a sampled RoI is positive at IoU >= this with its best ground truth, negative below.
        box_coder_weights: torchvision BoxCoder weights (wx, wy, ww, wh) of this stage's targets.
        in_channels: channels of the RoI features (FPN width).
        roi_size: RoIAlign output side of the box branch (7).
        fc_dim: width of the two fc layers (1024).
        with_mask: give the stage an FCN mask head.
        mask_channels: width of the mask head's convs.
        batch_size_per_image: RoIs sampled per image (512).
        positive_fraction: at most this fraction of them positive (0.25).
    """

    def __init__(self, *, num_classes: int, iou_threshold: float, box_coder_weights: tuple[float, ...],
                 in_channels: int = 256, roi_size: int = 7, fc_dim: int = 1024, with_mask: bool = True,
                 mask_channels: int = 256, batch_size_per_image: int = 512, positive_fraction: float = 0.25) -> None:
        super().__init__()
        self.iou_threshold = iou_threshold
        self.box_coder = det_utils.BoxCoder(tuple(float(w) for w in box_coder_weights))
        # pos = neg = min_pos IoU threshold, no low-quality matches (mmdetection's cascade assigners)
        self.matcher = det_utils.Matcher(iou_threshold, iou_threshold, allow_low_quality_matches=False)
        self.sampler = det_utils.BalancedPositiveNegativeSampler(batch_size_per_image, positive_fraction)
        self.box_head = TwoMLPHead(in_channels * roi_size ** 2, fc_dim)  # fc6, fc7 with ReLU
        self.box_predictor = AgnosticBoxPredictor(in_channels=fc_dim, num_classes=num_classes)
        self.mask_head = FCNMaskHead(in_channels=in_channels, num_classes=num_classes,
                                     conv_channels=mask_channels) if with_mask else None

    def sample(self, proposals: list[torch.Tensor], gt_boxes: list[torch.Tensor], gt_labels: list[torch.Tensor]):
        """Add the ground truths to the proposals, match them at this stage's IoU, sample.

        Returns per image: rois (R, 4), labels (R,) (0 = background), matched ground-truth index (R,),
        regression targets (R, 4) and is_gt (R,) (the RoI is a ground-truth box, not a proposal).
        Same operations, in the same order, as torchvision's RoIHeads.select_training_samples.
        """
        all_rois, all_labels, all_matched = [], [], []
        for props, boxes, labels in zip(proposals, gt_boxes, gt_labels):
            rois = torch.cat([props, boxes])  # (N + G, 4): the ground truths are RoIs too
            if boxes.numel() == 0:  # an image without objects: every RoI is background
                matched = torch.zeros(len(rois), dtype=torch.int64, device=rois.device)
                roi_labels = torch.zeros(len(rois), dtype=torch.int64, device=rois.device)
            else:
                m = self.matcher(box_ops.box_iou(boxes, rois))  # (N + G,): gt index, -1 below, -2 between
                matched = m.clamp(min=0)
                roi_labels = labels[matched].to(torch.int64)
                roi_labels[m == self.matcher.BELOW_LOW_THRESHOLD] = 0
                roi_labels[m == self.matcher.BETWEEN_THRESHOLDS] = -1  # ignored by the sampler
            all_rois.append(rois)
            all_labels.append(roi_labels)
            all_matched.append(matched)
        pos, neg = self.sampler(all_labels)  # per image a (N + G,) uint8 mask each
        out = dict(rois=[], labels=[], matched=[], is_gt=[], targets=[])
        matched_boxes = []
        for rois, labels, matched, boxes, p, n, props in zip(all_rois, all_labels, all_matched, gt_boxes, pos, neg,
                                                              proposals):
            keep = torch.where(p | n)[0]
            out["rois"].append(rois[keep])
            out["labels"].append(labels[keep])
            out["matched"].append(matched[keep])
            out["is_gt"].append(keep >= len(props))
            boxes = boxes if boxes.numel() else torch.zeros((1, 4), dtype=rois.dtype, device=rois.device)
            matched_boxes.append(boxes[matched[keep]])
        out["targets"] = list(self.box_coder.encode(matched_boxes, out["rois"]))  # (R, 4) each
        return out

    def decode(self, deltas: torch.Tensor, rois: list[torch.Tensor], image_shapes: list[tuple[int, int]]):
        """Apply this stage's deltas (R, 4) to its RoIs; boxes clipped to each image. Returns a list per image."""
        boxes = self.box_coder.decode(deltas, rois).reshape(-1, 4)  # (R, 1, 4) -> (R, 4)
        return [box_ops.clip_boxes_to_image(b, s) for b, s in zip(boxes.split([len(r) for r in rois]), image_shapes)]


def box_losses(class_logits: torch.Tensor, deltas: torch.Tensor, labels: list[torch.Tensor],
               targets: list[torch.Tensor], beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Cross-entropy over all sampled RoIs; smooth L1 of the positives' deltas, summed and divided by the number of
    sampled RoIs (torchvision's fastrcnn_loss normalisation, with one delta per RoI instead of one per class)."""
    labels, targets = torch.cat(labels), torch.cat(targets)
    loss_cls = F.cross_entropy(class_logits, labels)
    pos = torch.where(labels > 0)[0]
    loss_box = F.smooth_l1_loss(deltas[pos], targets[pos], beta=beta, reduction="sum") / labels.numel()
    return loss_cls, loss_box


class CascadeRoIHeads(nn.Module):
    """T cascade stages on FPN features, with the interface of torchvision's RoIHeads:
    forward(features, proposals, image_shapes, targets) -> (detections, losses).

    Args:
        num_classes: classes including background (COCO: 81).
        in_channels: FPN width.
        featmap_names: the FPN levels RoIAlign reads (P2-P5; the RoI's size picks its level).
        iou_thresholds: one per stage (its length is the number of stages).
        box_coder_weights: one (wx, wy, ww, wh) per stage.
        stage_loss_weights: one per stage, multiplies all of that stage's losses.
        batch_size_per_image, positive_fraction: RoI sampling of every stage.
        fc_dim: width of the box heads' two fc layers.
        with_mask: FCN mask head in every stage (Cascade Mask R-CNN).
        mask_channels: mask head width.
        box_loss_beta: smooth-L1 beta of the box loss (mmdetection's cascade: 1.0; torchvision's RoIHeads: 1/9).
        sampling_ratio: RoIAlign sampling points per bin (0 = adaptive, as mmdetection).
        score_thresh, nms_thresh, detections_per_img: test-time filtering (0.05, 0.5, 100).
    """

    def __init__(self, *, num_classes: int, in_channels: int = 256,
                 featmap_names: tuple[str, ...] = ("0", "1", "2", "3"),
                 iou_thresholds: tuple[float, ...] = IOU_THRESHOLDS,
                 box_coder_weights: tuple[tuple[float, ...], ...] = BOX_CODER_WEIGHTS,
                 stage_loss_weights: tuple[float, ...] = STAGE_LOSS_WEIGHTS, batch_size_per_image: int = 512,
                 positive_fraction: float = 0.25, fc_dim: int = 1024, with_mask: bool = True,
                 mask_channels: int = 256, box_loss_beta: float = 1.0, sampling_ratio: int = 0,
                 score_thresh: float = 0.05, nms_thresh: float = 0.5, detections_per_img: int = 100) -> None:
        super().__init__()
        if not len(iou_thresholds) == len(box_coder_weights) == len(stage_loss_weights):
            raise ValueError(f"one IoU threshold, box-coder weight and loss weight per stage: got "
                             f"{len(iou_thresholds)}, {len(box_coder_weights)}, {len(stage_loss_weights)}")
        self.num_classes = num_classes
        self.stage_loss_weights = tuple(stage_loss_weights)
        self.box_loss_beta = box_loss_beta
        self.score_thresh, self.nms_thresh, self.detections_per_img = score_thresh, nms_thresh, detections_per_img
        self.with_mask = with_mask
        self.box_roi_pool = MultiScaleRoIAlign(list(featmap_names), 7, sampling_ratio)  # no parameters
        self.mask_roi_pool = MultiScaleRoIAlign(list(featmap_names), 14, sampling_ratio) if with_mask else None
        self.stages = nn.ModuleList([
            CascadeStage(num_classes=num_classes, iou_threshold=u, box_coder_weights=w, in_channels=in_channels,
                         fc_dim=fc_dim, with_mask=with_mask, mask_channels=mask_channels,
                         batch_size_per_image=batch_size_per_image, positive_fraction=positive_fraction)
            for u, w in zip(iou_thresholds, box_coder_weights)])

    def forward(self, features: dict[str, torch.Tensor], proposals: list[torch.Tensor],
                image_shapes: list[tuple[int, int]], targets: Optional[list[dict[str, torch.Tensor]]] = None):
        if self.training:
            if targets is None:
                raise ValueError("CascadeRoIHeads: training needs targets (boxes, labels, masks)")
            return [], self._train(features, proposals, image_shapes, targets)
        return self._detect(features, proposals, image_shapes), {}

    # ---- training: each stage samples among the previous stage's refined boxes
    def _train(self, features, proposals, image_shapes, targets) -> dict[str, torch.Tensor]:
        gt_boxes = [t["boxes"].to(proposals[0].dtype) for t in targets]
        gt_labels = [t["labels"] for t in targets]
        losses, rois = {}, [p.detach() for p in proposals]
        for t, (stage, w) in enumerate(zip(self.stages, self.stage_loss_weights)):
            s = stage.sample(rois, gt_boxes, gt_labels)
            x = stage.box_head(self.box_roi_pool(features, s["rois"], image_shapes))  # (R, fc_dim)
            class_logits, deltas = stage.box_predictor(x)  # (R, K), (R, 4)
            loss_cls, loss_box = box_losses(class_logits, deltas, s["labels"], s["targets"], self.box_loss_beta)
            losses[f"s{t}.loss_cls"], losses[f"s{t}.loss_box"] = w * loss_cls, w * loss_box
            if self.with_mask:  # the mask head trains on this stage's positive RoIs
                pos = [torch.where(lab > 0)[0] for lab in s["labels"]]
                pos_rois = [r[p] for r, p in zip(s["rois"], pos)]
                mask_logits = stage.mask_head(self.mask_roi_pool(features, pos_rois, image_shapes))  # (P, K, 28, 28)
                losses[f"s{t}.loss_mask"] = w * maskrcnn_loss(mask_logits, pos_rois, [tt["masks"] for tt in targets],
                                                               gt_labels, [m[p] for m, p in zip(s["matched"], pos)])
            if t + 1 < len(self.stages):  # refine: next stage's RoIs = these RoIs regressed, no gradient through
                with torch.no_grad():
                    boxes = stage.decode(deltas.detach(), s["rois"], image_shapes)
                rois = [b[~g] for b, g in zip(boxes, s["is_gt"])]  # the ground truths are re-added next stage
        return losses

    # ---- test: average the stages' class logits per proposal, last stage's boxes, average the stages' masks
    @torch.no_grad()
    def _detect(self, features, proposals, image_shapes) -> list[dict[str, torch.Tensor]]:
        rois, logits_sum = proposals, 0.0
        for stage in self.stages:
            class_logits, deltas = stage.box_predictor(stage.box_head(self.box_roi_pool(features, rois, image_shapes)))
            logits_sum = logits_sum + class_logits  # (R, K)
            rois = stage.decode(deltas, rois, image_shapes)  # refined boxes: next stage's input / final boxes
        result = self.postprocess_detections(logits_sum / len(self.stages), rois, image_shapes)
        if self.with_mask:
            mask_rois = [r["boxes"] for r in result]
            x = self.mask_roi_pool(features, mask_rois, image_shapes)  # (D, 256, 14, 14), D detections in all
            probs = sum(stage.mask_head(x).sigmoid() for stage in self.stages) / len(self.stages)  # (D, K, 28, 28)
            labels = torch.cat([r["labels"] for r in result])
            probs = probs[torch.arange(len(labels), device=labels.device), labels][:, None]  # (D, 1, 28, 28)
            for r, p in zip(result, probs.split([len(b) for b in mask_rois])):
                r["masks"] = p
        return result

    def postprocess_detections(self, class_logits: torch.Tensor, boxes: list[torch.Tensor],
                               image_shapes: list[tuple[int, int]]) -> list[dict[str, torch.Tensor]]:
        """Per image: every (RoI, foreground class) pair is a candidate with the RoI's (class-agnostic) box;
        keep score > score_thresh and non-empty boxes, NMS per class, the best detections_per_img.
        torchvision's RoIHeads.postprocess_detections with one box per RoI instead of one per class."""
        scores = F.softmax(class_logits, -1).split([len(b) for b in boxes])
        out = []
        for b, sc, shape in zip(boxes, scores, image_shapes):
            b = box_ops.clip_boxes_to_image(b, shape)  # (R, 4)
            R, K = sc.shape
            b = b[:, None].expand(R, K - 1, 4).reshape(-1, 4)  # (R * (K-1), 4): RoI-major, class-minor
            labels = torch.arange(1, K, device=sc.device).view(1, -1).expand(R, K - 1).reshape(-1)
            sc = sc[:, 1:].reshape(-1)  # background dropped
            keep = torch.where(sc > self.score_thresh)[0]
            b, sc, labels = b[keep], sc[keep], labels[keep]
            keep = box_ops.remove_small_boxes(b, min_size=1e-2)
            b, sc, labels = b[keep], sc[keep], labels[keep]
            keep = box_ops.batched_nms(b, sc, labels, self.nms_thresh)[: self.detections_per_img]
            out.append(dict(boxes=b[keep], labels=labels[keep], scores=sc[keep]))
        return out
