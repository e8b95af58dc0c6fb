"""train_seg.py and predict_seg.py end to end on CPU: tiny SAM and tiny EfficientFormer + FPN on the synthetic set.

The scripts run in this process (runpy, as `python train_seg.py ...` would run it) to skip interpreter and torch
start-up; every number checked here is recomputed independently (baselines from the masks, the top-k mean from the
kept files, the merged export through a plain model, RLE through data_seg.rle_decode), never copied from a run.
"""

import json
import re
import sys
from pathlib import Path

import pytest
import torch
from scripts import run_script  # tests/scripts.py
from torchvision.io import decode_image, write_jpeg, write_png
from torchvision.transforms.v2 import functional as TF

from dataio import seg as data_seg
from lora import load_adapters, read_safetensors
from methods import PAPER_PARAMS, apply_sam_method
from models import PRESETS, create_model
from training import seg_metrics

ROOT = Path(__file__).resolve().parents[1]
SCRIPT, PREDICT = str(ROOT / "train_seg.py"), str(ROOT / "predict_seg.py")
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
SYN = ["--data", "synthetic", "--img-size", "64", "--synthetic-train", "32", "--synthetic-val", "8", "--workers", "0"]
SAM_RUN = ["--model", "sam_tiny", "--method", "lora", *SYN, "--no-randaug", "--epochs", "4", "--batch-size", "4",
           "--lr", "1e-2", "--top-k", "3"]
EF_RUN = ["--model", "ef_tiny", "--head", "fpn", "--method", "petah", *SYN, "--fpn-channels", "32",
          "--fpn-head-channels", "32", "--epochs", "4", "--batch-size", "4", "--lr", "1e-2"]


def run(*argv, script=SCRIPT) -> int:
    """`python train_seg.py *argv` (or another script) in this process; returns the exit status."""
    return run_script(script, *argv)


def read_log(out: Path) -> tuple[list[dict], dict]:
    lines = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    return [r for r in lines if not r.get("summary")], lines[-1]


def val_baselines() -> dict:
    """Metrics of the two constant predictors on the val masks the runs evaluate on."""
    _, val, _, k = data_seg.build_seg_datasets("synthetic", img_size=64, mean=MEAN, std=STD,
                                               synthetic_cfg=dict(train_per_class=32, val_per_class=8))
    assert len(val) == 16
    masks = torch.stack([val[i][1] for i in range(len(val))])
    valid = masks != 255
    p = float((masks[valid] == 1).float().mean())  # foreground fraction
    # all background: IoU_bg = 1 - p, IoU_fg = 0; all foreground: IoU_fg = p, IoU_bg = 0
    return dict(fg_frac=p, all_bg_miou=(1 - p) / 2, all_fg_miou=p / 2, all_fg_iou=p)


@pytest.fixture(scope="module")
def sam_run(one_thread, tmp_path_factory):
    out = tmp_path_factory.mktemp("sam")
    assert run(*SAM_RUN, "--out", out) == 0
    return out


@pytest.fixture(scope="module")
def ef_run(one_thread, tmp_path_factory):
    out = tmp_path_factory.mktemp("ef")
    assert run(*EF_RUN, "--out", out) == 0
    return out


@pytest.mark.parametrize("which", ["sam_run", "ef_run"])
def test_synthetic_run_learns(which, request):
    out = request.getfixturevalue(which)
    epochs, summary = read_log(out)
    base = val_baselines()
    assert 0.2 < base["fg_frac"] < 0.7
    assert [e["epoch"] for e in epochs] == [1, 2, 3, 4]
    for e in epochs:  # per-epoch foreground IoU and mIoU in the JSON-lines log
        assert {"iou_fg", "miou", "train_loss", "lr"} <= set(e)
    best = max(e["iou_fg"] for e in epochs)
    # well above both constant predictors: all background (IoU fg 0) and all foreground (IoU fg = fg fraction)
    assert best > base["all_fg_iou"] + 0.15, (best, base)
    assert summary["final_miou"] > max(base["all_bg_miou"], base["all_fg_miou"]) + 0.3, (summary, base)
    assert epochs[-1]["train_loss"] < epochs[0]["train_loss"]
    assert sorted(p.name for p in (out / "vis").iterdir()) == [f"epoch_{e:04d}.png" for e in range(1, 5)]
    grid = decode_image(str(out / "vis" / "epoch_0004.png"))
    assert grid.shape[0] == 3 and grid.shape[1] > grid.shape[2]  # 4 rows of image | truth | prediction


