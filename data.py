"""
Classification data: the six fine-grained sets of PETAH, any ImageFolder, and an embedded synthetic set.

    train_ds, val_ds, test_ds, num_classes = build_datasets("cub", "~/data", img_size=224,
                                                            mean=model.data_cfg["mean"], std=model.data_cfg["std"])

Every dataset returns `(image, label)` with `image` a normalised float tensor (3, img_size, img_size) and `label`
an int. `val_ds` is the split evaluated every epoch: the official validation split where the dataset has one
(Aircraft, DTD, Food101's 50-per-class hold-out), otherwise the test split itself, as the paper reports test
accuracy for CUB, Cars and Pets (then `test_ds` is None). Class names are in `train_ds.classes`.

Your own images (`folder`): ROOT/train/<class>/ with ROOT/val/ and/or ROOT/test/, or ROOT/<class>/ (or train/
alone) split per class with `val_split` (stratified_split; split_record describes it); class names from
ROOT/classes.txt, ROOT/classes.json or `classes_file` (read_class_names) where a folder cannot hold them.
find_images lists what the predict tools read (files and folders, recursively; broken links reported).

Splits (PETAH, train/val/test): CUB 5994/-/5794, Cars 8144/-/8041, Pets 3680/-/3669, Aircraft 3334/3333/3333,
DTD 1880/1880/1880 (partition 1), Food101 70700/5050/25250.

Images are decoded with torchvision.io (JPEG/PNG/WebP/GIF) into uint8 tensors and transformed with
torchvision.transforms.v2: training = RandomResizedCrop + horizontal flip (+ RandAugment), evaluation =
Resize(floor(img_size / crop_pct)) + CenterCrop, both followed by Normalize(mean, std) of the backbone.
"""

import json
import math
import os
import warnings
from pathlib import Path

import torch
from torch.utils.data import Dataset
from torchvision.datasets import DTD, FGVCAircraft, Food101, OxfordIIITPet, StanfordCars
from torchvision.datasets.utils import download_and_extract_archive
from torchvision.io import ImageReadMode, decode_image
from torchvision.transforms import InterpolationMode, v2

from dataio.synthetic import (
    SyntheticImages,  # the procedural set (synthetic.py); `from data import SyntheticImages` works
)

DATASETS = ("synthetic", "cub", "cars", "pets", "aircraft", "dtd", "food101", "folder")
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".gif")  # what torchvision.io.decode_image reads
_UNSUPPORTED_EXTENSIONS = (".bmp", ".tif", ".tiff", ".ppm", ".pgm")

CUB_URL = "https://data.caltech.edu/records/65de6-vp158/files/CUB_200_2011.tgz"
CUB_MD5 = "97eceeb196236b17998738112f37df78"

# -----------------------------------------------------------------------------
# transforms


def _interp(name):
    modes = {"bicubic": InterpolationMode.BICUBIC, "bilinear": InterpolationMode.BILINEAR,
             "nearest": InterpolationMode.NEAREST}
    if name not in modes:
        raise ValueError(f"interpolation must be one of {sorted(modes)}, got {name!r}")
    return modes[name]


def build_transform(*, train, img_size, mean, std, randaug=False, crop_pct=0.95, interpolation="bicubic",
                    crop_scale=(0.08, 1.0)):
    """The classification transform for a uint8 (or float in [0, 1]) image tensor (3, H, W).

    Args:
        train: RandomResizedCrop(img_size, crop_scale) + horizontal flip (+ RandAugment) if True, else
            Resize(floor(img_size / crop_pct)) + CenterCrop(img_size), as timm evaluates.
        img_size: output side.
        mean, std: per-channel normalisation of the backbone's checkpoint (model.data_cfg).
        randaug: torchvision RandAugment (2 ops, magnitude 9) after the crop and flip (train only).
        crop_pct: centre-crop fraction at evaluation.
        interpolation: "bicubic", "bilinear" or "nearest".
        crop_scale: area range of RandomResizedCrop.
    """
    if not 0 < crop_pct <= 1:
        raise ValueError(f"crop_pct must be in (0, 1], got {crop_pct}")
    interp = _interp(interpolation)
    if train:
        ops = [v2.RandomResizedCrop(img_size, scale=crop_scale, interpolation=interp, antialias=True),
               v2.RandomHorizontalFlip()]
        if randaug:  # RandAugment's posterize/equalize want uint8; a no-op when the input already is uint8
            ops += [v2.ToDtype(torch.uint8, scale=True), v2.RandAugment(num_ops=2, magnitude=9)]
    else:
        ops = [v2.Resize(math.floor(img_size / crop_pct), interpolation=interp, antialias=True),
               v2.CenterCrop(img_size)]
    ops += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean=list(mean), std=list(std))]
    return v2.Compose(ops)


