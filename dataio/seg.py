"""
Segmentation data: image folders with masks (UCC AI Quest vegetation), ADE20K, and the synthetic set.

    train_ds, val_ds, test_ds, num_classes = build_seg_datasets(
        "folder", "data/phase1", img_size=1024, mean=MEAN, std=STD, randaug=True)

The same contract as data.build_datasets; class names in `train_ds.classes` (also after train_on_val). Every
dataset returns `(image, mask)`: a normalised float tensor (3, h, w) and an int64 tensor (H, W) with class ids
in 0..num_classes-1 and IGNORE_INDEX (255) where there is no label (ADE20K's "other", padding). Binary sets
have num_classes = 2 (0 = background, 1 = foreground, e.g. high vegetation).

Two evaluation protocols:
  folder / synthetic (PETRAS)  training: random scale (shorter side = img_size * s, s ~ U(scale_range)), random
      crop img_size x img_size (padded with 0 / ignore), horizontal and vertical flips, RandAugment whose
      geometric ops (shear, translate, rotate) move the mask with the image (nearest neighbour, ignore filled
      in) and whose colour ops touch only the image. Evaluation: the longer side resized to img_size and
      padded to a square (image with the mean colour, mask with ignore): mask and image on that canvas.
  ade20k (mmsegmentation's ADE20K pipeline)  training: resize keeping the ratio to the scale
      (4 img_size, img_size) x r, r ~ U(scale_range) = U(0.5, 2), random img_size crop with cat_max_ratio 0.75,
      horizontal flip, photometric distortion, pad with ignore. Evaluation: the image resized keeping the ratio
      to fit (4 img_size, img_size) (short side 512 for ordinary photos at img_size 512), the mask at the
      ORIGINAL size: predictions are upsampled to it and scored there.

Binary folder masks: 0 = background, 1 or 255 = foreground (0/255 masks as image editors save them; one rule
for every file, so 255 never means foreground in one file and ignore in another); binary masks have no ignore
label. `SegFiles.masks_with_255` counts the masks read so (train_seg.py logs it). Masks of K > 2 classes: 255 is
the ignore label.

Also: `list_images(dir)` for prediction, `rle_encode` / `rle_decode` (the competition's run-length format:
1-based start/length pairs over the column-major flattened mask), `save_mask_png`.
"""
import math
import os
import warnings
from pathlib import Path

import torch
from torch.utils.data import ConcatDataset, Dataset
from torchvision.io import ImageReadMode, decode_image, encode_png
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from data import IMG_EXTENSIONS, CorruptImageError, read_image
from dataio.synthetic import SyntheticVegetation

SEG_DATASETS = ("folder", "ade20k", "synthetic")
IGNORE_INDEX = 255

# -----------------------------------------------------------------------------
# joint image + mask transforms (image uint8 (3, H, W), mask uint8 (H, W))

# RandAugment (Cubuk et al. 2020) as torchvision implements it: 2 ops, magnitude 9 of 31 bins.
_GEOMETRIC_OPS = ("ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate")
_COLOUR_OPS = ("Identity", "Brightness", "Color", "Contrast", "Sharpness", "Posterize", "Solarize", "AutoContrast",
               "Equalize")


def _affine_pair(image, mask, *, angle=0.0, translate=(0, 0), shear=(0.0, 0.0), center=None, ignore_index):
    """One affine warp applied to both: bilinear for the image (fill 0), nearest for the mask (fill ignore)."""
    kw = dict(angle=angle, translate=list(translate), scale=1.0, shear=list(shear), center=center)
    image = TF.affine(image, interpolation=InterpolationMode.BILINEAR, fill=0, **kw)
    mask = TF.affine(mask[None], interpolation=InterpolationMode.NEAREST, fill=ignore_index, **kw)[0]
    return image, mask


