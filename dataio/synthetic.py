"""
Procedural synthetic data for the demos and tests: no files, every sample rendered from a seed derived from
(seed, split, index), so the same index always gives the same sample and the splits never share a seed.

    SyntheticImages       classification: classes are (shape, texture, colour) triples      (data.py)
    SyntheticVegetation   segmentation: "vegetation" over textured ground, noisy label edges  (data_seg.py)

Both read S x S windows of noise banks rendered once per process and image size (_CACHE), which is much
cheaper than drawing fresh noise per image.
"""

import colorsys
import math
import random

import torch
from torch.utils.data import Dataset
from torchvision.transforms.v2 import functional as TF

SPLITS = {"train": 0, "val": 1, "test": 2}  # the split names; only the sample seeds differ between them
_CACHE = {}  # (kind, image size) -> coordinate grid and noise banks, built once per process (deterministically)


def _hsv(h, s, v):
    """RGB (3,) in [0, 1] of a hue (wrapped), saturation and value (clamped to [0, 1])."""
    return torch.tensor(colorsys.hsv_to_rgb(h % 1.0, min(max(s, 0.0), 1.0), min(max(v, 0.0), 1.0)))


# -----------------------------------------------------------------------------
# classification: SyntheticImages


_TEXTURES = ("stripes", "checker", "dots", "rings", "waves", "flat")
_MARKERS = ("disk", "ring", "square", "cross", "bar", "triangle")
_MARKER_COLOURS = ("white", "black", "complement")


def _canvas(size):
    """Pixel coordinates x, y (S, S) in [-1, 1] and two noise banks (3, 2S, 2S):
    white noise and smooth colour noise. A sample reads an S x S window of each at a seeded offset, which is
    much cheaper than drawing fresh noise per image."""
    if ("canvas", size) not in _CACHE:
        c = (torch.arange(size, dtype=torch.float32) + 0.5) / size * 2 - 1
        ys, xs = torch.meshgrid(c, c, indexing="ij")  # (S, S): y down, x right
        g = torch.Generator().manual_seed(12345 + size)
        white = torch.randn(3, 2 * size, 2 * size, generator=g)
        coarse = torch.randn(1, 1, 10, 10, generator=g) + 0.4 * torch.randn(1, 3, 10, 10, generator=g)
        coarse /= 1.08  # unit variance: mostly brightness, a little colour; about 5 blobs across an image
        smooth = torch.nn.functional.interpolate(coarse, size=(2 * size, 2 * size), mode="bicubic",
                                                 align_corners=False)[0]
        _CACHE["canvas", size] = (xs, ys, white, smooth)
    return _CACHE["canvas", size]


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

    def __init__(self, *, split="train", num_classes=10, samples_per_class=100, image_size=64, family=0, style=0,
                 fine_grained=0, seed=0, max_rotation=30.0, noise=0.03, transform=None):
        if split not in SPLITS:
            raise ValueError(f"split must be one of {list(SPLITS)}, got {split!r}")
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
# segmentation: SyntheticVegetation



