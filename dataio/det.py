"""
Detection / instance-segmentation data: COCO 2017 and a built-in synthetic instance set.

    train_ds, val_ds, classes = build_det_datasets("coco", "~/data/coco", img_size=800, max_size=1333)
    images, targets = det_collate(batch)          # lists: the detector pads the batch itself

Every dataset returns `(image, target)`: image a float tensor (3, h, w) in [0, 1] (the detector normalises),
target {boxes (G, 4) float xyxy in the image's pixels, labels (G,) int64 in 1..K (0 is background), masks
(G, h, w) uint8, image_id int, orig_size (H, W) before resizing}. `ds.coco` is the ground truth as a pycocotools
COCO object (for COCOeval), `ds.label_to_cat[label]` the COCO category id of a contiguous label.

Transforms (torchvision.transforms.v2, boxes and masks move with the image), as mmdetection's COCO pipeline:
training: horizontal flip 0.5, resize keeping the ratio so the shorter side is img_size unless the longer would
pass max_size (800 / 1333 on COCO); evaluation: the same resize, no flip. Predictions are mapped back to
orig_size by the detector, and scored there.

COCO (`ROOT/{train2017,val2017}/*.jpg`, `ROOT/annotations/instances_{train,val}2017.json`) is read with
torchvision.datasets.CocoDetection + wrap_dataset_for_transforms_v2. Annotation repairs, counted in
`ds.stats` (the scripts log them):
  - boxes reaching outside their image are clipped to it;
  - boxes under 1 pixel wide or high after clipping (zero area included) are dropped with their mask;
  - crowd annotations (iscrowd = 1) are not training targets (COCOeval still uses them to ignore detections);
  - training images left without a target are skipped (mmdetection's filter_empty_gt); validation keeps every
    image (COCOeval scores false positives on images without objects).
Refused by name before training: an annotation file without 'categories', with annotations of undefined category
ids, or listing images its folder does not hold. A COCO-format set under its own names: the train_ann / val_ann /
train_images / val_images keywords of build_det_datasets (coco_paths).

Synthetic (`--data synthetic`, no files): procedurally drawn scenes of 2-4 non-overlapping objects on a textured
background; the class (1..3) is the shape (rectangle, ellipse, triangle), each class with its own hue range, sizes
16-48 px; each object's box is its mask's extent. Deterministic per index and seed.
"""
import contextlib
import io
import json
import os

import numpy as np
import torch
from torch.utils.data import Dataset
from torchvision import tv_tensors
from torchvision.transforms import v2

DET_DATASETS = ("synthetic", "coco")
COCO_LAYOUT = ("ROOT/train2017/*.jpg, ROOT/val2017/*.jpg, ROOT/annotations/instances_train2017.json, "
               "ROOT/annotations/instances_val2017.json")
MIN_BOX_SIDE = 1.0  # boxes narrower or lower than this (pixels, after clipping) are dropped


def det_transforms(*, train: bool, img_size: int, max_size: int | None) -> v2.Compose:
    """PIL / uint8 image + tv_tensors targets -> float image in [0, 1], resized keeping the ratio (+ flip)."""
    t = [v2.ToImage()]
    if train:
        t.append(v2.RandomHorizontalFlip(0.5))
    t += [v2.Resize(img_size, max_size=max_size, antialias=True), v2.ToDtype(torch.float32, scale=True)]
    return v2.Compose(t)


def det_collate(batch):
    """[(image, target), ...] -> ([images], [targets]): images keep their sizes (the detector pads them)."""
    images, targets = zip(*batch)
    return list(images), list(targets)


def _plain_target(target: dict, orig_size: tuple[int, int]) -> dict:
    return dict(boxes=target["boxes"].as_subclass(torch.Tensor).float(), labels=target["labels"],
                masks=target["masks"].as_subclass(torch.Tensor).to(torch.uint8), image_id=int(target["image_id"]),
                orig_size=torch.tensor(orig_size))


# -----------------------------------------------------------------------------
# COCO