def rand_augment_pair(image, mask, *, num_ops=2, magnitude=9, num_bins=31, ignore_index=IGNORE_INDEX,
                      ops=_GEOMETRIC_OPS + _COLOUR_OPS):
    """RandAugment on an (image, mask) pair: geometric ops move both, colour ops change only the image.

    Args:
        image: uint8 (3, H, W). mask: uint8 (H, W).
        num_ops, magnitude, num_bins: as torchvision.transforms.RandAugment (14 ops, each drawn uniformly).
        ignore_index: mask value for pixels that come from outside the image.
        ops: the op names to draw from (default: all of RandAugment's).
    """
    H, W = mask.shape
    m = magnitude / (num_bins - 1)  # fraction of each op's maximum
    unknown = set(ops) - set(_GEOMETRIC_OPS + _COLOUR_OPS)
    if unknown:
        raise ValueError(f"unknown RandAugment ops {sorted(unknown)}; known: {_GEOMETRIC_OPS + _COLOUR_OPS}")
    for _ in range(num_ops):
        op = ops[int(torch.randint(len(ops), ()))]
        sign = -1.0 if torch.rand(()) < 0.5 else 1.0
        if op == "ShearX":
            shear = math.degrees(math.atan(0.3 * m)) * sign
            image, mask = _affine_pair(image, mask, shear=(shear, 0.0), center=[0, 0], ignore_index=ignore_index)
        elif op == "ShearY":
            shear = math.degrees(math.atan(0.3 * m)) * sign
            image, mask = _affine_pair(image, mask, shear=(0.0, shear), center=[0, 0], ignore_index=ignore_index)
        elif op == "TranslateX":
            image, mask = _affine_pair(image, mask, translate=(int(150 / 331 * W * m * sign), 0),
                                       ignore_index=ignore_index)
        elif op == "TranslateY":
            image, mask = _affine_pair(image, mask, translate=(0, int(150 / 331 * H * m * sign)),
                                       ignore_index=ignore_index)
        elif op == "Rotate":
            image, mask = _affine_pair(image, mask, angle=30.0 * m * sign, ignore_index=ignore_index)
        elif op == "Brightness":
            image = TF.adjust_brightness(image, 1.0 + 0.9 * m * sign)
        elif op == "Color":
            image = TF.adjust_saturation(image, 1.0 + 0.9 * m * sign)
        elif op == "Contrast":
            image = TF.adjust_contrast(image, 1.0 + 0.9 * m * sign)
        elif op == "Sharpness":
            image = TF.adjust_sharpness(image, 1.0 + 0.9 * m * sign)
        elif op == "Posterize":
            image = TF.posterize(image, int(round(8 - 4 * m)))
        elif op == "Solarize":
            image = TF.solarize(image, 255.0 * (1.0 - m))
        elif op == "AutoContrast":
            image = TF.autocontrast(image)
        elif op == "Equalize":
            image = TF.equalize(image)
    return image, mask


def scale_saturation(image, a):
    """Multiply the HSV saturation of a (3, H, W) image in [0, 1] by `a` (clipped to [0, 1]), hue and value kept.
    With V = max(r, g, b) and S = (V - min) / V, a channel c at distance V - c from the top moves to V - (V - c) k,
    k = S' / S: the max stays (V), the min lands at V (1 - S'), the middle one keeps its place between (the hue)."""
    v = image.amax(dim=0, keepdim=True)  # (1, H, W)
    s = (v - image.amin(dim=0, keepdim=True)) / v.clamp_min(1e-12)
    k = torch.where(s > 0, (a * s).clamp(0, 1) / s.clamp_min(1e-12), torch.zeros_like(s))
    return v - (v - image) * k


def photometric(image, *, brightness=None, contrast=None, saturation=None, hue=None, contrast_last=False):
    """The steps of mmsegmentation's PhotoMetricDistortion on a (3, H, W) image in [0, 1]; None skips a step.
    brightness: added (in 0-255 units / 255); contrast: multiplies every value (mmseg's `img * alpha`, not a blend
    with the mean); saturation: multiplies HSV S; hue: added to HSV H in OpenCV's uint8 units (180 per turn, so one
    unit is 2 degrees); contrast comes second, or last with contrast_last. Clipped to [0, 1] after every step."""
    if brightness is not None:
        image = (image + brightness / 255).clamp(0, 1)
    if contrast is not None and not contrast_last:
        image = (image * contrast).clamp(0, 1)
    if saturation is not None:
        image = scale_saturation(image, saturation).clamp(0, 1)
    if hue is not None:
        image = TF.adjust_hue(image, hue / 180).clamp(0, 1)  # hue / 180 of a turn
    if contrast is not None and contrast_last:
        image = (image * contrast).clamp(0, 1)
    return image


