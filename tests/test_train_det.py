"""train_det.py end to end on CPU: a tiny EfficientFormer Cascade Mask R-CNN on the synthetic instance set.

The script runs in this process (runpy, as `python train_det.py ...` would) to skip interpreter start-up. Checked:
it learns (COCO AP far above a trivial predictor's, whose AP is computed here by the same COCOeval), a run stopped
after epoch 1 and resumed ends with the same numbers and weights as an uninterrupted one, the merged export loaded
into a plain detector (no adapter code) scores what the adapted one scored, the #Params / head counts (hand-derived
from the layer shapes), and bad input gives a clear message (exit 2, no traceback).
"""
import json
import runpy
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import methods
from dataio.det import SyntheticInstances
from models import create_model
from models.det.detector import build_cascade_mask_rcnn
from training.det_eval import coco_evaluate, to_coco_results, trivial_results

pytestmark = pytest.mark.usefixtures("one_thread")

SCRIPT = str(Path(__file__).resolve().parents[1] / "train_det.py")
TINY = ["--model", "ef_tiny", "--data", "synthetic", "--img-size", "96", "--fpn-channels", "32", "--fc-dim", "128",
        "--mask-channels", "32", "--roi-batch", "64", "--rpn-batch", "64", "--workers", "0", "--batch-size", "4",
        "--warmup-iters", "5", "--lr", "3e-3", "--lr-steps"]


def run(*argv) -> int:
    old = sys.argv
    sys.argv = ["train_det.py", *map(str, argv)]
    try:
        runpy.run_path(SCRIPT, run_name="__main__")
        return 0
    except SystemExit as e:
        return e.code or 0
    finally:
        sys.argv = old


def summary(out) -> dict:
    lines = (Path(out) / "log.jsonl").read_text().splitlines()
    return json.loads(lines[-1])


def test_learns_far_above_a_trivial_predictor(tmp_path):
    out = tmp_path / "learn"
    assert run(*TINY, "--method", "full", "--synthetic-train", "64", "--synthetic-val", "16", "--epochs", "2",
               "--out", out) == 0
    s = summary(out)
    val = SyntheticInstances(n=16, img_size=96, train=False, seed=1)  # the script's val set (seed + 1)
    trivial = coco_evaluate(val.coco, trivial_results(val.coco))
    assert trivial["bbox_AP50"] < 0.01 and trivial["segm_AP50"] < 0.01
    # 32 steps from a random tiny backbone, measured box / mask AP50: seed 0 (this test) 0.475 / 0.520 (AP 0.165 /
    # 0.236), seeds 1 and 2 0.277 / 0.229 and 0.495 / 0.512; the bounds leave room for other BLAS / CPUs
    assert s["bbox_AP50"] > 0.15 and s["segm_AP50"] > 0.15, s
    assert s["bbox_AP"] > 0.03 and s["segm_AP"] > 0.03, s


@pytest.fixture(scope="module")
def petah_runs(tmp_path_factory):
    """PETAH-2 uninterrupted, and stopped after epoch 1 then resumed."""
    root = tmp_path_factory.mktemp("det")
    args = [*TINY, "--method", "petah", "--rc", "2", "--synthetic-train", "16", "--synthetic-val", "4", "--epochs", "2"]
    assert run(*args, "--out", root / "a") == 0
    assert run(*args, "--out", root / "b", "--stop-after-epoch", "1") == 0
    assert not (root / "b" / "merged.safetensors").exists()
    assert run(*args, "--out", root / "b", "--resume") == 0
    return root / "a", root / "b"