def test_topk_average_is_the_mean_and_is_what_gets_evaluated(sam_run, capsys):
    epochs, summary = read_log(sam_run)
    top3 = [e["epoch"] for e in sorted(epochs, key=lambda e: (-e["score"], e["epoch"]))[:3]]
    assert summary["topk_epochs"] == top3
    files = sorted((sam_run / "topk").iterdir())
    assert [f.name for f in files] == [f"epoch_{e:04d}.safetensors" for e in sorted(top3)]  # the others deleted
    kept = [read_safetensors(f)[0] for f in files]
    final = read_safetensors(sam_run / "final.safetensors")[0]
    assert set(final) == set(kept[0]) and any(k.endswith("lora_B") for k in final)
    differ = 0
    for k, v in final.items():
        mean = torch.stack([d[k].double() for d in kept]).mean(0)
        torch.testing.assert_close(v.double(), mean, rtol=1e-6, atol=1e-7)
        differ += not torch.equal(kept[0][k], kept[1][k])
    assert differ > len(final) // 2  # the epochs really differ, so the mean is not a copy of one of them
    # evaluating final.safetensors from scratch gives the metrics the run reported for the average
    capsys.readouterr()
    assert run("--checkpoint", sam_run / "final.safetensors", "--eval", "synthetic", "--synthetic-val", "8",
               "--workers", "0", script=PREDICT) == 0
    rec = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert rec["miou"] == pytest.approx(summary["final_miou"], abs=1e-12)
    assert rec["iou_fg"] == pytest.approx(summary["final_score"], abs=1e-12)
    assert summary["best_score"] == max(e["score"] for e in epochs)


def sam_models(run_dir: Path):
    """The run's model rebuilt here: tiny SAM + LoRA with final.safetensors, and a plain SAM with merged.safetensors."""
    cfg = PRESETS["sam_tiny"][1]
    torch.manual_seed(0)  # the script's --seed: the same random base, so the adapters' fingerprint matches
    adapted = create_model("sam_vitb", img_size=64, num_classes=1, **cfg)
    apply_sam_method(adapted, "lora", num_classes=2, r=8)
    load_adapters(adapted, run_dir / "final.safetensors")
    plain = create_model("sam_vitb", img_size=64, num_classes=1, **cfg)
    tensors, _ = read_safetensors(run_dir / "merged.safetensors")
    plain.load_state_dict(tensors, strict=True)  # Meta's key layout, no adapter keys left
    return adapted.eval(), plain.eval()


def test_merged_export_equals_unmerged_on_val(sam_run):
    _, summary = read_log(sam_run)
    assert summary["merged_pixels_differ"] == 0 and summary["merged_max_logit_diff"] < 1e-4
    adapted, plain = sam_models(sam_run)
    _, val, _, _ = data_seg.build_seg_datasets("synthetic", img_size=64, mean=MEAN, std=STD,
                                               synthetic_cfg=dict(train_per_class=32, val_per_class=8))
    x = torch.stack([val[i][0] for i in range(len(val))])
    with torch.no_grad():
        a, b = adapted.segment(x), plain.segment(x)
    assert a.abs().max() > 0.1  # a real prediction, not zeros
    torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4)


def test_predict_writes_masks_and_rle_that_round_trips(sam_run, tmp_path):
    ds = data_seg.SyntheticVegetation(split="test", num_samples=3, image_size=64)
    images = tmp_path / "images"
    images.mkdir()
    sizes = {"square": (64, 64), "wide": (48, 80), "tall": (90, 50)}
    for i, (name, (h, w)) in enumerate(sizes.items()):
        img = TF.to_dtype(ds.render(i)[0], torch.uint8, scale=True)  # (3, 64, 64)
        img = TF.resize(img, [h, w], antialias=True)
        ext = "png" if name == "square" else "jpg"
        (write_png if name == "square" else write_jpeg)(img, str(images / f"{name}.{ext}"))
    out, rle_file = tmp_path / "pred", tmp_path / "sub.json"
    assert run("--images", images, "--checkpoint", sam_run / "final.safetensors", "--out", out,
               "--rle-json", rle_file, script=PREDICT) == 0
    rle = json.loads(rle_file.read_text())
    assert sorted(rle) == sorted(sizes)
    for name, (h, w) in sizes.items():
        mask = decode_image(str(out / f"{name}.png"))[0]  # single-channel PNG of class ids
        assert mask.shape == (h, w) and set(mask.unique().tolist()) <= {0, 1}
        assert torch.equal(data_seg.rle_decode(rle[name], (h, w)), (mask == 1).to(torch.uint8))
    # the 64 x 64 image needs no resizing: its mask is exactly the model's prediction
    adapted, _ = sam_models(sam_run)
    x = (TF.to_dtype(decode_image(str(images / "square.png")), torch.float32, scale=True)
         - torch.tensor(MEAN)[:, None, None]) / torch.tensor(STD)[:, None, None]
    with torch.no_grad():
        want = (adapted.segment(x[None])[0, 0] > 0).to(torch.uint8)
    got = decode_image(str(out / "square.png"))[0]
    assert (got != want).sum() <= 2 and got.float().mean() > 0.05  # (ties at logit 0 aside)