def photometric_distortion(image):
    """mmsegmentation's PhotoMetricDistortion (the ADE20K training recipe) on a (3, H, W) image in [0, 1]: each
    step with probability 1/2: brightness + U(-32, 32), contrast x U(0.5, 1.5), saturation x U(0.5, 1.5), hue +
    randint(-18, 18) OpenCV units (+-36 degrees); contrast second or last (p 1/2). See `photometric`."""
    r = torch.rand(9).tolist()
    pick = lambda i, v: v if r[i] < 0.5 else None  # noqa: E731
    return photometric(image, brightness=pick(0, (2 * r[1] - 1) * 32), contrast=pick(2, 0.5 + r[3]),
                       saturation=pick(4, 0.5 + r[5]), hue=pick(6, int(r[7] * 37) - 18), contrast_last=r[8] < 0.5)


def _resize_pair(image, mask, h, w):
    """Resize both to (h, w): bilinear (antialiased) for the image, nearest for the mask. NEAREST_EXACT samples at
    pixel centres like the bilinear resize; plain NEAREST (floor) shifts the mask by up to half a pixel."""
    image = TF.resize(image, [h, w], interpolation=InterpolationMode.BILINEAR, antialias=True)
    mask = TF.resize(mask[None], [h, w], interpolation=InterpolationMode.NEAREST_EXACT)[0]
    return image, mask


def _augment_and_normalise(t, image, mask):
    """The training steps after the crop, in this order: flips (t.hflip, t.vflip, p = 0.5 each), joint RandAugment
    (t.randaug), to float, photometric distortion (t.photometric), normalisation (t.mean, t.std)."""
    if t.hflip and torch.rand(()) < 0.5:
        image, mask = image.flip(-1), mask.flip(-1)
    if t.vflip and torch.rand(()) < 0.5:
        image, mask = image.flip(-2), mask.flip(-2)
    if t.randaug:
        image, mask = rand_augment_pair(image, mask, ignore_index=t.ignore_index)
    image = TF.to_dtype(image, torch.float32, scale=True)
    if t.photometric:
        image = photometric_distortion(image)
    return (image - t.mean) / t.std, mask


class SegTransform:
    """Joint transform: (uint8 image (3, H, W), uint8 mask (H, W)) -> (float image (3, S, S), int64 mask (S, S)).

    Args:
        train: random scale + crop + flips (+ RandAugment, photometric distortion) if True; else the longer side
            resized to img_size and padded to a square.
        img_size: output side S.
        mean, std: image normalisation (in [0, 1] units).
        scale_range: range of the random scale s; the shorter side becomes img_size * s before cropping.
        hflip, vflip: random horizontal / vertical flips (p = 0.5 each).
        randaug: joint RandAugment (2 ops, magnitude 9).
        photometric: photometric distortion (image only).
        ignore_index: mask value for padding and pixels moved in from outside the image.
    """

    def __init__(self, *, train, img_size, mean, std, scale_range=(0.5, 2.0), hflip=True, vflip=False,
                 randaug=False, photometric=False, ignore_index=IGNORE_INDEX):
        if not 0 < scale_range[0] <= scale_range[1]:
            raise ValueError(f"scale_range must be (low, high) with 0 < low <= high, got {scale_range}")
        self.train, self.img_size, self.scale_range = train, img_size, tuple(scale_range)
        self.mean = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
        self.hflip, self.vflip, self.randaug, self.photometric = hflip, vflip, randaug, photometric
        self.ignore_index = ignore_index

    def __call__(self, image, mask):
        S = self.img_size
        H, W = mask.shape
        if self.train:
            s = self.scale_range[0] + (self.scale_range[1] - self.scale_range[0]) * float(torch.rand(()))
            f = S * s / min(H, W)
            image, mask = _resize_pair(image, mask, max(1, round(H * f)), max(1, round(W * f)))
            H, W = mask.shape
            if H < S or W < S:  # pad bottom/right: black image, ignored mask
                image = TF.pad(image, [0, 0, max(0, S - W), max(0, S - H)], fill=0)
                mask = TF.pad(mask[None], [0, 0, max(0, S - W), max(0, S - H)], fill=self.ignore_index)[0]
                H, W = mask.shape
            y0, x0 = int(torch.randint(H - S + 1, ())), int(torch.randint(W - S + 1, ()))
            image, mask = image[:, y0:y0 + S, x0:x0 + S], mask[y0:y0 + S, x0:x0 + S]
            image, mask = _augment_and_normalise(self, image, mask)
        else:
            f = S / max(H, W)
            h, w = max(1, round(H * f)), max(1, round(W * f))
            if (h, w) != (H, W):
                image, mask = _resize_pair(image, mask, h, w)
            image = (TF.to_dtype(image, torch.float32, scale=True) - self.mean) / self.std
            # pad after normalising: 0 = the mean colour
            image = TF.pad(image, [0, 0, S - w, S - h], fill=0.0)
            mask = TF.pad(mask[None], [0, 0, S - w, S - h], fill=self.ignore_index)[0]
        return image.contiguous(), mask.long()