def _banks(size):
    """Noise banks of side 2S: 'blob' (smooth, a few blobs per image), 'edge' (medium, for label-edge noise),
    'leaf' (fine, 1-3 px grain) and 'grain' (white). A sample reads S x S windows at seeded offsets."""
    if ("banks", size) not in _CACHE:
        g = torch.Generator().manual_seed(54321 + size)
        n = 2 * size

        def smooth(cells):
            x = torch.randn(1, 1, cells, cells, generator=g)
            x = torch.nn.functional.interpolate(x, size=(n, n), mode="bicubic", align_corners=False)[0, 0]
            return (x - x.mean()) / x.std()

        blob, edge = smooth(12), smooth(max(4, n // 6))
        leaf = smooth(max(4, min(n // 2, 96)))  # grain ~ S/48 px, at least 2 px
        grain = torch.randn(n, n, generator=g)
        c = (torch.arange(size, dtype=torch.float32) + 0.5) / size * 2 - 1
        ys, xs = torch.meshgrid(c, c, indexing="ij")
        _CACHE["banks", size] = dict(blob=blob, edge=edge, leaf=leaf, grain=grain, xs=xs, ys=ys)
    return _CACHE["banks", size]


class SyntheticVegetation(Dataset):
    """Procedural aerial-photo stand-in: textured "vegetation" over textured ground, with noisy label edges.

    Deterministic per index (seed from (seed, split, index); splits never share a seed); no files. Each image:
    ground of soil/asphalt colour with smooth shading and grain, smooth green "lawn" patches (background: they
    are green but not high vegetation, so colour alone does not solve the task), a few grey/red rectangles
    (roofs, roads), then the foreground: blobs of a thresholded smooth field, leafy (fine, high-contrast)
    texture, brighter crowns and a cast shadow. The label is the same field thresholded after adding a
    medium-frequency noise, so label edges wander a few pixels off the visible edge, as hand-drawn masks do.
    Foreground covers about 20-60% of an image.

    With num_classes = K > 2, classes 1..K-1 are K-1 foreground materials (each its own hue and texture
    frequency), layered in order; class 0 is the ground.

    Args:
        split: "train", "val" or "test".
        num_samples: number of images in the split.
        image_size: rendered side S (images are square).
        num_classes: 2 (binary, default) or more.
        seed: data seed.
        edge_noise: how far label edges wander from the visible edges (0 = exact labels).
        transform: joint transform (uint8 image (3, S, S), uint8 mask (S, S)) -> (image, mask); None returns
            the float image in [0, 1] and the int64 mask.
    """

    def __init__(self, *, split="train", num_samples=256, image_size=128, num_classes=2, seed=0, edge_noise=0.25,
                 transform=None):
        if split not in SPLITS:
            raise ValueError(f"split must be one of {list(SPLITS)}, got {split!r}")
        if seed < 0:
            raise ValueError(f"seed must be >= 0, got {seed}")
        if num_classes < 2 or num_classes > 32 or image_size < 16 or num_samples < 1:
            raise ValueError(f"need 2 <= num_classes <= 32, image_size >= 16, num_samples >= 1; got "
                             f"{num_classes}, {image_size}, {num_samples}")
        self.split, self.num_samples, self.image_size = split, num_samples, image_size
        self.num_classes, self.seed, self.edge_noise, self.transform = num_classes, seed, edge_noise, transform
        self.classes = ["background", "vegetation"] + [f"material_{k}" for k in range(2, num_classes)]
        # foreground materials: class 1 = green leafy vegetation; further classes other hues/textures
        g = torch.Generator().manual_seed(99)
        self.materials = [(0.3, 0.6, 0.45, 1.0)]  # (hue, saturation, value, texture frequency factor)
        for k in range(2, num_classes):
            r = torch.rand(4, generator=g).tolist()
            self.materials.append(((0.3 + k / num_classes) % 1.0, 0.4 + 0.4 * r[1], 0.35 + 0.4 * r[2], 0.5 + r[3]))

    def __len__(self):
        return self.num_samples

    def sample_seed(self, index):
        return f"synthetic-vegetation/{self.seed}/{self.split}/{index}"  # distinct per (seed, split, index)

    def _window(self, bank, r1, r2, r3):
        """An S x S window of a (2S, 2S) bank at a seeded offset, randomly transposed/flipped."""
        S = self.image_size
        oy, ox = int(r1 * S), int(r2 * S)
        w = bank[oy:oy + S, ox:ox + S]
        k = int(r3 * 4)
        return w.t() if k == 1 else w.flip(0) if k == 2 else w.flip(1) if k == 3 else w

    def render(self, index):
        """The untransformed float image (3, S, S) in [0, 1] and its int64 mask (S, S)."""
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} samples")
        S = self.image_size
        b = _banks(S)
        rng = random.Random(self.sample_seed(index))  # str seed, hashed with SHA-512 (torch keeps 32 bits)
        r = [rng.random() for _ in range(30 + 8 * len(self.materials))]

        # ground: soil / dry grass / asphalt colour, smooth shading, fine grain
        ground = _hsv(0.06 + 0.08 * r[0], 0.15 + 0.35 * r[1], 0.35 + 0.35 * r[2])[:, None, None]
        image = ground * (1 + 0.15 * self._window(b["blob"], r[3], r[4], r[5]))
        image = image + 0.04 * self._window(b["grain"], r[6], r[7], r[8])
        # lawns: smooth green patches that are background
        lawn = torch.sigmoid((self._window(b["blob"], r[9], r[10], r[11]) - 0.6 - r[12]) * 6)
        lawn_rgb = _hsv(0.22 + 0.08 * r[13], 0.45, 0.5 + 0.2 * r[14])[:, None, None]  # (3, 1, 1)
        image = torch.lerp(image, lawn_rgb.expand_as(image), lawn)
        # roofs / roads: up to two rotated rectangles
        for j in range(int(r[15] * 3)):
            q = r[16 + 6 * j:22 + 6 * j]
            a = math.pi * q[0]
            u = (b["xs"] - (2 * q[1] - 1)) * math.cos(a) + (b["ys"] - (2 * q[2] - 1)) * math.sin(a)
            v = -(b["xs"] - (2 * q[1] - 1)) * math.sin(a) + (b["ys"] - (2 * q[2] - 1)) * math.cos(a)
            inside = torch.sigmoid((torch.minimum(0.1 + 0.3 * q[3] - u.abs(), 0.05 + 0.15 * q[4] - v.abs())) * S)
            colour = (_hsv(0.0, 0.5 * q[5], 0.45 + 0.3 * q[5]) if q[5] < 0.5 else _hsv(0.0, 0.05, 0.6))[:, None, None]
            image = torch.lerp(image, colour.expand_as(image), inside)

        # foreground: blobs of a smooth field above a threshold; the label uses the same field plus edge noise
        mask = torch.zeros(S, S, dtype=torch.long)
        for k, (hue, sat, val, freq) in enumerate(self.materials, start=1):
            q = r[22 + 8 * k:30 + 8 * k]
            field = self._window(b["blob"], q[0], q[1], q[2])
            thr = (-0.25 + 1.1 * q[3]) if len(self.materials) == 1 else 0.4 + 0.8 * q[3]  # coverage ~60%..20%
            vis = field - thr
            alpha = torch.sigmoid(vis * 8)
            # cast shadow: the alpha map shifted down-right, darkening what lies under it
            sh = max(1, S // 32)
            shadow = torch.nn.functional.pad(alpha, (sh, 0, sh, 0))[:S, :S]
            image = image * (1 - 0.35 * shadow * (1 - alpha))
            leaf = self._window(b["leaf"] if freq >= 0.75 else b["edge"], q[4], q[5], q[6])
            crown = (vis * 2).clamp(0, 1)  # brighter towards the blob's centre
            tone = (1 + 0.35 * leaf) * (0.75 + 0.35 * crown)
            image = torch.lerp(image, _hsv(hue + 0.05 * (q[7] - 0.5), sat, val)[:, None, None] * tone, alpha)
            label = (vis + self.edge_noise * self._window(b["edge"], q[2], q[0], q[1])) > 0
            mask[label] = k
        image = image.clamp(0, 1)
        return image, mask

    def __getitem__(self, index):
        image, mask = self.render(index)
        if self.transform is not None:
            return self.transform(TF.to_dtype(image, torch.uint8, scale=True), mask.to(torch.uint8))
        return image, mask
