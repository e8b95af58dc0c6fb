"""
train_cls.py: the paper's #Params from the command line, a synthetic run that learns, torchrun with gloo
on two CPU processes, resume after an
interruption (and after a kill) reproducing the uninterrupted run exactly, the merged export, sparse
backbones, and what bad input gets.

Most runs execute train_cls.py in this process (runpy, as experiments/replicate.py does), which skips the
interpreter start and the torch import; the --count-only CLI check, the kill and torchrun use real processes.
"""

import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from scripts import run_script  # tests/scripts.py
from torch import nn

import methods
from data import build_datasets
from models import create_model

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny ops: see conftest.py

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = str(ROOT / "train_cls.py")
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")

# A tiny EfficientFormer on 3 synthetic classes: 48 training images (3 optimizer steps per epoch), 33 eval images
# (2 processes evaluate 17 and 16 of them: 2 batches and 1 batch).
TINY = ["--model", "ef_tiny", "--data", "synthetic", "--img-size", "64", "--synthetic-classes", "3",
        "--synthetic-train", "16", "--synthetic-val", "11", "--batch-size", "16", "--warmup-epochs", "1",
        "--workers", "0", "--device", "cpu", "--lr", "0.005"]
EF_TINY = dict(depths=(1, 1, 1, 2), embed_dims=(16, 24, 32, 48), num_vit=1)
VIT_TINY = dict(embed_dim=48, depth=2, num_heads=3, patch_size=8)


def train_cls(*argv) -> int:
    """Run train_cls.py in this process with `argv`; return its exit code."""
    return run_script(SCRIPT, *argv)