def test_resume_continues_exactly(ef_run, tmp_path, capsys):
    out = tmp_path / "resumed"
    assert run(*EF_RUN, "--out", out, "--stop-after-epoch", "2") == 0
    assert json.loads((out / "ckpt" / "last.json").read_text())["epoch"] == 2
    assert not (out / "final.safetensors").exists()
    # other settings than the checkpoint's are refused, naming the setting
    capsys.readouterr()
    assert run(*EF_RUN[:-2], "--lr", "0.5", "--out", out, "--resume") == 2
    assert "--lr 0.01 -> 0.5" in capsys.readouterr().err
    assert run(*EF_RUN, "--out", out, "--resume") == 0
    a = read_safetensors(ef_run / "ckpt" / "epoch_0004.safetensors")[0]
    b = read_safetensors(out / "ckpt" / "epoch_0004.safetensors")[0]
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)  # bit for bit the uninterrupted run
    ea, sa = read_log(ef_run)
    eb, sb = read_log(out)
    assert [e["miou"] for e in ea] == [e["miou"] for e in eb]
    assert sa["final_miou"] == sb["final_miou"]


def test_nan_loss_stops_and_keeps_last_good_checkpoint(one_thread, tmp_path, capsys):
    out = tmp_path / "nan"
    args = ["--model", "ef_tiny", "--method", "lora", *SYN[:4], "--synthetic-train", "4", "--synthetic-val", "2",
            "--workers", "0", "--fpn-channels", "16", "--fpn-head-channels", "16", "--epochs", "3",
            "--batch-size", "4", "--out", out]
    assert run(*args, "--inject-nan-step", "3") == 1  # step 3 = the second step of epoch 2
    assert "loss is nan at step 3" in capsys.readouterr().out
    assert json.loads((out / "ckpt" / "last.json").read_text())["epoch"] == 1
    assert len(read_log(out)[0]) == 1 and not (out / "final.safetensors").exists()


def test_count_only_sam_vitb_lora(one_thread, capsys):
    assert run("--model", "sam_vitb", "--method", "lora", "--learn-interp", "--count-only") == 0
    c = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    r = 8
    # image encoder, 12 blocks: qkv 768->2304, proj 768->768, lin1 768->3072, lin2 3072->768
    enc = 12 * r * ((768 + 2304) + (768 + 768) + (768 + 3072) + (3072 + 768))
    # mask decoder: 2 layers of self-attn (q,k,v,out 256<->256), two cross-attns (internal width 128: q,k,v
    # 256->128, out 128->256), MLP 256->2048->256; plus the final token-to-image attention
    dec = 2 * (4 * r * 512 + 2 * 4 * r * 384 + 2 * r * (256 + 2048)) + 4 * r * 384
    assert enc + dec == 1_347_584
    n_lora_layers = 12 * 4 + 2 * (12 + 2) + 4  # + one interpolation scalar a per LoRA layer
    # norms and biases: encoder blocks (2 LayerNorms 2*768 each; biases 2304 + 768 + 3072 + 768), patch embedding
    # bias, neck LayerNorm2d x2; decoder layers (biases 4*256 + 2*(3*128 + 256) + 2048 + 256, 4 LayerNorms),
    # final attention biases + its norm; output upscaling (two ConvTranspose biases 64 + 32, one LayerNorm2d 64)
    norms_biases = (12 * (4 * 768 + 2304 + 768 + 3072 + 768) + 768 + 2 * 512
                    + 2 * (4 * 256 + 2 * (3 * 128 + 256) + 2048 + 256 + 4 * 512) + (3 * 128 + 256) + 512
                    + (64 + 32) + 128)
    assert c["adapter_params"] == enc + dec + n_lora_layers + norms_biases
    # head: the 4 mask tokens + the hypernetwork MLP of token 0 (256->256->256->32)
    assert c["head_params"] == 4 * 256 + (256 * 256 + 256) * 2 + 256 * 32 + 32
    assert c["total_params"] == 93_735_472 + enc + dec + n_lora_layers  # Meta's SAM ViT-B + the adapters