# -----------------------------------------------------------------------------
# image files on disk


class CorruptImageError(ValueError):
    """An image file that cannot be read or decoded, or (dataio.seg) a mask that cannot be used with its image:
    another size, values outside the classes. The scripts stop on it naming the file (or skip and count it)."""


def read_image(path):
    """Decode an image file into a uint8 RGB tensor (3, H, W); the error names the file.

    An animated GIF decodes to (frames, 3, H, W): its first frame is the image, as PIL's Image.open (and so
    torchvision's ImageFolder) reads it. A 16-bit PNG is scaled to 8 bits; grey, RGBA, palette and CMYK images
    come out as RGB (torchvision.io's RGB mode).
    """
    try:
        image = decode_image(str(path), mode=ImageReadMode.RGB)
    except (RuntimeError, OSError, ValueError) as e:
        raise CorruptImageError(
            f"cannot read image {path}: {e}. Replace or delete the file, or pass skip_corrupt=True "
            f"(--skip-corrupt) to skip unreadable images and count them.") from e
    if image.ndim == 4:  # (frames, 3, H, W): an animated GIF
        image = image[0]
    if image.dtype != torch.uint8:  # a 16-bit PNG decodes to uint16: to 8 bits, as every transform here expects
        image = v2.functional.to_dtype(image, torch.uint8, scale=True)
    return image


class ImageFiles(Dataset):
    """A list of (image path, label) pairs, decoded with torchvision.io and transformed.

    Unreadable files raise CorruptImageError naming the file. With `skip_corrupt=True` an unreadable file is
    instead marked in `bad`, a shared-memory bool tensor (so marks made inside DataLoader worker processes are
    seen by the main process, once per file however many epochs touch it), a warning names it, and the next
    readable sample is returned in its place. `num_skipped` and `skipped_files()` report them; a training
    script prints them after each epoch.

    Args:
        samples: list of (path, label).
        classes: class names, index = label.
        transform: applied to the uint8 image tensor (3, H, W).
        skip_corrupt: skip and count unreadable images instead of raising.
    """

    def __init__(self, samples, classes, *, transform=None, skip_corrupt=False):
        if len(samples) == 0:
            raise ValueError("ImageFiles got an empty sample list")
        self.samples = [(str(p), int(y)) for p, y in samples]
        self.targets = [y for _, y in self.samples]
        self.classes = list(classes)
        self.transform = transform
        self.skip_corrupt = skip_corrupt
        self.bad = torch.zeros(len(self.samples), dtype=torch.bool).share_memory_()

    def __len__(self):
        return len(self.samples)

    @property
    def num_skipped(self):
        return int(self.bad.sum())

    def skipped_files(self):
        return [self.samples[i][0] for i in self.bad.nonzero().flatten().tolist()]

    def __getitem__(self, index):
        n = len(self.samples)
        for k in range(n):
            i = (index + k) % n
            if self.bad[i]:
                continue
            path, label = self.samples[i]
            try:
                image = read_image(path)
            except CorruptImageError as e:
                if not self.skip_corrupt:
                    raise
                self.bad[i] = True
                warnings.warn(f"skipping unreadable image ({self.num_skipped} so far): {e.__cause__} [{path}]")
                continue
            if self.transform is not None:
                image = self.transform(image)
            return image, label
        raise CorruptImageError(f"every one of the {n} images is unreadable, e.g. {self.samples[0][0]}")


# -----------------------------------------------------------------------------
# the named datasets


def _missing(name, root, layout, download_hint):
    return FileNotFoundError(
        f"{name}: dataset not found under {root!s}. Expected layout:\n{layout}\n{download_hint}")


def _under(root, base):
    """root/base, or root itself when the user pointed at the dataset folder."""
    root = Path(os.path.expanduser(str(root)))
    if not (root / base).exists() and root.name == base:
        return root.parent
    return root


