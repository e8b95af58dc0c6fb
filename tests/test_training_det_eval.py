"""training/det_eval.py: COCOeval numbers that follow from the geometry (not from this code's own output), and
evaluation that leaves the ground truth it scores unchanged (pycocotools rewrites it in place: issue 21)."""
import contextlib
import copy
import io
from pathlib import Path

import numpy as np
import torch

from dataio.det import SyntheticInstances
from training.det_eval import coco_evaluate, private_copy, to_coco_results, trivial_results

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "coco" / "annotations" / "instances_val2017.json"


# -----------------------------------------------------------------------------
# COCOeval numbers that follow from the geometry

def test_coco_eval_numbers_follow_the_overlap():
    ds = SyntheticInstances(n=8, img_size=128, train=False, seed=1)
    gt = [ds[i][1] for i in range(len(ds))]
    ids = [t["image_id"] for t in gt]

    def results(shift):  # every object found, its box and mask shifted right by `shift` of the box width
        outs = []
        for t in gt:
            b = t["boxes"].clone()
            d = (shift * (b[:, 2] - b[:, 0])).round()
            b[:, 0::2] += d[:, None]
            masks = torch.stack([torch.roll(m, int(s), dims=1) for m, s in zip(t["masks"], d)])[:, None].float()
            outs.append(dict(boxes=b, labels=t["labels"], scores=torch.ones(len(b)), masks=masks))
        return to_coco_results(outs, ids, ds.label_to_cat)

    perfect = coco_evaluate(ds.coco, results(0.0))
    assert perfect["bbox_AP"] == perfect["segm_AP"] == 1.0
    # a shift of 1/5 of the width: box IoU = 0.8 / 1.2 = 0.67 (+- rounding): a hit at IoU 0.5, a miss at 0.75
    m = coco_evaluate(ds.coco, results(0.2))
    assert m["bbox_AP50"] == 1.0 and m["bbox_AP75"] == 0.0
    # AP over 0.50:0.05:0.95: hits at the thresholds 0.50, 0.55, 0.60, 0.65 (box IoUs lie in [0.64, 0.70]), i.e. 3-4
    # of 10 thresholds
    assert 0.3 - 1e-9 <= m["bbox_AP"] <= 0.4 + 1e-9
    trivial = coco_evaluate(ds.coco, trivial_results(ds.coco))
    assert trivial["bbox_AP"] < 0.01 and trivial["segm_AP"] < 0.01  # whole-image boxes overlap no object enough
    assert coco_evaluate(ds.coco, []) == {f"{k}_{m}": 0.0 for k in ("bbox", "segm")
                                          for m in ("AP", "AP50", "AP75", "APs", "APm", "APl")}


def _fixture_results(coco):
    from pycocotools import mask as mask_utils
    out = []
    for a in coco.dataset["annotations"]:
        if not a["iscrowd"]:
            rle = mask_utils.encode(np.asfortranarray(coco.annToMask(a)))
            rle["counts"] = rle["counts"].decode("ascii")
            out.append(dict(image_id=a["image_id"], category_id=a["category_id"], bbox=list(a["bbox"]), score=0.9,
                            segmentation=rle))
    return out


def test_evaluation_leaves_the_ground_truth_unchanged():
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO(str(FIXTURE))  # polygons, crowd RLE with list counts, compressed RLE
    original = copy.deepcopy(coco.dataset)
    results = _fixture_results(coco)
    first = coco_evaluate(coco, results)
    assert coco.dataset == original and coco_evaluate(coco, results) == first  # unchanged, so the same numbers
    # what pycocotools does to the object it is given: polygons become RLEs with bytes counts, "ignore" keys appear
    with contextlib.redirect_stdout(io.StringIO()):
        ev = COCOeval(coco, coco.loadRes(copy.deepcopy(results)), "segm")
        ev.evaluate()
    assert coco.dataset != original
    assert any(isinstance(a["segmentation"], dict) and isinstance(a["segmentation"]["counts"], bytes)
               for a in coco.dataset["annotations"])
    copy_ = private_copy(coco)  # a copy shares nothing with its source
    copy_.dataset["annotations"][0]["bbox"][0] = -1.0
    assert coco.dataset["annotations"][0]["bbox"][0] != -1.0 and copy_.anns[copy_.dataset["annotations"][0]["id"]]