def test_count_only_sam_vitb_ia3(one_thread, capsys):
    assert run("--model", "sam_vitb", "--method", "ia3", "--count-only") == 0
    c = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    # encoder: k and v rows of qkv (2 * 768) + lin2 input (3072) per block; decoder layers: self-attn k, v (256 each),
    # two cross-attns' k, v (128 each), lin2 input (2048); final attention k, v (128 each)
    # the scales are the only parameters added to Meta's SAM ViT-B (93,735,472)
    assert c["total_params"] - 93_735_472 == 12 * (2 * 768 + 3072) + 2 * (2 * 256 + 2 * 2 * 128 + 2048) + 2 * 128 \
        == 61_696


def test_count_only_efl1_petah_matches_reference(one_thread, capsys):
    assert run("--model", "efl1", "--head", "fpn", "--method", "petah", "--count-only") == 0
    c = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert c["adapter_params"] == PAPER_PARAMS["efl1", "petah", 8, 1] == 62_283  # PETAH-1 (FPN head not counted)


def make_folder(root: Path, *, n_train=4, n_val=2, size=(48, 64)):
    """The UCC AI Quest layout: img/{train,valid}/*.jpg + ann/{train,valid}/*.png with 0/255 masks."""
    ds = data_seg.SyntheticVegetation(split="train", num_samples=n_train + n_val, image_size=64)
    for i in range(n_train + n_val):
        split = "train" if i < n_train else "valid"
        img, mask = ds.render(i)
        img = TF.to_dtype(img, torch.uint8, scale=True)[:, :size[0], :size[1]]
        (root / "img" / split).mkdir(parents=True, exist_ok=True)
        (root / "ann" / split).mkdir(parents=True, exist_ok=True)
        write_jpeg(img.contiguous(), str(root / "img" / split / f"tile{i}.jpg"))
        write_png((mask[:size[0], :size[1]] * 255).to(torch.uint8)[None].contiguous(),
                  str(root / "ann" / split / f"tile{i}.png"))


def test_folder_data_and_bad_input_errors(one_thread, tmp_path, capsys):
    folder = tmp_path / "ucc"
    make_folder(folder)
    tiny = ["--model", "ef_tiny", "--method", "linear", "--img-size", "64", "--fpn-channels", "16",
            "--fpn-head-channels", "16", "--epochs", "1", "--batch-size", "2", "--workers", "0"]
    assert run(*tiny, "--data", "folder", "--data-root", folder, "--out", tmp_path / "ok") == 0
    _, summary = read_log(tmp_path / "ok")
    assert 0.0 <= summary["final_iou_fg"] <= 1.0

    def fails(*argv, match, script=SCRIPT):
        capsys.readouterr()
        assert run(*argv, script=script) == 2
        assert match in capsys.readouterr().err

    fails("--model", "sam_tiny", "--method", "petah", "--count-only", match="not a method for sam_tiny")
    fails("--model", "sam_tiny", "--head", "fpn", "--count-only", match="--head is for EfficientFormer")
    fails("--model", "ef_tiny", "--img-size", "50", "--count-only", match="multiple of 32")
    fails("--model", "ef_tiny", "--weights", tmp_path / "nope.pth", "--count-only", match="does not exist")
    fails("--checkpoint", tmp_path / "x", "--eval", "synthetic", "--rle-json", tmp_path / "x.json",
          match="--rle-json needs --images", script=PREDICT)
    fails("--images", folder, "--checkpoint", tmp_path / "none.safetensors", match="does not exist", script=PREDICT)
    fails("--images", folder, "--eval", "synthetic", "--checkpoint", tmp_path / "x", match="one of the two",
          script=PREDICT)
    fails("--eval", "synthetic", "--checkpoint", tmp_path / "x", "--batch-size", "0", match="--batch-size 0 must be",
          script=PREDICT)
    fails("--eval", "synthetic", "--checkpoint", tmp_path / "x", "--weights", tmp_path / "no.pth",
          match="does not exist", script=PREDICT)
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    fails("--eval", "synthetic", "--checkpoint", tmp_path / "junk.safetensors", match="cannot read its metadata",
          script=PREDICT)
    o = ["--out", tmp_path / "refused"]  # (not the default runs/seg: the tests write nothing into the repository)
    fails(*tiny, *o, "--data", "folder", "--data-root", tmp_path / "missing", match="img/")
    fails(*tiny, *o, "--data", "synthetic", "--num-classes", "1", match="count the background")
    # an image without its mask: the error names both files
    (folder / "ann" / "train" / "tile1.png").unlink()
    fails(*tiny, *o, "--data", "folder", "--data-root", folder, match=f"{folder / 'img' / 'train' / 'tile1.jpg'}")
    # a mask of another size than its image: raised while loading, naming both files
    write_png(torch.zeros(1, 10, 10, dtype=torch.uint8), str(folder / "ann" / "train" / "tile1.png"))
    capsys.readouterr()
    assert run(*tiny, "--data", "folder", "--data-root", folder, "--out", tmp_path / "bad") == 2  # argparse-style
    err = capsys.readouterr().err
    assert re.search(r"tile1\.jpg.*tile1\.png", err, re.S) and "Traceback" not in err