def _draw_crop(H, W, S):
    y0, x0 = int(torch.randint(max(H - S, 0) + 1, ())), int(torch.randint(max(W - S, 0) + 1, ()))
    return y0, x0


class AdeTrainTransform:
    """mmsegmentation's ADE20K training pipeline on (uint8 image (3, H, W), uint8 mask (H, W)).

    1. resize keeping the aspect ratio to the scale (long, short) = (4 S, S) x r, r ~ U(ratio_range):
       factor f = min(4 S r / max(H, W), S r / min(H, W));
    2. random S x S crop (smaller where the image is smaller); while one class covers more than cat_max_ratio of
       the crop's labelled pixels, draw another crop, at most 10 times (mmseg's RandomCrop);
    3. horizontal flip (p = 0.5), optional RandAugment, photometric distortion, normalise;
    4. pad to S x S: image 0 (after normalising: the mean colour), mask ignore_index.

    Args:
        img_size: crop side S (512 for ADE20K).
        mean, std: image normalisation (in [0, 1] units).
        ratio_range: range of the random scale ratio r.
        cat_max_ratio: largest share of one class in a crop (1 = no re-drawing).
        randaug: joint RandAugment after the flip.
        photometric: photometric distortion.
        ignore_index: the mask's padding value.
    """

    def __init__(self, *, img_size, mean, std, ratio_range=(0.5, 2.0), cat_max_ratio=0.75, randaug=False,
                 photometric=True, ignore_index=IGNORE_INDEX):
        if not 0 < ratio_range[0] <= ratio_range[1]:
            raise ValueError(f"ratio_range must be (low, high) with 0 < low <= high, got {ratio_range}")
        self.img_size, self.ratio_range, self.cat_max_ratio = img_size, tuple(ratio_range), cat_max_ratio
        self.mean = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
        self.hflip, self.vflip, self.randaug, self.photometric = True, False, randaug, photometric
        self.ignore_index = ignore_index

    def crop_ok(self, crop):
        """True when no class covers more than cat_max_ratio of the crop's labelled pixels (and > 1 class)."""
        _, counts = crop[crop != self.ignore_index].unique(return_counts=True)
        return len(counts) > 1 and counts.max() / counts.sum() < self.cat_max_ratio

    def __call__(self, image, mask):
        S = self.img_size
        H, W = mask.shape
        r = self.ratio_range[0] + (self.ratio_range[1] - self.ratio_range[0]) * float(torch.rand(()))
        f = min(int(4 * S * r) / max(H, W), int(S * r) / min(H, W))  # mmseg truncates the scale to pixels
        h, w = max(1, int(H * f + 0.5)), max(1, int(W * f + 0.5))
        image, mask = _resize_pair(image, mask, h, w)
        y0, x0 = _draw_crop(h, w, S)
        if self.cat_max_ratio < 1:
            for _ in range(10):
                if self.crop_ok(mask[y0:y0 + S, x0:x0 + S]):
                    break
                y0, x0 = _draw_crop(h, w, S)
        image, mask = image[:, y0:y0 + S, x0:x0 + S], mask[y0:y0 + S, x0:x0 + S]
        image, mask = _augment_and_normalise(self, image, mask)
        h, w = mask.shape
        image = TF.pad(image, [0, 0, S - w, S - h], fill=0.0)  # (3, S, S)
        mask = TF.pad(mask[None], [0, 0, S - w, S - h], fill=self.ignore_index)[0]  # (S, S)
        return image.contiguous(), mask.long()


class AdeEvalTransform:
    """mmsegmentation's ADE20K test pipeline: the image resized keeping its ratio to fit the scale (4 S, S)
    (f = min(4 S / max(H, W), S / min(H, W))) and normalised; the mask stays at the ORIGINAL size, where the
    prediction is scored. Returns (float image (3, h, w), int64 mask (H, W)).

    Args:
        img_size: S (512 for ADE20K: short side 512 unless the long side would exceed 2048).
        mean, std: image normalisation (in [0, 1] units).
    """

    def __init__(self, *, img_size, mean, std):
        self.img_size = img_size
        self.mean = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)

    def __call__(self, image, mask):
        H, W = image.shape[-2:]
        f = min(4 * self.img_size / max(H, W), self.img_size / min(H, W))
        h, w = max(1, int(H * f + 0.5)), max(1, int(W * f + 0.5))
        if (h, w) != (H, W):
            image = TF.resize(image, [h, w], interpolation=InterpolationMode.BILINEAR, antialias=True)
        image = (TF.to_dtype(image, torch.float32, scale=True) - self.mean) / self.std
        return image.contiguous(), mask.long()


