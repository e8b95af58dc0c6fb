"""predict_cls.py on a folder of images: each task's merged-model top-1, mixed batches and --task; user errors."""
import copy
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file
from scripts import run_captured
from torchvision.io import write_jpeg, write_png

from data import build_transform, read_image
from lora import merge_and_unload
from methods import apply_method
from models import create_model
from tasks.task_file import save_task

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(*args):
    return subprocess.run([sys.executable, "predict_cls.py", *map(str, args)], cwd=ROOT, capture_output=True,
                          text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})


def here(*args):
    """predict_cls.py in this process (tests/scripts.run_captured)."""
    return run_captured(os.path.join(ROOT, "predict_cls.py"), *args)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("pred")
    torch.manual_seed(0)
    base = create_model("ef_tiny", num_classes=1000, img_size=64).eval()
    save_file({k: v.contiguous() for k, v in base.state_dict().items()}, d / "base.safetensors")
    merged = {}
    for name, method, nc, kw in (("birds", "petah", 7, dict(rc=2, train_norms=True)), ("cars", "ia3", 5, {})):
        m = copy.deepcopy(base)
        m.reset_classifier(nc)
        apply_method(m, "ef_tiny", method, **kw)
        with torch.no_grad():  # a trained-looking task: every trained tensor moved, heads far from uniform
            for p in m.parameters():
                if p.requires_grad:
                    p.add_(torch.randn_like(p) * (2.0 if p.ndim == 2 and p.shape[0] == nc else 0.2))
        dc = m.data_cfg
        save_task(m, d / f"{name}.safetensors", meta=dict(
            task_type="cls", model="ef_tiny", model_cfg={}, method=method, num_classes=nc, img_size=64,
            class_names=[f"{name}_{i}" for i in range(nc)], mean=list(dc["mean"]), std=list(dc["std"]),
            interpolation=dc["interpolation"], crop_pct=dc["crop_pct"]))
        merged[name] = merge_and_unload(m).eval()
    imgs = d / "imgs"
    (imgs / "sub").mkdir(parents=True)
    g = torch.Generator().manual_seed(1)
    for i in range(5):  # random 3x3 colour blocks at different image sizes, one image in a sub-folder
        small = torch.randint(0, 256, (3, 3, 3), generator=g, dtype=torch.uint8)
        img = torch.nn.functional.interpolate(small[None].float(), size=(70 + 9 * i, 90 - 5 * i), mode="nearest")
        write_png(img[0].round().clamp(0, 255).to(torch.uint8), str(imgs / ("sub" if i == 4 else "") / f"im{i}.png"))
    return d, base, merged


def expected_top1(d, base, merged):
    """Each image through the eval transform of the base's checkpoint and each task's merged model."""
    dc = base.data_cfg
    tf = build_transform(train=False, img_size=64, mean=dc["mean"], std=dc["std"], crop_pct=dc["crop_pct"],
                         interpolation=dc["interpolation"])
    paths = sorted(str(p) for p in (d / "imgs").rglob("*.png"))
    x = torch.stack([tf(read_image(p)) for p in paths])
    with torch.no_grad():
        return paths, {n: m(x).softmax(-1) for n, m in merged.items()}


def test_folder_top1_equals_merged_models(setup):
    d, base, merged = setup
    paths, probs = expected_top1(d, base, merged)
    out = d / "preds.jsonl"
    r = run("--model", "ef_tiny", "--weights", d / "base.safetensors", "--tasks", f"birds={d / 'birds.safetensors'}",
            f"cars={d / 'cars.safetensors'}", "--images", d / "imgs", "--topk", 3, "--batch-size", 4, "--workers", 0,
            "--out", out)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "\r" not in r.stderr  # no progress-bar frames in a log
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(row["image"], row["task"]) for row in rows] == [(p, t) for p in paths for t in ("birds", "cars")]
    tops = {n: set() for n in merged}
    for row in rows:
        p = probs[row["task"]][paths.index(row["image"])]
        assert len(row["top"]) == 3
        best = row["top"][0]
        assert best["index"] == int(p.argmax()) and best["class"] == f"{row['task']}_{best['index']}"
        assert abs(best["prob"] - float(p.max())) <= 1e-5
        assert [t["prob"] for t in row["top"]] == sorted([t["prob"] for t in row["top"]], reverse=True)
        tops[row["task"]].add(best["index"])
    assert any(len(s) > 1 for s in tops.values())  # the images are told apart: the check is not vacuous
    # --task: one task, its layers merged: the same predictions
    out1 = d / "one.jsonl"
    r = run("--weights", d / "base.safetensors", "--tasks", f"birds={d / 'birds.safetensors'}",
            f"cars={d / 'cars.safetensors'}", "--images", d / "imgs" / "im0.png", d / "imgs" / "sub",
            "--task", "cars", "--topk", 10, "--workers", 0, "--out", out1)
    assert r.returncode == 0, r.stderr[-3000:]
    rows1 = [json.loads(line) for line in out1.read_text().splitlines()]
    assert [row["task"] for row in rows1] == ["cars", "cars"] and len(rows1[0]["top"]) == 5  # topk <= classes
    for row in rows1:
        assert row["top"][0]["index"] == int(probs["cars"][paths.index(row["image"])].argmax())


