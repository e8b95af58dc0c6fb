"""data.py: the synthetic set (deterministic, disjoint splits, learnable, knobs), on-disk layouts, errors."""

import json
import os
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader
from torchvision.io import write_jpeg, write_png

import data
from data import CorruptImageError, SyntheticImages, build_datasets, build_transform

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
pytestmark = pytest.mark.usefixtures("one_thread")  # tiny ops: see conftest.py


# -----------------------------------------------------------------------------
# synthetic


def test_synthetic_is_deterministic_per_index():
    a = SyntheticImages(num_classes=7, image_size=32, seed=3)
    b = SyntheticImages(num_classes=7, image_size=32, seed=3)
    for i in (0, 5, 69):
        xa, ya = a.render(i)
        xb, yb = b.render(i)
        assert ya == yb == i % 7
        assert torch.equal(xa, xb)
    # order of access does not matter (no shared RNG state)
    assert torch.equal(b.render(5)[0], a.render(5)[0])
    assert not torch.equal(a.render(0)[0], a.render(7)[0])  # same class, new nuisance
    x = a.render(0)[0]
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32 and 0 <= x.min() and x.max() <= 1


def test_synthetic_splits_and_seeds_are_disjoint():
    n = 40
    seeds = {s: {SyntheticImages(split=s, num_classes=4, samples_per_class=10).sample_seed(i) for i in range(n)}
             for s in ("train", "val", "test")}
    assert not seeds["train"] & seeds["val"] and not seeds["train"] & seeds["test"] and not seeds["val"] & seeds["test"]
    other = {SyntheticImages(split="train", num_classes=4, samples_per_class=10, seed=1).sample_seed(i)
             for i in range(n)}
    assert not other & seeds["train"] and not other & seeds["val"] and not other & seeds["test"]
    tr = SyntheticImages(split="train", num_classes=4, image_size=16, samples_per_class=10)
    va = SyntheticImages(split="val", num_classes=4, image_size=16, samples_per_class=10)
    imgs_tr = torch.stack([tr.render(i)[0] for i in range(n)]).flatten(1)
    imgs_va = torch.stack([va.render(i)[0] for i in range(n)]).flatten(1)
    assert torch.cdist(imgs_tr, imgs_va).min() > 1.0  # no val image repeats a train image


def _features(x):
    """Hand-made, pose-invariant features of (B, 3, S, S) images in [0, 1]: a hue histogram of the saturated
    pixels (the object's colour) and the power spectrum of the grey image (texture, shape; translation-free)."""
    B = x.shape[0]
    mx, mn = x.amax(1), x.amin(1)
    sat = (mx - mn) / (mx + 1e-6)
    hue = torch.atan2(3 ** 0.5 * (x[:, 1] - x[:, 2]), 2 * x[:, 0] - x[:, 1] - x[:, 2])  # (B, S, S)
    bins = ((hue + torch.pi) / (2 * torch.pi) * 12).long().clamp(0, 11)
    hist = torch.zeros(B, 12).scatter_add_(1, bins.flatten(1), (sat * (sat > 0.4)).flatten(1))
    grey = x.mean(1)
    spec = torch.fft.rfft2(grey - grey.mean((1, 2), keepdim=True)).abs()[:, :12, :12].reshape(B, -1)
    return torch.cat([hist / (hist.sum(1, keepdim=True) + 1e-6), spec / (spec.norm(dim=1, keepdim=True) + 1e-6)], 1)


def _probe_accuracy(train, val, num_classes, shuffle_labels=False):
    xtr = torch.stack([train.render(i)[0] for i in range(len(train))])
    ytr = torch.arange(len(train)) % num_classes
    xva = torch.stack([val.render(i)[0] for i in range(len(val))])
    yva = torch.arange(len(val)) % num_classes
    if shuffle_labels:
        ytr = ytr[torch.randperm(len(ytr), generator=torch.Generator().manual_seed(0))]
    ftr, fva = _features(xtr), _features(xva)
    mu, sd = ftr.mean(0), ftr.std(0) + 1e-6
    ftr, fva = (ftr - mu) / sd, (fva - mu) / sd
    W = torch.zeros(ftr.shape[1], num_classes, requires_grad=True)
    b = torch.zeros(num_classes, requires_grad=True)
    opt = torch.optim.Adam([W, b], lr=0.05)
    for _ in range(150):
        loss = F.cross_entropy(ftr @ W + b, ytr) + 1e-3 * W.pow(2).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return ((fva @ W + b).argmax(1) == yva).float().mean().item()