def _need_root(name, root, layout):
    if root is None:
        raise FileNotFoundError(f"{name}: no dataset root given (--data-root DIR). Expected layout:\n{layout}")


_LAYOUTS = {
    "cub": "  ROOT/CUB_200_2011/{images/<NNN.Class>/*.jpg, images.txt, image_class_labels.txt, "
           "train_test_split.txt, classes.txt}",
    "cars": "  ROOT/stanford_cars/{cars_train/, cars_test/, cars_test_annos_withlabels.mat, "
            "devkit/{cars_meta.mat, cars_train_annos.mat}} (torchvision StanfordCars; reading the .mat files "
            "needs scipy)",
    "pets": "  ROOT/oxford-iiit-pet/{images/*.jpg, annotations/{trainval,test}.txt}",
    "aircraft": "  ROOT/fgvc-aircraft-2013b/data/{images/*.jpg, variants.txt, images_variant_{train,val,test}.txt}",
    "dtd": "  ROOT/dtd/dtd/{images/<class>/*.jpg, labels/{train,val,test}1.txt}",
    "food101": "  ROOT/food-101/{images/<class>/*.jpg, meta/{train,test}.json}",
    "folder": "  ROOT/train/<class>/*.jpg and ROOT/val/<class>/*.jpg and/or ROOT/test/<class>/*.jpg, or (with "
              "--val-split) ROOT/<class>/*.jpg; optional ROOT/classes.txt ('FOLDER NAME' lines) or classes.json",
}


def _load_cub(root, download):
    layout = _LAYOUTS["cub"]
    _need_root("cub", root, layout)
    root = _under(root, "CUB_200_2011")
    base = root / "CUB_200_2011"
    needed = ["images.txt", "image_class_labels.txt", "train_test_split.txt", "classes.txt", "images"]
    if download and not all((base / f).exists() for f in needed):
        download_and_extract_archive(CUB_URL, download_root=str(root), filename="CUB_200_2011.tgz", md5=CUB_MD5)
    missing = [f for f in needed if not (base / f).exists()]
    if missing:
        raise _missing("cub", root, layout, f"Missing: {', '.join(missing)}. Pass --download (download=True) to "
                                            f"fetch it from {CUB_URL} (1.1 GB).")

    def table(name):
        with open(base / name) as f:
            return [line.split() for line in f if line.strip()]

    paths = {int(i): p for i, p in table("images.txt")}
    labels = {int(i): int(c) - 1 for i, c in table("image_class_labels.txt")}
    is_train = {int(i): t == "1" for i, t in table("train_test_split.txt")}
    classes = [name for _, name in sorted((int(i), name) for i, name in table("classes.txt"))]
    splits = {"train": [], "test": []}
    for i in sorted(paths):
        splits["train" if is_train[i] else "test"].append((base / "images" / paths[i], labels[i]))
    return splits, classes


# name -> torchvision class, its folder under ROOT, our split -> its split, extra kwargs, sub-folders it needs
_TORCHVISION = {
    "cars": (StanfordCars, "stanford_cars", {"train": "train", "test": "test"}, {}, ("devkit",)),
    "pets": (OxfordIIITPet, "oxford-iiit-pet", {"train": "trainval", "test": "test"},
             {"target_types": "category"}, ("images", "annotations")),
    "aircraft": (FGVCAircraft, "fgvc-aircraft-2013b", {"train": "train", "val": "val", "test": "test"},
                 {"annotation_level": "variant"}, ("data",)),
    "dtd": (DTD, "dtd", {"train": "train", "val": "val", "test": "test"}, {"partition": 1}, ("dtd",)),
    "food101": (Food101, "food-101", {"train": "train", "test": "test"}, {}, ("images", "meta")),
}


def _tv_samples(ds):
    """(path, label) pairs of a torchvision dataset, read from its private file lists (_samples / _images /
    _image_files and _labels, unchanged from 0.16 to at least 0.29). A release that renames them gets a clear error."""
    try:
        if isinstance(ds, StanfordCars):
            return [(p, y) for p, y in ds._samples]
        files = ds._images if isinstance(ds, OxfordIIITPet) else ds._image_files
        return list(zip(files, ds._labels))
    except AttributeError as e:
        import torchvision
        raise ImportError(
            f"torchvision {torchvision.__version__}'s {type(ds).__name__} no longer has the private file list data.py "
            f"reads ({e}): install an earlier torchvision (0.29 has it: pip install 'torchvision<0.30' with its "
            f"matching torch), or arrange the images as an ImageFolder and use --data folder"
        ) from None


