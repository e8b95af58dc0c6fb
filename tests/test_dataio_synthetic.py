"""dataio/synthetic.py: the procedural sets are deterministic per (seed, split, index), the splits differ, the
classes are balanced (the sets' use in training: tests/test_data.py, tests/test_dataio_seg.py)."""

import pytest
import torch

from dataio.synthetic import SyntheticImages, SyntheticVegetation


def test_images_are_a_function_of_seed_split_and_index():
    a = SyntheticImages(split="train", num_classes=3, samples_per_class=2, image_size=32, seed=5)
    b = SyntheticImages(split="train", num_classes=3, samples_per_class=2, image_size=32, seed=5)
    assert len(a) == 6 and sorted(a[i][1] for i in range(6)) == [0, 0, 1, 1, 2, 2]
    for i in range(6):
        assert torch.equal(a[i][0], b[i][0]) and a[i][1] == b[i][1]
    val = SyntheticImages(split="val", num_classes=3, samples_per_class=2, image_size=32, seed=5)
    other = SyntheticImages(split="train", num_classes=3, samples_per_class=2, image_size=32, seed=6)
    assert not torch.equal(a[0][0], val[0][0]) and not torch.equal(a[0][0], other[0][0])
    assert a[0][0].shape == (3, 32, 32) and 0 <= a[0][0].min() and a[0][0].max() <= 1


def test_vegetation_masks_match_their_images():
    ds = SyntheticVegetation(split="val", num_samples=2, image_size=32, num_classes=3, seed=1)
    img, mask = ds[0]
    assert img.shape[-2:] == mask.shape[-2:] == (32, 32)
    assert set(torch.unique(mask).tolist()) <= {0, 1, 2}
    img2, mask2 = SyntheticVegetation(split="val", num_samples=2, image_size=32, num_classes=3, seed=1)[0]
    assert torch.equal(img, img2) and torch.equal(mask, mask2)


@pytest.mark.parametrize("kw", [dict(num_classes=1), dict(samples_per_class=0), dict(image_size=4), dict(seed=-1),
                                dict(split="holdout")])
def test_bad_settings_are_named(kw):
    with pytest.raises(ValueError):
        SyntheticImages(**{**dict(num_classes=3, samples_per_class=2, image_size=32), **kw})