def test_synthetic_classes_are_learnable_and_labels_matter():
    # a linear probe on hand-made invariant features: far above chance with true labels, chance with shuffled ones
    C = 10
    # (measured: 0.46 with 30 images per class; a small CNN reaches ~0.8 in a few CPU minutes)
    train = SyntheticImages(split="train", num_classes=C, samples_per_class=30, image_size=32)
    val = SyntheticImages(split="val", num_classes=C, samples_per_class=10, image_size=32)
    acc = _probe_accuracy(train, val, C)
    assert acc > 0.3, acc  # chance 0.1
    assert _probe_accuracy(train, val, C, shuffle_labels=True) < 0.22


def test_synthetic_classes_are_distinct_combinations():
    for C in (10, 64, 100):
        ds = SyntheticImages(num_classes=C)
        triples = [d[:3] for d in ds.class_defs]
        assert len(set(triples)) == C  # every class its own (shape, texture, colour)
        assert len(set(ds.classes)) == C
        for k in range(3):  # no single attribute names the class
            assert len({t[k] for t in triples}) < C


def test_synthetic_family_style_and_fine_grained_knobs():
    base = SyntheticImages(num_classes=20, image_size=32)
    fam = SyntheticImages(num_classes=20, image_size=32, family=1)
    assert base.class_defs != fam.class_defs or base.shapes != fam.shapes  # new class definitions
    assert base.classes != fam.classes
    sty = SyntheticImages(num_classes=20, image_size=32, style=1)
    assert sty.class_defs == base.class_defs and sty.shapes == base.shapes  # same classes...
    assert all(sty.tex_perm[i] != i for i in range(len(sty.tex_perm)))  # ...every texture kind replaced
    assert not torch.allclose(sty.draw(3, 11), base.draw(3, 11), atol=0.05)  # ...rendered differently
    # fine-grained: classes of a group share shape/texture/colour and differ only near the object's centre
    fg = SyntheticImages(num_classes=12, image_size=64, fine_grained=4)
    for grp in range(3):
        defs = fg.class_defs[4 * grp:4 * grp + 4]
        assert len({d[:3] for d in defs}) == 1 and len({d[3] for d in defs}) == 4
    assert fg.class_defs[0][:3] != fg.class_defs[4][:3]
    for seed in (1, 2, 3):
        a, b = fg.draw(0, seed), fg.draw(1, seed)
        changed = (a - b).abs().amax(0) > 0.02  # (S, S)
        assert 0.003 < changed.float().mean() < 0.08, changed.float().mean()
    with pytest.raises(ValueError, match="fine_grained"):
        SyntheticImages(num_classes=12, fine_grained=1)


def test_synthetic_render_is_fast():
    import time
    ds = SyntheticImages(num_classes=64, image_size=64)
    ds.render(0)
    t = time.process_time()
    for i in range(50):
        ds.render(i)
    per_image = (time.process_time() - t) / 50
    assert per_image < 0.01, per_image  # ~0.7 ms CPU measured; generous for a busy machine


def test_build_synthetic_datasets():
    cfg = dict(num_classes=5, train_per_class=4, val_per_class=2, test_per_class=3, family=2)
    tr, va, te, n = build_datasets("synthetic", img_size=24, mean=MEAN, std=STD, randaug=True, synthetic_cfg=cfg)
    assert n == 5 and (len(tr), len(va), len(te)) == (20, 10, 15)
    assert tr.classes == va.classes and tr.family == 2
    x, y = tr[3]
    assert x.shape == (3, 24, 24) and x.dtype == torch.float32 and y == 3
    xv, yv = va[1]
    raw = va.render(1)[0]
    mean, std = torch.tensor(MEAN).view(3, 1, 1), torch.tensor(STD).view(3, 1, 1)
    # eval: normalise only. (x - mean) / std rounds twice (three times as x * (1 / std)): each result is within
    # 1.5 eps of the exact value, relative to it, so the two agree to 3 eps |value| element-wise
    expected = (raw - mean) / std
    assert bool(((xv - expected).abs() <= 3 * torch.finfo(torch.float32).eps * expected.abs()).all()) and yv == 1
    xb, yb = next(iter(DataLoader(tr, batch_size=8, num_workers=1)))
    assert xb.shape == (8, 3, 24, 24) and yb.tolist() == [0, 1, 2, 3, 4, 0, 1, 2]
    with pytest.raises(ValueError, match="image_size"):
        build_datasets("synthetic", img_size=24, mean=MEAN, std=STD, synthetic_cfg=dict(image_size=32))


