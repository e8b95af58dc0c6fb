"""predict_seg.py on the files users have: names that cannot collide, subfolders, unreadable images skipped and named
(or --strict), an image file as --images, the run's saved random base, and --eval on masks that do not fit their
images (issue 23: tracebacks 4-8, unclear 2). One tiny EF + FPN run trained here (no --weights: it saves
OUT/base.safetensors); every call runs the script as `python predict_seg.py ...` would (runpy, in this process)."""
import re
from pathlib import Path

import pytest
import torch
from scripts import run_script  # tests/scripts.py
from torchvision.io import decode_image, write_jpeg, write_png

from dataio.synthetic import SyntheticVegetation

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = Path(__file__).resolve().parents[1]
TRAIN, PREDICT = str(ROOT / "train_seg.py"), str(ROOT / "predict_seg.py")
TINY = ["--model", "ef_tiny", "--method", "lora", "--data", "synthetic", "--img-size", "32", "--synthetic-train", "2",
        "--synthetic-val", "1", "--fpn-channels", "16", "--fpn-head-channels", "16", "--epochs", "1",
        "--batch-size", "2", "--workers", "0"]


def run(script, *argv) -> int:
    return run_script(script, *argv)


@pytest.fixture(scope="module")
def seg_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("seg") / "run"
    assert run(TRAIN, *TINY, "--out", out) == 0
    assert (out / "base.safetensors").is_file()  # a run without --weights saves its random base
    return out


def photo(i, h, w):
    img = (SyntheticVegetation(split="test", num_samples=4, image_size=64).render(i)[0] * 255).round()
    return torch.nn.functional.interpolate(img[None], size=(h, w), mode="bilinear")[0].clamp(0, 255).to(torch.uint8)