# -----------------------------------------------------------------------------
# masks, run-length encoding


def read_mask(path):
    """A single-channel label PNG as a uint8 tensor (H, W) (palette PNGs give their indices)."""
    try:
        mask = decode_image(str(path), mode=ImageReadMode.UNCHANGED)
    except (RuntimeError, OSError, ValueError) as e:
        raise CorruptImageError(f"cannot read mask {path}: {e}") from e
    if mask.dtype != torch.uint8:
        raise ValueError(f"mask {path} is {mask.dtype}; expected an 8-bit single-channel PNG")
    if mask.shape[0] != 1:  # RGB(A) mask: accept only if the colour channels are equal (a grey image)
        if mask.shape[0] in (3, 4) and bool((mask[0] == mask[1]).all() and (mask[0] == mask[2]).all()):
            warnings.warn(f"mask {path} is stored with {mask.shape[0]} equal colour channels: read as its first "
                          f"channel (save masks as single-channel PNGs to skip this)")
            return mask[0]
        raise ValueError(f"mask {path} has {mask.shape[0]} channels; expected a single-channel PNG of class ids")
    return mask[0]


def _to_numpy_or_tensor_2d(mask):
    mask = torch.as_tensor(mask)
    if mask.dim() != 2:
        raise ValueError(f"expected a 2-d mask (H, W), got shape {tuple(mask.shape)}")
    return mask


def rle_encode(mask):
    """Run-length encoding of the foreground (mask != 0) as in the competition's submission JSON.

    Pixels are numbered 1..H*W down each column first (column-major); the result is [start, length, start,
    length, ...] of the foreground runs. Accepts a (H, W) tensor or numpy array.
    """
    mask = _to_numpy_or_tensor_2d(mask)
    flat = (mask != 0).t().reshape(-1).to(torch.int8)  # (W*H,) column-major
    edges = torch.diff(flat, prepend=flat.new_zeros(1), append=flat.new_zeros(1))  # +1 at run starts, -1 after ends
    starts = (edges == 1).nonzero().flatten() + 1  # 1-based
    ends = (edges == -1).nonzero().flatten() + 1  # 1-based index one past the run
    return torch.stack([starts, ends - starts], 1).flatten().tolist()


def rle_decode(rle, shape):
    """Inverse of rle_encode: a uint8 tensor of `shape` (H, W) with 1 on the encoded runs, 0 elsewhere."""
    H, W = shape
    rle = [int(x) for x in rle]
    if len(rle) % 2:
        raise ValueError(f"run-length list has odd length {len(rle)}; expected start/length pairs")
    flat = torch.zeros(H * W, dtype=torch.uint8)
    for start, length in zip(rle[0::2], rle[1::2]):
        if start < 1 or length < 0 or start - 1 + length > H * W:
            raise ValueError(f"run (start={start}, length={length}) lies outside a {H}x{W} mask (1-based starts)")
        flat[start - 1:start - 1 + length] = 1
    return flat.view(W, H).t().contiguous()  # column-major back to (H, W)


def encode_mask_png(mask, *, scale=1):
    """The bytes of a (H, W) mask of class ids as a single-channel 8-bit PNG (scale=255 makes a binary mask
    visible)."""
    mask = _to_numpy_or_tensor_2d(mask).long() * scale
    if mask.min() < 0 or mask.max() > 255:
        raise ValueError(f"mask values must lie in 0..255 after scaling, got {int(mask.min())}..{int(mask.max())}")
    return encode_png(mask.to(torch.uint8)[None]).numpy().tobytes()


def save_mask_png(mask, path, *, scale=1):
    """Write encode_mask_png(mask, scale=scale) to `path` (the parent folder is created)."""
    data = encode_mask_png(mask, scale=scale)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_bytes(data)