def test_user_errors(setup, tmp_path):
    """Exit 2, a message naming the problem, no traceback, no partial output (the first case in a process of its
    own, as users run it; the others in this process: the same exit status and stderr)."""
    d, _, _ = setup
    t = f"birds={d / 'birds.safetensors'}"
    bad_img = tmp_path / "broken.png"
    bad_img.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    cases = [
        (["--tasks", "birds", "--images", d / "imgs"], "NAME=FILE"),
        (["--tasks", f"x={d / 'base.safetensors'}", "--images", d / "imgs"], "not a task file"),
        (["--tasks", t, "--images", bad_img, "--workers", 0], "cannot read image"),
    ]
    for i, (extra, phrase) in enumerate(cases):
        r = (run if i == 0 else here)("--weights", d / "base.safetensors", "--out", tmp_path / "p.jsonl", *extra)
        assert r.returncode == 2 and phrase in r.stderr and "Traceback" not in r.stderr, (extra, r.stderr[-1500:])
        assert not os.listdir(tmp_path) or sorted(os.listdir(tmp_path)) == ["broken.png"]  # no partial output


def test_unreadable_images_skipped_and_named_base_found_and_leftover_removed(setup, tmp_path):
    """The policy both predict tools share: an unreadable image (undecodable, truncated JPEG, broken link: issue 23
    silent 4) is skipped and named in a summary, --strict stops at the first; a run without --weights is used
    through the base.safetensors next to its task file; the temporary of a killed predict_cls.py is removed
    (issue 23); --out naming a folder is refused (issue 23 traceback 3)."""
    d, base, merged = setup
    paths, probs = expected_top1(d, base, merged)
    imgs = tmp_path / "imgs"
    shutil.copytree(d / "imgs", imgs)
    (imgs / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    write_jpeg(read_image(paths[0]), str(tmp_path / "whole.jpg"))
    data = (tmp_path / "whole.jpg").read_bytes()
    (imgs / "trunc.jpg").write_bytes(data[:len(data) // 2])
    (imgs / "gone.png").symlink_to(tmp_path / "nowhere.png")
    (imgs / "sub" / "loop").symlink_to(imgs / "sub", target_is_directory=True)  # read once, not again and again
    run_dir = tmp_path / "run"  # what train_cls.py leaves after a run without --weights
    run_dir.mkdir()
    shutil.copy(d / "birds.safetensors", run_dir / "adapters.safetensors")
    shutil.copy(d / "base.safetensors", run_dir / "base.safetensors")
    dead = subprocess.Popen(["true"])
    dead.wait()
    leftover = tmp_path / f"preds.jsonl.tmp.{dead.pid}"
    leftover.write_text('{"image": "half a line')
    out = tmp_path / "preds.jsonl"
    r = run("--tasks", f"birds={run_dir / 'adapters.safetensors'}", "--images", imgs, "--workers", 0, "--out", out)
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"using {run_dir / 'base.safetensors'}" in r.stderr and not leftover.exists()
    assert f"removed {leftover}" in r.stderr
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 5 and "wrote 5 predictions (5 image(s) x 1 task(s))" in r.stderr  # the loop added none
    for row in rows:  # the same predictions as the merged model, on the images that could be read
        rel = os.path.relpath(row["image"], imgs)
        assert row["top"][0]["index"] == int(probs["birds"][paths.index(str(d / "imgs" / rel))].argmax())
    summary = r.stderr.split("skipped 3 image(s) that cannot be read")[1]
    assert all(str(imgs / n) in summary for n in ("bad.png", "trunc.jpg", "gone.png"))
    assert "broken symbolic link" in summary and "Traceback" not in r.stderr
    # the two refusals in this process (the same exit status and stderr, without a process start)
    r = here("--tasks", f"birds={run_dir / 'adapters.safetensors'}", "--images", imgs, "--workers", 0, "--out",
             tmp_path / "strict.jsonl", "--strict")
    assert r.returncode == 2 and "--strict: cannot read" in r.stderr and "gone.png" in r.stderr
    assert "Traceback" not in r.stderr and not (tmp_path / "strict.jsonl").exists()
    r = here("--tasks", f"birds={run_dir / 'adapters.safetensors'}", "--images", imgs, "--out", tmp_path)
    assert r.returncode == 2 and "is a folder; --out names the JSON-lines file" in r.stderr


def test_real_photos_in_several_formats_and_sizes(setup, tmp_path):
    """matplotlib's and scikit-learn's sample photographs (tests/realdata.py) as JPEG, CMYK JPEG, RGBA / grey / 16-bit
    PNG, WebP, GIF at several sizes: every one predicted, as the merged model predicts it."""
    from realdata import write_photos
    d, base, merged = setup
    sizes = write_photos(tmp_path / "photos")
    out = tmp_path / "preds.jsonl"
    r = run("--weights", d / "base.safetensors", "--tasks", f"birds={d / 'birds.safetensors'}", "--images",
            tmp_path / "photos", "--workers", 0, "--out", out)
    assert r.returncode == 0 and "skipped" not in r.stderr, r.stderr[-3000:]
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert sorted(os.path.relpath(row["image"], tmp_path / "photos") for row in rows) == sorted(sizes)
    dc = base.data_cfg
    tf = build_transform(train=False, img_size=64, mean=dc["mean"], std=dc["std"], crop_pct=dc["crop_pct"],
                         interpolation=dc["interpolation"])
    x = torch.stack([tf(read_image(row["image"])) for row in rows])
    with torch.no_grad():
        p = merged["birds"](x).softmax(-1)
    for row, want in zip(rows, p):
        assert row["top"][0]["index"] == int(want.argmax()) and abs(row["top"][0]["prob"] - float(want.max())) <= 1e-5