# -----------------------------------------------------------------------------
# transforms


def test_eval_transform_resize_crop_normalise():
    # a constant image stays constant through bicubic resize + crop; normalisation is (x - mean) / std
    img = torch.full((3, 50, 80), 200, dtype=torch.uint8)
    img[0] = 100
    out = build_transform(train=False, img_size=32, mean=MEAN, std=STD, crop_pct=0.8)(img)
    assert out.shape == (3, 32, 32)
    expect = (torch.tensor([100, 200, 200]) / 255 - torch.tensor(MEAN)) / torch.tensor(STD)
    assert torch.allclose(out.mean((1, 2)), expect, atol=1e-3) and out.std((1, 2)).max() < 1e-3
    # the resize goes to floor(img_size / crop_pct) = 40 on the shorter side, then the centre 32 are kept:
    # a 1-px border stripe of a 50-px-high image (0.8 px after resizing) is cropped away
    img = torch.zeros(3, 50, 50, dtype=torch.uint8)
    img[:, :5] = 255  # top 5 rows -> top 4 rows after resizing to 40 -> exactly the 4 rows the crop drops
    out = build_transform(train=False, img_size=32, mean=(0, 0, 0), std=(1, 1, 1), crop_pct=0.8)(img)
    assert out[:, 1:].max() < 0.05
    train_tf = build_transform(train=True, img_size=16, mean=MEAN, std=STD, randaug=True)
    assert train_tf(torch.randint(0, 255, (3, 40, 30), dtype=torch.uint8)).shape == (3, 16, 16)


# -----------------------------------------------------------------------------
# on-disk layouts (tiny files)


def _jpg(path, colour, size=(12, 16)):
    path.parent.mkdir(parents=True, exist_ok=True)
    img = torch.tensor(colour, dtype=torch.uint8).view(3, 1, 1).expand(3, *size).contiguous()
    write_jpeg(img, str(path), quality=95)


COLOURS = [(250, 10, 10), (10, 250, 10), (10, 10, 250)]


def _colour_of(ds, i):
    x = ds[i][0]
    rgb = x.mean((1, 2)) * torch.tensor(STD) + torch.tensor(MEAN)
    return int(rgb.argmax())


def _make_cub(root):
    base = root / "CUB_200_2011"
    names = ["001.Black_footed_Albatross", "002.Laysan_Albatross", "003.Sooty_Albatross"]
    images, labels, split = [], [], []
    i = 0
    for c, name in enumerate(names):
        for k in range(4):
            i += 1
            rel = f"{name}/{name.split('.')[1]}_{k}.jpg"
            _jpg(base / "images" / rel, COLOURS[c])
            images.append(f"{i} {rel}")
            labels.append(f"{i} {c + 1}")
            split.append(f"{i} {1 if k < 3 else 0}")  # 3 train, 1 test per class
    (base / "images.txt").write_text("\n".join(images) + "\n")
    (base / "image_class_labels.txt").write_text("\n".join(labels) + "\n")
    (base / "train_test_split.txt").write_text("\n".join(split) + "\n")
    (base / "classes.txt").write_text("\n".join(f"{c + 1} {n}" for c, n in enumerate(names)) + "\n")
    return base


def test_cub_layout(tmp_path):
    _make_cub(tmp_path)
    for root in (tmp_path, tmp_path / "CUB_200_2011"):  # parent or the dataset folder itself
        tr, va, te, n = build_datasets("cub", root, img_size=16, mean=MEAN, std=STD)
        assert n == 3 and te is None and (len(tr), len(va)) == (9, 3)
        assert tr.classes[0] == "001.Black_footed_Albatross"
        assert sorted(tr.targets) == [0, 0, 0, 1, 1, 1, 2, 2, 2] and sorted(va.targets) == [0, 1, 2]
        for i in range(len(va)):  # labels belong to the right files: class k images are colour k
            assert _colour_of(va, i) == va[i][1]
        assert tr[0][0].shape == (3, 16, 16)