def mask_names(names):
    """Output file names of the masks of images named `names` (paths relative to what was given, unique): the
    name with its extension replaced by .png, where no other image gets that name; else (x.jpg and x.png in one
    folder) the whole name + .png (x.jpg.png, x.png.png). Distinct names always give distinct outputs."""
    stems = [str(Path(n).with_suffix(".png")) for n in names]
    count = {}
    for s in stems:
        count[s] = count.get(s, 0) + 1
    out = [s if count[s] == 1 else f"{n}.png" for n, s in zip(names, stems)]
    if len(set(out)) != len(out):  # e.g. x.jpg.jpeg next to x.jpg and x.png: every name in full
        out = [f"{n}.png" for n in names]
    return out


def list_images(directory):
    """Sorted image files (jpg/jpeg/png/webp/gif) directly inside `directory`."""
    directory = Path(directory)
    if directory.is_file():
        raise FileNotFoundError(f"{directory} is a file, not a folder of images")
    if not directory.is_dir():
        raise FileNotFoundError(f"image directory {directory} does not exist")
    files = sorted(p for p in directory.iterdir() if p.is_file() and p.suffix.lower() in IMG_EXTENSIONS)
    if not files:
        raise ValueError(f"{directory} holds no {'/'.join(IMG_EXTENSIONS)} images")
    return files


# -----------------------------------------------------------------------------
# datasets on disk


class SegFiles(Dataset):
    """(image, mask) file pairs, decoded with torchvision.io, mapped to class ids and jointly transformed.

    Args:
        pairs: list of (image path, mask path).
        num_classes: valid class ids are 0..num_classes-1 (plus ignore_index).
        classes: class names (index = class id); default "class_0", "class_1", ...
        transform: a joint transform (uint8 image, uint8 mask) -> (image, mask).
        lut: optional uint8 lookup table (256,) applied to raw mask values (ADE20K: 0 -> 255, k -> k-1).
        binary_255: binary sets: 255 is foreground like 1 (0/255 masks), in every file; such masks are
            counted in the shared-memory flags `has_255` (seen from DataLoader workers too): masks_with_255.
        ignore_index: the ignore label.
    """

    def __init__(self, pairs, *, num_classes, classes=None, transform=None, lut=None, binary_255=False,
                 ignore_index=IGNORE_INDEX):
        if not pairs:
            raise ValueError("SegFiles got no (image, mask) pairs")
        self.samples = [(str(i), str(m)) for i, m in pairs]
        self.num_classes, self.transform, self.lut = num_classes, transform, lut
        self.classes = list(classes) if classes is not None else [f"class_{k}" for k in range(num_classes)]
        self.binary_255, self.ignore_index = binary_255, ignore_index
        self.has_255 = torch.zeros(len(self.samples), dtype=torch.bool).share_memory_()

    def __len__(self):
        return len(self.samples)

    @property
    def masks_with_255(self):
        """How many of the masks read so far held 255 (read as foreground under binary_255)."""
        return int(self.has_255.sum())

    def load(self, index):
        """Untransformed (uint8 image (3, H, W), uint8 mask (H, W) of class ids / ignore_index)."""
        image_path, mask_path = self.samples[index]
        image, mask = read_image(image_path), read_mask(mask_path)
        if image.shape[1:] != mask.shape:
            raise CorruptImageError(
                f"image {image_path} is {image.shape[2]}x{image.shape[1]} (WxH) but its mask {mask_path} is "
                f"{mask.shape[1]}x{mask.shape[0]}; a mask must have its image's size: resize it with nearest "
                f"neighbour (class ids must not be blended) or replace it")
        if self.lut is not None:
            mask = self.lut[mask.long()]
        if self.binary_255 and bool((mask == 255).any()):
            self.has_255[index] = True
            mask = torch.where(mask == 255, torch.ones_like(mask), mask)  # 0/255 masks: 255 is foreground
        bad = (mask >= self.num_classes) & (mask != self.ignore_index)
        if bool(bad.any()):
            vals = sorted(set(mask[bad].unique().tolist()))[:8]
            binary = (" (a binary mask holds 0 and 1, or 0 and 255)" if self.binary_255 else "")
            raise CorruptImageError(
                f"mask {mask_path} (for {image_path}) holds values {vals} outside the class ids "
                f"0..{self.num_classes - 1}{binary} and the ignore index {self.ignore_index}; pass the number of "
                f"classes the masks hold (--num-classes) or fix the mask")
        return image, mask

    def __getitem__(self, index):
        image, mask = self.load(index)
        if self.transform is not None:
            return self.transform(image, mask)
        return image, mask.long()