def _load_torchvision(name, root, download):
    layout = _LAYOUTS[name]
    _need_root(name, root, layout)
    cls, base, split_names, kwargs, needed = _TORCHVISION[name]
    root = _under(root, base)
    if name == "cars" and download:
        raise ValueError("cars: Stanford Cars can no longer be downloaded (its URL is gone). Get the files "
                         f"elsewhere and arrange them as\n{layout}\nor as an ImageFolder and use --data folder.")
    if not all((root / base / d).is_dir() for d in needed) and not download:
        hint = ("--download cannot fetch Stanford Cars any more (its URL is gone): obtain the files yourself."
                if name == "cars" else "Pass --download (download=True) to fetch it with torchvision.")
        raise _missing(name, root, layout, hint)
    splits, classes = {}, None
    for ours, theirs in split_names.items():
        try:
            ds = cls(root, split=theirs, download=download, **kwargs)
        except RuntimeError as e:
            if "scipy" in str(e).lower():
                raise ImportError("cars: torchvision's StanfordCars reads its .mat annotations with scipy: "
                                  "pip install scipy (or use --data folder with an ImageFolder copy)") from e
            raise _missing(name, root, layout, f"torchvision said: {e}") from e
        splits[ours] = _tv_samples(ds)
        classes = classes or ds.classes  # the train split's (Pets derives its class list from each split)
    if name == "food101":  # val = the last 50 images of every class in the official train list
        per_class = {}
        for p, y in splits["train"]:
            per_class.setdefault(y, []).append((p, y))
        splits["train"] = [s for y in sorted(per_class) for s in per_class[y][:-50]]
        splits["val"] = [s for y in sorted(per_class) for s in per_class[y][-50:]]
    return splits, classes


