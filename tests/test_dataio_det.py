"""dataio/det.py: the synthetic instance set, COCO through CocoDetection (a tiny COCO written here, and
tests/fixtures/coco in the released format), the annotation repairs, files that are refused by name, and the
dataset read for 2 epochs and 2 evaluations (COCOeval's in-place rewrite of the ground truth, issue 21).
COCOeval's numbers themselves: tests/test_training_det_eval.py."""
import contextlib
import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from torchvision.io import write_png

from dataio.det import SyntheticInstances, build_det_datasets, det_collate
from training.det_eval import coco_evaluate


def test_synthetic_targets_match_the_drawn_objects():
    ds = SyntheticInstances(n=6, img_size=128, train=False, seed=3)
    for i in range(len(ds)):
        image, t = ds[i]
        assert image.shape == (3, 128, 128) and image.dtype == torch.float32 and 0 <= image.min() <= image.max() <= 1
        assert 2 <= len(t["labels"]) <= 4 and set(t["labels"].tolist()) <= {1, 2, 3}
        for box, m in zip(t["boxes"], t["masks"]):  # each box is its mask's extent
            ys, xs = torch.where(m > 0)
            assert box.tolist() == [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]
            assert 16 <= box[2] - box[0] <= 48 and 16 <= box[3] - box[1] <= 48
        assert t["masks"].sum(0).max() <= 1  # objects do not overlap
    a, b = ds[2], SyntheticInstances(n=6, img_size=128, train=False, seed=3)[2]
    assert torch.equal(a[0], b[0]) and torch.equal(a[1]["boxes"], b[1]["boxes"])  # deterministic per index


def test_synthetic_flip_moves_boxes_and_masks_with_the_image():
    ds = SyntheticInstances(n=20, img_size=128, train=True, seed=0)
    ref = SyntheticInstances(n=20, img_size=128, train=False, seed=0)
    flipped = 0
    for i in range(len(ds)):
        torch.manual_seed(i)
        (x, t), (x0, t0) = ds[i], ref[i]
        if torch.equal(x, x0):
            assert torch.equal(t["boxes"], t0["boxes"])
            continue
        flipped += 1
        assert torch.equal(x, x0.flip(-1)) and torch.equal(t["masks"], t0["masks"].flip(-1))
        b = t0["boxes"]
        assert torch.equal(t["boxes"], torch.stack([128 - b[:, 2], b[:, 1], 128 - b[:, 0], b[:, 3]], 1))
    assert 0 < flipped < 20


def test_synthetic_resize_keeps_targets_aligned():
    ds = SyntheticInstances(n=2, img_size=64, train=False)
    x, t = ds[0]
    assert x.shape == (3, 64, 64) and t["masks"].shape[-2:] == (64, 64) and t["orig_size"].tolist() == [128, 128]
    _, t0 = SyntheticInstances(n=2, img_size=128, train=False)[0]
    torch.testing.assert_close(t["boxes"], t0["boxes"] / 2)


# -----------------------------------------------------------------------------
# a tiny COCO on disk

def write_coco(root, anns_val=None, *, bad_json=False):
    """Three 40x60 train images (one with no annotation) and two val images, COCO layout, category ids 3 and 7."""
    for split, n in (("train", 3), ("val", 2)):
        (root / f"{split}2017").mkdir(parents=True)
        for i in range(n):
            img = torch.full((3, 40, 60), 50 * i, dtype=torch.uint8)
            write_png(img, str(root / f"{split}2017" / f"{i:012d}.png"))
    (root / "annotations").mkdir()

    def poly(x, y, w, h):
        return [[x, y, x + w, y, x + w, y + h, x, y + h]]

    train = dict(
        images=[dict(id=i, file_name=f"{i:012d}.png", width=60, height=40) for i in range(3)],
        categories=[dict(id=3, name="cat"), dict(id=7, name="dog")],
        annotations=[
            dict(id=1, image_id=0, category_id=7, bbox=[10, 5, 20, 10], area=200, iscrowd=0,
                 segmentation=poly(10, 5, 20, 10)),
            dict(id=2, image_id=0, category_id=3, bbox=[50, 30, 20, 20], area=100, iscrowd=0,  # reaches outside: clip
                 segmentation=poly(50, 30, 10, 10)),
            dict(id=3, image_id=0, category_id=3, bbox=[5, 5, 0, 8], area=0, iscrowd=0, segmentation=poly(5, 5, 1, 8)),
            dict(id=4, image_id=1, category_id=3, bbox=[0, 0, 30, 30], area=900, iscrowd=1,  # crowd only: skipped
                 segmentation=poly(0, 0, 30, 30)),
        ])
    val = dict(images=[dict(id=i, file_name=f"{i:012d}.png", width=60, height=40) for i in range(2)],
               categories=train["categories"], annotations=anns_val or [])
    (root / "annotations" / "instances_train2017.json").write_text("{not json" if bad_json else json.dumps(train))
    (root / "annotations" / "instances_val2017.json").write_text(json.dumps(val))