def test_folder_layout(tmp_path):
    for split, n in (("train", 3), ("val", 2), ("test", 1)):
        for c, name in enumerate(["cat", "dog", "emu"]):
            for k in range(n):
                _jpg(tmp_path / split / name / f"{k}.jpg", COLOURS[c])
    (tmp_path / "train" / "cat" / "notes.txt").write_text("not an image")
    tr, va, te, n = build_datasets("folder", tmp_path, img_size=16, mean=MEAN, std=STD)
    assert n == 3 and (len(tr), len(va), len(te)) == (9, 6, 3) and tr.classes == ["cat", "dog", "emu"]
    assert all(_colour_of(va, i) == va[i][1] for i in range(len(va)))
    # only test/: it becomes the evaluated split
    import shutil
    shutil.rmtree(tmp_path / "val")
    tr, va, te, n = build_datasets("folder", tmp_path, img_size=16, mean=MEAN, std=STD)
    assert len(va) == 3 and te is None
    # an eval class missing from train is an error naming it
    _jpg(tmp_path / "test" / "yak" / "0.jpg", COLOURS[0])
    with pytest.raises(ValueError, match="yak"):
        build_datasets("folder", tmp_path, img_size=16, mean=MEAN, std=STD)


def test_torchvision_layouts_and_paper_splits(tmp_path):
    # file lists only: torchvision reads no image at construction
    # Food101: val = the last 50 of each class's official train list
    food = tmp_path / "food-101"
    (food / "images").mkdir(parents=True)
    (food / "meta").mkdir()
    train = {c: [f"{c}/{i}" for i in range(60)] for c in ("ramen", "apple_pie")}
    test = {c: [f"{c}/t{i}" for i in range(7)] for c in ("ramen", "apple_pie")}
    (food / "meta" / "train.json").write_text(json.dumps(train))
    (food / "meta" / "test.json").write_text(json.dumps(test))
    tr, va, te, n = build_datasets("food101", tmp_path, img_size=16, mean=MEAN, std=STD)
    assert n == 2 and (len(tr), len(va), len(te)) == (20, 100, 14)
    assert {p.split("/")[-1] for p, _ in va.samples} == {f"{i}.jpg" for i in range(10, 60)}
    assert sorted(set(tr.targets)) == [0, 1] and va.targets.count(0) == 50
    # DTD partition 1
    dtd = tmp_path / "dtd" / "dtd"
    (dtd / "images").mkdir(parents=True)
    (dtd / "labels").mkdir()
    for split, n_img in (("train", 4), ("val", 3), ("test", 2)):
        (dtd / "labels" / f"{split}1.txt").write_text("".join(f"{c}/{c}_{split}{i}.jpg\n" for c in ("banded", "zigzag")
                                                              for i in range(n_img)))
        (dtd / "labels" / f"{split}2.txt").write_text("banded/other.jpg\n")
    tr, va, te, n = build_datasets("dtd", tmp_path, img_size=16, mean=MEAN, std=STD)
    assert n == 2 and (len(tr), len(va), len(te)) == (8, 6, 4)
    # Pets: trainval / test, no val -> evaluate on test
    pets = tmp_path / "oxford-iiit-pet"
    (pets / "images").mkdir(parents=True)
    (pets / "annotations").mkdir()
    (pets / "annotations" / "trainval.txt").write_text("Abyssinian_1 1 1 1\nBeagle_2 2 2 1\nBeagle_3 2 2 1\n")
    (pets / "annotations" / "test.txt").write_text("Abyssinian_9 1 1 1\n")
    tr, va, te, n = build_datasets("pets", tmp_path, img_size=16, mean=MEAN, std=STD)
    assert n == 2 and (len(tr), len(va)) == (3, 1) and te is None and tr.targets == [0, 1, 1]
    # Aircraft, variant level, train/val/test
    air = tmp_path / "fgvc-aircraft-2013b" / "data"
    (air / "images").mkdir(parents=True)
    (air / "variants.txt").write_text("707-320\nA300B4\n")
    for split, lines in (("train", "0001 707-320\n0002 A300B4\n"), ("val", "0003 A300B4\n"),
                         ("test", "0004 707-320\n")):
        (air / f"images_variant_{split}.txt").write_text(lines)
    tr, va, te, n = build_datasets("aircraft", tmp_path, img_size=16, mean=MEAN, std=STD)
    assert n == 2 and (len(tr), len(va), len(te)) == (2, 1, 1) and va.targets == [1]


