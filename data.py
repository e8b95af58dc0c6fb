"""
Classification data: the six fine-grained sets of PETAH, any ImageFolder, and an embedded synthetic set.

    train_ds, val_ds, test_ds, num_classes = build_datasets("cub", "~/data", img_size=224,
                                                            mean=model.data_cfg["mean"], std=model.data_cfg["std"])

Every dataset returns `(image, label)` with `image` a normalised float tensor (3, img_size, img_size) and `label`
an int. `val_ds` is the split evaluated every epoch: the official validation split where the dataset has one
(Aircraft, DTD, Food101's 50-per-class hold-out), otherwise the test split itself, as the paper reports test
accuracy for CUB, Cars and Pets (then `test_ds` is None). Class names are in `train_ds.classes`.

Splits (PETAH, train/val/test): CUB 5994/-/5794, Cars 8144/-/8041, Pets 3680/-/3669, Aircraft 3334/3333/3333,
DTD 1880/1880/1880 (partition 1), Food101 70700/5050/25250.

Images are decoded with torchvision.io (JPEG/PNG/WebP/GIF) into uint8 tensors and transformed with
torchvision.transforms.v2: training = RandomResizedCrop + horizontal flip (+ RandAugment), evaluation =
Resize(floor(img_size / crop_pct)) + CenterCrop, both followed by Normalize(mean, std) of the backbone.
"""

import colorsys
import math
import os
import random
import warnings
from pathlib import Path

import torch
from torch.utils.data import Dataset
from torchvision.datasets import DTD, FGVCAircraft, Food101, OxfordIIITPet, StanfordCars
from torchvision.datasets.utils import download_and_extract_archive
from torchvision.io import ImageReadMode, decode_image
from torchvision.transforms import InterpolationMode
from torchvision.transforms import v2

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
    """An image file that cannot be read or decoded."""


def read_image(path):
    """Decode an image file into a uint8 RGB tensor (3, H, W); the error names the file."""
    try:
        return decode_image(str(path), mode=ImageReadMode.RGB)
    except (RuntimeError, OSError, ValueError) as e:
        raise CorruptImageError(
            f"cannot read image {path}: {e}. Replace or delete the file, or pass skip_corrupt=True "
            f"(--skip-corrupt) to skip unreadable images and count them.") from e


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
# the embedded synthetic set

_TEXTURES = ("stripes", "checker", "dots", "rings", "waves", "flat")
_MARKERS = ("disk", "ring", "square", "cross", "bar", "triangle")
_MARKER_COLOURS = ("white", "black", "complement")
_CACHE = {}  # per image size: coordinate grid and noise banks, built once per process (deterministically)


def _canvas(size):
    """Pixel coordinates x, y (S, S) in [-1, 1] and two noise banks (3, 2S, 2S):
    white noise and smooth colour noise. A sample reads an S x S window of each at a seeded offset, which is
    much cheaper than drawing fresh noise per image."""
    if size not in _CACHE:
        c = (torch.arange(size, dtype=torch.float32) + 0.5) / size * 2 - 1
        ys, xs = torch.meshgrid(c, c, indexing="ij")  # (S, S): y down, x right
        g = torch.Generator().manual_seed(12345 + size)
        white = torch.randn(3, 2 * size, 2 * size, generator=g)
        coarse = torch.randn(1, 1, 10, 10, generator=g) + 0.4 * torch.randn(1, 3, 10, 10, generator=g)
        coarse /= 1.08  # unit variance: mostly brightness, a little colour; about 5 blobs across an image
        smooth = torch.nn.functional.interpolate(coarse, size=(2 * size, 2 * size), mode="bicubic",
                                                 align_corners=False)[0]
        _CACHE[size] = (xs, ys, white, smooth)
    return _CACHE[size]


def _hsv(h, s, v):
    return torch.tensor(colorsys.hsv_to_rgb(h % 1.0, min(max(s, 0.0), 1.0), min(max(v, 0.0), 1.0)))