def clean_boxes(boxes_xywh: list, width: int, height: int) -> tuple[list[bool], int, int]:
    """Which COCO [x, y, w, h] boxes stay after clipping to the image; also (number clipped, number dropped)."""
    keep, clipped, dropped = [], 0, 0
    for x, y, w, h in boxes_xywh:
        x0, y0, x1, y1 = max(x, 0.0), max(y, 0.0), min(x + w, width), min(y + h, height)
        ok = x1 - x0 >= MIN_BOX_SIDE and y1 - y0 >= MIN_BOX_SIDE
        clipped += ok and (x0, y0, x1, y1) != (x, y, x + w, y + h)
        dropped += not ok
        keep.append(ok)
    return keep, clipped, dropped


def _check_coco(coco, ann_file: str, img_dir: str) -> None:
    """Refuse, naming the file and the fix, what would otherwise fail later inside pycocotools or the loader:
    no 'categories', annotations of unknown categories, images the file lists but the folder lacks."""
    data = coco.dataset
    for key in ("images", "annotations", "categories"):
        if not isinstance(data.get(key), list):
            what = "has no" if key not in data else "has a non-list"
            raise ValueError(f"{ann_file} {what} {key!r} list; a COCO instances file holds 'images', 'annotations' "
                             f"and 'categories' lists (as instances_val2017.json: categories = [{{\"id\": 1, "
                             f"\"name\": \"person\"}}, ...])")
    if not data["categories"]:
        raise ValueError(f"{ann_file} lists no categories; add them ([{{\"id\": 1, \"name\": \"person\"}}, ...])")
    unknown = sorted({a["category_id"] for a in data["annotations"]} - set(coco.cats))
    if unknown:
        raise ValueError(f"{ann_file}: annotations use category ids {unknown[:8]} that its 'categories' list does not "
                         f"define (defined: {sorted(coco.cats)[:8]}...); add them or remove those annotations")
    missing = [info["file_name"] for info in coco.imgs.values()
               if not os.path.isfile(os.path.join(img_dir, info["file_name"]))]
    if missing:
        raise FileNotFoundError(f"{ann_file} lists {len(missing)} image(s) of {len(coco.imgs)} that {img_dir} does "
                                f"not hold, e.g. {os.path.join(img_dir, missing[0])}; put the images there, point "
                                f"the image folder at them, or remove them from the file's 'images'")