@pytest.fixture()
def folder(tmp_path):
    """x.jpg and x.png side by side, an image in a subfolder, an undecodable file, a truncated JPEG, a broken link."""
    d = tmp_path / "images"
    (d / "sub").mkdir(parents=True)
    write_jpeg(photo(0, 40, 56), str(d / "x.jpg"))
    write_png(photo(1, 30, 30), str(d / "x.png"))
    write_png(photo(2, 24, 40), str(d / "sub" / "y.png"))
    (d / "bad.png").write_bytes(b"not a png at all")
    write_jpeg(photo(3, 64, 64), str(tmp_path / "whole.jpg"), quality=90)
    data = (tmp_path / "whole.jpg").read_bytes()
    (d / "trunc.jpg").write_bytes(data[:len(data) // 2])  # cut in the middle of the scan data
    (d / "gone.png").symlink_to(tmp_path / "nowhere.png")
    return d


def test_masks_keep_names_subfolders_and_skip_unreadable_images(seg_run, folder, tmp_path, capsys):
    out = tmp_path / "pred"
    assert run(PREDICT, "--checkpoint", seg_run / "adapters.safetensors", "--images", folder, "--out", out,
               "--workers", "0") == 0
    text = capsys.readouterr().out
    written = sorted(p.relative_to(out).as_posix() for p in out.rglob("*.png"))
    assert written == ["sub/y.png", "x.jpg.png", "x.png.png"]  # x.jpg and x.png no longer overwrite each other
    assert "wrote 3 masks" in text  # the count printed is the count written
    for name, size in (("x.jpg.png", (40, 56)), ("x.png.png", (30, 30)), ("sub/y.png", (24, 40))):
        assert decode_image(str(out / name)).shape == (1, *size)  # each at its image's own size
    summary = text.split("skipped 3 image(s) that cannot be read")[1]
    for name in ("bad.png", "trunc.jpg", "gone.png"):
        assert str(folder / name) in summary
    assert "broken symbolic link" in summary
    assert f"using {seg_run / 'base.safetensors'}" in text  # no --weights: the run's saved base


def test_strict_stops_at_the_first_unreadable_image(seg_run, folder, tmp_path, capsys):
    assert run(PREDICT, "--checkpoint", seg_run / "adapters.safetensors", "--images", folder, "--out",
               tmp_path / "pred", "--strict", "--workers", "0") == 2
    err = capsys.readouterr().err
    assert "--strict" in err and "gone.png" in err and "Traceback" not in err
    (folder / "gone.png").unlink()
    assert run(PREDICT, "--checkpoint", seg_run / "adapters.safetensors", "--images", folder, "--out",
               tmp_path / "pred", "--strict", "--workers", "0") == 2
    err = capsys.readouterr().err
    assert "bad.png" in err and "Traceback" not in err  # bad.png sorts before trunc.jpg


def test_an_image_file_as_images_and_the_same_base_either_way(seg_run, folder, tmp_path, capsys):
    """Issue 23 unclear 2: --images FILE said 'image directory ... does not exist'; now a file is an input."""
    a, b = tmp_path / "a", tmp_path / "b"
    assert run(PREDICT, "--checkpoint", seg_run / "adapters.safetensors", "--images", folder / "x.jpg", "--out", a,
               "--workers", "0") == 0
    assert run(PREDICT, "--checkpoint", seg_run / "adapters.safetensors", "--images", folder / "x.jpg", "--out", b,
               "--weights", seg_run / "base.safetensors", "--workers", "0") == 0
    assert "wrote 1 masks" in capsys.readouterr().out
    assert torch.equal(decode_image(str(a / "x.png")), decode_image(str(b / "x.png")))
    assert run(PREDICT, "--checkpoint", seg_run / "adapters.safetensors", "--images", tmp_path / "nope.jpg",
               "--out", a, "--workers", "0") == 2
    assert "no such file or folder" in capsys.readouterr().err


def _folder_set(root, *, mask_of=None):
    """A UCC-layout binary set (img/ + ann/, train and valid), 32 x 32; mask_of(name) may replace a mask."""
    for split in ("train", "valid"):
        for i in range(2):
            (root / "img" / split).mkdir(parents=True, exist_ok=True)
            (root / "ann" / split).mkdir(parents=True, exist_ok=True)
            write_jpeg(photo(i, 32, 32), str(root / "img" / split / f"{i}.jpg"))
            m = torch.zeros(1, 32, 32, dtype=torch.uint8)
            m[0, :16] = 1
            m = mask_of(f"{split}/{i}", m) if mask_of else m
            write_png(m, str(root / "ann" / split / f"{i}.png"))


def _bad(name, make):
    return lambda key, m: make(m) if key == name else m


@pytest.mark.parametrize("make, phrase", [
    (lambda m: m[:, :20, :24].contiguous(), r"is 32x32 \(WxH\) but its mask .*1\.png is 24x20"),  # case 6
    (lambda m: torch.where(m == 1, 7, m).to(torch.uint8), r"holds values \[7\] outside the class ids 0..1"),  # 7
])
@pytest.mark.parametrize("workers", ["0", "1"])
def test_eval_mask_that_does_not_fit_is_a_clear_error(seg_run, tmp_path, capsys, make, phrase, workers):
    """Issue 23 tracebacks 6 and 7 in predict_seg.py --eval (from a DataLoader worker too): the message only."""
    _folder_set(tmp_path / "data", mask_of=_bad("valid/1", make))
    assert run(PREDICT, "--checkpoint", seg_run / "adapters.safetensors", "--eval", "folder", "--data-root",
               tmp_path / "data", "--workers", workers) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "DataLoader worker" not in err
    assert re.search(phrase, err), err


def test_real_photos_in_several_formats_and_sizes(seg_run, tmp_path, capsys):
    """matplotlib's and scikit-learn's sample photographs as JPEG, CMYK JPEG, RGBA / grey / 16-bit PNG, WebP, GIF."""
    from realdata import write_photos
    sizes = write_photos(tmp_path / "photos")
    out = tmp_path / "pred"
    assert run(PREDICT, "--checkpoint", seg_run / "adapters.safetensors", "--images", tmp_path / "photos", "--out", out,
               "--workers", "0") == 0
    text = capsys.readouterr().out
    assert f"wrote {len(sizes)} masks" in text and "skipped" not in text
    for name, (h, w) in sizes.items():
        mask = decode_image(str(out / Path(name).with_suffix(".png")))
        assert mask.shape == (1, h, w) and set(mask.unique().tolist()) <= {0, 1}