def walk_images(folder):
    """(decodable image paths, paths in formats torchvision.io cannot read, broken links) under `folder`, sorted,
    recursively. Symbolic links to folders are followed once: a folder reached again (a link loop, or two links to
    one folder) is skipped with a warning naming it, so its images are not counted twice. A link whose target is
    gone is listed in the third list, not among the images."""
    images, unsupported, broken, seen = [], [], [], set()
    for dirpath, dirnames, files in os.walk(folder, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen:
            warnings.warn(f"folder: {dirpath} is a link to {real}, whose images are already read (a symbolic-link "
                          f"loop or a second link to one folder): skipping it")
            dirnames[:] = []
            continue
        seen.add(real)
        dirnames.sort()
        for f in sorted(files):
            ext = os.path.splitext(f)[1].lower()
            path = Path(dirpath) / f
            if ext in IMG_EXTENSIONS:
                (images if path.exists() else broken).append(path)
            elif ext in _UNSUPPORTED_EXTENSIONS:
                unsupported.append(path)
    return images, unsupported, broken


def find_images(items):
    """The images to predict on, as the predict tools read their --images: ([(path, name)], [(path, problem)]).

    Each item is an image file (name: its file name) or a folder, searched recursively (walk_images; name: the
    path relative to the folder). Broken links and files in formats torchvision.io cannot decode are returned as
    problems (the tools name them), not dropped silently. FileNotFoundError for an item that does not exist or a
    folder without images, ValueError for a file that is not an image."""
    found, problems = [], []
    for item in items:
        p = Path(item)
        if p.is_dir():
            images, unsupported, broken = walk_images(p)
            problems += [(q, "a broken symbolic link (its target does not exist)") for q in broken]
            problems += [(q, "a format torchvision.io cannot decode: convert it to PNG or JPEG") for q in unsupported]
            if not images and not problems:
                raise FileNotFoundError(f"{item}: the folder holds no {'/'.join(IMG_EXTENSIONS)} images")
            found += [(q, q.relative_to(p).as_posix()) for q in images]
        elif p.is_file():
            if p.suffix.lower() not in IMG_EXTENSIONS + _UNSUPPORTED_EXTENSIONS:
                raise ValueError(f"{item} is not an image file ({'/'.join(IMG_EXTENSIONS)})")
            found.append((p, p.name))
        elif p.is_symlink():
            problems.append((p, "a broken symbolic link (its target does not exist)"))
        else:
            raise FileNotFoundError(f"{item}: no such file or folder")
    return found, problems


def read_class_names(path, folders):
    """Display names of the class folders from a JSON map {"folder": "name"} or a classes.txt whose lines are
    `FOLDER NAME` (the folder, whitespace, the name: CUB's classes.txt form), for names a folder cannot hold
    (Fashion-MNIST's "T-shirt/top"). Every folder must be named; the labels keep the sorted folder order."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"class-name file {path} does not exist; give a JSON map {{\"folder\": \"name\"}} or a "
                                f"classes.txt of 'FOLDER NAME' lines")
    text = path.read_text(encoding="utf-8")
    if path.suffix.lower() == ".json":
        try:
            names = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"class-name file {path} is not valid JSON ({e}); write a map {{\"folder\": \"name\"}}"
                             ) from None
        if not isinstance(names, dict) or not all(isinstance(v, str) for v in names.values()):
            raise ValueError(f"class-name file {path} must hold a JSON object mapping folder -> name, e.g. "
                             f"{{\"0\": \"T-shirt/top\", \"1\": \"Trouser\"}}")
    else:
        names = {}
        for n, line in enumerate(text.splitlines(), 1):
            if line.strip():
                parts = line.strip().split(maxsplit=1)
                if len(parts) != 2:
                    raise ValueError(f"{path} line {n}: {line!r} is not 'FOLDER NAME' (the folder, a space, the name)")
                names[parts[0]] = parts[1].strip()
    missing = [f for f in folders if f not in names]
    if missing:
        raise ValueError(f"class-name file {path} names no class for the folder(s) {missing[:5]}; add a line (or "
                         f"key) for every class folder")
    return [names[f] for f in folders]


def stratified_split(labels, fraction, seed):
    """(train indices, val indices): `fraction` of each class's samples (rounded, at least 1 while the class keeps
    one for training) drawn for validation by a torch.Generator seeded with `seed`; sorted. Same labels, fraction
    and seed: the same split."""
    if not 0 < fraction < 1:
        raise ValueError(f"val_split must be a fraction in (0, 1), got {fraction}")
    g = torch.Generator().manual_seed(seed)
    by_class = {}
    for i, y in enumerate(labels):
        by_class.setdefault(y, []).append(i)
    train, val = [], []
    for y in sorted(by_class):
        idx = by_class[y]
        n_val = min(max(1, round(fraction * len(idx))), len(idx) - 1)  # 0 for a class of one sample
        order = torch.randperm(len(idx), generator=g).tolist()
        val += [idx[k] for k in order[:n_val]]
        train += [idx[k] for k in order[n_val:]]
    return sorted(train), sorted(val)


def split_record(train_ds, val_ds, *, root, val_split, seed):
    """The split of a --val-split run as a JSON-able dict (a script writes it into its output folder): the
    fraction, the seed and every image's path relative to `root`, per split."""
    rel = lambda ds: [os.path.relpath(p, root) for p, _ in ds.samples]  # noqa: E731
    return dict(root=str(root), val_split=val_split, seed=seed, classes=list(train_ds.classes),
                train=rel(train_ds), val=rel(val_ds))


def split_changes(saved: dict, now: dict) -> str | None:
    """What differs between two split records (split_record), in words, or None when the images, their split
    and the class list are the same. A --resume of a --val-split run checks its OUT/split.json with this: a folder
    that changed since the start would move images between train and val (a seeded split of other files)."""
    try:
        old = {p: "train" for p in saved["train"]} | {p: "val" for p in saved["val"]}
        classes = saved["classes"]
    except (KeyError, TypeError):
        return "its split.json is not a split record"
    new = {p: "train" for p in now["train"]} | {p: "val" for p in now["val"]}
    added, gone = sorted(new.keys() - old.keys()), sorted(old.keys() - new.keys())
    moved = sorted(p for p in old.keys() & new.keys() if old[p] != new[p])
    parts = [f"{len(v)} image(s) {what} (e.g. {v[0]})" for v, what in
             ((added, "added"), (gone, "gone"), (moved, "moved between train and val")) if v]
    if classes != now["classes"]:
        parts.append(f"the classes {classes} -> {now['classes']}")
    return "; ".join(parts) or None


def _class_folders(d):
    return sorted(e.name for e in d.iterdir() if e.is_dir() and not e.name.startswith("."))


