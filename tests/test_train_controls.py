"""The training controls in the scripts (training/controls.py): the same flags in the three --help texts, their
records (args.json, task file metadata, log.jsonl), accumulation and activation checkpointing changing nothing they
should not, fp16 + EMA + clipping + accumulation resumed bit for bit, --resume's warning about another run record,
--eval-only scoring a task file as the run did, channels_last computing the same function, and the user errors."""
import argparse
import json
import os
from pathlib import Path

import pytest
import torch
from scripts import run_captured, run_script  # tests/scripts.py

from lora import read_safetensors
from methods import apply_method
from models import create_model
from tasks.task_file import read_task
from training.controls import add_control_args

ROOT = Path(__file__).resolve().parents[1]
FLAGS = ("--amp", "--accum-steps", "--clip-grad", "--grad-ckpt", "--compile", "--channels-last", "--ema")
# ef_tiny on 3 synthetic classes at 32 px: 48 training images, 3 optimizer steps of 16 per epoch; frozen BatchNorms
# (petah without --train-norms), so the samples of a batch do not interact
TINY = ["--model", "ef_tiny", "--method", "petah", "--rc", "2", "--data", "synthetic", "--img-size", "32",
        "--synthetic-classes", "3", "--synthetic-train", "16", "--synthetic-val", "6", "--batch-size", "16",
        "--warmup-epochs", "1", "--workers", "0", "--device", "cpu", "--lr", "0.005"]
EPS32 = torch.finfo(torch.float32).eps


@pytest.fixture(autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def run(script: str, *argv) -> int:
    """Run a training script in this process (as tests/test_train_cls.py does); its exit code."""
    return run_script(ROOT / script, *argv)


def log_records(out) -> list[dict]:
    """log.jsonl without the wall-clock fields."""
    with open(os.path.join(out, "log.jsonl")) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return [{k: v for k, v in r.items() if k not in ("img_per_s", "time_s")} for r in rows]


def trained(out) -> dict:
    return read_safetensors(os.path.join(out, "adapters.safetensors"))[0]


@pytest.mark.parametrize("script", ["train_cls.py", "train_seg.py", "train_det.py"])
def test_every_script_has_the_same_controls(script):
    help = run_captured(ROOT / script, "--help")  # in this process: --help exits 0 before any work
    assert help.returncode == 0, help.stderr[-2000:]
    text = help.stdout
    words = text.replace(",", " ").split()
    for flag in FLAGS + ("--final-model",):
        assert flag in words, (script, flag)
    assert "{bf16,fp16,off}" in text
    if script != "train_seg.py":  # predict_seg.py --eval scores segmentation checkpoints
        assert "--eval-only" in words


def test_records_in_args_json_task_file_and_log(tmp_path):
    out = tmp_path / "run"
    assert run("train_cls.py", *TINY, "--epochs", "2", "--clip-grad", "0.5", "--ema", "0.9", "--out", out) == 0
    args = json.loads((out / "args.json").read_text())
    assert args["amp"] == "off" and args["accum_steps"] == 1 and args["clip_grad"] == 0.5 and args["ema"] == 0.9
    rec = args["run_record"]
    assert rec["torch"] == torch.__version__ and rec["world_size"] == 1 and rec["python"]
    assert "git_commit" in rec and "git_dirty" in rec and "cudnn" in rec and "gpu" in rec
    task = read_task(out / "adapters.safetensors")
    assert task.meta["run_record"] == rec
    assert task.meta["training"] == dict(amp="off", accum_steps=1, clip_grad=0.5, grad_ckpt=False, compile=False,
                                         channels_last=False, ema=0.9)
    epochs = [r for r in log_records(out) if not r.get("summary")]
    for r in epochs:
        assert r["grad_norm_max"] >= r["grad_norm_mean"] > 0 and 0 <= r["clipped_steps"] <= 3
        assert r["nonfinite_grad_steps"] == 0
        assert 0 <= r["ema_eval_acc"] <= 1 and r["ema_eval_loss"] > 0  # the EMA scored beside the raw model


def test_accumulation_gives_the_run_of_the_whole_batch(tmp_path):
    """--accum-steps 2 and 4: the same optimizer steps, LR schedule and adapters as --accum-steps 1, to float32
    rounding. Each gradient is a sum over the batch (at most B (S/2)^2 = 16 * 16^2 = 4096 terms, the stem's first
    conv); regrouping it changes it by at most about 4096 eps32 of its size, and 6 AdamW steps carry that into the
    weights (Adam's update is a ratio of such sums: the same relative error): 6 * 4096 eps32 = 1.5e-3 of each
    tensor's change."""
    outs = {}
    for k in (1, 2, 4):
        outs[k] = tmp_path / f"k{k}"
        assert run("train_cls.py", *TINY, "--epochs", "2", "--eval-every", "2", "--accum-steps", k,
                   "--out", outs[k]) == 0
    ref = trained(outs[1])
    ref_log = log_records(outs[1])
    bound = 6 * 4096 * EPS32
    for k in (2, 4):
        got = trained(outs[k])
        assert [r["step"] for r in log_records(outs[k]) if "step" in r] == [r["step"] for r in ref_log if "step" in r]
        assert [r["lr"] for r in log_records(outs[k]) if "lr" in r] == [r["lr"] for r in ref_log if "lr" in r]
        for name, t in ref.items():
            if not t.is_floating_point():
                continue
            scale = t.abs().max()  # lora_B starts at 0, the rest near its initial scale: bound relative to size
            assert (got[name] - t).abs().max() <= bound * max(float(scale), 1e-3), (k, name)


def test_grad_ckpt_run_equals_the_plain_run(tmp_path):
    """Activation checkpointing changes memory, not results: the whole log and the task file equal the plain run's
    bit for bit (the recomputation replays the same float operations)."""
    a, b = tmp_path / "plain", tmp_path / "ckpt"
    assert run("train_cls.py", *TINY, "--epochs", "1", "--warmup-epochs", "0.5", "--out", a) == 0
    assert run("train_cls.py", *TINY, "--epochs", "1", "--warmup-epochs", "0.5", "--grad-ckpt", "--out", b) == 0
    assert log_records(a) == log_records(b)
    ta, tb = trained(a), trained(b)
    assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)