def test_resume_gives_the_uninterrupted_numbers(petah_runs):
    a, b = petah_runs
    sa, sb = summary(a), summary(b)
    keys = [k for k in sa if k.startswith(("bbox_", "segm_", "merged_"))]
    assert {k: sa[k] for k in keys} == {k: sb[k] for k in keys}
    la = [json.loads(x) for x in (a / "log.jsonl").read_text().splitlines()[:-1]]
    lb = [json.loads(x) for x in (b / "log.jsonl").read_text().splitlines()[:-1]]
    assert [r["train_loss"] for r in la] == [r["train_loss"] for r in lb]
    wa, wb = load_file(str(a / "merged.safetensors")), load_file(str(b / "merged.safetensors"))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def test_merged_detector_scores_as_the_adapted_one(petah_runs):
    """merged.safetensors into a detector built without any adapter, evaluated here: the adapted model's numbers."""
    a, _ = petah_runs
    s = summary(a)
    assert s["adapter_params"] > 0 and s["merged_max_abs_diff"] == 0.0
    body = create_model("ef_tiny", num_classes=0, img_size=224)  # as train_det builds it: the 224 bias grid
    det = build_cascade_mask_rcnn(body, num_classes=4, fpn_channels=32, fc_dim=128, mask_channels=32).eval()
    det.load_state_dict(load_file(str(a / "merged.safetensors")), strict=True)
    val = SyntheticInstances(n=4, img_size=96, train=False, seed=1)
    outs, ids = [], []
    with torch.no_grad():
        for i in range(len(val)):
            x, t = val[i]
            outs += det([x], original_sizes=[tuple(t["orig_size"].tolist())])
            ids.append(t["image_id"])
    metrics = coco_evaluate(val.coco, to_coco_results(outs, ids, val.label_to_cat))
    for k, v in metrics.items():
        assert v == pytest.approx(s[k], abs=1e-9), k  # same detections -> the same COCOeval numbers
    # the task file holds the adapters and the whole detection head, not the frozen backbone
    task = load_file(str(a / "adapters.safetensors"))
    assert any(k.endswith("lora_A") for k in task) and any(k.startswith("roi_heads.stages.2.") for k in task)
    assert not any(k.startswith("backbone.body.") and k.endswith(".weight") and "lora" not in k for k in task)


def test_count_only_efl7_petah2(capsys):
    assert run("--model", "efl7", "--method", "petah", "--rc", "2", "--data", "coco", "--count-only") == 0
    c = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    # PETAH Table 6 = the classification count
    assert c["adapter_params"] == methods.PAPER_PARAMS["efl7", "petah", 8, 2]
    widths = (96, 192, 384, 768)
    fpn = 2 * sum(widths) + (sum(widths) * 256 + 4 * 256) + 4 * (256 * 256 * 9 + 256)  # GroupNorms, lateral, output
    rpn = (256 * 256 * 9 + 256) + (256 * 3 + 3) + (256 * 12 + 12)  # conv, 3 objectness, 3 x 4 deltas
    box = (256 * 49 * 1024 + 1024) + (1024 * 1024 + 1024) + (1024 * 81 + 81) + (1024 * 4 + 4)  # fc6 fc7 cls reg
    mask = 4 * (256 * 256 * 9 + 256) + (256 * 256 * 4 + 256) + (256 * 81 + 81)  # 4 convs, deconv, logits
    assert (c["fpn_params"], c["rpn_params"], c["roi_heads_params"]) == (fpn, rpn, 3 * (box + mask))


@pytest.mark.parametrize("extra, phrase", [
    (["--data", "coco", "--data-root", "{tmp}/nowhere"], "instances_train2017.json"),
    (["--data", "coco", "--data-root", "{tmp}/badjson"], "is not a COCO annotation file"),
    (["--img-size", "16"], "--img-size 16 is too small"),
    (["--max-size", "64"], "--max-size 64 must be >= --img-size 96"),
    (["--model-cfg", "[1]"], "--model-cfg must be a JSON object"),
])
def test_bad_input_is_a_clear_error(tmp_path, capsys, extra, phrase):
    bad = tmp_path / "badjson"
    for d in ("train2017", "val2017", "annotations"):
        (bad / d).mkdir(parents=True)
    (bad / "annotations" / "instances_train2017.json").write_text("{oops")
    (bad / "annotations" / "instances_val2017.json").write_text("{}")
    extra = [e.replace("{tmp}", str(tmp_path)) for e in extra]
    assert run(*TINY, "--method", "frozen", *extra, "--out", tmp_path / "out") == 2
    err = capsys.readouterr().err
    assert phrase in err and "Traceback" not in err


def test_resume_with_other_settings_is_refused(petah_runs, capsys):
    _, b = petah_runs
    args = [*TINY, "--method", "petah", "--rc", "2", "--synthetic-train", "16", "--synthetic-val", "4"]
    assert run(*args, "--epochs", "3", "--out", b, "--resume") == 2
    err = capsys.readouterr().err
    assert "--epochs 2 -> 3" in err and "Traceback" not in err


def test_nan_loss_stops_with_the_last_good_checkpoint(tmp_path, capsys):
    out = tmp_path / "nan"
    assert run(*TINY, "--method", "lora", "--synthetic-train", "8", "--synthetic-val", "2", "--epochs", "2",
               "--inject-nan-step", "3", "--out", out) == 1  # step 3 = the second step of epoch 2
    text = capsys.readouterr().out
    assert "loss is nan at step 3 (epoch 2)" in text and "Last good checkpoint: epoch 1" in text
    assert json.loads((out / "ckpt" / "last.json").read_text())["epoch"] == 1
    assert not (out / "merged.safetensors").exists()