class PixelModel(torch.nn.Module):
    """A per-pixel model (1x1 conv) that accepts only its S x S input size, like SAM / EfficientFormer."""

    img_size = 32

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 1)

    def segment(self, x):
        assert x.shape[-2:] == (32, 32), x.shape
        return self.conv(x)


@pytest.mark.parametrize("size", [(80, 80), (70, 45), (20, 24), (32, 32)])
def test_sliding_window_stitches_exactly(size):
    torch.manual_seed(0)
    model, x = PixelModel(), torch.randn(2, 3, *size)
    with torch.no_grad():
        got = seg_metrics.predict_logits(model, x, mode="slide", out_size=size, stride=20)
        want = model.conv(x)  # a per-pixel model gives the same logits on the whole image
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_whole_image_mode_resizes_to_the_model_input_and_back():
    torch.manual_seed(0)
    model, x = PixelModel(), torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        got = seg_metrics.predict_logits(model, x, mode="whole", out_size=(64, 64))
        small = model.conv(torch.nn.functional.interpolate(x, size=(32, 32), mode="bilinear", align_corners=False))
        want = torch.nn.functional.interpolate(small, size=(64, 64), mode="bilinear", align_corners=False)
    torch.testing.assert_close(got, want)


def test_metrics_and_losses_on_hand_made_masks():
    truth = torch.tensor([[0, 0, 1, 1], [0, 1, 1, 255]])
    pred = torch.tensor([[0, 1, 1, 1], [0, 0, 1, 1]])
    cm = seg_metrics.confusion_matrix(pred, truth, 2)
    # class 0: TP 2 (truth 0 at 3 pixels, one predicted 1), FP 1 -> IoU 2/4; class 1: TP 3, FP 1, FN 1 -> 3/5
    assert cm.tolist() == [[2, 1], [1, 3]]
    m = seg_metrics.metrics(cm)
    assert m["iou_fg"] == pytest.approx(3 / 5) and m["miou"] == pytest.approx((2 / 4 + 3 / 5) / 2)
    assert m["pixel_acc"] == pytest.approx(5 / 7)  # the ignored pixel counts nowhere
    with pytest.raises(ValueError, match="label 2"):
        seg_metrics.confusion_matrix(pred, torch.full_like(truth, 2), 2)
    # losses: a confident correct prediction costs ~0, the ignored pixel never counts
    logit = (truth == 1).float() * 40 - 20  # (2, 4)
    logit[1, 3] = 1e4  # wildly wrong on the ignored pixel (truth 255, read as background): must not count
    bce = seg_metrics.seg_loss(logit[None, None], truth[None], "bce_dice")
    assert bce < 1e-3
    two = torch.stack([-logit, logit])[None]  # (1, 2, H, W)
    assert seg_metrics.seg_loss(two, truth[None], "ce_dice") < 1e-3
    assert seg_metrics.seg_loss(two, truth[None], "ce") < 1e-6
    assert seg_metrics.seg_loss(-two, truth[None], "ce_dice") > 1.5