def test_fp16_ema_clip_accumulation_resume_bit_for_bit(tmp_path, capsys):
    """--amp fp16 (its GradScaler), --ema, --clip-grad and --accum-steps together: stopped after epoch 1 and resumed,
    the run's log (EMA scores and gradient norms included) and its final EMA model equal the uninterrupted run's bit
    for bit. A resumed checkpoint whose run record names another torch gets a warning naming the difference."""
    flags = [*TINY, "--epochs", "3", "--amp", "fp16", "--ema", "0.7", "--clip-grad", "0.5", "--accum-steps", "2",
             "--final-model", "ema"]
    whole, part = tmp_path / "whole", tmp_path / "part"
    assert run("train_cls.py", *flags, "--out", whole) == 0
    assert run("train_cls.py", *flags, "--out", part, "--stop-after-epoch", "1") == 0
    state_file = part / "ckpt" / "epoch_0001.pt"
    state = torch.load(state_file, map_location="cpu", weights_only=True)
    assert state["scaler"]["scale"] > 0 and set(state["ema"]["shadow"]) == set(trained(whole))
    state["run_record"] = dict(state["run_record"], torch="0.0.1")
    torch.save(state, state_file)
    capsys.readouterr()
    assert run("train_cls.py", *flags, "--out", part, "--resume") == 0
    printed = capsys.readouterr().out
    assert "WARNING: --resume on other software or hardware" in printed
    assert f"torch: 0.0.1 -> {torch.__version__}" in printed
    assert log_records(part) == log_records(whole)
    tw, tp = trained(whole), trained(part)
    assert all(torch.equal(tw[k], tp[k]) for k in tw)
    assert read_task(whole / "adapters.safetensors").meta["final_model"] == "ema"
    # fp16 autocast casts inside the forward only: the task file and the merged model are float32
    merged = read_safetensors(whole / "merged.safetensors")[0]
    assert all(t.dtype == torch.float32 for t in [*tw.values(), *merged.values()] if t.is_floating_point())


def test_eval_only_scores_the_task_file_as_the_run_did(tmp_path):
    out = tmp_path / "run"
    assert run("train_cls.py", *TINY, "--epochs", "1", "--warmup-epochs", "0.5", "--out", out) == 0
    summary = log_records(out)[-1]
    ev = tmp_path / "eval"
    assert run("train_cls.py", *TINY, "--eval-only", out / "adapters.safetensors", "--out", ev) == 0
    result = json.loads((ev / "eval.json").read_text())
    assert result["eval_acc"] == summary["eval_acc"] and result["count"] == 18
    assert not (ev / "ckpt").exists() and not (ev / "args.json").exists()  # nothing trained, no run written
    # another method's file does not fit: named, argparse-style
    assert run("train_cls.py", *TINY[:3], "lora", *TINY[6:], "--eval-only", out / "adapters.safetensors",
               "--out", ev) == 2


def test_eval_only_detection(tmp_path):
    det = ["--model", "ef_tiny", "--method", "lora", "--data", "synthetic", "--img-size", "64", "--fpn-channels", "16",
           "--fc-dim", "32", "--mask-channels", "8", "--roi-batch", "16", "--rpn-batch", "16", "--synthetic-train",
           "8", "--synthetic-val", "4", "--batch-size", "4", "--lr", "2e-3", "--warmup-iters", "2", "--lr-steps", "1",
           "--workers", "0", "--device", "cpu"]
    out, ev = tmp_path / "run", tmp_path / "eval"
    assert run("train_det.py", *det, "--epochs", "1", "--out", out) == 0
    summary = log_records(out)[-1]
    assert run("train_det.py", *det, "--eval-only", out / "adapters.safetensors", "--out", ev) == 0
    result = json.loads((ev / "eval.json").read_text())
    for k in ("bbox_AP", "bbox_AP50", "segm_AP", "segm_AP50"):
        assert result[k] == summary[k], k