@pytest.mark.parametrize("name,expect", [("cub", "CUB_200_2011"), ("dtd", "dtd/dtd"), ("food101", "food-101"),
                                         ("pets", "oxford-iiit-pet"), ("aircraft", "fgvc-aircraft-2013b"),
                                         ("cars", "stanford_cars"), ("folder", "train/<class>")])
def test_missing_root_names_layout_and_download(tmp_path, name, expect):
    with pytest.raises(FileNotFoundError) as e:
        build_datasets(name, tmp_path / "nowhere", img_size=16, mean=MEAN, std=STD)
    msg = str(e.value)
    assert expect in msg and "--download" in msg
    with pytest.raises(FileNotFoundError, match="--data-root"):
        build_datasets(name, None, img_size=16, mean=MEAN, std=STD)


def test_cars_download_refused_and_unknown_name():
    with pytest.raises(ValueError, match="no longer be downloaded"):
        build_datasets("cars", "/tmp", img_size=16, mean=MEAN, std=STD, download=True)
    with pytest.raises(ValueError, match="synthetic"):
        build_datasets("imagenet", "/tmp", img_size=16, mean=MEAN, std=STD)


def _corrupt_folder(root):
    for split in ("train", "val"):
        for k in range(3):
            _jpg(root / split / "a" / f"{k}.jpg", COLOURS[0])
    bad = root / "train" / "a" / "1.jpg"
    bad.write_bytes(b"\xff\xd8 this is not really a jpeg")
    return bad


def test_corrupt_image_names_file(tmp_path):
    bad = _corrupt_folder(tmp_path)
    tr, *_ = build_datasets("folder", tmp_path, img_size=16, mean=MEAN, std=STD)
    tr[0]
    with pytest.raises(CorruptImageError) as e:
        tr[1]
    assert str(bad) in str(e.value) and "skip" in str(e.value)
    assert isinstance(e.value, ValueError)