class CocoInstances(Dataset):
    """COCO instances of one split through CocoDetection + wrap_dataset_for_transforms_v2.

    Args:
        img_dir: ROOT/train2017 or ROOT/val2017.
        ann_file: the split's instances_*.json.
        train: training split (crowd annotations dropped, images without targets skipped, flip).
        img_size, max_size: resize of the shorter side / cap of the longer side.
    """

    def __init__(self, *, img_dir: str, ann_file: str, train: bool, img_size: int, max_size: int | None) -> None:
        from torchvision.datasets import CocoDetection, wrap_dataset_for_transforms_v2
        try:
            with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its progress
                ds = CocoDetection(img_dir, ann_file)
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError, AssertionError) as e:
            raise ValueError(f"{ann_file} is not a COCO annotation file ({type(e).__name__}: {e}); it must be JSON "
                             f"with 'images', 'annotations' and 'categories' lists, as instances_val2017.json"
                             ) from None
        coco = ds.coco
        _check_coco(coco, ann_file, img_dir)
        self.coco, self.train = coco, train
        cats = sorted(coco.getCatIds())
        self.classes = [coco.cats[c]["name"] for c in cats]
        self.label_to_cat = [0] + cats  # contiguous label -> category id (label 0 = background)
        self.cat_to_label = {c: i + 1 for i, c in enumerate(cats)}
        stats = dict(images=len(ds.ids), boxes=0, clipped=0, dropped=0, crowd=0, skipped_images=0)
        kept_ids = []
        for img_id in ds.ids:
            info, anns = coco.imgs[img_id], coco.imgToAnns.get(img_id, [])
            crowd = [a for a in anns if a.get("iscrowd", 0)]
            boxes = [a["bbox"] for a in anns if not a.get("iscrowd", 0)]
            keep, clipped, dropped = clean_boxes(boxes, info["width"], info["height"])
            stats["boxes"] += len(boxes)
            stats["clipped"] += clipped
            stats["dropped"] += dropped
            stats["crowd"] += len(crowd)
            if train and not any(keep):
                stats["skipped_images"] += 1
            else:
                kept_ids.append(img_id)
        ds.ids = kept_ids
        self.stats = stats
        self.ds = wrap_dataset_for_transforms_v2(ds, target_keys=("image_id", "boxes", "labels", "masks", "iscrowd"))
        self.ids = kept_ids
        self.transform = det_transforms(train=train, img_size=img_size, max_size=max_size)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int):
        image, target = self.ds[i]
        w, h = image.size  # PIL
        if "boxes" not in target:  # an image without annotations (the wrapper then returns only the id)
            target = dict(image_id=target["image_id"], iscrowd=[],
                          boxes=tv_tensors.BoundingBoxes(torch.zeros(0, 4), format="XYXY", canvas_size=(h, w)),
                          labels=torch.zeros(0, dtype=torch.int64), masks=tv_tensors.Mask(torch.zeros(0, h, w)))
        b = target["boxes"].as_subclass(torch.Tensor)  # (G, 4) xyxy
        keep, _, _ = clean_boxes([[x0, y0, x1 - x0, y1 - y0] for x0, y0, x1, y1 in b.tolist()], w, h)
        keep = torch.tensor(keep, dtype=torch.bool) & ~torch.tensor(target["iscrowd"], dtype=torch.bool)
        boxes = b.clone()
        boxes[:, 0::2] = boxes[:, 0::2].clamp(0, w)
        boxes[:, 1::2] = boxes[:, 1::2].clamp(0, h)
        target = dict(image_id=target["image_id"],
                      boxes=tv_tensors.BoundingBoxes(boxes[keep], format="XYXY", canvas_size=(h, w)),
                      labels=torch.tensor([self.cat_to_label[int(c)] for c in target["labels"][keep]],
                                          dtype=torch.int64),
                      masks=tv_tensors.Mask(target["masks"][keep]))
        image, target = self.transform(image, target)
        return image, _plain_target(target, (h, w))


def coco_paths(root: str | None, *, train_ann: str | None = None, val_ann: str | None = None,
               train_images: str | None = None, val_images: str | None = None) -> dict[str, tuple[str, str]]:
    """{split: (image folder, annotation file)}: the COCO 2017 names under `root`, each replaced by the explicit
    path when given (a custom COCO-format set keeps its own names). FileNotFoundError names what is missing."""
    given = dict(train=(train_images, train_ann), val=(val_images, val_ann))
    if root is None and not all(p for pair in given.values() for p in pair):
        raise FileNotFoundError(f"COCO: no --data-root given; pass it (the standard layout {COCO_LAYOUT}) or all four "
                                f"of --train-images, --train-ann, --val-images and --val-ann")
    root = os.path.expanduser(root) if root is not None else None
    paths = {}
    for s, (images, ann) in given.items():
        paths[s] = (os.path.expanduser(images) if images else os.path.join(root, f"{s}2017"),
                    os.path.expanduser(ann) if ann else os.path.join(root, "annotations", f"instances_{s}2017.json"))
    missing = [p for d, a in paths.values() for p in (d, a) if not os.path.exists(p)]
    if missing:
        where = f"under --data-root {root} " if root is not None else ""
        raise FileNotFoundError(f"COCO not found {where}(missing {', '.join(missing)}); expected the standard layout "
                                f"{COCO_LAYOUT} (cocodataset.org/#download: 2017 train/val images and annotations), "
                                f"or explicit --train-images / --train-ann / --val-images / --val-ann paths")
    for s, (images, ann) in paths.items():
        if not os.path.isdir(images):
            raise FileNotFoundError(f"COCO {s} images: {images} is not a folder; pass the folder holding the images "
                                    f"its annotation file names")
        if os.path.isdir(ann):
            raise FileNotFoundError(f"COCO {s} annotations: {ann} is a folder; pass the JSON file (e.g. "
                                    f"{os.path.join(ann, f'instances_{s}2017.json')})")
    return paths