def test_channels_last_computes_the_same_function():
    """channels_last changes the memory layout of the conv weights and activations, not the arithmetic's terms:
    logits and gradients equal the contiguous model's to float32 rounding (convolution kernels for the two layouts
    may sum in other orders: relative differences of a few eps32 per layer, a dozen layers)."""
    torch.manual_seed(0)
    model = create_model("ef_tiny", num_classes=3, img_size=32)
    apply_method(model, "ef_tiny", "petah", r=2, rc=2)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
    import copy
    cl = copy.deepcopy(model).to(memory_format=torch.channels_last)
    assert cl.stem.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    x = torch.randn(4, 3, 32, 32)
    outs = []
    for net, inp in ((model, x), (cl, x.contiguous(memory_format=torch.channels_last))):
        net.eval()
        y = net(inp)
        y.square().sum().backward()
        outs.append((y.detach(), {n: p.grad for n, p in net.named_parameters() if p.requires_grad}))
    (y0, g0), (y1, g1) = outs
    assert (y1 - y0).abs().max() <= 64 * EPS32 * y0.abs().max()
    for n in g0:
        assert (g1[n] - g0[n]).abs().max() <= 1024 * EPS32 * g0[n].abs().max() + 1e-12, n


ERRORS = [
    (["--accum-steps", "3"], "--accum-steps 3 must divide the per-process batch (4 = --batch-size 4 / 1 process(es))"),
    (["--accum-steps", "0"], "--accum-steps 0 must be >= 1"),
    (["--clip-grad", "0"], "--clip-grad 0.0 must be > 0"),
    (["--ema", "1"], "--ema 1.0 must be a decay in [0, 1)"),
    (["--final-model", "ema"], "--final-model ema needs --ema DECAY"),
    (["--compile", "inductr"], "--compile inductr: torch.compile has no such backend; choose one of inductor, "
                               "aot_eager"),
]


@pytest.mark.parametrize("script, flags, message", [("train_cls.py", *e) for e in ERRORS]
                         + [(s, *ERRORS[i]) for s in ("train_seg.py", "train_det.py") for i in (0, 4)])
def test_control_errors_are_argparse_errors(script, flags, message, tmp_path, capsys):
    assert run(script, "--batch-size", "4", "--workers", "0", "--device", "cpu", "--out", tmp_path / "o",
               *flags) == 2
    err = capsys.readouterr().err
    assert message in err and "error:" in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()  # refused before anything was written


DET_TINY = ["--model", "ef_tiny", "--method", "lora", "--data", "synthetic", "--img-size", "64", "--fpn-channels", "16",
            "--fc-dim", "32", "--mask-channels", "8", "--roi-batch", "16", "--rpn-batch", "16", "--synthetic-train",
            "8", "--synthetic-val", "4", "--batch-size", "4", "--lr", "2e-3", "--warmup-iters", "2", "--lr-steps",
            "1", "--workers", "0", "--device", "cpu"]


def test_compile_alone_means_inductor():
    parser = argparse.ArgumentParser()
    add_control_args(parser)
    assert parser.parse_args([]).compile is False
    assert parser.parse_args(["--compile", "--grad-ckpt"]).compile == "inductor"
    assert parser.parse_args(["--compile", "aot_eager"]).compile == "aot_eager"


@pytest.mark.parametrize("script, argv", [
    # train_det.py compiles the backbone in place (nn.Module.compile), a path of its own; train_cls.py and
    # train_seg.py use torch.compile(module). The backend is aot_eager: dynamo's graph capture and AOT autograd
    # (where checkpointing and the BatchNorm buffers' update are handled), without inductor's code generation, whose
    # C++ builds took 96 s for this run alone on a 2-core CPU with a cold cache (tests/test_cuda.py compiles with
    # inductor on CUDA)
    ("train_cls.py", [*TINY, "--epochs", "2"]),
    ("train_seg.py", ["--model", "ef_tiny", "--head", "fpn", "--method", "petah", "--data", "synthetic", "--img-size",
                      "32", "--fpn-channels", "16", "--fpn-head-channels", "16", "--synthetic-train", "4",
                      "--synthetic-val", "2", "--batch-size", "2", "--epochs", "1", "--workers", "0", "--device",
                      "cpu"]),
    ("train_det.py", [*DET_TINY, "--epochs", "1"]),
])
def test_compile_with_grad_ckpt_runs(script, argv, tmp_path):
    """--compile (with --grad-ckpt, the combination torch.compile once refused) trains, writes the task file and
    records both controls in it; the losses are finite."""
    out = tmp_path / "run"
    assert run(script, *argv, "--compile", "aot_eager", "--grad-ckpt", "--out", out) == 0
    task = read_task(out / "adapters.safetensors")
    assert task.meta["training"]["compile"] == "aot_eager" and task.meta["training"]["grad_ckpt"] is True
    losses = [r["train_loss"] for r in log_records(out) if "train_loss" in r and not r.get("summary")]
    assert losses and all(torch.isfinite(torch.tensor(losses)))