def read_log(out) -> list[dict]:
    with open(os.path.join(out, "log.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


def deterministic(records: list[dict]) -> list[dict]:
    """Log records without the wall-clock fields."""
    return [{k: v for k, v in r.items() if k not in ("img_per_s", "time_s")} for r in records]


# -----------------------------------------------------------------------------
# --count-only: the paper's #Params from the command line (every entry of methods.PAPER_PARAMS is checked in
# tests/test_paper_params.py)

def test_count_only_cli():
    """A real command line prints one JSON line with the counts."""
    out = subprocess.run([sys.executable, SCRIPT, "--model", "efl1", "--method", "petah", "--rc", "2", "--count-only",
                          "--num-classes", "100"], cwd=ROOT, env=ENV, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    counts = json.loads(out.stdout.strip().splitlines()[-1])
    backbone = 11_391_928  # EF L1 without heads: 12,289,928 parameters with both 1000-class heads
    heads = 2 * (448 * 100 + 100)
    petah2 = methods.PAPER_PARAMS["efl1", "petah", 8, 2]
    assert {k: v for k, v in counts.items() if k != "nonzero_params"} == dict(
        model="efl1", method="petah", adapter_params=petah2, head_params=heads, total_params=backbone + heads + petah2)
    assert 0 < counts["nonzero_params"] <= backbone + heads


def test_count_only_sparsity_shows_in_nonzero_params(capsys):
    """--sparsity 0.9: 10% of the backbone's Linear / Conv2d weights survive, the other tensors are untouched."""
    assert train_cls("--model", "ef_tiny", "--img-size", "64", "--method", "lora", "--count-only", "--num-classes", "4",
                     "--sparsity", "0.9") == 0
    counts = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    torch.manual_seed(0)  # train_cls builds the model right after seeding with --seed 0
    model = create_model("efl1", num_classes=1, img_size=64, layer_scale_init=1.0, **EF_TINY)
    model.reset_classifier(4)
    prunable = {f"{n}.weight" for n, m in model.named_modules()
                if isinstance(m, (nn.Linear, nn.Conv2d)) and not n.startswith("head")}
    n_prunable = sum(p.numel() for n, p in model.named_parameters() if n in prunable)
    other = sum(int(p.count_nonzero()) for n, p in model.named_parameters() if n not in prunable)
    assert counts["nonzero_params"] - other == n_prunable - round(0.9 * n_prunable)  # no ties among random weights


# -----------------------------------------------------------------------------
# train_cls.py: a run that learns, its merged export, resume, torchrun

LEARN = ["--model", "ef_tiny", "--method", "petah", "--r", "8", "--rc", "4", "--train-norms", "--data", "synthetic",
         "--img-size", "64", "--synthetic-classes", "4", "--synthetic-train", "60", "--synthetic-val", "25",
         "--epochs", "6", "--batch-size", "16", "--lr", "0.003", "--adapter-lr-factor", "3", "--warmup-epochs", "1",
         "--workers", "0", "--device", "cpu"]


@pytest.fixture(scope="module")
def learned(tmp_path_factory):
    out = tmp_path_factory.mktemp("learn")
    assert train_cls(*LEARN, "--out", out) == 0
    return out


def test_synthetic_run_learns(learned):
    records = read_log(learned)
    summary = records[-1]
    assert summary["summary"] and len(records) == 7 and summary["steps"] == 6 * (4 * 60 // 16)
    # 4 classes, 100 eval images: chance is 0.25 (+- 0.043); a random backbone adapted for 90 steps reaches ~0.5
    assert summary["eval_acc"] >= 0.4
    assert records[5]["train_loss"] < 0.8 * records[0]["train_loss"]


def test_merged_export_matches_the_adapted_model(learned):
    """merged.safetensors has the base model's keys, loads strictly into a plain model, and that model
    scores exactly what the adapted model scored on the eval set."""
    summary = read_log(learned)[-1]
    assert summary["merged_acc"] == summary["eval_acc"] and summary["merged_pred_diff"] == 0
    torch.manual_seed(0)
    plain = create_model("efl1", num_classes=4, img_size=64, layer_scale_init=1.0, **EF_TINY)
    state = load_file(os.path.join(learned, "merged.safetensors"))
    assert set(state) == set(plain.state_dict())
    plain.load_state_dict(state, strict=True)
    plain.eval()
    _, val, _, _ = build_datasets("synthetic", None, img_size=64, mean=plain.data_cfg["mean"],
                                  std=plain.data_cfg["std"],
                                  synthetic_cfg=dict(num_classes=4, train_per_class=60, val_per_class=25))
    x = torch.stack([val[i][0] for i in range(len(val))])
    y = torch.tensor([val[i][1] for i in range(len(val))])
    with torch.no_grad():
        acc = (plain(x).argmax(-1) == y).float().mean().item()
    assert acc == pytest.approx(summary["eval_acc"], abs=1e-9)


def test_run_without_weights_saves_the_random_base_its_task_was_trained_on(learned):
    """OUT/base.safetensors is the random base: the task file loads onto it (TaskBank checks the base
    fingerprint the task recorded) and the selected task computes what merged.safetensors computes."""
    from tasks.bank import TaskBank

    torch.manual_seed(123)  # another initialisation: every base tensor must come from the file
    base = create_model("efl1", num_classes=4, img_size=64, layer_scale_init=1.0, **EF_TINY)
    state = load_file(os.path.join(learned, "base.safetensors"))
    assert set(state) == set(base.state_dict())
    base.load_state_dict(state, strict=True)
    bank = TaskBank(base.eval())
    bank.add("demo", os.path.join(learned, "adapters.safetensors"))  # a ValueError if the fingerprint differs
    bank.select("demo")
    plain = create_model("efl1", num_classes=4, img_size=64, layer_scale_init=1.0, **EF_TINY)
    plain.load_state_dict(load_file(os.path.join(learned, "merged.safetensors")), strict=True)
    x = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want, got = plain.eval()(x), bank(x)
    # both merge W0 + dW in fp32 (the same sums, possibly in another order): rounding of the logits' scale
    assert (got - want).abs().max() <= 1e-5 * want.abs().max()


RESUME = [*TINY, "--method", "petah", "--dropout", "0.1", "--epochs", "3"]  # 3 steps per epoch


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp("uninterrupted")
    assert train_cls(*RESUME, "--out", out) == 0
    return out


def test_resume_after_stop_reproduces_the_uninterrupted_run(uninterrupted, tmp_path):
    out = tmp_path / "resumed"
    assert train_cls(*RESUME, "--out", out, "--stop-after-epoch", "1") == 0
    assert json.load(open(out / "ckpt" / "last.json"))["epoch"] == 1 and not (out / "merged.safetensors").exists()
    assert train_cls(*RESUME, "--out", out, "--resume") == 0
    assert deterministic(read_log(out)) == deterministic(read_log(uninterrupted))
    a, b = load_file(out / "merged.safetensors"), load_file(uninterrupted / "merged.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_eval_every_skips_evaluations_without_changing_training(uninterrupted, tmp_path):
    out = tmp_path / "sparse_eval"
    assert train_cls(*RESUME, "--out", out, "--eval-every", "2") == 0
    ours, ref = read_log(out), read_log(uninterrupted)
    assert [r["eval_acc"] is None for r in ours[:3]] == [True, False, False]  # epoch 2, and the last one
    assert ours[1]["eval_acc"] == ref[1]["eval_acc"] and ours[-1] == ref[-1]
    assert [r["train_loss"] for r in ours[:3]] == [r["train_loss"] for r in ref[:3]]
    a, b = load_file(out / "merged.safetensors"), load_file(uninterrupted / "merged.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert train_cls(*RESUME, "--out", tmp_path / "bad", "--eval-every", "0") == 2


def test_resume_after_kill_reproduces_the_uninterrupted_run(uninterrupted, tmp_path):
    """SIGKILL a real run as soon as its first checkpoint exists (wherever it then is), then --resume."""
    out = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, SCRIPT, *RESUME, "--out", str(out)], cwd=ROOT, env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        while not (out / "ckpt" / "last.json").exists() and proc.poll() is None:  # bounded by the run's epochs
            time.sleep(0.02)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    assert proc.returncode == -signal.SIGKILL  # killed, not finished
    assert not (out / "merged.safetensors").exists()
    assert train_cls(*RESUME, "--out", out, "--resume") == 0
    assert deterministic(read_log(out)) == deterministic(read_log(uninterrupted))
    a, b = load_file(out / "merged.safetensors"), load_file(uninterrupted / "merged.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_torchrun_two_cpu_processes(uninterrupted, tmp_path):
    """gloo on CPU, the same global batch split over 2 processes: as many optimizer steps as one process."""
    out = tmp_path / "ddp"
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          SCRIPT, *RESUME, "--out", str(out)], cwd=ROOT, env=ENV, capture_output=True, text=True)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    single, multi = read_log(uninterrupted), read_log(out)
    assert multi[-1]["steps"] == single[-1]["steps"] == 3 * (3 * 16 // 16)
    assert [r["step"] for r in multi[:-1]] == [r["step"] for r in single[:-1]] == [3, 6, 9]
    assert multi[-1]["merged_acc"] == multi[-1]["eval_acc"] and multi[-1]["merged_pred_diff"] == 0
    assert run.stdout.count('"summary": true') == 1  # rank 0 alone reports
    assert "2 process(es) on cpu, --amp off: 8 images per process" in run.stdout


def readme_torchrun_line() -> list[str]:
    """The README's torchrun command, continuation lines joined, split as a shell would (no expansion needed)."""
    lines = (ROOT / "README.md").read_text().splitlines()
    i = next(i for i, line in enumerate(lines) if line.startswith("torchrun "))
    cmd = lines[i]
    while cmd.endswith("\\"):
        i += 1
        cmd = cmd[:-1] + " " + lines[i].strip()
    return shlex.split(cmd)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_readme_torchrun_line_runs_as_printed(tmp_path):
    """The README's torchrun line with --r 8 --rc 2, as printed, on 2 CPU processes with tiny settings appended
    (argparse: the last value of a flag wins). torchrun's own parser must not see the script's flags (--r would be
    'ambiguous: --rdzv-backend, --role, ...'). The rendezvous port comes from PET_MASTER_PORT (torchrun reads its
    options from PET_* variables), so parallel test runs do not collide on the default port."""
    argv = readme_torchrun_line()
    assert argv[:3] == ["torchrun", "--nproc_per_node", "8"] and "--r" in argv and "--rc" in argv
    argv[2] = "2"
    torchrun = Path(sys.executable).parent / "torchrun"
    launcher = [str(torchrun)] if torchrun.exists() else [sys.executable, "-m", "torch.distributed.run"]
    tiny = ["--model", "ef_tiny", "--weights", "", "--data", "synthetic", "--img-size", "32", "--synthetic-classes",
            "2", "--synthetic-train", "4", "--synthetic-val", "2", "--epochs", "1", "--warmup-epochs", "0",
            "--batch-size", "4", "--workers", "0", "--device", "cpu", "--out", str(tmp_path / "run")]
    run = subprocess.run(launcher + argv[1:] + tiny, cwd=ROOT, capture_output=True, text=True,
                         env=dict(ENV, PET_MASTER_PORT=str(free_port())))
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    used = json.load(open(tmp_path / "run" / "args.json"))
    assert (used["method"], used["r"], used["rc"], used["model"]) == ("petah", 8, 2, "ef_tiny")
    assert "2 process(es) on cpu, --amp off: 2 images per process" in run.stdout
    assert read_log(tmp_path / "run")[-1]["summary"]


@pytest.mark.parametrize("argv", [["--", "--r", "8"], ["--r", "8"]])
def test_a_stray_leading_double_dash_is_accepted(argv, capsys):
    """`torchrun ... -- train_cls.py -- --flags` hands the script a leading "--": ignored like torchrun's own."""
    assert train_cls(*argv, "--model", "ef_tiny", "--img-size", "32", "--count-only", "--num-classes", "2") == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["model"] == "ef_tiny"


# -----------------------------------------------------------------------------
# sparse backbones

def test_sparse_full_finetuning_keeps_the_mask(tmp_path):
    out = tmp_path / "full"
    assert train_cls(*TINY, "--method", "full", "--sparsity", "0.5", "--epochs", "1", "--warmup-epochs", "0",
                     "--out", out) == 0
    masks = load_file(out / "masks.safetensors")
    merged = load_file(out / "merged.safetensors")
    assert len(masks) == 17  # every Linear / Conv2d weight but the heads: 13 convs, qkv, proj, fc1, fc2
    for k, m in masks.items():
        assert not merged[k][~m.bool()].any(), k  # pruned weights are still exactly 0 after training
    s = read_log(out)[-1]
    assert s["merged_nonzero"] == s["masked_nonzero"]


def test_adapters_on_sparse_base_report_both_merges(tmp_path):
    out = tmp_path / "petah"
    assert train_cls(*TINY, "--method", "petah", "--sparsity", "0.5", "--epochs", "1", "--warmup-epochs", "0",
                     "--out", out) == 0
    s = read_log(out)[-1]
    masks = load_file(out / "masks.safetensors")
    dense, masked = load_file(out / "merged.safetensors"), load_file(out / "merged_masked.safetensors")
    n_pruned = sum(int((~m.bool()).sum()) for m in masks.values())
    adapted = [k for k in masks if not torch.equal(dense[k], masked[k])]
    assert adapted  # the dense merge fills pruned entries of the adapted layers
    assert all(not masked[k][~masks[k].bool()].any() for k in masks)
    assert s["masked_nonzero"] < s["merged_nonzero"] <= s["masked_nonzero"] + n_pruned
    assert s["merged_acc"] == s["eval_acc"]


# -----------------------------------------------------------------------------
# bad input

@pytest.mark.parametrize("flag, value, choices", [("--model", "efl9", "efl7"), ("--method", "prompt", "petah")])
def test_unknown_choice_is_an_argparse_error(capsys, flag, value, choices):
    assert train_cls(*TINY, flag, value, "--count-only") == 2
    err = capsys.readouterr().err
    assert "invalid choice" in err and repr(value) in err and choices in err


def test_missing_dataset_root(capsys, tmp_path):
    assert train_cls("--model", "ef_tiny", "--data", "cub", "--data-root", tmp_path / "nowhere", "--img-size", "64",
                     "--out", tmp_path / "o") == 2
    err = capsys.readouterr().err
    assert "CUB_200_2011" in err and "--download" in err


@pytest.mark.parametrize("model, method", [("vit_tiny", "petah"), ("ef_tiny", "lora")])
def test_rc_without_conv_lora_warns(model, method, capsys):
    with pytest.warns(UserWarning, match="--rc 2 is ignored"):
        assert train_cls("--model", model, "--method", method, "--rc", "2", "--img-size", "64", "--count-only",
                         "--num-classes", "4") == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["method"] == method


def test_nan_loss_stops_and_keeps_the_last_checkpoint(tmp_path, capsys):
    out = tmp_path / "nan"
    assert train_cls(*TINY, "--method", "petah", "--epochs", "3", "--out", out, "--inject-nan-step", "4") == 1
    assert "loss is nan at step 4 (epoch 2)" in capsys.readouterr().out
    assert json.load(open(out / "ckpt" / "last.json"))["epoch"] == 1
    assert sorted(os.listdir(out / "ckpt")) == ["epoch_0001.pt", "epoch_0001.safetensors", "last.json"]
    assert not (out / "merged.safetensors").exists() and len(read_log(out)) == 1
    # the kept checkpoint resumes; other settings than the checkpoint's are refused
    assert train_cls(*TINY, "--method", "petah", "--epochs", "3", "--out", out, "--resume", "--lr", "0.1") == 2
    assert "--lr 0.005 -> 0.1" in capsys.readouterr().err
    assert train_cls(*TINY, "--method", "petah", "--epochs", "3", "--out", out, "--resume") == 0
    assert read_log(out)[-1]["steps"] == 9


def test_missing_weights_warns_loudly(tmp_path, capsys):
    assert train_cls(*TINY, "--method", "linear", "--epochs", "1", "--warmup-epochs", "0", "--out", tmp_path) == 0
    assert "no --weights" in capsys.readouterr().err


def test_resume_refuses_a_folder_that_no_longer_gives_its_split(tmp_path, capsys):
    """--val-split draws the held-out images from the files found, seeded: an image added to the folder between the
    start and a --resume would draw another val set (with images the run trained on). The resume compares with
    OUT/split.json and refuses, naming the change; with the folder restored it resumes. --eval-only of the run's
    task file checks the split.json beside it."""
    from torchvision.io import write_png
    root = tmp_path / "data"
    g = torch.Generator().manual_seed(0)
    for c in ("ant", "bee"):
        (root / c).mkdir(parents=True)
        for i in range(10):
            write_png(torch.randint(0, 256, (3, 16, 16), dtype=torch.uint8, generator=g), str(root / c / f"{i}.png"))
    argv = ["--model", "ef_tiny", "--method", "lora", "--data", "folder", "--data-root", root, "--val-split", "0.2",
            "--img-size", "32", "--epochs", "2", "--batch-size", "8", "--warmup-epochs", "0", "--workers", "0",
            "--device", "cpu", "--out", tmp_path / "run"]
    assert train_cls(*argv, "--stop-after-epoch", "1") == 0
    split = json.loads((tmp_path / "run" / "split.json").read_text())
    extra = root / "bee" / "10.png"
    extra.write_bytes((root / "bee" / "0.png").read_bytes())
    capsys.readouterr()
    assert train_cls(*argv, "--resume") == 2
    err = capsys.readouterr().err
    assert "--resume: " in err and "no longer gives the split the run started with" in err
    assert "1 image(s) added (e.g. bee/10.png)" in err
    assert "Traceback" not in err and json.loads((tmp_path / "run" / "split.json").read_text()) == split
    extra.unlink()
    assert train_cls(*argv, "--resume") == 0
    assert json.loads((tmp_path / "run" / "split.json").read_text()) == split
    # --eval-only of the task file: the split beside it, likewise (an image moved to another class folder)
    task = tmp_path / "run" / "adapters.safetensors"
    assert train_cls(*argv[:-2], "--eval-only", task) == 0
    (root / "ant" / "0.png").rename(root / "bee" / "moved.png")
    capsys.readouterr()
    assert train_cls(*argv[:-2], "--eval-only", task) == 2
    err = capsys.readouterr().err
    assert "--eval-only: " in err and "1 image(s) added (e.g. bee/moved.png); 1 image(s) gone (e.g. ant/0.png)" in err