def build_coco(root: str | None, *, img_size: int, max_size: int | None, **explicit):
    """(train, val, class names) of a COCO-format set; `explicit`: coco_paths' keyword paths."""
    paths = coco_paths(root, **explicit)
    train = CocoInstances(img_dir=paths["train"][0], ann_file=paths["train"][1], train=True, img_size=img_size,
                          max_size=max_size)
    val = CocoInstances(img_dir=paths["val"][0], ann_file=paths["val"][1], train=False, img_size=img_size,
                        max_size=max_size)
    if train.classes != val.classes:
        raise ValueError(f"the train and val annotation files define different categories ({train.classes[:5]}... vs "
                         f"{val.classes[:5]}...); both must list the same 'categories'")
    return train, val, train.classes


# -----------------------------------------------------------------------------
# synthetic instances

SHAPES = ("rectangle", "ellipse", "triangle")


def _shape_mask(shape: str, h: int, w: int, rng: np.random.Generator) -> np.ndarray:
    """A (h, w) bool mask of the shape filling its h x w box."""
    yy, xx = np.mgrid[0:h, 0:w]
    if shape == "rectangle":
        return np.ones((h, w), dtype=bool)
    if shape == "ellipse":
        return ((yy + 0.5 - h / 2) / (h / 2)) ** 2 + ((xx + 0.5 - w / 2) / (w / 2)) ** 2 <= 1.0
    apex = rng.uniform(0.2, 0.8) * w  # triangle: apex on the top edge, base = the bottom edge
    left = apex * (1 - (yy + 0.5) / h)
    right = apex + (w - apex) * (yy + 0.5) / h
    return (xx + 0.5 >= left) & (xx + 0.5 <= right)