_SPLIT_NAMES = {"train": ("train", "training"), "val": ("valid", "val", "validation"), "test": ("test",)}
_FOLDER_LAYOUT = ("  ROOT/img/{train,valid[,test]}/<name>.jpg + ROOT/ann/{train,valid[,test]}/<name>.png "
                  "(UCC AI Quest), or ROOT/images/... + ROOT/masks/...; masks single-channel with class ids "
                  "{0,1} (0/255 accepted)")
_ADE_LAYOUT = ("  ROOT/ADEChallengeData2016/images/{training,validation}/*.jpg + "
               "ROOT/ADEChallengeData2016/annotations/{training,validation}/*.png")


def _pairs(image_dir, mask_dir):
    images = sorted(p for p in Path(image_dir).iterdir() if p.is_file() and p.suffix.lower() in IMG_EXTENSIONS)
    if not images:
        raise FileNotFoundError(f"{image_dir} holds no {'/'.join(IMG_EXTENSIONS)} images")
    pairs = []
    for img in images:
        mask = Path(mask_dir) / (img.stem + ".png")
        if not mask.is_file():
            raise ValueError(f"image {img} has no mask: expected {mask}")
        pairs.append((img, mask))
    return pairs


def _folder_pairs(root):
    if root is None:
        raise FileNotFoundError(f"folder: no dataset root given (--data-root DIR). Expected layout:\n{_FOLDER_LAYOUT}")
    root = Path(os.path.expanduser(str(root)))
    for img_name, ann_name in (("img", "ann"), ("images", "masks")):
        if (root / img_name).is_dir():
            break
    else:
        raise FileNotFoundError(f"folder: no img/ or images/ directory under {root}. Expected layout:\n"
                                f"{_FOLDER_LAYOUT}\n(--download does not apply to --data folder.)")
    splits = {}
    for split, names in _SPLIT_NAMES.items():
        for name in names:
            if (root / img_name / name).is_dir():
                if (root / ann_name / name).is_dir():
                    splits[split] = _pairs(root / img_name / name, root / ann_name / name)
                elif split != "test":  # an unlabelled test split is for prediction only (list_images)
                    raise FileNotFoundError(f"folder: {root / img_name / name} has no mask directory "
                                            f"{root / ann_name / name}. Expected layout:\n{_FOLDER_LAYOUT}")
                break
    for split in ("train", "val"):
        if split not in splits:
            raise FileNotFoundError(f"folder: no {split} split ({'/'.join(_SPLIT_NAMES[split])}) under "
                                    f"{root / img_name}. Expected layout:\n{_FOLDER_LAYOUT}")
    return splits


def _ade_pairs(root, download):
    if root is None:
        raise FileNotFoundError(f"ade20k: no dataset root given (--data-root DIR). Expected layout:\n{_ADE_LAYOUT}")
    root = Path(os.path.expanduser(str(root)))
    base = root if root.name == "ADEChallengeData2016" else root / "ADEChallengeData2016"
    dirs = [base / k / s for k in ("images", "annotations") for s in ("training", "validation")]
    if not all(d.is_dir() for d in dirs):
        missing = ", ".join(str(d) for d in dirs if not d.is_dir())
        raise FileNotFoundError(
            f"ade20k: dataset not found under {root} (missing {missing}). Expected layout:\n{_ADE_LAYOUT}\n"
            f"--download is not supported for ADE20K here: fetch ADEChallengeData2016.zip from "
            f"http://data.csail.mit.edu/places/ADEchallenge/ and unzip it into ROOT.")
    return {"train": _pairs(base / "images" / "training", base / "annotations" / "training"),
            "val": _pairs(base / "images" / "validation", base / "annotations" / "validation")}


def _ade_class_names(root):
    """The 150 class names from ADEChallengeData2016/objectInfo150.txt (tab-separated; Name is the last column,
    synonyms separated by ';': the first is kept) when the file is there, else class_0 .. class_149."""
    root = Path(os.path.expanduser(str(root)))
    base = root if root.name == "ADEChallengeData2016" else root / "ADEChallengeData2016"
    info = base / "objectInfo150.txt"
    if info.is_file():
        rows = [line.rstrip("\n").split("\t") for line in info.read_text().splitlines()[1:] if line.strip()]
        if len(rows) == 150:
            return [row[-1].split(";")[0].strip() for row in rows]
    return [f"class_{k}" for k in range(150)]


# -----------------------------------------------------------------------------