def test_coco_repairs_are_counted_and_applied(tmp_path):
    write_coco(tmp_path)
    train, val, classes = build_det_datasets("coco", str(tmp_path), img_size=40, max_size=None)
    assert classes == ["cat", "dog"] and train.label_to_cat == [0, 3, 7]
    # 3 non-crowd boxes: 1 clipped (x 50..70 in a 60-wide image), 1 dropped (zero width); 1 crowd region;
    # image 1 (crowd only) and image 2 (no annotation) have no target left: skipped in training, kept in val
    assert train.stats == dict(images=3, boxes=3, clipped=1, dropped=1, crowd=1, skipped_images=2)
    assert len(train) == 1 and len(val) == 2
    torch.manual_seed(0)
    image, t = train[0]
    assert image.shape == (3, 40, 60)
    flipped = not torch.equal(t["masks"][0][5, 10:30], torch.ones(20, dtype=torch.uint8))
    boxes = torch.tensor([[10., 5., 30., 15.], [50., 30., 60., 40.]])  # dog, then the clipped cat
    if flipped:
        boxes = torch.stack([60 - boxes[:, 2], boxes[:, 1], 60 - boxes[:, 0], boxes[:, 3]], 1)
    torch.testing.assert_close(t["boxes"], boxes)
    assert t["labels"].tolist() == [2, 1] and t["masks"].shape == (2, 40, 60) and t["orig_size"].tolist() == [40, 60]
    _, t = val[1]  # a val image without annotations: empty targets of the right shapes
    assert t["boxes"].shape == (0, 4) and t["labels"].shape == (0,) and t["masks"].shape == (0, 40, 60)


def test_coco_resize_keeps_the_ratio_and_caps_the_long_side(tmp_path):
    write_coco(tmp_path)
    train, _, _ = build_det_datasets("coco", str(tmp_path), img_size=80, max_size=100)
    image, t = train[0]
    # short side 80 would make the long side 120 > 100: long side 100, short 40 * 100 / 60 = 66.7 (v2 rounds down)
    assert image.shape[-2:] == (66, 100)
    assert t["orig_size"].tolist() == [40, 60] and t["masks"].shape[-2:] == (66, 100)


def test_coco_missing_root_names_the_layout(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"train2017.*val2017.*instances_train2017\.json"):
        build_det_datasets("coco", str(tmp_path / "nowhere"), img_size=800, max_size=1333)


def test_coco_annotation_file_that_does_not_parse(tmp_path):
    write_coco(tmp_path, bad_json=True)
    with pytest.raises(ValueError, match=r"instances_train2017\.json is not a COCO annotation file"):
        build_det_datasets("coco", str(tmp_path), img_size=40, max_size=None)


# -----------------------------------------------------------------------------
# tests/fixtures/coco: files in the released COCO format (tests/fixtures/make_coco.py), read as training reads them

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "coco"
CAT_TO_LABEL = {1: 1, 3: 2, 18: 3}  # the fixture's category ids 1, 3, 18 -> contiguous labels


def fresh_coco(ann_file):
    from pycocotools.coco import COCO
    with contextlib.redirect_stdout(io.StringIO()):
        return COCO(str(ann_file))


def expected_targets(coco, image_id):
    """What a target must hold, from pycocotools' own reading of the JSON: non-crowd objects whose box clipped to
    the image is >= 1 px wide and high; boxes clipped; masks from COCO.annToMask (polygons, RLE)."""
    info = coco.imgs[image_id]
    boxes, labels, masks = [], [], []
    for a in coco.imgToAnns.get(image_id, []):
        x, y, w, h = a["bbox"]
        x0, y0, x1, y1 = max(x, 0), max(y, 0), min(x + w, info["width"]), min(y + h, info["height"])
        if a["iscrowd"] or x1 - x0 < 1 or y1 - y0 < 1:
            continue
        boxes.append([x0, y0, x1, y1])
        labels.append(CAT_TO_LABEL[a["category_id"]])
        masks.append(torch.from_numpy(coco.annToMask(a)))
    return boxes, labels, masks


def check_against_pycocotools(ds, coco):
    for i in range(len(ds)):
        image, t = ds[i]
        boxes, labels, masks = expected_targets(coco, t["image_id"])
        assert image.shape == (3, 96, 128)  # img_size 96 = the images' short side: no resize
        assert t["labels"].tolist() == labels
        assert t["boxes"].tolist() == boxes
        assert t["masks"].shape == (len(masks), 96, 128)
        for got, want in zip(t["masks"], masks):
            assert torch.equal(got, want.to(torch.uint8))  # per pixel


def gt_results(coco):
    """Every non-crowd object of the JSON but the zero-width box, as a detection with score 1: box and compressed-RLE
    mask exactly the ground truth's."""
    from pycocotools import mask as mask_utils
    out = []
    for a in coco.dataset["annotations"]:
        if a["iscrowd"] or a["bbox"][2] == 0:
            continue
        rle = mask_utils.encode(np.asfortranarray(coco.annToMask(a)))
        rle["counts"] = rle["counts"].decode("ascii")
        out.append(dict(image_id=a["image_id"], category_id=a["category_id"], bbox=list(a["bbox"]), score=1.0,
                        segmentation=rle))
    return out