class SyntheticInstances(Dataset):
    """Procedural scenes with 2-4 objects each (box, class, mask); no files.

    Args:
        n: number of images.
        img_size: training / evaluation input side (the images are drawn at `size` and resized to it).
        train: random horizontal flip.
        size: side of the drawn images.
        seed: base seed (train and val use different ones).
    """

    classes = list(SHAPES)

    def __init__(self, *, n: int, img_size: int, train: bool, size: int = 128, seed: int = 0) -> None:
        self.n, self.size, self.seed, self.train = n, size, seed, train
        self.label_to_cat = list(range(len(SHAPES) + 1))  # category id = label
        self.stats = dict(images=n, boxes=0, clipped=0, dropped=0, crowd=0, skipped_images=0)
        self.transform = det_transforms(train=train, img_size=img_size, max_size=None)
        self._coco = None

    def __len__(self) -> int:
        return self.n

    def draw(self, i: int) -> tuple[np.ndarray, list[tuple[int, np.ndarray]]]:
        """Image i: uint8 (S, S, 3) and [(label, bool mask (S, S)), ...]."""
        rng = np.random.default_rng([self.seed, i])
        S = self.size
        yy, xx = np.mgrid[0:S, 0:S] / S
        base = rng.uniform(60, 190, size=3)
        grad = rng.uniform(-40, 40, size=(2, 3))
        img = base + yy[..., None] * grad[0] + xx[..., None] * grad[1] + rng.normal(0, 12, size=(S, S, 3))
        objects, boxes = [], []
        for _ in range(int(rng.integers(2, 5))):
            for _try in range(30):  # rejection sampling: boxes do not overlap, so every mask is whole
                h, w = rng.integers(16, 49, size=2)
                y0, x0 = int(rng.integers(0, S - h + 1)), int(rng.integers(0, S - w + 1))
                if all(y0 >= b[2] or y0 + h <= b[0] or x0 >= b[3] or x0 + w <= b[1] for b in boxes):
                    break
            else:
                continue
            label = int(rng.integers(1, len(SHAPES) + 1))
            m = np.zeros((S, S), dtype=bool)
            m[y0:y0 + h, x0:x0 + w] = _shape_mask(SHAPES[label - 1], int(h), int(w), rng)
            hue = (label - 1) / len(SHAPES) + rng.uniform(-0.08, 0.08)  # class hue +- jitter
            colour = 255 * (0.5 + 0.5 * np.cos(2 * np.pi * (hue + np.array([0, 1 / 3, 2 / 3]))))
            img[m] = colour * rng.uniform(0.7, 1.0) + rng.normal(0, 10, size=(int(m.sum()), 3))
            objects.append((label, m))
            boxes.append((y0, x0, y0 + h, x0 + w))
        return np.clip(img, 0, 255).astype(np.uint8), objects

    def target(self, objects, image_id: int) -> dict:
        masks = torch.from_numpy(np.stack([m for _, m in objects])).to(torch.uint8)  # (G, S, S)
        boxes = []
        for m in masks:  # the mask's extent, xyxy with exclusive right / bottom edges
            ys, xs = torch.where(m > 0)
            boxes.append([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])
        return dict(image_id=image_id, labels=torch.tensor([c for c, _ in objects], dtype=torch.int64),
                    boxes=tv_tensors.BoundingBoxes(torch.tensor(boxes, dtype=torch.float32), format="XYXY",
                                                   canvas_size=(self.size, self.size)),
                    masks=tv_tensors.Mask(masks))

    def __getitem__(self, i: int):
        img, objects = self.draw(i)
        image, target = self.transform(torch.from_numpy(img).permute(2, 0, 1).contiguous(), self.target(objects, i))
        return image, _plain_target(target, (self.size, self.size))

    @property
    def coco(self):
        """The ground truth as an in-memory pycocotools COCO object (drawn once, on first use)."""
        if self._coco is None:
            from pycocotools import mask as mask_utils
            from pycocotools.coco import COCO
            images, anns = [], []
            for i in range(self.n):
                _, objects = self.draw(i)
                images.append(dict(id=i, width=self.size, height=self.size))
                t = self.target(objects, i)
                for box, label, m in zip(t["boxes"].tolist(), t["labels"].tolist(), t["masks"]):
                    rle = mask_utils.encode(np.asfortranarray(m.numpy()))
                    rle["counts"] = rle["counts"].decode("ascii")
                    anns.append(dict(id=len(anns) + 1, image_id=i, category_id=label, iscrowd=0,
                                     area=float(m.sum()), segmentation=rle,
                                     bbox=[box[0], box[1], box[2] - box[0], box[3] - box[1]]))
            coco = COCO()
            coco.dataset = dict(images=images, annotations=anns,
                                categories=[dict(id=i + 1, name=s) for i, s in enumerate(SHAPES)])
            with contextlib.redirect_stdout(io.StringIO()):
                coco.createIndex()
            self._coco = coco
        return self._coco


def build_det_datasets(name: str, root: str | None = None, *, img_size: int, max_size: int | None = None,
                       synthetic_train: int = 256, synthetic_val: int = 64, seed: int = 0,
                       train_ann: str | None = None, val_ann: str | None = None, train_images: str | None = None,
                       val_images: str | None = None):
    """(train_ds, val_ds, class names). COCO: FileNotFoundError naming the layout when files are missing (or an
    image the annotation file lists), ValueError when an annotation file does not parse or lacks its categories.
    train_ann / val_ann / train_images / val_images: explicit paths of a COCO-format set, each replacing the 2017
    name under `root` (root may be None when all four are given)."""
    explicit = dict(train_ann=train_ann, val_ann=val_ann, train_images=train_images, val_images=val_images)
    if name == "coco":
        return build_coco(root, img_size=img_size, max_size=max_size, **explicit)
    if any(explicit.values()):
        raise ValueError(f"--train-ann / --val-ann / --train-images / --val-images are for --data coco, not {name!r}")
    if name == "synthetic":
        train = SyntheticInstances(n=synthetic_train, img_size=img_size, train=True, seed=seed)
        val = SyntheticInstances(n=synthetic_val, img_size=img_size, train=False, seed=seed + 1)
        return train, val, list(SHAPES)
    raise ValueError(f"unknown detection dataset {name!r}; choose one of {DET_DATASETS}")