def test_corrupt_image_skipped_and_counted_across_workers(tmp_path):
    bad = _corrupt_folder(tmp_path)
    tr, *_ = build_datasets("folder", tmp_path, img_size=16, mean=MEAN, std=STD, skip_corrupt=True)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        x, y = tr[1]  # replaced by the next readable sample
    assert x.shape == (3, 16, 16) and any(str(bad) in str(m.message) for m in w)
    assert tr.num_skipped == 1 and tr.skipped_files() == [str(bad)]
    # marks made in DataLoader worker processes reach the main process (shared memory), once per file
    tr, *_ = build_datasets("folder", tmp_path, img_size=16, mean=MEAN, std=STD, skip_corrupt=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for _ in range(2):  # two epochs
            batches = list(DataLoader(tr, batch_size=1, num_workers=2))
    assert len(batches) == 3
    assert tr.num_skipped == 1 and tr.skipped_files() == [str(bad)]


def test_png_and_grey_images_decode_as_rgb(tmp_path):
    for c in range(2):
        _jpg(tmp_path / "train" / f"c{c}" / "0.jpg", COLOURS[c])
    (tmp_path / "val" / "c0").mkdir(parents=True)
    write_png(torch.full((1, 10, 10), 128, dtype=torch.uint8), str(tmp_path / "val" / "c0" / "grey.png"))
    tr, va, te, n = build_datasets("folder", tmp_path, img_size=8, mean=(0, 0, 0), std=(1, 1, 1))
    x, y = va[0]
    assert x.shape == (3, 8, 8) and torch.allclose(x, torch.full_like(x, 128 / 255), atol=2e-3)


def test_cub_download_is_wired(tmp_path, monkeypatch):
    calls = []

    def fake_download(url, download_root, filename, md5):
        calls.append((url, md5))
        _make_cub(tmp_path)

    monkeypatch.setattr(data, "download_and_extract_archive", fake_download)
    tr, va, te, n = build_datasets("cub", tmp_path, img_size=16, mean=MEAN, std=STD, download=True)
    assert calls == [(data.CUB_URL, data.CUB_MD5)] and n == 3


def test_animated_gif_reads_its_first_frame(tmp_path):
    """An animated GIF decodes to (frames, 3, H, W); the dataset takes the first frame (as PIL's Image.open does),
    so a batch with it stacks like any other."""
    Image = pytest.importorskip("PIL.Image")
    for c in range(2):
        _jpg(tmp_path / "train" / f"c{c}" / "0.jpg", COLOURS[c])
        _jpg(tmp_path / "val" / f"c{c}" / "0.jpg", COLOURS[c])
    frames = [Image.new("RGB", (12, 16), COLOURS[k]) for k in (1, 0, 2)]  # first frame: class 1's colour
    frames[0].save(tmp_path / "val" / "c1" / "anim.gif", save_all=True, append_images=frames[1:])
    tr, va, te, n = build_datasets("folder", tmp_path, img_size=8, mean=MEAN, std=STD)
    i = next(i for i, (p, _) in enumerate(va.samples) if p.endswith("anim.gif"))
    assert data.read_image(va.samples[i][0]).shape == (3, 16, 12) and _colour_of(va, i) == 1
    x, y = next(iter(DataLoader(va, batch_size=len(va))))
    assert x.shape == (3, 3, 8, 8)


@pytest.mark.parametrize("files, phrase", [((), "holds no files"), (("a.bmp", "b.tif"), "only .bmp, .tif files")])
def test_a_training_class_without_usable_images_is_an_error_naming_it(tmp_path, files, phrase):
    for c in range(2):
        _jpg(tmp_path / "train" / f"c{c}" / "0.jpg", COLOURS[c])
        _jpg(tmp_path / "val" / f"c{c}" / "0.jpg", COLOURS[c])
    (tmp_path / "train" / "empty").mkdir()
    for f in files:
        (tmp_path / "train" / "empty" / f).write_bytes(b"\0")
    with pytest.raises(ValueError, match=phrase) as e:
        build_datasets("folder", tmp_path, img_size=8, mean=MEAN, std=STD)
    assert str(tmp_path / "train" / "empty") in str(e.value) and "remove the folder" in str(e.value)


def test_torchvision_without_its_private_file_lists_is_a_clear_error():
    """data.py reads torchvision's private _image_files / _labels: a release that renames them gets an error
    that says so and what to do, not an AttributeError deep inside."""
    ds = object.__new__(data.DTD)  # an instance without the attributes
    with pytest.raises(ImportError, match=r"DTD no longer has the private file list.*--data folder"):
        data._tv_samples(ds)


# -----------------------------------------------------------------------------
# folder layouts of real sets: class folders without a split, class-name maps, symbolic links


def _flat(root, counts):
    """ROOT/<class>/<k>.jpg, class c coloured COLOURS[c]."""
    for c, (name, n) in enumerate(counts.items()):
        for k in range(n):
            _jpg(root / name / f"{k}.jpg", COLOURS[c % 3])


def test_class_folders_without_a_split_need_val_split(tmp_path):
    _flat(tmp_path, {"a": 10, "b": 5, "c": 1})
    with pytest.raises(FileNotFoundError, match=r"class folders and no train/val split: pass val_split \(--val-split"):
        build_datasets("folder", tmp_path, img_size=8, mean=MEAN, std=STD)
    with pytest.warns(UserWarning, match=r"single training image, e.g. c \(1\).*training only"):
        tr, va, te, n = build_datasets("folder", tmp_path, img_size=8, mean=MEAN, std=STD, val_split=0.2)
    assert n == 3 and te is None and tr.classes == ["a", "b", "c"]
    # stratified: round(0.2 x 10) = 2 of a, round(0.2 x 5) = 1 of b, none of the single c (it must train)
    assert sorted(va.targets) == [0, 0, 1] and sorted(tr.targets) == [0] * 8 + [1] * 4 + [2]
    assert not {p for p, _ in tr.samples} & {p for p, _ in va.samples}
    assert all(_colour_of(va, i) == va[i][1] for i in range(len(va)))  # labels belong to the files
    # seeded: the same seed gives the same split, another seed another one (10 choose 2 ways for class a)
    again = build_datasets("folder", tmp_path, img_size=8, mean=MEAN, std=STD, val_split=0.2)[1]
    assert again.samples == va.samples
    others = [build_datasets("folder", tmp_path, img_size=8, mean=MEAN, std=STD, val_split=0.2, split_seed=s)[1]
              for s in (1, 2, 3)]
    assert any(o.samples != va.samples for o in others)
    rec = data.split_record(tr, va, root=tmp_path, val_split=0.2, seed=0)
    assert json.loads(json.dumps(rec))["val"] == [os.path.relpath(p, tmp_path) for p, _ in va.samples]
    assert len(rec["train"]) == 13 and rec["classes"] == ["a", "b", "c"] and rec["val"][0].startswith(("a/", "b/"))


def test_train_folder_alone_with_val_split_and_a_split_root_refuses_it(tmp_path):
    _flat(tmp_path / "train", {"a": 4, "b": 4})
    tr, va, _, _ = build_datasets("folder", tmp_path, img_size=8, mean=MEAN, std=STD, val_split=0.5)
    assert (len(tr), len(va)) == (4, 4) and sorted(va.targets) == [0, 0, 1, 1]
    _flat(tmp_path / "val", {"a": 1, "b": 1})
    with pytest.raises(ValueError, match=r"has its own val/ split; drop val_split"):
        build_datasets("folder", tmp_path, img_size=8, mean=MEAN, std=STD, val_split=0.5)
    with pytest.raises(ValueError, match=r"fraction in \(0, 1\), got 1.5"):
        data.stratified_split([0, 1], 1.5, 0)
    with pytest.raises(ValueError, match="are for --data folder"):
        build_datasets("synthetic", img_size=8, mean=MEAN, std=STD, val_split=0.2)


@pytest.mark.parametrize("file, text", [
    ("classes.txt", "0 T-shirt/top\n1 Trouser\n2 Ankle boot\n"),
    ("classes.json", json.dumps({"0": "T-shirt/top", "1": "Trouser", "2": "Ankle boot"})),
])
def test_class_names_a_folder_cannot_hold(tmp_path, file, text):
    _flat(tmp_path / "train", {"0": 2, "1": 2, "2": 2})
    _flat(tmp_path / "val", {"0": 1, "1": 1, "2": 1})
    (tmp_path / file).write_text(text)  # next to the splits: picked up by itself
    tr, va, _, _ = build_datasets("folder", tmp_path, img_size=8, mean=MEAN, std=STD)
    assert tr.classes == va.classes == ["T-shirt/top", "Trouser", "Ankle boot"]
    elsewhere = tmp_path.parent / f"names_{file}"
    elsewhere.write_text(text.replace("Trouser", "Pants"))
    (tmp_path / file).unlink()
    tr, *_ = build_datasets("folder", tmp_path, img_size=8, mean=MEAN, std=STD, classes_file=elsewhere)
    assert tr.classes == ["T-shirt/top", "Pants", "Ankle boot"]
    elsewhere.write_text(text.replace("2 Ankle boot", "").replace(', "2": "Ankle boot"', ""))
    with pytest.raises(ValueError, match=r"names no class for the folder\(s\) \['2'\]"):
        build_datasets("folder", tmp_path, img_size=8, mean=MEAN, std=STD, classes_file=elsewhere)


def test_symlink_loop_in_a_class_folder_is_read_once(tmp_path):
    """Issue 23, silent 2: a link loop used to be followed, multiplying the class's images."""
    _flat(tmp_path / "train", {"a": 2, "b": 2})
    _flat(tmp_path / "val", {"a": 1, "b": 1})
    (tmp_path / "train" / "a" / "again").symlink_to(tmp_path / "train" / "a", target_is_directory=True)
    (tmp_path / "train" / "b" / "more").symlink_to(tmp_path / "train" / "a", target_is_directory=True)
    with pytest.warns(UserWarning, match=r"again is a link to .*already read"):
        tr, *_ = build_datasets("folder", tmp_path, img_size=8, mean=MEAN, std=STD)
    # a: its 2 images once; b: its 2 + the 2 of a reached through the link `more` (another folder: read)
    assert sorted(tr.targets) == [0, 0, 1, 1, 1, 1]


def test_real_photos_in_several_formats_read_as_rgb_uint8(tmp_path):
    """Grey, RGBA, palette, CMYK and 16-bit files of real photographs (tests/realdata.py) come out as uint8 RGB."""
    from PIL import Image
    from realdata import photo_sources, write_photos
    sizes = write_photos(tmp_path)
    for name, (h, w) in sizes.items():
        x = data.read_image(tmp_path / name)
        assert x.shape == (3, h, w) and x.dtype == torch.uint8, name
    # the 16-bit PNG holds grey * 257: scaled to 8 bits it is the 8-bit grey photo exactly
    Image.open(photo_sources()[0]).convert("L").save(tmp_path / "grey8.png")
    assert torch.equal(data.read_image(tmp_path / "hopper_16bit.png"), data.read_image(tmp_path / "grey8.png"))
    grey = data.read_image(tmp_path / "china_grey.png")
    assert torch.equal(grey[0], grey[1]) and torch.equal(grey[1], grey[2])