def build_seg_datasets(name, root=None, *, img_size, mean, std, randaug=False, scale_range=None,
                       num_classes=None, hflip=True, vflip=None, photometric=None, train_on_val=False,
                       synthetic_cfg=None, download=False):
    """Build (train_ds, val_ds, test_ds or None, num_classes), as data.build_datasets; names in train_ds.classes.

    Args:
        name: "folder", "ade20k" or "synthetic".
        root: dataset directory (unused for synthetic).
        img_size: side of the square training crops; the folder / synthetic evaluation canvas; ADE20K's
            evaluation scale (4 img_size, img_size).
        mean, std: image normalisation in [0, 1] units (SAM: pixel_mean / 255, pixel_std / 255).
        randaug: joint RandAugment in training.
        scale_range: random scale in training: of the shorter side relative to img_size (folder, synthetic;
            default (0.5, 2.0)), of ADE20K's scale (4 img_size, img_size) (default (0.5, 2.0)).
        num_classes: folder: classes in the masks (2 = binary, default); synthetic: 2 by default;
            ade20k: always 150.
        hflip, vflip: random flips in training (folder, synthetic); vflip defaults to True (aerial images).
        photometric: photometric distortion in training; default True for ADE20K (the mmseg recipe), else False.
        train_on_val: train on train + val (the val split keeps being returned for evaluation).
        synthetic_cfg: train_per_class (256), val_per_class (32), test_per_class (32): a split has
            per_class x num_classes images (as data.build_datasets' splits), and SyntheticVegetation keywords
            (seed, edge_noise).
        download: not supported (ADE20K and the competition data have to be fetched by hand).
    """
    if name not in SEG_DATASETS:
        raise ValueError(f"unknown segmentation dataset {name!r}; choose one of {', '.join(SEG_DATASETS)}")
    scale_range = tuple(scale_range or (0.5, 2.0))
    if name == "ade20k":
        if num_classes not in (None, 150):
            raise ValueError(f"ade20k has 150 classes, got num_classes={num_classes}")
        if vflip:
            raise ValueError("ade20k: the mmsegmentation recipe has no vertical flip (vflip=False)")
        train_tf = AdeTrainTransform(img_size=img_size, mean=mean, std=std, ratio_range=scale_range, randaug=randaug,
                                     photometric=True if photometric is None else photometric)
        eval_tf = AdeEvalTransform(img_size=img_size, mean=mean, std=std)
    else:
        train_tf = SegTransform(train=True, img_size=img_size, mean=mean, std=std, scale_range=scale_range,
                                hflip=hflip, vflip=True if vflip is None else vflip, randaug=randaug,
                                photometric=bool(photometric))
        eval_tf = SegTransform(train=False, img_size=img_size, mean=mean, std=std)

    if name == "synthetic":
        cfg = dict(synthetic_cfg or {})
        k = num_classes or cfg.pop("num_classes", 2)
        cfg.pop("num_classes", None)
        per = {s: cfg.pop(f"{s}_per_class", d) for s, d in (("train", 256), ("val", 32), ("test", 32))}
        make = lambda s, t: SyntheticVegetation(split=s, num_samples=per[s] * k, image_size=img_size,  # noqa: E731
                                                num_classes=k, transform=t, **cfg)
        train_ds, val_ds, test_ds = make("train", train_tf), make("val", eval_tf), make("test", eval_tf)
        if train_on_val:
            train_ds = ConcatDataset([train_ds, make("val", train_tf)])
            train_ds.classes = val_ds.classes
        return train_ds, val_ds, test_ds, k

    if name == "ade20k":
        splits = _ade_pairs(root, download)
        k = 150
        lut = torch.arange(256, dtype=torch.uint8) - 1  # reduce_zero_label: 1..150 -> 0..149, 0 -> 255 (wrap)
        opts = dict(num_classes=k, lut=lut, classes=_ade_class_names(root))
    else:
        if download:
            raise ValueError("folder: --download does not apply; point --data-root at the unpacked data")
        splits = _folder_pairs(root)
        k = num_classes or 2
        opts = dict(num_classes=k, binary_255=k == 2,
                    classes=["background", "foreground"] if k == 2 else [f"class_{c}" for c in range(k)])
    train_ds = SegFiles(splits["train"], transform=train_tf, **opts)
    val_ds = SegFiles(splits["val"], transform=eval_tf, **opts)
    test_ds = SegFiles(splits["test"], transform=eval_tf, **opts) if "test" in splits else None
    if train_on_val:
        train_ds = ConcatDataset([train_ds, SegFiles(splits["val"], transform=train_tf, **opts)])
        train_ds.classes = val_ds.classes
    return train_ds, val_ds, test_ds, k