class SyntheticImages(Dataset):
    """Procedural, deterministic images whose classes are combinations of shape, texture and colour.

    No files: sample `index` of a split is rendered from a seed derived from (seed, split, index), so the same
    index always gives the same image and the train/val/test splits never share a seed. Rendering is a few
    dozen vectorised torch ops on an (S, S) grid: about 0.5-0.7 ms of one core at 32-64 px, 3-5 ms at 224 px.
    (In a DataLoader worker, which runs one thread; in the main process with several threads on a busy
    machine tiny ops can be much slower, so use num_workers >= 1.)

    What a class is. The `family` seed draws a pool of prototypes: shapes (a radial profile
    r(phi) = 1 + sum_k a_k cos(k phi + p_k) with one dominant lobe count per shape), textures (stripes, checker,
    dots, rings, waves, flat, each with its own frequency and orientation in the object's frame) and colours
    (hues spread evenly round the colour wheel from a random offset). Each class is a distinct (shape, texture,
    colour) triple picked from that pool, so no single attribute names the class. Another `family` gives new
    prototypes and new triples: new classes from the same generator. (The pool size grows with the number of
    classes, about num_classes ** (1/3) prototypes per attribute, so the class definitions depend on
    (family, num_classes, fine_grained): classes 0..9 of a 64-class set are not a 10-class set of the same family;
    take a subset of labels instead.)

    Nuisance per sample: position, scale, rotation (up to `max_rotation` degrees), the texture's phase, a small
    jitter of hue/saturation/brightness and texture frequency, a background of random low-saturation colour with
    smooth colour noise and a faint grating, and pixel noise.

    Args:
        split: "train", "val" or "test" (only seeds differ).
        num_classes: number of classes (up to 512; 64-100 for a many-class source task).
        samples_per_class: split size is num_classes * samples_per_class; label = index % num_classes.
        image_size: rendered side in pixels (textures are resolved from about 48 px; 32 works, a little aliased).
        family: seed of the class definitions (which shapes/textures/colours exist and which triples are classes).
        style: 0 = canonical rendering. Any other value re-renders the same classes under shifted statistics
            drawn from that seed: all hues rotated by 0.15-0.85 of the wheel, saturation and brightness scaled,
            texture kinds permuted (each class keeps one texture, but a new one), texture frequency scaled by
            0.7-1.4 and its waveform sharpened or softened, darker/lighter second tone, and a more saturated,
            busier background.
        fine_grained: 0 = off. g >= 2: classes come in groups of g that share shape, texture and colour and differ
            only in a small mark at the object's centre (one of 6 marker shapes x 3 colours, g <= 18), like
            species of one genus differing in a patch. Render at >= 64 px so the mark spans a few pixels.
        seed: data seed; (seed, split, index) -> sample seed. Change it for a fresh draw of the same classes.
        max_rotation: rotation nuisance in degrees (uniform in +-max_rotation).
        noise: standard deviation of the pixel noise (images are in [0, 1]).
        transform: applied to the float image (3, S, S) in [0, 1]; None returns it as is.
    """

    _SPLITS = {"train": 0, "val": 1, "test": 2}

    def __init__(self, *, split="train", num_classes=10, samples_per_class=100, image_size=64, family=0, style=0,
                 fine_grained=0, seed=0, max_rotation=30.0, noise=0.03, transform=None):
        if split not in self._SPLITS:
            raise ValueError(f"split must be one of {list(self._SPLITS)}, got {split!r}")
        if seed < 0 or family < 0 or style < 0:
            raise ValueError(f"seed, family and style must be >= 0, got {seed}, {family}, {style}")
        if num_classes < 2 or samples_per_class < 1 or image_size < 8:
            raise ValueError(f"need num_classes >= 2, samples_per_class >= 1, image_size >= 8; got "
                             f"{num_classes}, {samples_per_class}, {image_size}")
        if fine_grained == 1 or fine_grained > len(_MARKERS) * len(_MARKER_COLOURS) or fine_grained < 0:
            raise ValueError(f"fine_grained must be 0 (off) or a group size in "
                             f"2..{len(_MARKERS) * len(_MARKER_COLOURS)}, got {fine_grained}")
        self.split, self.num_classes, self.samples_per_class = split, num_classes, samples_per_class
        self.image_size, self.family, self.style, self.fine_grained = image_size, family, style, fine_grained
        self.seed, self.max_rotation, self.noise, self.transform = seed, max_rotation, noise, transform
        self._make_classes()
        self._make_style()

    # --- class definitions (family) and rendering statistics (style) ---
    def _make_classes(self):
        g = torch.Generator().manual_seed(1_000_003 * self.family + 17)
        n_groups = math.ceil(self.num_classes / self.fine_grained) if self.fine_grained else self.num_classes
        n = max(2, math.ceil(n_groups ** (1 / 3)))  # prototypes per attribute, n^3 >= number of triples
        n_shape, n_tex, n_col = n, n, n
        while n_shape * n_tex * n_col < n_groups:  # (never for <= 512 groups; kept for safety)
            n_col += 1
        if n_shape > 8 or n_tex > 2 * len(_TEXTURES) or n_col > 12:
            raise ValueError(f"num_classes={self.num_classes} needs more prototypes than the generator has")

        def rand(*shape):
            return torch.rand(*shape, generator=g)

        # shapes: a dominant harmonic (lobe count 2..6, in a family-specific order) and a weaker second one
        # (strong in the second round, so those shapes differ from the first five): ((k, amp, phase), (k, amp, phase))
        lobes = (torch.randperm(5, generator=g) + 2).tolist()
        self.shapes = []
        for j in range(n_shape):
            k1, k2 = lobes[j % 5], lobes[(j + 1 + int(rand(1) * 4)) % 5] if j < 5 else lobes[(j + 2) % 5]
            a1, a2 = 0.22 + 0.1 * float(rand(1)), (0.03 + 0.05 * float(rand(1))) if j < 5 else 0.13
            p1, p2 = (rand(2) * 2 * math.pi).tolist()
            self.shapes.append(((k1, a1, p1), (k2, a2, p2)))
        # textures: distinct kinds first; a second round reuses kinds at a clearly different frequency
        kinds = torch.randperm(len(_TEXTURES), generator=g).tolist()
        self.textures = []
        for j in range(n_tex):
            lo = j < len(_TEXTURES)
            freq = (1.0 + 0.4 * float(rand(1))) if lo else (1.8 + 0.3 * float(rand(1)))  # cycles per radius
            self.textures.append((kinds[j % len(_TEXTURES)], freq, float(rand(1)) * math.pi))
        # colours: evenly spread hues, random offset, each with its own saturation/brightness
        off = float(rand(1))
        self.colours = [((off + j / n_col) % 1.0, 0.6 + 0.3 * float(rand(1)), 0.7 + 0.25 * float(rand(1)))
                        for j in range(n_col)]
        # classes (or groups): distinct triples
        pick = torch.randperm(n_shape * n_tex * n_col, generator=g)[:n_groups].tolist()
        triples = [(p // (n_tex * n_col), (p // n_col) % n_tex, p % n_col) for p in pick]
        self.class_defs = []
        for c in range(self.num_classes):
            if self.fine_grained:
                grp, member = divmod(c, self.fine_grained)
                if member == 0:
                    variants = torch.randperm(len(_MARKERS) * len(_MARKER_COLOURS), generator=g).tolist()
                v = variants[member]
                mark = (v // len(_MARKER_COLOURS), v % len(_MARKER_COLOURS))
                self.class_defs.append(triples[grp] + (mark,))
            else:
                self.class_defs.append(triples[c] + (None,))
        self.classes = [self._class_name(d) for d in self.class_defs]

    def _class_name(self, d):
        s, t, c, mark = d
        name = f"shape{s}-{_TEXTURES[self.textures[t][0]]}{t}-hue{round(360 * self.colours[c][0])}"
        if mark is not None:
            name += f"-{_MARKER_COLOURS[mark[1]]}_{_MARKERS[mark[0]]}"
        return name

    def _make_style(self):
        if self.style == 0:
            self.hue_shift, self.sat_scale, self.val_scale = 0.0, 1.0, 1.0
            self.tex_perm, self.freq_scale, self.sharpness, self.dark = list(range(len(_TEXTURES))), 1.0, 2.0, 0.35
            self.bg_sat, self.bg_grating = 0.3, 0.06
            return
        g = torch.Generator().manual_seed(7_919 * self.style + 5)
        r = torch.rand(8, generator=g).tolist()
        self.hue_shift = 0.15 + 0.7 * r[0]
        self.sat_scale, self.val_scale = 0.6 + 0.5 * r[1], 0.75 + 0.3 * r[2]
        perm = torch.randperm(len(_TEXTURES), generator=g).tolist()
        while any(perm[i] == i for i in range(len(perm))):  # every texture kind really changes
            perm = torch.randperm(len(_TEXTURES), generator=g).tolist()
        self.tex_perm = perm
        self.freq_scale = 0.7 + 0.7 * r[3]
        self.sharpness = 0.7 + 5.0 * r[4]
        self.dark = 0.15 + 0.45 * r[5]
        self.bg_sat, self.bg_grating = 0.3 + 0.4 * r[6], 0.06 + 0.1 * r[7]

    # --- rendering ---
    def __len__(self):
        return self.num_classes * self.samples_per_class

    def sample_seed(self, index):
        # one string per (seed, split, index): splits never share a seed (random.Random hashes it with SHA-512)
        return f"synthetic-images/{self.seed}/{self.split}/{index}"

    def render(self, index):
        """The untransformed image (3, S, S) in [0, 1] and its label."""
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} samples")
        label = index % self.num_classes
        return self.draw(label, self.sample_seed(index)), label

    def draw(self, label, sample_seed):
        """Class `label` under the nuisance drawn from `sample_seed` (any int or str): (3, S, S) in [0, 1].
        The same seed with another label gives the same pose, background and noise (useful to see what tells
        two classes apart)."""
        s_id, t_id, c_id, mark = self.class_defs[label]
        S = self.image_size
        rng = random.Random(sample_seed)  # a str seed is hashed with SHA-512 (torch's generator keeps 32 bits)
        r = [rng.random() for _ in range(20)]
        xs, ys, white, smooth = _canvas(S)  # (S, S), (S, S), (3, 2S, 2S), (3, 2S, 2S)

        # object frame: centre (cx, cy), radius `scale` (in half-images), rotation; the texture's own axes
        # (uo, vo) are the object axes turned by the texture's orientation. (Elementwise ops, not a matmul:
        # tiny BLAS calls are slow when the machine is oversubscribed.)
        kind, freq, orient = self.textures[t_id]
        cx, cy = (r[0] - 0.5) * 0.5, (r[1] - 0.5) * 0.5
        scale = 0.45 + 0.2 * r[2]
        rot = math.radians((2 * r[3] - 1) * self.max_rotation)
        dx, dy = xs - cx, ys - cy
        u, v, uo, vo = [dx * (c / scale) + dy * (s / scale)  # (S, S) each, in object units (radius ~ 1)
                        for a in (rot, rot + orient)
                        for c, s in ((math.cos(a), math.sin(a)), (-math.sin(a), math.cos(a)))]
        rho, phi = (u * u + v * v).sqrt_(), torch.atan2(v, u)  # (S, S)
        px = 2.0 / (S * scale)  # one pixel in object units: edges are anti-aliased over about a pixel

        # shape: inside the radial profile 0.85 * (1 + a1 cos(k1 phi + p1) + a2 cos(k2 phi + p2))
        (k1, a1, p1), (k2, a2, p2) = self.shapes[s_id]
        radius = torch.cos(phi * k1 + p1).mul_(a1).add_(torch.cos(phi * k2 + p2), alpha=a2).add_(1)
        alpha = torch.sigmoid(radius.mul_(0.85 / px).sub_(rho, alpha=1 / px))  # (S, S)

        # texture in the object's frame, t in [0, 1]
        name = _TEXTURES[self.tex_perm[kind]]
        w = 2 * math.pi * freq * self.freq_scale * (1 + 0.1 * (2 * r[4] - 1))
        ph = 2 * math.pi * r[5]
        if name == "stripes":
            t = torch.sin(w * uo + ph)
        elif name == "checker":
            t = torch.sin(w * uo + ph) * torch.sin(w * vo + ph) * 2
        elif name == "dots":
            t = (torch.cos(w * uo + ph) * torch.cos(w * vo) - 0.3) * 2
        elif name == "rings":
            t = torch.sin(1.3 * w * rho + ph)
        elif name == "waves":
            t = torch.sin(w * vo + 1.5 * torch.sin(0.7 * w * uo + ph))
        else:  # flat
            t = None
        k = self.sharpness
        t = torch.full_like(rho, 0.5 + 0.5 * math.tanh(0.4 * k) / math.tanh(k)) if t is None else \
            torch.tanh(k * t).mul_(0.5 / math.tanh(k)).add_(0.5)

        # colours: the class hue (jittered) in a light and a dark tone; fg = dark + (light - dark) * t
        h, sat, val = self.colours[c_id]
        h = h + self.hue_shift + 0.03 * (2 * r[6] - 1)
        sat = sat * self.sat_scale + 0.1 * (2 * r[7] - 1)
        val = val * self.val_scale + 0.1 * (2 * r[8] - 1)
        light, dark = _hsv(h, sat, val), _hsv(h, sat, val * self.dark)
        fg = torch.addcmul(dark[:, None, None], (light - dark)[:, None, None], t)  # (3, S, S)

        if mark is not None:  # fine-grained: a small mark at the object's centre, in the object's frame
            fg = self._mark(fg, mark, u, v, rho, px, h)

        # background: low-saturation colour + smooth colour noise + a faint grating
        ox, oy = int(r[9] * S), int(r[10] * S)
        bg = _hsv(r[11], self.bg_sat * r[12], 0.25 + 0.5 * r[13])[:, None, None]  # (3, 1, 1)
        ang, wb = math.pi * r[14], 2 * math.pi * (2 + 6 * r[15])
        grating = torch.sin(xs * (wb * math.cos(ang)) + ys * (wb * math.sin(ang)) + 2 * math.pi * r[16])
        bg = torch.add(bg, smooth[:, oy:oy + S, ox:ox + S], alpha=0.12)  # (3, S, S)
        bg.add_(grating, alpha=self.bg_grating)

        image = torch.lerp(bg, fg, alpha)  # (3, S, S)
        if self.noise > 0:
            ox, oy = int(r[17] * S), int(r[18] * S)
            image.add_(white[:, oy:oy + S, ox:ox + S], alpha=self.noise)
        return image.clamp_(0, 1)

    def _mark(self, fg, mark, u, v, rho, px, hue):
        m_kind, m_col = mark
        mr = 0.28  # mark radius in object units
        fg = torch.lerp(fg, _hsv(hue, 0.25, 0.6)[:, None, None].expand_as(fg),
                        torch.sigmoid((rho - 1.45 * mr).mul_(-1 / px)))  # a plain patch the mark sits on
        au, av = u.abs(), v.abs()
        name = _MARKERS[m_kind]
        if name == "disk":  # d = signed distance-like function, < 0 inside the mark
            d = rho - mr
        elif name == "ring":
            d = (rho - 0.7 * mr).abs() - 0.3 * mr
        elif name == "square":
            d = torch.maximum(au, av) - 0.85 * mr
        elif name == "cross":
            d = torch.minimum(torch.maximum(au - mr, av - 0.3 * mr), torch.maximum(av - mr, au - 0.3 * mr))
        elif name == "bar":
            d = torch.maximum(au - mr, av - 0.35 * mr)
        else:  # triangle: three half-planes
            d = torch.stack([u * math.cos(a) + v * math.sin(a) for a in (math.pi / 2, math.pi * 7 / 6,
                                                                         math.pi * 11 / 6)]).amax(0) - 0.5 * mr
        colour = {"white": torch.tensor([0.97, 0.97, 0.97]), "black": torch.tensor([0.03, 0.03, 0.03]),
                  "complement": _hsv(hue + 0.5, 0.9, 0.9)}[_MARKER_COLOURS[m_col]]
        return torch.lerp(fg, colour[:, None, None].expand_as(fg), torch.sigmoid(d.mul_(-1 / px)))

    def __getitem__(self, index):
        image, label = self.render(index)
        if self.transform is not None:
            image = self.transform(image)
        return image, label


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
    "folder": "  ROOT/train/<class>/*.jpg and ROOT/val/<class>/*.jpg and/or ROOT/test/<class>/*.jpg",
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
    """(path, label) pairs of a torchvision dataset, read from its private file lists (torchvision <= 0.29)."""
    if isinstance(ds, StanfordCars):
        return [(p, y) for p, y in ds._samples]
    files = ds._images if isinstance(ds, OxfordIIITPet) else ds._image_files
    return list(zip(files, ds._labels))


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


def _load_folder(root):
    layout = _LAYOUTS["folder"]
    _need_root("folder", root, layout)
    root = Path(os.path.expanduser(str(root)))
    hint = "(--download does not apply to --data folder.)"
    if not (root / "train").is_dir():
        raise _missing("folder", root, layout, hint)
    evals = [s for s in ("val", "test") if (root / s).is_dir()]
    if not evals:
        raise _missing("folder", root, layout, "Found train/ but neither val/ nor test/. " + hint)
    classes = sorted(d.name for d in (root / "train").iterdir() if d.is_dir())
    if not classes:
        raise _missing("folder", root, layout, "train/ has no class folders. " + hint)
    index = {c: i for i, c in enumerate(classes)}
    splits = {}
    for split in ["train"] + evals:
        samples, skipped = [], []
        for c in sorted(d.name for d in (root / split).iterdir() if d.is_dir()):
            if c not in index:
                raise ValueError(f"folder: class {c!r} in {root / split} does not exist in {root / 'train'}")
            for dirpath, _, files in sorted(os.walk(root / split / c, followlinks=True)):
                for f in sorted(files):
                    ext = os.path.splitext(f)[1].lower()
                    if ext in IMG_EXTENSIONS:
                        samples.append((Path(dirpath) / f, index[c]))
                    elif ext in _UNSUPPORTED_EXTENSIONS:
                        skipped.append(Path(dirpath) / f)
        if skipped:
            warnings.warn(f"folder: ignoring {len(skipped)} images in {root / split} in formats torchvision.io "
                          f"cannot decode (e.g. {skipped[0]}); convert them to PNG or JPEG")
        if not samples:
            raise _missing("folder", root, layout, f"{root / split} holds no {'/'.join(IMG_EXTENSIONS)} images.")
        splits[split] = samples
    return splits, classes


def build_datasets(name, root=None, *, img_size=224, mean, std, randaug=False, download=False, crop_pct=0.95,
                   interpolation="bicubic", synthetic_cfg=None, skip_corrupt=False):
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

    Returns:
        train_ds, val_ds, test_ds (None when the evaluated split is the test split itself), num_classes.
        Class names: train_ds.classes.
    """
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
    tf = dict(img_size=img_size, mean=mean, std=std, crop_pct=crop_pct, interpolation=interpolation)

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
        splits, classes = _load_folder(root)
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