def test_pretrained_weights_are_loaded_resized_and_stay_frozen(one_thread, tmp_path):
    from models.sam import resize_sam_state_dict
    tiny = ["--data", "synthetic", "--synthetic-train", "2", "--synthetic-val", "1", "--workers", "0", "--epochs", "1",
            "--batch-size", "2", "--lr", "1e-3"]
    # SAM "pretrained" at 64 px, fine-tuned at 32 px: pos_embed / rel-pos tables resized, frozen weights kept
    cfg = PRESETS["sam_tiny"][1]
    torch.manual_seed(1)
    sam = create_model("sam_vitb", img_size=64, num_classes=1, **cfg)
    torch.save(sam.state_dict(), tmp_path / "sam.pth")
    assert run("--model", "sam_tiny", "--method", "lora", "--weights", tmp_path / "sam.pth", "--img-size", "32",
               *tiny, "--out", tmp_path / "sam") == 0
    merged = read_safetensors(tmp_path / "sam" / "merged.safetensors")[0]
    want = resize_sam_state_dict(sam.state_dict(), create_model("sam_vitb", img_size=32, num_classes=1, **cfg))
    assert merged["image_encoder.pos_embed"].shape == (1, 4, 4, 48)
    for k in ("image_encoder.pos_embed", "image_encoder.blocks.1.attn.rel_pos_h",
              "image_encoder.patch_embed.proj.weight", "mask_decoder.output_upscaling.0.weight",
              "prompt_encoder.no_mask_embed.weight"):
        assert torch.equal(merged[k], want[k]), k  # frozen under lora: exactly the (resized) checkpoint
    qkv = "image_encoder.blocks.0.attn.qkv.weight"
    assert not torch.equal(merged[qkv], want[qkv])
    # EfficientFormer with a classifier head, made at 224: the head is skipped, the attention biases resized
    cfg = PRESETS["ef_tiny"][1]
    ef = create_model("efl1", num_classes=10, img_size=224, **cfg)
    torch.save(ef.state_dict(), tmp_path / "ef.pth")
    assert run("--model", "ef_tiny", "--method", "lora", "--weights", tmp_path / "ef.pth", "--img-size", "64",
               "--fpn-channels", "16", "--fpn-head-channels", "16", *tiny, "--out", tmp_path / "ef") == 0
    merged = read_safetensors(tmp_path / "ef" / "merged.safetensors")[0]
    assert torch.equal(merged["backbone.stem.conv1.weight"], ef.state_dict()["stem.conv1.weight"])
    assert merged["backbone.stages.3.blocks.2.token_mixer.attention_biases"].shape == (8, 4)  # 7x7 -> 2x2 grid
    assert not any(k.startswith(("backbone.head", "backbone.norm")) for k in merged)
    # predict_seg needs the base the run adapted: without --weights the adapters' base fingerprint does not match
    evaluate = ["--checkpoint", tmp_path / "ef" / "final.safetensors", "--eval", "synthetic", "--synthetic-val", "1",
                "--workers", "0"]
    assert run(*evaluate, script=PREDICT) == 2
    assert run(*evaluate, "--weights", tmp_path / "ef.pth", script=PREDICT) == 0


def test_task_file_is_the_final_model_and_predicts(sam_run, tmp_path, capsys):
    from tasks.task_file import read_task
    task = read_task(sam_run / "adapters.safetensors")
    assert task.task_type == "seg" and task.meta["model"] == "sam_tiny" and task.meta["num_classes"] == 2
    assert task.meta["class_names"] == ["background", "vegetation"] and task.meta["img_size"] == 64
    final = read_safetensors(sam_run / "final.safetensors")[0]
    assert set(task.tensors) == set(final) and all(torch.equal(task.tensors[k], final[k]) for k in final)
    # predict_seg rebuilds the model from the task file as from final.safetensors: the same metrics
    _, summary = read_log(sam_run)
    capsys.readouterr()
    assert run("--checkpoint", sam_run / "adapters.safetensors", "--eval", "synthetic", "--workers", "0",
               script=PREDICT) == 0
    rec = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert rec["miou"] == pytest.approx(summary["final_miou"], abs=1e-12)


TINY = ["--model", "ef_tiny", "--method", "lora", "--data", "synthetic", "--img-size", "32", "--synthetic-train", "2",
        "--synthetic-val", "1", "--fpn-channels", "16", "--fpn-head-channels", "16", "--epochs", "1",
        "--batch-size", "2", "--workers", "0"]


