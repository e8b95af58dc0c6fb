"""Real photographs for the predict tools' tests, from packages requirements-dev.txt installs: matplotlib's sample
photo grace_hopper.jpg (600 x 512) and scikit-learn's china.jpg and flower.jpg (427 x 640; scikit-learn comes with
mlxtend), written in the formats and modes users have (JPEG, CMYK JPEG, PNG RGBA / grey / 16-bit, WebP, GIF) and
several sizes. No other registry package with photos was found in the package lists checked."""
import os
from pathlib import Path

import pytest


def photo_sources():
    """Paths of the three photographs; the test is skipped, naming the install line, when a package is missing."""
    mpl = pytest.importorskip("matplotlib", reason="needs matplotlib's sample photo: pip install matplotlib")
    datasets = pytest.importorskip("sklearn.datasets", reason="needs scikit-learn's sample photos: pip install mlxtend "
                                                              "(or scikit-learn)")
    hopper = Path(os.path.dirname(mpl.__file__)) / "mpl-data" / "sample_data" / "grace_hopper.jpg"
    china, flower = datasets.load_sample_images().filenames
    return hopper, Path(china), Path(flower)


def write_photos(dest):
    """dest/<name>: the photographs in several formats, modes and sizes; returns {relative name: (H, W)}."""
    import numpy as np
    from PIL import Image
    hopper, china, flower = photo_sources()
    dest = Path(dest)
    (dest / "more").mkdir(parents=True, exist_ok=True)
    h, c, f = Image.open(hopper), Image.open(china), Image.open(flower)
    out = {}

    def save(img, name, **kw):
        img.save(dest / name, **kw)
        out[name] = (img.height, img.width)

    save(h, "hopper.jpg", quality=95)
    save(c.resize((320, 213)), "china_small.png")
    save(f.convert("RGBA").resize((200, 300)), "flower_rgba.png")
    save(c.convert("L"), "china_grey.png")
    grey16 = (np.asarray(h.convert("L"), dtype=np.uint16) * 257).astype(np.uint16)
    save(Image.fromarray(grey16), "hopper_16bit.png")
    save(f.convert("CMYK"), "flower_cmyk.jpg", quality=90)
    save(h.resize((150, 176)), "more/hopper.webp", quality=90)
    save(c.resize((160, 107)).convert("P"), "more/china.gif")
    return out
