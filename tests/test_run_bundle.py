"""run_bundle.py: the device side of a bundle, with `import torch` made to fail.

- Classification: for the same images (PNG files of several sizes and modes, in a folder with a subfolder) it
  writes predict_cls.py's JSON lines: same order, same keys, the same top-k classes, probabilities within 1e-4.
- Segmentation: the mask PNGs (class ids at each image's own size, named as predict_seg.py names them) agree with
  predict_seg.py's pipeline run here in PyTorch (dataio.seg.SegTransform's canvas, the merged model, bilinear
  resize back, training.seg_metrics.to_classes) on at least 99% of the pixels: the two resize the image with
  different code (Pillow here, torchvision there), which moves a few pixels at class boundaries.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from bundle_fixtures import ENV, ROOT, S, export, make_base, make_task, merged_reference
from PIL import Image

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("rb")
    base = make_base(d / "base.safetensors")
    files = dict(a=make_task(d / "a.safetensors", base, "cls", "petah"),
                 b=make_task(d / "b.safetensors", base, "cls", "lora", seed=3, num_classes=4),
                 seg=make_task(d / "seg.safetensors", base, "fpn", "petah", num_classes=3))
    export("--bundle", d / "bundle", "--weights", base, *[a for n, f in files.items() for a in ("--task", f"{n}={f}")],
           "--format", "onnx")
    images = d / "images"
    (images / "sub").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name, (w, h), mode in (("wide.png", (96, 64), "RGB"), ("tall.png", (64, 100), "RGB"),
                               ("small.png", (40, 50), "RGB"), ("sub/gray.png", (81, 77), "L"),
                               ("sub/odd.png", (131, 97), "RGB")):
        arr = rng.integers(0, 256, (h, w, 3) if mode == "RGB" else (h, w), dtype=np.uint8)
        Image.fromarray(arr, mode=mode).save(images / name)
    fake = d / "no_torch"
    (fake / "torch").mkdir(parents=True)
    (fake / "torch" / "__init__.py").write_text("raise ImportError('torch is not on this device', name='torch')\n")
    return dict(dir=d, base=base, files=files, bundle=d / "bundle", images=images, fake=fake)


def run_bundle(setup, *argv):
    env = dict(ENV, PYTHONPATH=str(setup["fake"]))  # `import torch` fails in this process
    return subprocess.run([sys.executable, str(ROOT / "run_bundle.py"), "--bundle", str(setup["bundle"]), *argv],
                          capture_output=True, text=True, env=env, cwd=setup["dir"])


def test_the_fake_torch_blocks_torch(setup):
    p = subprocess.run([sys.executable, "-c", "import torch"], capture_output=True, text=True,
                       env=dict(ENV, PYTHONPATH=str(setup["fake"])))
    assert p.returncode != 0 and "not on this device" in p.stderr


def test_classification_matches_predict_cls(setup):
    out = setup["dir"] / "bundle.jsonl"
    p = run_bundle(setup, "--images", str(setup["images"]), "--task", "a", "b", "--topk", "3", "--out", str(out))
    assert p.returncode == 0, p.stderr[-3000:]
    ref = setup["dir"] / "ref.jsonl"
    q = subprocess.run([sys.executable, str(ROOT / "predict_cls.py"), "--weights", str(setup["base"]), "--tasks",
                        f"a={setup['files']['a']}", f"b={setup['files']['b']}", "--images", str(setup["images"]),
                        "--topk", "3", "--out", str(ref), "--workers", "0", "--device", "cpu"],
                       capture_output=True, text=True, env=ENV, cwd=ROOT)
    assert q.returncode == 0, q.stderr[-3000:]
    got = [json.loads(line) for line in out.read_text().splitlines()]
    want = [json.loads(line) for line in ref.read_text().splitlines()]
    assert len(got) == len(want) == 5 * 2
    for g, w in zip(got, want):
        assert g.keys() == w.keys() and (g["image"], g["task"]) == (w["image"], w["task"])
        assert [(t["class"], t["index"]) for t in g["top"]] == [(t["class"], t["index"]) for t in w["top"]]
        assert all(t.keys() == {"class", "index", "prob"} for t in g["top"])
        assert max(abs(a["prob"] - b["prob"]) for a, b in zip(g["top"], w["top"])) <= 1e-4


def test_segmentation_masks_match_predict_seg_pipeline(setup):
    from data import read_image
    from dataio import seg as data_seg
    from training.seg_metrics import to_classes
    masks = setup["dir"] / "masks"
    p = run_bundle(setup, "--images", str(setup["images"]), "--task", "seg", "--masks", str(masks))
    assert p.returncode == 0, p.stderr[-3000:]
    net, _ = merged_reference(setup["files"]["seg"], setup["base"])
    canvas = data_seg.SegTransform(train=False, img_size=S, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
    for rel in ("wide.png", "tall.png", "small.png", "sub/gray.png", "sub/odd.png"):
        img = read_image(setup["images"] / rel)
        H, W = img.shape[-2:]
        x, where = canvas(img, torch.zeros(H, W, dtype=torch.uint8))
        inside = where != data_seg.IGNORE_INDEX
        h, w = int(inside.any(1).sum()), int(inside.any(0).sum())
        with torch.no_grad():
            logits = net(x[None])[..., :h, :w]
        logits = torch.nn.functional.interpolate(logits, size=(H, W), mode="bilinear", align_corners=False)
        want = to_classes(logits)[0].numpy()
        got = np.asarray(Image.open(masks / "seg" / rel))
        assert got.shape == want.shape and got.dtype == np.uint8
        assert (got == want).mean() >= 0.99, (rel, (got == want).mean())


def test_bad_input(setup, tmp_path):
    cases = [(["--images", str(setup["images"]), "--task", "nope"], "no task 'nope'"),
             (["--images", str(tmp_path / "missing")], "no such file or folder"),
             (["--images", str(setup["images"]), "--topk", "0"], "--topk 0"),
             # an output that none of the chosen tasks writes: named, with the tasks that would
             (["--images", str(setup["images"]), "--task", "a", "b", "--masks", str(tmp_path / "m")],
              "--masks " + str(tmp_path / "m") + " is the output of segmentation tasks, and none of the tasks run "
              "(a, b) is one: drop --masks, or add one with --task (this bundle's: seg)"),
             (["--images", str(setup["images"]), "--task", "seg", "--out", str(tmp_path / "p.jsonl")],
              "--out " + str(tmp_path / "p.jsonl") + " is the output of classification tasks"),
             (["--images", str(setup["images"]), "--task", "a", "--out", ""], "--out is empty: give a file name")]
    for argv, words in cases:
        p = run_bundle(setup, *argv)
        assert p.returncode == 2 and "Traceback" not in p.stderr and words in p.stderr, p.stderr[-2000:]
    p = subprocess.run([sys.executable, str(ROOT / "run_bundle.py"), "--bundle", str(tmp_path), "--images",
                        str(setup["images"])], capture_output=True, text=True, env=ENV)
    assert p.returncode == 2 and "not a bundle" in p.stderr
    p = subprocess.run([sys.executable, str(ROOT / "run_bundle.py"), "--bundle", str(ROOT / "README.md"), "--images",
                        str(setup["images"])], capture_output=True, text=True, env=ENV)
    assert p.returncode == 2 and "README.md is a file, not a bundle folder" in p.stderr, p.stderr[-2000:]
    assert not (tmp_path / "m").exists() and not (tmp_path / "p.jsonl").exists()
    assert not os.path.exists(setup["dir"] / "preds.jsonl")


def test_readme_device_flow_runs_as_printed(tmp_path):
    """README's three commands ("On a device: one base, many tasks"), run as printed in a fresh folder (the scripts
    and tests/fixtures linked in): two trained tasks on one base, bundled, classified without PyTorch's help."""
    text = (ROOT / "README.md").read_text()
    block = text.split("### On a device: one base, many tasks", 1)[1].split("```bash\n", 1)[1].split("```", 1)[0]
    commands = [line for line in block.splitlines() if line.strip()]
    assert len(commands) == 3 and "run_bundle.py" in commands[2]
    for name in ("train_cls.py", "export.py", "run_bundle.py", "tests"):
        (tmp_path / name).symlink_to(ROOT / name)
    env = dict(ENV, PYTHONPATH=str(ROOT), PATH=f"{os.path.dirname(sys.executable)}{os.pathsep}{os.environ['PATH']}")
    for c in commands:
        p = subprocess.run(["bash", "-c", c], cwd=tmp_path, capture_output=True, text=True, env=env)
        assert p.returncode == 0, (c, p.stdout[-2000:], p.stderr[-3000:])
    lines = [json.loads(x) for x in (tmp_path / "preds.jsonl").read_text().splitlines()]
    images = sorted({r["image"] for r in lines})
    assert images and len(lines) == 2 * len(images) and {r["task"] for r in lines} == {"lora", "petah"}
    assert all(len(r["top"]) == 3 for r in lines)