def _check_trainable(root, split_dir, classes):
    """Every class needs an image torchvision.io can decode: an empty class folder would become a class the model
    can never learn (and would shift the labels of a later run that drops it)."""
    for c in classes:
        images, _, _ = walk_images(split_dir / c)
        if images:
            continue
        files = [f for _, _, fs in os.walk(split_dir / c, followlinks=True) for f in fs]
        other = sorted({os.path.splitext(f)[1].lower() for f in files if not f.startswith(".")})
        what = (f"only {', '.join(e or '(no extension)' for e in other)} files, which torchvision.io cannot "
                f"decode; convert them to PNG or JPEG" if other else "no files")
        raise ValueError(f"folder: class folder {split_dir / c} holds {what}. Every class needs training "
                         f"images ({'/'.join(IMG_EXTENSIONS)}): add some, or remove the folder to drop the class")


def _folder_samples(split_dir, index, layout):
    samples, skipped = [], []
    for c in _class_folders(split_dir):
        if c not in index:
            raise ValueError(f"folder: class {c!r} in {split_dir} is not among the training classes")
        images, unsupported, broken = walk_images(split_dir / c)
        samples += [(p, index[c]) for p in images]
        skipped += unsupported
        if broken:
            warnings.warn(f"folder: skipping {len(broken)} broken symbolic link(s) in {split_dir / c} (their targets "
                          f"do not exist), e.g. {broken[0]}")
    if skipped:
        warnings.warn(f"folder: ignoring {len(skipped)} images in {split_dir} in formats torchvision.io "
                      f"cannot decode (e.g. {skipped[0]}); convert them to PNG or JPEG")
    if not samples:
        raise _missing("folder", split_dir, layout, f"{split_dir} holds no {'/'.join(IMG_EXTENSIONS)} images.")
    return samples


def _load_folder(root, *, val_split=None, seed=0, classes_file=None):
    """Splits and class names of an ImageFolder set: ROOT/train/ + ROOT/val/ and/or ROOT/test/, or (with
    val_split) ROOT/<class>/ or ROOT/train/ alone, split per class."""
    layout = _LAYOUTS["folder"]
    _need_root("folder", root, layout)
    root = Path(os.path.expanduser(str(root)))
    hint = "(--download does not apply to --data folder.)"
    if not root.is_dir():
        raise _missing("folder", root, layout, hint)
    evals = [s for s in ("val", "test") if (root / s).is_dir()]
    train_dir = root / "train" if (root / "train").is_dir() else root
    if train_dir == root and (evals or not _class_folders(root)):
        raise _missing("folder", root, layout, "Found no train/ folder and no class folders. " + hint)
    if val_split is not None and evals:
        raise ValueError(f"folder: {root} has its own {' and '.join(s + '/' for s in evals)} split; drop val_split "
                         f"(--val-split), or move those images into the class folders")
    if val_split is None and not evals:
        found = "train/ but neither val/ nor test/" if train_dir != root else "class folders and no train/val split"
        raise _missing("folder", root, layout, f"Found {found}: pass val_split (--val-split 0.2) to hold out a "
                                               f"fraction of every class for validation. " + hint)
    folders = _class_folders(train_dir)
    if not folders:
        raise _missing("folder", root, layout, f"{train_dir} has no class folders. " + hint)
    _check_trainable(root, train_dir, folders)
    if classes_file is None:  # a map next to the class folders is picked up by itself
        classes_file = next((p for p in (root / "classes.json", root / "classes.txt") if p.is_file()), None)
    classes = read_class_names(classes_file, folders) if classes_file is not None else folders
    index = {c: i for i, c in enumerate(folders)}
    splits = {s: _folder_samples(train_dir if s == "train" else root / s, index, layout) for s in ["train"] + evals}
    if val_split is not None:
        samples = splits["train"]
        tr, va = stratified_split([y for _, y in samples], val_split, seed)
        splits = {"train": [samples[i] for i in tr], "val": [samples[i] for i in va]}
    counts = torch.bincount(torch.tensor([y for _, y in splits["train"]]), minlength=len(folders)).tolist()
    few = [f"{folders[k]} ({n})" for k, n in enumerate(counts) if n < 2]
    if few:
        warnings.warn(f"folder: {len(few)} class(es) have a single training image, e.g. {few[0]}"
                      + (": too few to also hold one out for validation, so it is used for training only"
                         if val_split is not None else ""))
    return splits, classes


