"""
COCO evaluation of detections and instance masks with pycocotools' COCOeval (iouType "bbox" and "segm").

    results = to_coco_results(outputs, image_ids, label_to_cat)    # one list per rank, then gathered
    metrics = coco_evaluate(ds.coco, results)                       # {"bbox_AP": ..., "segm_AP50": ..., ...}

AP is the mean over IoU thresholds 0.50:0.05:0.95 (AP50 / AP75 at one threshold), over the categories, of the
101-point interpolated precision; APs / APm / APl restrict it to objects of area < 32^2, 32^2-96^2, > 96^2 pixels.
A detection is {image_id, category_id (COCO id), bbox [x, y, w, h], score, segmentation (RLE of mask > 0.5)} in
the ORIGINAL image's pixels. The synthetic set is scored by the same code through its in-memory COCO object.

COCOeval rewrites the ground truth it is given IN PLACE (for "segm" every polygon becomes an RLE whose counts are
bytes, and every annotation gains an "ignore" key), and a dataset that reads its targets from the same COCO object
(torchvision's CocoDetection wrapper) then fails on its next read. `coco_evaluate` therefore scores against a
COCO object of its own, built from a deep copy of the annotations: evaluation never changes the data it scores.
"""
import contextlib
import copy
import io

import numpy as np
import torch

METRICS = ("AP", "AP50", "AP75", "APs", "APm", "APl")  # COCOeval.stats[0:6]
MASK_THRESHOLD = 0.5


def to_coco_results(outputs: list[dict[str, torch.Tensor]], image_ids: list[int], label_to_cat: list[int], *,
                    mask_threshold: float = MASK_THRESHOLD) -> list[dict]:
    """Detector outputs (boxes xyxy, labels, scores, masks (D, 1, H, W) probabilities) -> COCO result dicts."""
    from pycocotools import mask as mask_utils
    results = []
    for out, image_id in zip(outputs, image_ids):
        boxes = out["boxes"].detach().float().cpu()
        xywh = torch.cat([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], dim=1).tolist()
        scores, labels = out["scores"].tolist(), out["labels"].tolist()
        rles = [None] * len(scores)
        if "masks" in out and len(scores):
            binary = (out["masks"][:, 0] > mask_threshold).cpu().numpy().astype(np.uint8)  # (D, H, W)
            rles = mask_utils.encode(np.asfortranarray(binary.transpose(1, 2, 0)))  # column-major (H, W, D)
            for r in rles:
                r["counts"] = r["counts"].decode("ascii")  # JSON-able, and what COCO.loadRes expects
        for box, score, label, rle in zip(xywh, scores, labels, rles):
            r = dict(image_id=int(image_id), category_id=int(label_to_cat[label]), bbox=[round(v, 3) for v in box],
                     score=float(score))
            if rle is not None:
                r["segmentation"] = rle
            results.append(r)
    return results


def private_copy(coco_gt):
    """A new pycocotools COCO object over a deep copy of `coco_gt`'s annotations (images, annotations, categories),
    indexed afresh: what COCOeval may rewrite without touching the caller's dataset."""
    from pycocotools.coco import COCO
    gt = COCO()
    gt.dataset = copy.deepcopy(coco_gt.dataset)
    with contextlib.redirect_stdout(io.StringIO()):  # createIndex prints its progress
        gt.createIndex()
    return gt


def coco_evaluate(coco_gt, results: list[dict], *, iou_types=("bbox", "segm"), image_ids=None,
                  verbose: bool = False) -> dict[str, float]:
    """COCOeval of `results` against `coco_gt` for each iou type: {"<type>_<metric>": value in [0, 1]}.

    image_ids: the images to score (default: all of coco_gt's). No detections at all gives 0 everywhere
    (COCO.loadRes refuses an empty list). `coco_gt` is left unchanged (see the module docstring)."""
    from pycocotools.cocoeval import COCOeval
    metrics = {}
    coco_gt = private_copy(coco_gt) if results else coco_gt  # COCOeval writes into the ground truth it is given
    for iou_type in iou_types:
        res = [r for r in results if iou_type == "bbox" or "segmentation" in r]
        if not res:
            metrics.update({f"{iou_type}_{m}": 0.0 for m in METRICS})
            continue
        if iou_type == "bbox":  # loadRes derives box-type results from 'segmentation' when present: drop it
            res = [{k: v for k, v in r.items() if k != "segmentation"} for r in res]
        with contextlib.redirect_stdout(io.StringIO()) as log:
            dt = coco_gt.loadRes(copy.deepcopy(res))
            ev = COCOeval(coco_gt, dt, iou_type)
            if image_ids is not None:
                ev.params.imgIds = sorted(image_ids)
            ev.evaluate()
            ev.accumulate()
            ev.summarize()
        if verbose:
            print(log.getvalue())
        # -1 where COCOeval had nothing to score (e.g. APl when no object is larger than 96^2 pixels)
        metrics.update({f"{iou_type}_{m}": float(v) for m, v in zip(METRICS, ev.stats[:6])})
    return metrics


def trivial_results(coco_gt, *, image_ids=None) -> list[dict]:
    """A trivial predictor for comparison: per image, one whole-image box of every category with score 1 (and a
    whole-image mask). What a detector scores when it has learnt nothing about where the objects are."""
    from pycocotools import mask as mask_utils
    out = []
    for img_id in image_ids if image_ids is not None else coco_gt.getImgIds():
        info = coco_gt.imgs[img_id]
        h, w = info["height"], info["width"]
        rle = mask_utils.encode(np.asfortranarray(np.ones((h, w), dtype=np.uint8)))
        rle["counts"] = rle["counts"].decode("ascii")
        for cat in coco_gt.getCatIds():
            out.append(dict(image_id=img_id, category_id=cat, bbox=[0, 0, w, h], score=1.0, segmentation=rle))
    return out
