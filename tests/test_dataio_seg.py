"""data_seg.py: joint transforms keep image and mask aligned, layouts, mask conventions, RLE, synthetic set."""

import pytest
import torch
import torch.nn.functional as F
from torchvision.io import write_jpeg, write_png

from data import CorruptImageError
from dataio.seg import (
    _COLOUR_OPS,
    _GEOMETRIC_OPS,
    IGNORE_INDEX,
    AdeTrainTransform,
    SegTransform,
    SyntheticVegetation,
    build_seg_datasets,
    list_images,
    rand_augment_pair,
    read_mask,
    rle_decode,
    rle_encode,
    save_mask_png,
)

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
pytestmark = pytest.mark.usefixtures("one_thread")  # tiny ops: see conftest.py


def blocky_pair(H=48, W=64, block=8, seed=0):
    """A random block mask and an image whose red channel says where the mask is (230 vs 20), noise elsewhere."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.randint(0, 2, (H // block + 1, W // block + 1), generator=g).repeat_interleave(block, 0)
    mask = mask.repeat_interleave(block, 1)[:H, :W].to(torch.uint8)
    image = torch.randint(0, 256, (3, H, W), generator=g, dtype=torch.uint8)
    image[0] = torch.where(mask.bool(), 230, 20).to(torch.uint8)
    return image, mask


def agreement(image_u8_or_float, mask):
    """Fraction of labelled pixels where (red > 0.5) == (mask == 1)."""
    red = image_u8_or_float[0].float()
    red = red / 255 if image_u8_or_float.dtype == torch.uint8 else red
    valid = mask != IGNORE_INDEX
    return ((red > 0.5) == (mask == 1))[valid].float().mean().item(), valid.float().mean().item()


def interior_disagreements(image_u8_or_float, mask):
    """Labelled pixels away from any label edge and the image border (3x3 neighbourhood of one label) where the
    red channel disagrees with the mask. Interpolation may blur edges; a misaligned mask shows up here."""
    red = image_u8_or_float[0].float()
    red = red / 255 if image_u8_or_float.dtype == torch.uint8 else red
    m = F.pad(mask.float()[None, None], (1, 1, 1, 1), value=IGNORE_INDEX)  # the image border counts as an edge
    uniform = (F.max_pool2d(m, 3, 1) == -F.max_pool2d(-m, 3, 1))[0, 0]
    return (((red > 0.5) != (mask == 1)) & uniform & (mask != IGNORE_INDEX)).sum().item()


def unnormalise(x):
    return x * torch.tensor(STD).view(3, 1, 1) + torch.tensor(MEAN).view(3, 1, 1)


# -----------------------------------------------------------------------------
# joint transforms


def test_train_transform_keeps_image_and_mask_aligned():
    tf = SegTransform(train=True, img_size=40, mean=MEAN, std=STD, scale_range=(0.5, 2.0), hflip=True, vflip=True)
    torch.manual_seed(0)
    saw_padding = False
    for seed in range(20):
        image, mask = blocky_pair(seed=seed)
        x, m = tf(image, mask)
        assert x.shape == (3, 40, 40) and x.dtype == torch.float32 and m.shape == (40, 40) and m.dtype == torch.int64
        assert set(m.unique().tolist()) <= {0, 1, IGNORE_INDEX}
        agree, valid = agreement(unnormalise(x), m)
        assert agree > 0.92, (seed, agree)  # (measured 0.95-1.0: only edge pixels, blurred by resizing, differ)
        assert interior_disagreements(unnormalise(x), m) == 0, seed
        saw_padding |= valid < 1
        # the control: a mask flipped or shifted on its own disagrees inside regions, so the checks can fail
        if 0.2 < m[m != IGNORE_INDEX].float().mean() < 0.8:
            assert interior_disagreements(unnormalise(x), m.flip(-1)) > 20
            assert interior_disagreements(unnormalise(x), m.roll(3, -1)) > 20
    assert saw_padding  # scale < 1 happened: padded pixels are ignore_index


def test_randaugment_geometric_ops_move_the_mask_too():
    torch.manual_seed(1)
    for op in _GEOMETRIC_OPS:
        for seed in range(4):
            image, mask = blocky_pair(seed=seed)
            img2, mask2 = rand_augment_pair(image, mask, num_ops=1, ops=(op,))
            assert img2.dtype == torch.uint8 and mask2.dtype == torch.uint8
            assert not torch.equal(mask2, mask)  # the op did move things
            agree, valid = agreement(img2, mask2)
            assert agree > 0.93 and interior_disagreements(img2, mask2) == 0, (op, agree)
            if op.startswith("Translate"):  # pixels moved in from outside: ignored in the mask, black in the image
                outside = mask2 == IGNORE_INDEX
                assert outside.float().mean() > 0.05
                assert (img2[:, outside] == 0).float().mean() > 0.9


def test_randaugment_colour_ops_leave_the_mask_alone():
    torch.manual_seed(2)
    image, mask = blocky_pair()
    changed = 0
    for op in _COLOUR_OPS:
        for _ in range(3):
            img2, mask2 = rand_augment_pair(image, mask, num_ops=1, ops=(op,))
            assert torch.equal(mask2, mask)
            changed += not torch.equal(img2, image)
    assert changed >= 3 * (len(_COLOUR_OPS) - 2)  # Identity (and maybe AutoContrast on a full-range image) no-op
    with pytest.raises(ValueError, match="Blur"):
        rand_augment_pair(image, mask, ops=("Blur",))


def test_full_train_transform_with_randaug_and_photometric():
    tf = SegTransform(train=True, img_size=32, mean=MEAN, std=STD, randaug=True, photometric=True, vflip=True)
    torch.manual_seed(3)
    for seed in range(10):
        image, mask = blocky_pair(seed=seed)
        x, m = tf(image, mask)
        assert x.shape == (3, 32, 32) and torch.isfinite(x).all()
        assert set(m.unique().tolist()) <= {0, 1, IGNORE_INDEX}


def test_eval_transform_fits_longer_side_and_pads_with_ignore():
    image, mask = blocky_pair(H=30, W=60, block=6)
    x, m = SegTransform(train=False, img_size=40, mean=MEAN, std=STD)(image, mask)
    assert x.shape == (3, 40, 40) and m.shape == (40, 40)
    assert (m[20:] == IGNORE_INDEX).all() and (m[:20] != IGNORE_INDEX).all()  # 30x60 -> 20x40, padded below
    assert torch.allclose(x[:, 20:], torch.zeros(3, 20, 40))  # padding is the mean colour (0 after normalising)
    assert agreement(unnormalise(x), m)[0] > 0.95
    # a square image of the canvas size passes unchanged
    image, mask = blocky_pair(H=40, W=40)
    x, m = SegTransform(train=False, img_size=40, mean=MEAN, std=STD)(image, mask)
    assert torch.equal(m, mask.long()) and torch.allclose(unnormalise(x), image / 255, atol=1e-6)


# -----------------------------------------------------------------------------
# run-length encoding


def test_rle_hand_worked_examples():
    # 3x3: column-major order reads col 0 (0,1,0), col 1 (1,1,0), col 2 (0,0,1) -> 0 1 0 1 1 0 0 0 1,
    # pixels numbered from 1: runs start at 2 (length 1), 4 (length 2), 9 (length 1)
    mask = torch.tensor([[0, 1, 0],
                         [1, 1, 0],
                         [0, 0, 1]])
    assert rle_encode(mask) == [2, 1, 4, 2, 9, 1]
    # 2x3 (not square): columns (1,1), (1,0), (0,1) -> 1 1 1 0 0 1 -> [1, 3, 6, 1] (row-major would give [1,2,4,1,6,1])
    mask = torch.tensor([[1, 1, 0],
                         [1, 0, 1]])
    assert rle_encode(mask) == [1, 3, 6, 1]
    assert rle_decode([1, 3, 6, 1], (2, 3)).tolist() == mask.tolist()
    assert rle_encode(torch.zeros(4, 5)) == [] and rle_encode(torch.ones(4, 5)) == [1, 20]
    import numpy as np
    assert rle_encode(np.array([[0, 1], [0, 1]], dtype=np.uint8)) == [3, 2]


def test_rle_round_trip_and_errors():
    g = torch.Generator().manual_seed(0)
    for H, W in ((1, 1), (7, 13), (64, 48)):
        mask = (torch.rand(H, W, generator=g) > 0.6).to(torch.uint8)
        rle = rle_encode(mask)
        assert all(isinstance(v, int) for v in rle)
        assert torch.equal(rle_decode(rle, (H, W)), mask)
    with pytest.raises(ValueError, match="odd"):
        rle_decode([1, 2, 3], (2, 2))
    with pytest.raises(ValueError, match="outside"):
        rle_decode([4, 2], (2, 2))


def test_save_mask_png_round_trip(tmp_path):
    mask = torch.tensor([[0, 1, 1], [1, 0, 0]])
    save_mask_png(mask, tmp_path / "sub" / "m.png")
    assert torch.equal(read_mask(tmp_path / "sub" / "m.png"), mask.to(torch.uint8))
    save_mask_png(mask, tmp_path / "v.png", scale=255)
    assert read_mask(tmp_path / "v.png").unique().tolist() == [0, 255]
    with pytest.raises(ValueError, match="0..255"):
        save_mask_png(mask * 300, tmp_path / "bad.png")


# -----------------------------------------------------------------------------
# on-disk layouts


def _write_pair(img_dir, ann_dir, name, seed, *, scale=1, mask_size=None):
    image, mask = blocky_pair(H=24, W=32, seed=seed)
    img_dir.mkdir(parents=True, exist_ok=True)
    ann_dir.mkdir(parents=True, exist_ok=True)
    write_jpeg(image, str(img_dir / f"{name}.jpg"), quality=98)
    if mask_size is not None:
        mask = mask[:mask_size[0], :mask_size[1]]
    write_png((mask * scale)[None], str(ann_dir / f"{name}.png"))
    return mask


def _ucc(root, img="img", ann="ann", val="valid", n=(3, 2), scale=1):
    for split, k in zip(("train", val), n):
        for i in range(k):
            _write_pair(root / img / split, root / ann / split, f"{split}_{i}", seed=i, scale=scale)


def test_ucc_folder_layout(tmp_path):
    _ucc(tmp_path)
    (tmp_path / "img" / "test").mkdir()
    write_jpeg(blocky_pair()[0], str(tmp_path / "img" / "test" / "t0.jpg"))  # unlabelled test: prediction only
    tr, va, te, k = build_seg_datasets("folder", tmp_path, img_size=32, mean=MEAN, std=STD)
    assert (len(tr), len(va), te, k) == (3, 2, None, 2) and tr.classes == ["background", "foreground"]
    x, m = va[0]  # 24x32 -> 24x32 on a 32x32 canvas
    assert x.shape == (3, 32, 32) and (m[24:] == IGNORE_INDEX).all()
    assert set(m.unique().tolist()) <= {0, 1, IGNORE_INDEX}
    assert agreement(unnormalise(x), m)[0] > 0.97  # the right mask for the right image
    assert [p.name for p in list_images(tmp_path / "img" / "test")] == ["t0.jpg"]
    # a labelled test split is returned; train_on_val adds val to train
    _write_pair(tmp_path / "img" / "test", tmp_path / "ann" / "test", "t0", seed=5)
    tr, va, te, k = build_seg_datasets("folder", tmp_path, img_size=32, mean=MEAN, std=STD, train_on_val=True)
    assert (len(tr), len(va), len(te)) == (5, 2, 1)


def test_images_masks_layout_with_0_255_masks(tmp_path):
    _ucc(tmp_path, img="images", ann="masks", val="val", scale=255)
    tr, va, te, k = build_seg_datasets("folder", tmp_path, img_size=32, mean=MEAN, std=STD)
    assert (len(tr), len(va), k) == (3, 2, 2)
    image, mask = va.load(1)
    assert set(mask.unique().tolist()) == {0, 1}  # 255 read as foreground
    assert agreement(image, mask)[0] > 0.97


def test_image_without_mask_names_both_files(tmp_path):
    _ucc(tmp_path)
    write_jpeg(blocky_pair()[0], str(tmp_path / "img" / "train" / "orphan.jpg"))
    with pytest.raises(ValueError) as e:
        build_seg_datasets("folder", tmp_path, img_size=32, mean=MEAN, std=STD)
    assert str(tmp_path / "img" / "train" / "orphan.jpg") in str(e.value)
    assert str(tmp_path / "ann" / "train" / "orphan.png") in str(e.value)


def test_mask_size_mismatch_names_both_files(tmp_path):
    _ucc(tmp_path)
    _write_pair(tmp_path / "img" / "valid", tmp_path / "ann" / "valid", "small", seed=9, mask_size=(20, 30))
    tr, va, *_ = build_seg_datasets("folder", tmp_path, img_size=32, mean=MEAN, std=STD)
    i = [p for p, _ in va.samples].index(str(tmp_path / "img" / "valid" / "small.jpg"))
    with pytest.raises(ValueError) as e:
        va[i]
    assert "small.jpg" in str(e.value) and str(tmp_path / "ann" / "valid" / "small.png") in str(e.value)


def test_bad_mask_values_and_corrupt_image(tmp_path):
    _ucc(tmp_path)
    write_png(torch.full((1, 24, 32), 7, dtype=torch.uint8), str(tmp_path / "ann" / "valid" / "valid_0.png"))
    (tmp_path / "img" / "valid" / "valid_1.jpg").write_bytes(b"garbage")
    tr, va, *_ = build_seg_datasets("folder", tmp_path, img_size=32, mean=MEAN, std=STD)
    with pytest.raises(ValueError, match=r"valid_0\.png.*\[7\]"):
        va[0]
    with pytest.raises(CorruptImageError, match=r"valid_1\.jpg"):
        va[1]


def test_missing_roots(tmp_path):
    for name, expect in (("folder", "img/{train,valid"), ("ade20k", "ADEChallengeData2016")):
        with pytest.raises(FileNotFoundError) as e:
            build_seg_datasets(name, tmp_path / "nowhere", img_size=32, mean=MEAN, std=STD)
        assert expect in str(e.value) and "--download" in str(e.value)
        with pytest.raises(FileNotFoundError, match="--data-root"):
            build_seg_datasets(name, None, img_size=32, mean=MEAN, std=STD)
    (tmp_path / "img" / "train").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="mask directory"):
        build_seg_datasets("folder", tmp_path, img_size=32, mean=MEAN, std=STD)
    with pytest.raises(FileNotFoundError):
        list_images(tmp_path / "nope")


def test_ade20k_layout_and_label_mapping(tmp_path):
    base = tmp_path / "ADEChallengeData2016"
    raw = torch.tensor([[0, 1, 2], [150, 0, 75]], dtype=torch.uint8)  # ADE ids: 0 = other, 1..150 classes
    for split, n in (("training", 2), ("validation", 1)):
        for i in range(n):
            (base / "images" / split).mkdir(parents=True, exist_ok=True)
            (base / "annotations" / split).mkdir(parents=True, exist_ok=True)
            write_jpeg(torch.full((3, 2, 3), 128, dtype=torch.uint8), str(base / "images" / split / f"ADE_{i}.jpg"))
            write_png(raw[None], str(base / "annotations" / split / f"ADE_{i}.png"))
    for root in (tmp_path, base):
        tr, va, te, k = build_seg_datasets("ade20k", root, img_size=3, mean=MEAN, std=STD)
        assert (len(tr), len(va), te, k) == (2, 1, None, 150)
        x, m = va[0]  # scale (12, 3): f = min(12 / 3, 3 / 2) = 1.5, 2x3 -> 3x5 (int(4.5 + 0.5)); mask original
        assert x.shape == (3, 3, 5)
        assert m.tolist() == [[255, 0, 1], [149, 255, 74]]  # reduce_zero_label, at the ORIGINAL size
    assert isinstance(tr.transform, AdeTrainTransform) and tr.transform.photometric  # the mmseg recipe
    assert tr.classes == [f"class_{c}" for c in range(150)]
    (base / "objectInfo150.txt").write_text("Idx\tRatio\tTrain\tVal\tName\n" + "".join(
        f"{c + 1}\t0.1\t1\t1\tname{c};synonym\n" for c in range(150)))
    assert build_seg_datasets("ade20k", tmp_path, img_size=3, mean=MEAN, std=STD)[0].classes[:2] == ["name0", "name1"]


def test_ade_train_transform_scale_crop_and_cat_max_ratio():
    torch.manual_seed(0)
    S = 8
    # 12 x 20 image: scale (32 r, 8 r) -> f = min(int(32 r) / 20, int(8 r) / 12)
    mask = torch.zeros(12, 20, dtype=torch.uint8)
    mask[:, 14:] = 1  # class 1 only in the right 30%
    image = torch.stack([mask * 200] * 3)
    tf = AdeTrainTransform(img_size=S, mean=(0, 0, 0), std=(1, 1, 1), ratio_range=(1.0, 1.0), photometric=False)
    seen_two = 0
    for _ in range(40):
        x, m = tf(image, mask)
        assert x.shape == (3, S, S) and m.shape == (S, S)
        # f = min(32 / 20, 8 / 12) = 2/3 -> 8 x 13: the crop is always 8 rows, no padding
        assert (m != 255).all()
        assert torch.equal((x[0] > 0.5).long(), m)  # image and mask cropped and flipped together
        _, counts = m.unique(return_counts=True)
        seen_two += len(counts) == 2 and counts.max() / counts.sum() < 0.75
    # a crop with only class 0 is re-drawn (up to 10 times): almost every crop holds both classes
    assert seen_two >= 36
    # without the check, crops right of column 5 of the 13 are one class only: some of 40 draws hit them
    tf.cat_max_ratio = 1.0
    assert sum(len(tf(image, mask)[1].unique()) == 1 for _ in range(40)) > 0
    # an image smaller than the crop is padded: image 0 (= mean after normalising), mask 255
    tf = AdeTrainTransform(img_size=S, mean=(0, 0, 0), std=(1, 1, 1), ratio_range=(0.5, 0.5), photometric=False)
    x, m = tf(image, mask)  # f = min(16 / 20, 4 / 12) = 1/3 -> 4 x 7 on an 8 x 8 crop
    assert (m[4:] == 255).all() and (m[:, 7:] == 255).all() and (m[:4, :7] != 255).all()
    assert (x[:, 4:] == 0).all() and (x[:, :, 7:] == 0).all()


def test_binary_0_255_rule_is_one_rule_for_every_file(tmp_path):
    _ucc(tmp_path)  # 0/1 masks
    # one mask with 0, 1 and 255: 255 is foreground here too (binary masks have no ignore label)
    mask = torch.tensor([[0, 1, 255]], dtype=torch.uint8).repeat(24, 11)[:, :32]  # 11 columns of 1, 10 of 255
    write_png(mask[None].contiguous(), str(tmp_path / "ann" / "valid" / "valid_0.png"))
    tr, va, *_ = build_seg_datasets("folder", tmp_path, img_size=32, mean=MEAN, std=STD)
    _, m = va.load(0)
    assert set(m.unique().tolist()) == {0, 1} and int((m == 1).sum()) == 24 * (11 + 10)
    assert va.masks_with_255 == 1 and tr.masks_with_255 == 0
    va.load(1)
    assert va.masks_with_255 == 1  # counted once per file


# -----------------------------------------------------------------------------
# synthetic


def test_synthetic_vegetation_deterministic_disjoint_and_binary():
    a = SyntheticVegetation(image_size=48, num_samples=8)
    b = SyntheticVegetation(image_size=48, num_samples=8)
    for i in (0, 7):
        xa, ma = a.render(i)
        xb, mb = b.render(i)
        assert torch.equal(xa, xb) and torch.equal(ma, mb)
    assert xa.shape == (3, 48, 48) and ma.shape == (48, 48) and ma.dtype == torch.int64
    val = SyntheticVegetation(split="val", image_size=48, num_samples=8)
    assert a.sample_seed(0) != val.sample_seed(0) and not torch.equal(a.render(0)[0], val.render(0)[0])
    cover = torch.stack([a.render(i)[1].float().mean() for i in range(8)])
    assert set(torch.cat([a.render(i)[1].unique() for i in range(8)]).tolist()) == {0, 1}
    assert 0.15 < cover.mean() < 0.75 and cover.min() > 0.02
    multi = SyntheticVegetation(image_size=48, num_samples=4, num_classes=4)
    assert set(torch.cat([multi.render(i)[1].unique() for i in range(4)]).tolist()) == {0, 1, 2, 3}


def test_synthetic_label_edges_are_noisy_only_near_edges():
    clean = SyntheticVegetation(image_size=64, num_samples=4, edge_noise=0.0)
    noisy = SyntheticVegetation(image_size=64, num_samples=4)
    for i in range(4):
        (xc, mc), (xn, mn) = clean.render(i), noisy.render(i)
        assert torch.equal(xc, xn)  # same picture, only the label differs
        differ = mc != mn
        assert 0.002 < differ.float().mean() < 0.15
        # disagreements lie near the clean label's edge (within 6 px), apart from rare small islands
        edge = F.max_pool2d(mc[None, None].float(), 13, 1, 6) != -F.max_pool2d(-mc[None, None].float(), 13, 1, 6)
        assert edge[0, 0][differ].float().mean() > 0.9


def _pixel_features(x):
    """(3, S, S) -> (S*S, 7): RGB, local mean of RGB, local std of the grey image (texture)."""
    grey = x.mean(0, keepdim=True)[None]
    local_mean = F.avg_pool2d(x[None], 5, 1, 2)[0]
    local_std = (F.avg_pool2d(grey ** 2, 5, 1, 2) - F.avg_pool2d(grey, 5, 1, 2) ** 2).clamp_min(0).sqrt()[0]
    return torch.cat([x, local_mean, local_std]).flatten(1).t()


def test_synthetic_vegetation_is_learnable_per_pixel():
    # a per-pixel logistic regression on colour + local texture beats the trivial predictors by far
    tr = SyntheticVegetation(split="train", image_size=48, num_samples=12)
    va = SyntheticVegetation(split="val", image_size=48, num_samples=6)
    X = torch.cat([_pixel_features(tr.render(i)[0]) for i in range(len(tr))])
    y = torch.cat([tr.render(i)[1].flatten() for i in range(len(tr))]).float()
    mu, sd = X.mean(0), X.std(0)
    w = torch.zeros(X.shape[1], requires_grad=True)
    b = torch.zeros(1, requires_grad=True)
    opt = torch.optim.Adam([w, b], lr=0.1)
    for _ in range(100):
        loss = F.binary_cross_entropy_with_logits((X - mu) / sd @ w + b, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    inter = union = fg = total = 0
    for i in range(len(va)):
        x, m = va.render(i)
        pred = ((_pixel_features(x) - mu) / sd @ w + b > 0).view_as(m)
        inter += (pred & (m == 1)).sum().item()
        union += (pred | (m == 1)).sum().item()
        fg += (m == 1).sum().item()
        total += m.numel()
    iou, all_fg_iou = inter / union, fg / total  # all-background IoU is 0; all-foreground IoU = coverage
    assert iou > all_fg_iou + 0.25 and iou > 0.7, (iou, all_fg_iou)


def test_build_synthetic_seg_datasets_and_loader():
    cfg = dict(train_per_class=3, val_per_class=2, test_per_class=1)
    tr, va, te, k = build_seg_datasets("synthetic", img_size=32, mean=MEAN, std=STD, randaug=True,
                                       synthetic_cfg=cfg)
    assert (len(tr), len(va), len(te), k) == (6, 4, 2, 2)  # per class x 2 classes
    assert tr.classes == ["background", "vegetation"]
    x, m = tr[0]
    assert x.shape == (3, 32, 32) and m.shape == (32, 32) and m.dtype == torch.int64
    xv, mv = va[1]
    raw_x, raw_m = va.render(1)
    assert torch.equal(mv, raw_m)  # evaluation: canvas = render size, no change to the mask
    assert (unnormalise(xv) - raw_x).abs().max() < 1 / 255 + 1e-5  # only the uint8 quantisation
    xb, mb = next(iter(torch.utils.data.DataLoader(tr, batch_size=3, num_workers=1)))
    assert xb.shape == (3, 3, 32, 32) and mb.shape == (3, 32, 32)
    tr, va, _, k = build_seg_datasets("synthetic", img_size=32, mean=MEAN, std=STD, num_classes=3,
                                      train_on_val=True, synthetic_cfg=cfg)
    assert k == 3 and len(tr) == 3 * 3 + 3 * 2 and tr.classes == va.classes and len(tr.classes) == 3


def test_photometric_steps_equal_the_hsv_formulas():
    """mmseg's PhotoMetricDistortion steps, checked per pixel against colorsys (the standard library's HSV): saturation
    scales S only, hue adds 2 degrees per OpenCV unit, contrast multiplies, brightness adds /255; order matters."""
    import colorsys

    from dataio.seg import photometric, scale_saturation
    g = torch.Generator().manual_seed(0)
    img = torch.rand(3, 4, 5, generator=g, dtype=torch.float64)
    px = [tuple(img[:, i, j].tolist()) for i in range(4) for j in range(5)]
    for a in (0.5, 1.3):
        out = scale_saturation(img, a)
        for (i, j), rgb in zip([(i, j) for i in range(4) for j in range(5)], px):
            h, s, v = colorsys.rgb_to_hsv(*rgb)
            want = colorsys.hsv_to_rgb(h, min(1.0, a * s), v)
            assert max(abs(x - y) for x, y in zip(out[:, i, j].tolist(), want)) < 1e-12
    out = photometric(img.float(), hue=9)  # +18 degrees
    for (i, j), rgb in zip([(i, j) for i in range(4) for j in range(5)], px):
        h, s, v = colorsys.rgb_to_hsv(*rgb)
        want = colorsys.hsv_to_rgb((h + 18 / 360) % 1, s, v)
        assert max(abs(x - y) for x, y in zip(out[:, i, j].tolist(), want)) < 1e-5  # fp32 rounding of values <= 1
    assert torch.equal(photometric(img, contrast=1.5), (img * 1.5).clamp(0, 1))
    assert torch.equal(photometric(img, brightness=-32), (img - 32 / 255).clamp(0, 1))
    # contrast second vs last: different images once saturation sits between them
    first = photometric(img, contrast=1.5, saturation=0.5)
    last = photometric(img, contrast=1.5, saturation=0.5, contrast_last=True)
    assert (first - last).abs().max() > 1e-3


# -----------------------------------------------------------------------------
# masks that do not fit (issue 23, tracebacks 6-8) and unusual but valid ones


@pytest.mark.parametrize("num_classes, make, phrase", [
    (2, lambda m: m[:20, :30], r"is 32x24 \(WxH\) but its mask .* is 30x20; a mask must have its image's size"),
    (2, lambda m: torch.where(m == 1, 7, m), r"holds values \[7\] outside the class ids 0..1 \(a binary mask holds"),
    (3, lambda m: m * 4, r"holds values \[4\] outside the class ids 0..2 and the ignore index 255; pass the number"),
])
def test_masks_that_do_not_fit_their_images(tmp_path, num_classes, make, phrase):
    _ucc(tmp_path)
    image, mask = blocky_pair(H=24, W=32, seed=0)
    write_png(make(mask).contiguous()[None], str(tmp_path / "ann" / "valid" / "valid_0.png"))
    _, va, *_ = build_seg_datasets("folder", tmp_path, img_size=32, mean=MEAN, std=STD, num_classes=num_classes)
    with pytest.raises(CorruptImageError, match=phrase):  # what the scripts stop on by name (a ValueError too)
        va[0]
    va[1]  # the other pair is fine


def test_ade_label_above_150_is_named(tmp_path):
    base = tmp_path / "ADEChallengeData2016"
    for split in ("training", "validation"):
        (base / "images" / split).mkdir(parents=True)
        (base / "annotations" / split).mkdir(parents=True)
        write_jpeg(torch.full((3, 2, 3), 128, dtype=torch.uint8), str(base / "images" / split / "ADE_0.jpg"))
        write_png(torch.tensor([[[0, 1, 151], [150, 0, 75]]], dtype=torch.uint8),
                  str(base / "annotations" / split / "ADE_0.png"))
    _, va, _, _ = build_seg_datasets("ade20k", tmp_path, img_size=3, mean=MEAN, std=STD)
    with pytest.raises(CorruptImageError, match=r"holds values \[150\] outside the class ids 0..149"):
        va[0]  # ADE id 151 -> 150 after reduce_zero_label: no such class


def test_rgb_mask_with_equal_channels_is_read_and_said(tmp_path):
    _ucc(tmp_path)
    _, mask = blocky_pair(H=24, W=32, seed=0)
    write_png(mask[None].expand(3, -1, -1).contiguous(), str(tmp_path / "ann" / "valid" / "valid_0.png"))
    _, va, *_ = build_seg_datasets("folder", tmp_path, img_size=32, mean=MEAN, std=STD)
    with pytest.warns(UserWarning, match=r"valid_0\.png is stored with 3 equal colour channels: read as its first"):
        _, got = va.load(0)
    assert torch.equal(got, mask)
    rgb = mask[None].expand(3, -1, -1).clone()
    rgb[1, 0, 0] = 1 - rgb[1, 0, 0]  # one pixel differs: a colour mask, refused
    write_png(rgb, str(tmp_path / "ann" / "valid" / "valid_0.png"))
    with pytest.raises(ValueError, match="has 3 channels; expected a single-channel PNG"):
        va.load(0)


def test_mask_names_never_collide():
    from dataio.seg import mask_names
    assert mask_names(["a.jpg", "sub/b.png", "c.webp"]) == ["a.png", "sub/b.png", "c.png"]
    assert mask_names(["x.jpg", "x.png", "y.jpg"]) == ["x.jpg.png", "x.png.png", "y.png"]
    names = ["x.jpg", "x.png", "x.jpg.jpeg"]  # x.jpg.jpeg would take x.jpg.png: every name in full
    assert mask_names(names) == ["x.jpg.png", "x.png.png", "x.jpg.jpeg.png"]
    assert len(set(mask_names(["a/x.jpg", "a/x.png", "a/x.gif", "b/x.jpg"]))) == 4


def test_ade20k_fixture_files_read_as_mmsegmentation_reads_them():
    """tests/fixtures/ade20k: the release layout (JPEG images, 8-bit PNG ADE ids, objectInfo150.txt) through
    build_seg_datasets: every validation mask is the PNG's ids minus 1 (0 -> 255) at the original size, the image
    resized keeping its ratio; the training pairs come out as S x S crops."""
    from pathlib import Path

    import numpy as np
    from PIL import Image
    root = Path(__file__).resolve().parent / "fixtures" / "ade20k"
    tr, va, te, k = build_seg_datasets("ade20k", root, img_size=32, mean=MEAN, std=STD)
    assert (len(tr), len(va), te, k) == (3, 2, None, 150)
    assert tr.classes[:4] == ["wall", "thing2", "floor", "thing4"]  # objectInfo150.txt, first synonym
    for i, (image_path, mask_path) in enumerate(va.samples):
        ids = torch.from_numpy(np.array(Image.open(mask_path))).long()  # (H, W) ADE ids, read by PIL
        x, m = va[i]
        want = torch.where(ids == 0, torch.full_like(ids, 255), ids - 1)
        assert torch.equal(m, want)  # at the original size, per pixel
        H, W = ids.shape
        f = min(4 * 32 / max(H, W), 32 / min(H, W))
        assert x.shape == (3, int(H * f + 0.5), int(W * f + 0.5))
    torch.manual_seed(0)
    for i in range(len(tr)):
        x, m = tr[i]
        assert x.shape == (3, 32, 32) and m.shape == (32, 32)
        assert set(m.unique().tolist()) <= {0, 2, 12, 149, 255}  # ids 1, 3, 13, 150 and "other" / padding