def build_datasets(name, root=None, *, img_size=224, mean, std, randaug=False, download=False, crop_pct=0.95,
                   interpolation="bicubic", synthetic_cfg=None, skip_corrupt=False, val_split=None, split_seed=0,
                   classes_file=None):
    """Build (train_ds, val_ds, test_ds or None, num_classes) for a named dataset.

    Args:
        name: one of DATASETS.
        root: directory holding the dataset (layouts in _LAYOUTS; the dataset's own folder also works);
            unused for "synthetic".
        img_size: side of the square model input.
        mean, std: normalisation of the backbone's checkpoint (model.data_cfg["mean"], ["std"]).
        randaug: RandAugment on the training split.
        download: fetch the dataset if missing (CUB from CaltechDATA, pets/aircraft/dtd/food101 by torchvision;
            Stanford Cars has no source any more).
        crop_pct, interpolation: evaluation resize/crop (the backbone's data_cfg).
        synthetic_cfg: dict for "synthetic": num_classes (10), train_per_class (200), val_per_class (50),
            test_per_class (50), and any other SyntheticImages keyword (family, style, fine_grained, seed,
            max_rotation, noise). Images are rendered at img_size; training crops use scale (0.35, 1).
        skip_corrupt: skip and count unreadable images (see ImageFiles) instead of raising.
        val_split: "folder" only: hold out this fraction of every class (stratified_split, seeded by split_seed)
            as the validation split, for a root of class folders (or a train/ without val/ and test/);
            split_record(train_ds, val_ds, ...) describes the split for the run's output folder.
        split_seed: the seed of that split.
        classes_file: "folder" only: class names for the folders (read_class_names: a JSON map or 'FOLDER NAME'
            lines); ROOT/classes.json or ROOT/classes.txt is used when present and no file is given.

    Returns:
        train_ds, val_ds, test_ds (None when the evaluated split is the test split itself), num_classes.
        Class names: train_ds.classes.
    """
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
    tf = dict(img_size=img_size, mean=mean, std=std, crop_pct=crop_pct, interpolation=interpolation)
    if name != "folder" and (val_split is not None or classes_file is not None):
        raise ValueError(f"val_split (--val-split) and classes_file (--classes) are for --data folder, not {name!r}")

    if name == "synthetic":
        cfg = dict(synthetic_cfg or {})
        per = {s: cfg.pop(f"{s}_per_class", d) for s, d in (("train", 200), ("val", 50), ("test", 50))}
        cfg.setdefault("num_classes", 10)
        if "image_size" in cfg or "transform" in cfg or "split" in cfg:
            raise ValueError("synthetic_cfg may not set image_size/transform/split: use img_size and the splits")
        norm = v2.Normalize(mean=list(mean), std=list(std))
        train_tf = v2.Compose(
            [v2.RandomResizedCrop(img_size, scale=(0.35, 1.0), antialias=True), v2.RandomHorizontalFlip()]
            + ([v2.ToDtype(torch.uint8, scale=True), v2.RandAugment(num_ops=2, magnitude=9),
                v2.ToDtype(torch.float32, scale=True)] if randaug else [])
            + [norm])
        dss = [SyntheticImages(split=s, samples_per_class=per[s], image_size=img_size,
                               transform=train_tf if s == "train" else norm, **cfg)
               for s in ("train", "val", "test")]
        return dss[0], dss[1], dss[2], dss[0].num_classes

    if name == "cub":
        splits, classes = _load_cub(root, download)
    elif name == "folder":
        splits, classes = _load_folder(root, val_split=val_split, seed=split_seed, classes_file=classes_file)
    else:
        splits, classes = _load_torchvision(name, root, download)

    train_tf = build_transform(train=True, randaug=randaug, **tf)
    eval_tf = build_transform(train=False, **tf)
    make = lambda split, t: ImageFiles(splits[split], classes, transform=t, skip_corrupt=skip_corrupt)  # noqa
    train_ds = make("train", train_tf)
    if "val" in splits:
        val_ds = make("val", eval_tf)
        test_ds = make("test", eval_tf) if "test" in splits else None
    else:  # no official val split: evaluate on test (as the paper does for CUB, Cars, Pets)
        val_ds, test_ds = make("test", eval_tf), None
    return train_ds, val_ds, test_ds, len(classes)