def test_coco_fixture_two_epochs_and_two_evaluations_leave_the_data_unchanged():
    """The crash of issue 21: COCOeval rewrote the dataset's own polygons as bytes RLE, and the next read failed."""
    ann = FIXTURE / "annotations" / "instances_val2017.json"
    original = json.loads(ann.read_text())
    train, val, classes = build_det_datasets("coco", str(FIXTURE), img_size=96, max_size=None)
    assert classes == ["person", "car", "dog"] and val.label_to_cat == [0, 1, 3, 18]
    # val: 7 non-crowd boxes, the one reaching outside clipped, the zero-width one dropped; 1 crowd RLE region
    assert val.stats == dict(images=4, boxes=7, clipped=1, dropped=1, crowd=1, skipped_images=0) and len(val) == 4
    assert train.stats["skipped_images"] == 1 and len(train) == 3  # the image without annotations
    reference = fresh_coco(ann)
    loader = torch.utils.data.DataLoader(train, batch_size=2, collate_fn=det_collate)
    for epoch in range(2):
        torch.manual_seed(epoch)
        n = sum(len(images) for images, _ in loader)  # the training read, flips included
        assert n == 3
        check_against_pycocotools(val, reference)
        m = coco_evaluate(val.coco, gt_results(reference))
        # person and dog: every object found exactly (AP 1); car: 2 of its 3 objects (the third, zero-width, has no
        # detection), so precision 1 up to recall 2/3: 67 of COCO's 101 recall points (0, 0.01, ..., 0.66)
        want = (1 + 1 + 67 / 101) / 3
        assert m["bbox_AP"] == pytest.approx(want, abs=1e-12) and m["segm_AP"] == pytest.approx(want, abs=1e-12)
        assert val.coco.dataset == original  # evaluation changed nothing it scores
        assert train.coco.dataset == json.loads((FIXTURE / "annotations" / "instances_train2017.json").read_text())


@pytest.mark.parametrize("change, error, phrase", [
    (lambda d: d.pop("categories"), ValueError, r"has no 'categories' list"),
    (lambda d: d.update(categories=[]), ValueError, r"lists no categories"),
    (lambda d: d["annotations"][0].update(category_id=99), ValueError, r"category ids \[99\]"),
    (lambda d: d["images"].append(dict(d["images"][0], id=999, file_name="gone.jpg")), FileNotFoundError,
     r"lists 1 image\(s\) of 5 that .* does not hold, e.g. .*gone\.jpg"),
])
def test_coco_file_problems_are_named(tmp_path, change, error, phrase):
    """Issue 23, tracebacks 10 and 11: a COCO JSON listing a missing image, a COCO JSON without categories."""
    shutil.copytree(FIXTURE, tmp_path / "coco")
    ann = tmp_path / "coco" / "annotations" / "instances_val2017.json"
    data = json.loads(ann.read_text())
    change(data)
    ann.write_text(json.dumps(data))
    with pytest.raises(error, match=phrase):
        build_det_datasets("coco", str(tmp_path / "coco"), img_size=96, max_size=None)


def test_coco_explicit_paths_of_a_custom_set(tmp_path):
    custom = tmp_path / "my_set"
    shutil.copytree(FIXTURE / "train2017", custom / "pictures" / "a")
    shutil.copytree(FIXTURE / "val2017", custom / "pictures" / "b")
    shutil.copy(FIXTURE / "annotations" / "instances_train2017.json", custom / "train.json")
    shutil.copy(FIXTURE / "annotations" / "instances_val2017.json", custom / "val.json")
    paths = dict(train_images=str(custom / "pictures" / "a"), val_images=str(custom / "pictures" / "b"),
                 train_ann=str(custom / "train.json"), val_ann=str(custom / "val.json"))
    train, val, classes = build_det_datasets("coco", None, img_size=96, max_size=None, **paths)
    assert classes == ["person", "car", "dog"] and len(train) == 3 and len(val) == 4
    check_against_pycocotools(val, fresh_coco(custom / "val.json"))
    with pytest.raises(FileNotFoundError, match="no --data-root given.*--val-ann"):
        build_det_datasets("coco", None, img_size=96, max_size=None, train_ann=paths["train_ann"])
    # one explicit path, the rest from the standard names under the root
    shutil.copytree(FIXTURE, tmp_path / "coco")
    _, val, _ = build_det_datasets("coco", str(tmp_path / "coco"), img_size=96, max_size=None,
                                   val_ann=str(custom / "val.json"))
    assert len(val) == 4
    with pytest.raises(FileNotFoundError, match=r"missing .*nowhere\.json"):
        build_det_datasets("coco", str(tmp_path / "coco"), img_size=96, max_size=None, val_ann="nowhere.json")
    with pytest.raises(ValueError, match="are for --data coco"):
        build_det_datasets("synthetic", None, img_size=96, val_ann=str(custom / "val.json"))