@pytest.mark.parametrize("extra, phrase", [
    (["--batch-size", "0"], "--batch-size 0 must be >= 1"),
    (["--lr", "nan"], "--lr nan must be a finite number"),
    (["--workers", "-1"], "--workers -1 must be >= 0"),
    (["--epochs", "0"], "--epochs 0 must be >= 1"),
    (["--alpha", "0"], "--alpha 0.0 must be > 0"),
    (["--epochs", "2", "--warmup-epochs", "3"], "--warmup-epochs 3 must be < --epochs 2"),
    (["--iters", "0"], "--iters must be >= 1"),
    (["--iters", "5"], "--epochs or as --iters, not both"),
    (["--eval-size", "0"], "--eval-size must be >= 1"),
    (["--scale-range", "0", "1"], "--scale-range 0 1 must satisfy 0 < LO <= HI"),
    (["--model-cfg", "[1]"], "--model-cfg must be a JSON object"),
    (["--weights", "nowhere.pth"], "--weights nowhere.pth: does not exist"),
])
def test_bad_arguments_are_named_without_traceback(one_thread, tmp_path, capsys, extra, phrase):
    capsys.readouterr()
    assert run(*TINY, "--out", tmp_path / "out", *extra) == 2
    err = capsys.readouterr().err
    assert phrase in err and "Traceback" not in err and "usage:" in err


def test_out_dir_rules_resume_settings_and_damaged_checkpoints(ef_run, tmp_path, capsys):
    import shutil

    def fails(*argv, phrase):
        capsys.readouterr()
        assert run(*argv) == 2
        err = capsys.readouterr().err
        assert phrase in err and "Traceback" not in err, err

    (tmp_path / "file").write_text("x")
    fails(*EF_RUN, "--out", tmp_path / "file", phrase="is an existing file")
    out = tmp_path / "copy"
    shutil.copytree(ef_run, out)
    (out / ".lock").unlink(missing_ok=True)
    fails(*EF_RUN, "--out", out, phrase="holds a finished run")  # not overwritten without --resume
    fails(*EF_RUN, "--out", out, "--resume", "--data-root", tmp_path, phrase="--data-root 'data' -> ")
    state = out / "ckpt" / "epoch_0004.pt"
    state.write_bytes(state.read_bytes()[:100])  # truncated: named, with what can still be resumed
    fails(*EF_RUN, "--out", out, "--resume", phrase="epoch_0004.pt (the training state of epoch 4) is damaged")


def test_stray_leading_double_dash_is_accepted(one_thread, capsys):
    capsys.readouterr()
    assert run("--", "--model", "ef_tiny", "--method", "petah", "--rc", "2", "--count-only") == 0  # python x.py -- ...
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["model"] == "ef_tiny"


def free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_torchrun_two_processes_score_as_one(tmp_path, capsys):
    """The docstring's torchrun form (`-- --flags`, --r included) on 2 CPU processes: the run's final mIoU, summed over
    both ranks' halves of the val set, equals predict_seg's single-process evaluation of its final.safetensors."""
    import shutil
    import subprocess
    out = tmp_path / "ddp"
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent))
    p = subprocess.run([torchrun, "--nproc_per_node", "2", SCRIPT, "--", "--model", "ef_tiny", "--method", "petah",
                        "--r", "4", "--rc", "2", *SYN[:2], "--img-size", "32", "--synthetic-train", "4",
                        "--synthetic-val", "3", "--fpn-channels", "16", "--fpn-head-channels", "16", "--epochs", "2",
                        "--batch-size", "4", "--workers", "0", "--device", "cpu", "--out", out],
                       capture_output=True, text=True, cwd=ROOT,
                       env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin", "HOME": str(tmp_path),
                            "PET_MASTER_PORT": str(free_port())})  # not 29500: other runs may hold it
    assert p.returncode == 0, p.stderr[-3000:]
    _, summary = read_log(out)
    assert summary["steps"] == 4 and summary["merged_pixels_differ"] == 0
    capsys.readouterr()
    assert run("--checkpoint", out / "final.safetensors", "--eval", "synthetic", "--synthetic-val", "3", "--workers",
               "0", script=PREDICT) == 0
    rec = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert rec["images"] == 6 and rec["miou"] == pytest.approx(summary["final_miou"], abs=1e-12)
