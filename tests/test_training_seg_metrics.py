"""ADE20K as mmsegmentation scores it, end to end on a small fake ADEChallengeData2016 of NON-square images.

train_seg.py trains a tiny EfficientFormer + FPN for a few steps; predict_seg.py writes its masks; the mIoU is then
computed here by hand from the written PNGs and the raw annotation files (reduce_zero_label, intersections and
unions summed over the set, mean over the classes that occur) and must equal what both scripts report.
"""

import json
from pathlib import Path

import pytest
import torch
from scripts import run_script  # tests/scripts.py
from torchvision.io import decode_image, write_jpeg, write_png

from lora import read_safetensors
from training import seg_metrics

ROOT = Path(__file__).resolve().parents[1]
SIZES = {"training": [(40, 72), (64, 48), (48, 48), (56, 88)], "validation": [(48, 80), (72, 40), (50, 66)]}


def run(script: str, *argv) -> int:
    return run_script(ROOT / script, *argv)


def fake_ade(root: Path) -> None:
    """Images whose colour tells the class (ADE ids 1, 2, 3 as red, green, blue regions), 0 ("other") in a band."""
    g = torch.Generator().manual_seed(0)
    for split, sizes in SIZES.items():
        for i, (h, w) in enumerate(sizes):
            ann = torch.ones(h, w, dtype=torch.uint8)
            ann[:, w // 3:] = 2
            ann[h // 2:, w // 2:] = 3
            ann[: h // 8] = 0  # "other": ignored
            img = torch.zeros(3, h, w)
            for c in (1, 2, 3):
                img[c - 1][ann == c] = 0.8
            img = (img + 0.1 * torch.rand(3, h, w, generator=g)).clamp(0, 1)
            (root / "images" / split).mkdir(parents=True, exist_ok=True)
            (root / "annotations" / split).mkdir(parents=True, exist_ok=True)
            write_jpeg((img * 255).to(torch.uint8), str(root / "images" / split / f"ADE_{i}.jpg"), quality=95)
            write_png(ann[None], str(root / "annotations" / split / f"ADE_{i}.png"))


def hand_miou(preds: list[torch.Tensor], anns: list[torch.Tensor]) -> float:
    """mIoU by hand: truth = ADE id - 1 (0 -> ignored), per class the intersections and unions summed over the
    images, IoU = I / U for the classes with U > 0, their mean."""
    inter, union = [0] * 150, [0] * 150
    for pred, ann in zip(preds, anns):
        valid = ann != 0
        truth = ann.long() - 1
        for c in range(150):
            p, t = (pred == c) & valid, (truth == c) & valid
            inter[c] += int((p & t).sum())
            union[c] += int((p | t).sum())
    ious = [i / u for i, u in zip(inter, union) if u > 0]
    return sum(ious) / len(ious)


@pytest.fixture(scope="module")
def ade_run(one_thread, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ade")
    fake_ade(tmp / "ADEChallengeData2016")
    out = tmp / "run"
    assert run("train_seg.py", "--model", "ef_tiny", "--method", "lora", "--data", "ade20k", "--data-root", tmp,
               "--img-size", "32", "--fpn-channels", "16", "--fpn-head-channels", "16", "--iters", "6",
               "--batch-size", "2", "--lr", "1e-2", "--workers", "0", "--vis-images", "0", "--out", out) == 0
    return tmp, out


def test_predictions_at_the_original_size_and_miou_by_hand(ade_run, tmp_path, capsys):
    tmp, out = ade_run
    val = tmp / "ADEChallengeData2016" / "images" / "validation"
    assert run("predict_seg.py", "--checkpoint", out / "final.safetensors", "--images", val, "--out", tmp_path) == 0
    preds, anns = [], []
    for i, (h, w) in enumerate(SIZES["validation"]):
        pred = decode_image(str(tmp_path / f"ADE_{i}.png"))[0]
        assert pred.shape == (h, w)  # the ORIGINAL size, not the 32-pixel scale the model saw
        preds.append(pred.long())
        anns.append(decode_image(str(tmp.joinpath("ADEChallengeData2016", "annotations", "validation",
                                                  f"ADE_{i}.png")))[0])
    assert len(torch.cat([p.flatten() for p in preds]).unique()) >= 2  # a real prediction, not one constant class
    want = hand_miou(preds, anns)
    capsys.readouterr()
    assert run("predict_seg.py", "--checkpoint", out / "final.safetensors", "--eval", "ade20k", "--data-root", tmp,
               "--workers", "0") == 0
    rec = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert rec["images"] == 3 and rec["miou"] == pytest.approx(want, abs=1e-12)
    summary = json.loads((out / "log.jsonl").read_text().splitlines()[-1])
    assert summary["final_miou"] == pytest.approx(want, abs=1e-12)  # the run scored the same way


def test_the_last_model_is_the_result(ade_run):
    _, out = ade_run
    summary = json.loads((out / "log.jsonl").read_text().splitlines()[-1])
    assert summary["final_model"] == "last" and summary["steps"] == 6 and "topk_epochs" not in summary
    last = json.loads((out / "ckpt" / "last.json").read_text())["adapters"]
    a, b = read_safetensors(out / "final.safetensors")[0], read_safetensors(out / "ckpt" / last)[0]
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert not any((out / "topk").iterdir())


def test_miou_sums_over_the_set_before_dividing():
    # two images; class 0 is large in the first, class 1 tiny in the second
    t1, p1 = torch.tensor([[0, 0, 0, 0], [0, 0, 1, 1]]), torch.tensor([[0, 0, 0, 0], [0, 0, 0, 1]])
    t2, p2 = torch.tensor([[1, 255], [0, 0]]), torch.tensor([[0, 1], [0, 0]])
    cm = seg_metrics.confusion_matrix(p1, t1, 2) + seg_metrics.confusion_matrix(p2, t2, 2)
    # class 0: I = 6 + 2, U = 7 + 3 -> 8/10; class 1: I = 1 + 0, U = 2 + 1 -> 1/3 (255 counts nowhere)
    assert seg_metrics.metrics(cm)["miou"] == pytest.approx((8 / 10 + 1 / 3) / 2, abs=1e-15)
    # not the mean of the per-image mIoUs ((6/7 + 1/2) / 2 and (2/3 + 0) / 2)
    per_image = ((6 / 7 + 1 / 2) / 2 + (2 / 3 + 0 / 1) / 2) / 2
    assert abs(seg_metrics.metrics(cm)["miou"] - per_image) > 0.05
