"""
What a user gets for bad input: one row per case (command, expected exit code, a phrase the message must
contain, and never a Python traceback for an error the user can fix), for train_cls.py and the library calls.

Script rows run train_cls.py in this process (runpy, as tests/test_train_cls.py does) and record what a terminal
would show: exit code, stdout, stderr, and the traceback Python would print if an exception other than SystemExit
escaped. Rows that need a real process (a disk that fills up, a read-only file system, another live run holding
the output directory) run one. Tiny settings: ef_tiny at 32 px, 2 classes, 4 training images, one step per epoch.
"""

import copy
import json
import os
import re
import shutil
import socket
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from scripts import run_captured
from torch import nn

import lora
from training import run_dir

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny ops: see conftest.py

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = str(ROOT / "train_cls.py")
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
TINY = ["--model", "ef_tiny", "--method", "petah", "--data", "synthetic", "--img-size", "32",
        "--synthetic-classes", "2", "--synthetic-train", "2", "--synthetic-val", "1", "--epochs", "1",
        "--warmup-epochs", "0", "--batch-size", "4", "--workers", "0", "--device", "cpu"]


def run(*argv, script: str = SCRIPT) -> tuple[int, str, str]:
    """train_cls.py (or `script`) with argv, in this process (tests/scripts.run_captured): (exit code, stdout,
    stderr)."""
    p = run_captured(script, *argv)
    return p.returncode, p.stdout, p.stderr


def check(code, out, err, expect, phrase, prog="train_cls.py"):
    text = out + err
    assert "Traceback" not in err, err[-3000:]
    assert code == expect, f"exit {code}, expected {expect}:\n{text[-3000:]}"
    assert phrase in text, f"{phrase!r} not in:\n{text[-3000:]}"
    if expect == 2:  # argparse-style: usage, then "train_cls.py: error: <message>"
        assert f"usage: {prog}" in err and f"{prog}: error:" in err


# -----------------------------------------------------------------------------
# flags: refused before anything is built

FLAG_ROWS = [  # extra argv, phrase
    (["--batch-size", "0"], "--batch-size 0 must be >= 1"),
    (["--batch-size", "-4"], "--batch-size -4 must be >= 1"),
    (["--lr", "-1"], "--lr -1.0 must be a finite number >= 0"),
    (["--lr", "nan"], "--lr nan must be a finite number >= 0"),
    (["--lr", "inf"], "--lr inf must be a finite number >= 0"),
    (["--dropout", "2"], "--dropout 2.0 must lie in [0, 1)"),
    (["--workers", "-1"], "--workers -1 must be >= 0"),
    (["--epochs", "0"], "--epochs 0 must be >= 1"),
    (["--epochs", "-1"], "--epochs -1 must be >= 1"),
    (["--alpha", "0"], "--alpha 0.0 must be > 0"),
    (["--r", "0"], "--r 0 must be >= 1"),
    (["--rc", "0"], "--rc 0 must be >= 1"),
    (["--epochs", "2", "--warmup-epochs", "2"], "--warmup-epochs 2 must be < --epochs 2"),
    (["--epochs", "3", "--warmup-epochs", "5"], "--warmup-epochs 5 must be < --epochs 3"),
    (["--eval-every", "0"], "--eval-every 0 must be >= 1"),
    (["--sparsity", "1.5"], "--sparsity 1.5 must lie in [0, 1)"),
    (["--mask", "/nonexistent/mask.safetensors"], "--mask /nonexistent/mask.safetensors: does not exist"),
    (["--weights", "/nonexistent/efl7.pth"], "--weights /nonexistent/efl7.pth: does not exist"),
    (["--model-cfg", "{depths"], "--model-cfg must be a JSON object"),
    (["--img-size", "0"], "--img-size 0 must be >= 1"),
]


@pytest.mark.parametrize("extra, phrase", FLAG_ROWS, ids=[" ".join(r[0]) for r in FLAG_ROWS])
def test_bad_flag(tmp_path, extra, phrase):
    check(*run(*TINY, *extra, "--out", tmp_path / "o"), 2, phrase)
    assert not (tmp_path / "o").exists()  # refused before --out is touched


CALL_SITE_ROWS = [  # library errors the script reports argparse-style: extra argv, phrase
    (["--method", "lora", "--r", "100"], "LoRA rank r=100 is out of range"),
    (["--img-size", "33"], "must be a positive multiple of 32"),
    (["--weights", "GARBAGE"], "garbage.pth"),  # a file that is no checkpoint
    # issue 23: a negative width; a size whose model cannot be built (a tensor of more than 2^63 bytes); one whose
    # attention-bias index buffer alone, (N, N) int64 for N = (32768 / 32)^2 tokens, is 1048576^2 * 8 B = 8796.1 GB
    (["--model-cfg", '{"embed_dims": [-1, 2, 3, 4]}'], "embed_dims=[-1, 2, 3, 4]: every entry must be an integer >= 1"),
    (["--img-size", "1048576", "--count-only", "--num-classes", "2"], "would need more than 2^63 bytes"),
    (["--img-size", "32768", "--count-only", "--num-classes", "2"],
     "the largest is stages.3.blocks.2.token_mixer.attention_bias_idxs (1048576, 1048576) int64 (8,796.1 GB)"),
    (["--mask", "PICKLE"], "pickle.bin is not a readable safetensors file: it is a torch.save / pickle file"),
    (["--weights", "NAN"], "tensors hold NaN or inf values (e.g. head.bias"),
]


def make_input(name, tmp_path):
    """The file a CALL_SITE_ROWS placeholder stands for: no checkpoint, a pickle, ef_tiny's weights all NaN."""
    if name == "GARBAGE":
        (tmp_path / "garbage.pth").write_text("garbage")
        return tmp_path / "garbage.pth"
    if name == "PICKLE":  # a plain pickle, as torch.save's legacy format or any other tool writes it
        import pickle
        (tmp_path / "pickle.bin").write_bytes(pickle.dumps({"stem.conv1.weight": [True, False]}))
        return tmp_path / "pickle.bin"
    if name == "NAN":  # every float tensor NaN (a diverged run's checkpoint), the shapes of the TINY model
        from safetensors.torch import save_file

        from models import create_model
        sd = create_model("ef_tiny", num_classes=2, img_size=32).state_dict()
        save_file({k: torch.full_like(v, float("nan")) if v.is_floating_point() else v for k, v in sd.items()},
                  tmp_path / "nan.safetensors")
        return tmp_path / "nan.safetensors"
    return name


@pytest.mark.parametrize("extra, phrase", CALL_SITE_ROWS, ids=[" ".join(r[0]) for r in CALL_SITE_ROWS])
def test_library_error_at_a_call_site(tmp_path, extra, phrase):
    extra = [make_input(a, tmp_path) for a in extra]
    check(*run(*TINY, *extra, "--out", tmp_path / "o"), 2, phrase)


def test_task_file_as_weights(finished, tmp_path):
    """--weights OUT/adapters.safetensors: it is a task file, and how to use one (no strict=False: no such flag)."""
    task = finished / "done" / "adapters.safetensors"
    code, out, err = run(*TINY, "--weights", task, "--out", tmp_path / "o")
    check(code, out, err, 2, f"'{task}' is a task file (the adapters and head of a trained run, model='ef_tiny', "
                             f"method='petah'")
    assert f"predict_cls.py --weights BASE --tasks NAME={task}" in err
    assert f"export.py --weights BASE --task {task}" in err
    assert "strict" not in err


# the script flags issue 23 found silently accepted (their checks: training/cli.py)
SEG_TINY = ["--model", "ef_tiny", "--method", "lora", "--data", "synthetic", "--img-size", "32", "--synthetic-train",
            "2", "--synthetic-val", "1", "--fpn-channels", "16", "--fpn-head-channels", "16", "--epochs", "1",
            "--batch-size", "2", "--workers", "0"]
DET_TINY = ["--model", "ef_tiny", "--method", "petah", "--data", "synthetic", "--img-size", "96", "--fpn-channels",
            "32", "--fc-dim", "128", "--mask-channels", "32", "--roi-batch", "64", "--rpn-batch", "64", "--workers",
            "0", "--batch-size", "4", "--warmup-iters", "5", "--lr", "3e-3", "--synthetic-train", "8",
            "--synthetic-val", "2", "--epochs", "2"]
SCRIPT_FLAG_ROWS = [  # script, argv, phrase
    ("train_cls.py", [*TINY, "--method", "ia3", "--learn-interp"], "--learn-interp belongs to LoRA"),
    ("train_seg.py", [*SEG_TINY, "--method", "ia3", "--learn-interp"], "--learn-interp belongs to LoRA"),
    ("train_seg.py", [*SEG_TINY, "--vis-images", "-1"], "--vis-images -1 must be >= 0"),
    ("train_det.py", [*DET_TINY, "--lr-steps", "-1"], "--lr-steps -1 must be >= 1"),
    ("train_det.py", [*DET_TINY, "--lr-steps", "8", "0"], "--lr-steps 0 must be >= 1"),
]


@pytest.mark.parametrize("script, argv, phrase", SCRIPT_FLAG_ROWS,
                         ids=[f"{r[0]} {' '.join(r[1][-3:])}" for r in SCRIPT_FLAG_ROWS])
def test_script_flag_refused(tmp_path, script, argv, phrase):
    check(*run(*argv, "--out", tmp_path / "o", script=str(ROOT / script)), 2, phrase, prog=script)
    assert not (tmp_path / "o").exists()  # refused before --out is touched


def test_run_refused_over_its_data_leaves_no_folder(tmp_path):
    """A data error comes after --out is made (the lock first): the process exits 2 and removes the folders it
    made, so the default runs/seg of a mistyped --data-root is not left behind empty."""
    p = subprocess.run([sys.executable, str(ROOT / "train_seg.py"), *SEG_TINY, "--data", "folder", "--data-root",
                        str(tmp_path / "missing"), "--out", str(tmp_path / "runs" / "seg")], cwd=ROOT, env=ENV,
                       capture_output=True, text=True)
    assert p.returncode == 2 and "Traceback" not in p.stderr and "img/" in p.stderr, p.stderr[-2000:]
    assert os.listdir(tmp_path) == []


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_device_cuda_without_cuda(tmp_path):
    check(*run(*TINY, "--device", "cuda", "--out", tmp_path / "o"), 2, "use --device cpu")


def test_default_warmup_fits_a_short_run(tmp_path):
    """--epochs 1 without --warmup-epochs: the default (2) is capped at half the run, so the LR decays."""
    i = TINY.index("--warmup-epochs")
    check(*run(*TINY[:i], *TINY[i + 2:], "--out", tmp_path / "o"), 0, "done: top-1")
    assert json.load(open(tmp_path / "o" / "args.json"))["warmup_epochs"] == 0.5


def test_stray_double_dash(tmp_path):
    check(*run("--", *TINY, "--count-only", "--num-classes", "2"), 0, '"adapter_params"')


# -----------------------------------------------------------------------------
# --out: a file, a finished run, another live run, leftovers of a killed one

def test_out_is_an_existing_file(tmp_path):
    (tmp_path / "f").write_text("x")
    check(*run(*TINY, "--out", tmp_path / "f"), 2, f"--out {tmp_path / 'f'} is an existing file")


def test_out_below_a_file(tmp_path):
    (tmp_path / "f").write_text("x")
    check(*run(*TINY, "--out", tmp_path / "f" / "run"), 2, "is a file, not a directory; choose another --out")


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished 2-epoch run (its ckpt holds epoch 2), and a run stopped after epoch 1 of 2."""
    base = tmp_path_factory.mktemp("runs")
    check(*run(*TINY, "--epochs", "2", "--out", base / "done"), 0, "done: top-1")
    check(*run(*TINY, "--epochs", "2", "--out", base / "stopped", "--stop-after-epoch", "1"), 0, "--resume")
    return base


def copy_run(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_finished_run_is_not_overwritten(finished, tmp_path):
    out = copy_run(finished / "done", tmp_path / "done")
    before = (out / "merged.safetensors").read_bytes()
    check(*run(*TINY, "--epochs", "2", "--out", out), 2, "holds a finished run")
    code, o, e = run(*TINY, "--epochs", "2", "--out", out)
    assert "--resume" in e and "another --out" in e and (out / "merged.safetensors").read_bytes() == before
    check(*run(*TINY, "--epochs", "2", "--out", out, "--resume"), 0, "done: top-1")  # --resume: export again


def test_resume_with_another_data_root(finished, tmp_path):
    out = copy_run(finished / "stopped", tmp_path / "s")
    check(*run(*TINY, "--epochs", "2", "--out", out, "--resume", "--data-root", tmp_path / "elsewhere"), 2,
          f"--data-root 'data' -> '{tmp_path / 'elsewhere'}'")


def test_another_live_run_holds_out(tmp_path):
    """A live process (here a sleeping child standing in for the workers of a killed torchrun) holds OUT/.lock."""
    out = tmp_path / "busy"
    out.mkdir()
    other = subprocess.Popen([sys.executable, "-c", "import signal; signal.pause()"])  # lives until killed below
    try:
        (out / ".lock").write_text(json.dumps(dict(pid=other.pid, host=socket.gethostname(), command="train_cls.py",
                                                   proc_start=run_dir._proc_start(other.pid), started="now")))
        check(*run(*TINY, "--out", out), 2, f"is in use by another run: pid {other.pid}")
    finally:
        other.kill()
        other.wait()
    check(*run(*TINY, "--out", out), 0, "took over the lock of pid")  # now gone: the lock is stale
    assert not (out / ".lock").exists()  # released at the end


def test_leftovers_of_a_killed_run_are_removed_and_counted(finished, tmp_path):
    out = copy_run(finished / "stopped", tmp_path / "s")
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()  # a pid that no longer runs
    (out / f"log.jsonl.tmp.{dead}").write_text("half a line")
    (out / "ckpt" / "epoch_0000.safetensors").write_bytes(b"stale")  # an epoch last.json does not name
    code, o, e = run(*TINY, "--epochs", "2", "--out", out, "--resume")
    check(code, o, e, 0, f"removed 2 leftover(s) of an interrupted run in {out}")
    assert not (out / f"log.jsonl.tmp.{dead}").exists() and sorted(os.listdir(out / "ckpt")) == [
        "epoch_0002.pt", "epoch_0002.safetensors", "last.json"]


# -----------------------------------------------------------------------------
# --resume from damaged checkpoints: the file is named, and what can still be resumed

def truncate(path, keep=0.5):
    data = path.read_bytes()
    path.write_bytes(data[:int(len(data) * keep)])


DAMAGE = [  # id, what to do to OUT/ckpt, expected exit, phrase
    ("truncated adapters", lambda c: truncate(c / "epoch_0001.safetensors"), 2,
     "epoch_0001.safetensors is not a readable safetensors file"),
    ("empty adapters", lambda c: (c / "epoch_0001.safetensors").write_bytes(b""), 2, "it is empty (0 bytes)"),
    ("truncated state", lambda c: truncate(c / "epoch_0001.pt"), 2,
     "epoch_0001.pt (the training state of epoch 1) is damaged"),
    ("deleted state", lambda c: (c / "epoch_0001.pt").unlink(), 2,
     "epoch_0001.pt (the training state of epoch 1) is missing"),
    ("cut last.json", lambda c: truncate(c / "last.json"), 0, "is damaged (not the JSON the run writes): resuming "
                                                            "from epoch 1"),
    ("deleted last.json", lambda c: (c / "last.json").unlink(), 0, "last.json is missing: resuming from epoch 1"),
]


@pytest.mark.parametrize("damage, expect, phrase", [r[1:] for r in DAMAGE], ids=[r[0] for r in DAMAGE])
def test_resume_from_a_damaged_checkpoint(finished, tmp_path, damage, expect, phrase):
    out = copy_run(finished / "stopped", tmp_path / "s")
    damage(out / "ckpt")
    code, o, e = run(*TINY, "--epochs", "2", "--out", out, "--resume")
    check(code, o, e, expect, phrase)
    if expect == 2:
        assert "No earlier epoch is kept" in e and f"delete {out / 'ckpt'}" in e
    else:  # resumed: the same result as the uninterrupted run
        ours = [json.loads(line) for line in open(out / "log.jsonl")][-1]
        ref = [json.loads(line) for line in open(finished / "done" / "log.jsonl")][-1]
        assert ours == ref


def test_damaged_last_epoch_with_an_older_one_still_there(finished, tmp_path):
    """The newest epoch damaged, the previous one's files still there (a kill right after the pointer moved, then
    damage): they are kept, the message names them and how to resume from them, and doing so gives the same run."""
    out = copy_run(finished / "done", tmp_path / "d")
    for f in ("epoch_0001.safetensors", "epoch_0001.pt"):
        shutil.copy(finished / "stopped" / "ckpt" / f, out / "ckpt" / f)
    truncate(out / "ckpt" / "epoch_0002.safetensors")
    check(*run(*TINY, "--epochs", "2", "--out", out, "--resume"), 2,
          "Epoch 1's files are still there: to resume from it, delete last.json and the files of epoch 2")
    assert (out / "ckpt" / "epoch_0001.pt").exists()
    for f in ("last.json", "epoch_0002.safetensors", "epoch_0002.pt"):
        (out / "ckpt" / f).unlink()
    check(*run(*TINY, "--epochs", "2", "--out", out, "--resume"), 0, "resuming from epoch 1")
    ours, ref = ([json.loads(line) for line in open(d / "log.jsonl")][-1] for d in (out, finished / "done"))
    assert ours == ref


# -----------------------------------------------------------------------------
# folder datasets

def folder(root, classes):
    from torchvision.io import write_png
    for split in ("train", "val"):
        for c, files in classes.items():
            (root / split / c).mkdir(parents=True, exist_ok=True)
            for k, f in enumerate(files):
                if f.endswith(".png"):
                    write_png(torch.full((3, 8, 8), 40 * k, dtype=torch.uint8), str(root / split / c / f))
                else:
                    (root / split / c / f).write_bytes(b"\0")
    return root


FOLDER_ROWS = [
    ("empty class folder", {"a": ["0.png", "1.png"], "b": ["0.png", "1.png"], "empty": []}, "holds no files"),
    ("class of unsupported files", {"a": ["0.png", "1.png"], "b": ["0.png", "1.png"], "tif": ["0.tif", "1.bmp"]},
     "holds only .bmp, .tif files"),
    ("corrupt image", {"a": ["0.png", "1.png"], "b": ["0.png", "bad.png"]}, "cannot read image"),
]


@pytest.mark.parametrize("classes, phrase", [r[1:] for r in FOLDER_ROWS], ids=[r[0] for r in FOLDER_ROWS])
def test_folder_dataset(tmp_path, classes, phrase):
    root = folder(tmp_path / "data", classes)
    if "bad.png" in classes.get("b", []):
        (root / "train" / "b" / "bad.png").write_bytes(b"\x89PNG not really")
    check(*run(*TINY, "--data", "folder", "--data-root", root, "--out", tmp_path / "o"), 2, phrase)


# -----------------------------------------------------------------------------
# a disk that fills up, a read-only file system: real processes in a user + mount namespace with a small tmpfs
# (skipped where the kernel does not allow unprivileged namespaces); a file-size limit everywhere

def in_namespace(script: str) -> subprocess.CompletedProcess:
    probe = subprocess.run(["unshare", "-rm", "true"], capture_output=True)
    if probe.returncode != 0:
        pytest.skip("no unprivileged user + mount namespace here (unshare -rm): " + probe.stderr.decode()[:200])
    return subprocess.run(["unshare", "-rm", "sh", "-c", script], cwd=ROOT, env=ENV, capture_output=True, text=True)


def cli(out, weights=None) -> str:
    """The TINY run as a shell command; with `weights` (a base checkpoint outside `out`) it writes no
    OUT/base.safetensors (~860 KB: what a run without --weights keeps of its random base)."""
    extra = ["--weights", str(weights)] if weights else []
    return " ".join([sys.executable, SCRIPT, *TINY, "--out", str(out), *extra])


def tiny_base(tmp_path):
    """A base checkpoint of the TINY model (random weights), written outside the small file systems."""
    from safetensors.torch import save_file

    from models import create_model
    save_file(create_model("ef_tiny", num_classes=2, img_size=32).state_dict(), tmp_path / "base.safetensors")
    return tmp_path / "base.safetensors"


@pytest.mark.parametrize("size, file", [("64k", "epoch_0001.safetensors"), ("200k", "epoch_0001.pt"),
                                        ("64k", "base.safetensors")])
def test_disk_full(tmp_path, size, file):
    """The adapters (~100 KB), the state (torch.save, ~220 KB) or the random base of a run without --weights
    (~860 KB) do not fit: 'disk full', naming the file, never 'inline_container.cc ... unexpected pos'; no temporary
    is left."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    weights = None if file == "base.safetensors" else tiny_base(tmp_path)
    r = in_namespace(f"mount -t tmpfs -o size={size} tmpfs {mnt} && {cli(mnt / 'run', weights)}; echo EXIT $?; "
                     f"ls -R {mnt}")
    assert "Traceback" not in r.stderr and "inline_container" not in r.stderr, r.stderr[-3000:]
    where = mnt / "run" / (file if file == "base.safetensors" else f"ckpt/{file}")
    assert "EXIT 2" in r.stdout and f"disk full while writing {where}" in r.stderr, r.stdout + r.stderr[-3000:]
    assert "free space or choose another --out" in r.stderr and ".tmp." not in r.stdout.split("EXIT")[1]


def test_read_only_file_system(tmp_path):
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    r = in_namespace(f"mount -t tmpfs -o size=1m tmpfs {mnt} && mkdir {mnt}/run && mount -o remount,ro {mnt} && "
                     f"{cli(mnt / 'run')}; echo EXIT $?")
    assert "Traceback" not in r.stderr and "EXIT 2" in r.stdout, r.stdout + r.stderr[-3000:]
    assert f"read-only file system: cannot write {mnt / 'run' / '.lock'}" in r.stderr


def test_file_size_limit(tmp_path):
    """ulimit -f (RLIMIT_FSIZE; Python ignores SIGXFSZ, so the write fails with EFBIG): a clear message."""
    r = subprocess.run(["sh", "-c", f"ulimit -f 150 && {cli(tmp_path / 'run', tiny_base(tmp_path))}"], cwd=ROOT,
                       env=ENV, capture_output=True, text=True)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert "file too large while writing" in r.stderr and "choose another --out" in r.stderr
    assert not [f for f in os.listdir(tmp_path / "run" / "ckpt") if ".tmp." in f]


# -----------------------------------------------------------------------------
# what a run leaves: readable logs, summary.csv, curves, TensorBoard, file modes

def test_outputs_for_people(tmp_path):
    """stderr is not a terminal here: no carriage-return frames; summary.csv with timm's columns; curves.png;
    TensorBoard event files; every file readable as the umask allows (0644 under umask 022, 0664 under 002)."""
    for umask, mode in ((0o022, 0o644), (0o002, 0o664)):
        out = tmp_path / f"run{umask:o}"
        old = os.umask(umask)
        try:
            code, o, e = run(*TINY, "--epochs", "2", "--out", out, "--tensorboard")
        finally:
            os.umask(old)
        check(code, o, e, 0, "done: top-1")
        assert "\r" not in e
        files = [p for p in out.rglob("*") if p.is_file()]
        assert {"merged.safetensors", "adapters.safetensors", "summary.csv", "curves.png", "log.jsonl",
                "args.json", "last.json"} <= {p.name for p in files}
        assert {p.name: oct(stat.S_IMODE(p.stat().st_mode)) for p in files if p.parent.name != "tb"} == {
            p.name: oct(mode) for p in files if p.parent.name != "tb"}
    lines = (out / "summary.csv").read_text().splitlines()
    assert lines[0] == "epoch,train_loss,eval_loss,eval_top1,eval_top5,lr" and len(lines) == 3
    log = [json.loads(line) for line in open(out / "log.jsonl")]
    assert [float(v) for v in lines[2].split(",")[1:4]] == pytest.approx(
        [log[1]["train_loss"], log[1]["eval_loss"], 100 * log[1]["eval_acc"]], rel=1e-5)
    assert float(lines[2].split(",")[4]) == 100.0  # 2 classes: the label is always among the top 5
    assert list((out / "tb").glob("events.out.tfevents.*"))


def test_tensorboard_missing(tmp_path, monkeypatch):
    import builtins
    real = builtins.__import__

    def no_tensorboard(name, *a, **k):
        if name.startswith("torch.utils.tensorboard"):
            raise ImportError("No module named 'tensorboard'")
        return real(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_tensorboard)
    check(*run(*TINY, "--out", tmp_path / "o", "--tensorboard"), 2, "pip install tensorboard")


def test_help_is_complete():
    """Every option has a help text and no default is printed twice."""
    code, out, err = run("--help")
    assert code == 0 and "(default: " not in out and "default" in out
    lines = out.splitlines()
    options = [i for i, line in enumerate(lines) if line.startswith("  -")]
    assert len(options) > 40
    for i in options:  # the help follows the flag on its line (after 2+ spaces) or on the next, indented
        same_line = len(re.split(r"\s{2,}", lines[i].strip(), maxsplit=1)) == 2
        next_line = i + 1 < len(lines) and lines[i + 1].startswith(" " * 20) and lines[i + 1].strip()
        assert same_line or next_line, lines[i]


# -----------------------------------------------------------------------------
# the library: adapter files

class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.head = nn.Linear(4, 2)


def adapted():
    torch.manual_seed(0)
    m = Tiny()
    lora.add_lora(m, {"fc": 2})
    lora.mark_trainable(m, modules=("head",))
    return m


def good_file(tmp_path):
    path = tmp_path / "good.safetensors"
    lora.save_adapters(adapted(), path)
    return path


LIBRARY_ROWS = [  # id, how to make the file from a good one (bytes -> bytes), phrase
    ("0-byte file", lambda b: b"", "it is empty (0 bytes)"),
    ("5 bytes", lambda b: b[:5], "only 5 bytes"),
    ("huge header length", lambda b: (10 ** 15).to_bytes(8, "little") + b[8:],
     "header of 1,000,000,000,000,000 bytes but the file has"),
    ("corrupt header", lambda b: b[:8] + b"{not json" + b[17:], "header is not JSON"),
    ("truncated data", lambda b: b[:-10], "the file is truncated"),
    (".pth file", None, "it is a torch.save / pickle file (.pt / .pth)"),
]


@pytest.mark.parametrize("make, phrase", [r[1:] for r in LIBRARY_ROWS], ids=[r[0] for r in LIBRARY_ROWS])
def test_load_adapters_on_a_bad_file(tmp_path, make, phrase):
    path = tmp_path / "bad.safetensors"
    if make is None:
        path = tmp_path / "adapters.pth"
        torch.save(lora.adapter_state_dict(adapted()), path)
    else:
        path.write_bytes(make(good_file(tmp_path).read_bytes()))
    with pytest.raises(ValueError) as e:
        lora.load_adapters(adapted(), path)
    assert str(path) in str(e.value) and phrase in str(e.value), str(e.value)


def test_save_adapters_on_a_model_without_adapters(tmp_path):
    with pytest.raises(ValueError, match="has no adapter layers and nothing is frozen"):
        lora.save_adapters(Tiny(), tmp_path / "a.safetensors")
    assert not (tmp_path / "a.safetensors").exists()
    lora.save_adapters(Tiny(), tmp_path / "a.safetensors", allow_no_adapters=True)  # deliberate: every parameter
    assert len(lora.read_safetensors(tmp_path / "a.safetensors")[0]) == 4


# -----------------------------------------------------------------------------
# the library: bad input to the public API (issue 23), each a clear exception naming the problem

def tiny_task(tmp_path, seed=0):
    """A task file of Tiny (LoRA r 2 on fc, the head trained) and its base model."""
    from tasks.task_file import save_task
    torch.manual_seed(seed)
    base = Tiny()
    m = copy.deepcopy(base)
    lora.add_lora(m, {"fc": 2})
    lora.mark_trainable(m, modules=("head",))
    save_task(m, tmp_path / "t.safetensors", meta=dict(task_type="cls", model="tiny", method="lora"))
    return base, tmp_path / "t.safetensors"


def peft_dir(tmp_path, config: str, weights: bytes):
    d = tmp_path / "peft"
    d.mkdir()
    (d / "adapter_config.json").write_text(config)
    (d / "adapter_model.safetensors").write_bytes(weights)
    return d


def call_task_bank(tmp_path):
    from tasks.bank import TaskBank
    TaskBank("hello")


def call_bank_add_a_model(tmp_path):
    from tasks.bank import TaskBank
    TaskBank(Tiny()).add("t", Tiny())  # a model where the task file belongs


def call_corrupt_peft_weights(tmp_path):
    from tasks.peft_io import task_from_peft
    d = peft_dir(tmp_path, json.dumps(dict(peft_type="LORA", r=2, lora_alpha=4)), b"\x08\0\0\0\0\0\0\0{broken")
    task_from_peft(d, Tiny(), tmp_path / "t.safetensors", meta=dict(task_type="cls", model="tiny", method="lora"))


def call_peft_config_not_json(tmp_path):
    from tasks.peft_io import task_from_peft
    d = peft_dir(tmp_path, "peft_type: LORA\n", b"")
    task_from_peft(d, Tiny(), tmp_path / "t.safetensors", meta=dict(task_type="cls", model="tiny", method="lora"))


def call_load_masks_pickle(tmp_path):
    from methods.sparse import load_masks
    torch.save({"fc.weight": torch.ones(4, 4, dtype=torch.bool)}, tmp_path / "masks.safetensors")
    load_masks(tmp_path / "masks.safetensors")


def call_masks_of_another_model(tmp_path):
    from methods.sparse import apply_masks, load_masks, save_masks
    save_masks({"blocks.0.weight": torch.ones(4, 4, dtype=torch.bool)}, tmp_path / "m.safetensors")
    apply_masks(Tiny(), load_masks(tmp_path / "m.safetensors"))


def call_read_task_list_adapters(tmp_path):
    from tasks.task_file import read_task
    _, path = tiny_task(tmp_path)
    tensors, metadata = lora.read_safetensors(path)
    lora.write_safetensors(tensors, path, {**metadata, "adapters": json.dumps(["fc"])})
    read_task(path)


def call_read_task_directory(tmp_path):
    from tasks.task_file import read_task
    read_task(tmp_path)


def call_export_peft_other_base(tmp_path):
    from tasks.peft_io import export_peft
    _, path = tiny_task(tmp_path, seed=0)
    torch.manual_seed(1)
    export_peft(path, Tiny(), tmp_path / "peft")  # another base: other random weights


def call_load_pretrained_nan(tmp_path):
    from models import load_pretrained
    sd = Tiny().state_dict()
    sd["fc.weight"][1, 2] = float("nan")  # one NaN is enough to make every output NaN
    load_pretrained(Tiny(), sd, verbose=False)


def call_load_pretrained_task_file(tmp_path):
    from models import load_pretrained
    base, path = tiny_task(tmp_path)
    load_pretrained(base, path, verbose=False)


def call_create_model(**kw):
    def call(tmp_path):
        from models import create_model
        create_model("ef_tiny", **kw)
    return call


API_ROWS = [  # id, call(tmp_path), exception type, phrase ("{tmp}": tmp_path)
    ("TaskBank('hello')", call_task_bank, TypeError, "model must be the base model, an nn.Module"),
    ("bank.add of a model", call_bank_add_a_model, TypeError,
     "bank.add('t', task): task must be a task file's path (OUT/adapters.safetensors) or a Task"),
    ("task_from_peft, corrupt weights", call_corrupt_peft_weights, ValueError,
     "{tmp}/peft/adapter_model.safetensors is not a readable safetensors file"),
    ("task_from_peft, config not JSON", call_peft_config_not_json, ValueError,
     "{tmp}/peft/adapter_config.json is not valid JSON"),
    ("load_masks of a pickle", call_load_masks_pickle, ValueError,
     "mask file {tmp}/masks.safetensors is not a readable safetensors file: it is a torch.save / pickle file"),
    ("masks of another model", call_masks_of_another_model, ValueError,
     "masks name parameters the model does not have: ['blocks.0.weight']"),
    ("read_task, adapters a list", call_read_task_list_adapters, ValueError,
     "task file {tmp}/t.safetensors: its 'adapters' metadata must be {module name: adapter config"),
    ("read_task of a directory", call_read_task_directory, ValueError, "task file {tmp} is a directory, not a file"),
    ("export_peft, another base", call_export_peft_other_base, ValueError,
     "task {tmp}/t.safetensors was trained on another base model"),
    ("load_pretrained, a NaN", call_load_pretrained_nan, ValueError,
     "checkpoint 'state_dict': 1 of 4 tensors hold NaN or inf values (e.g. fc.weight)"),
    ("load_pretrained of a task file", call_load_pretrained_task_file, ValueError,
     "'{tmp}/t.safetensors' is a task file (the adapters and head of a trained run, model='tiny', method='lora'"),
    ("create_model, negative width", call_create_model(embed_dims=(16, -24, 32, 48)), ValueError,
     "create_model('ef_tiny'): embed_dims=(16, -24, 32, 48): every entry must be an integer >= 1"),
    ("create_model, bool depth", call_create_model(depths=(1, True, 1, 2)), ValueError,
     "depths=(1, True, 1, 2): every entry must be an integer >= 0"),
    ("create_model, rate", call_create_model(drop_path_rate=1.0), ValueError,
     "drop_path_rate=1.0 must be a probability in [0, 1)"),
]


@pytest.mark.parametrize("call, error, phrase", [r[1:] for r in API_ROWS], ids=[r[0] for r in API_ROWS])
def test_public_api_on_bad_input(tmp_path, call, error, phrase):
    with pytest.raises(error) as e:
        call(tmp_path)
    assert type(e.value) is error  # not a subclass the scripts' user_errors would miss (KeyError, ...)
    assert phrase.replace("{tmp}", str(tmp_path)) in str(e.value), str(e.value)


# -----------------------------------------------------------------------------
# crash safety (issue 23): kill -9 of train_det.py mid-epoch and while writing its checkpoint, then --resume; two
# runs started on one --out at once; kill -9 of the torchrun launcher. Real processes; every wait ends with the
# process (bounded by the run's steps), none by a clock.

KILL_HOOK = '''
"""Loaded by the interpreter at start (sitecustomize): SIGKILL this process at a chosen point of the run, as kill -9
or a power cut would. KILL_AFTER_STEP=N: right after the N-th optimizer step. KILL_WHILE_WRITING=NAME: while the file
whose name ends with NAME is being written (its temporary half written, before os.replace)."""
import os
import signal

if os.environ.get("KILL_AFTER_STEP"):
    from torch.optim.optimizer import register_optimizer_step_post_hook

    _steps = [0]

    def _after_step(optimizer, args, kwargs):
        _steps[0] += 1
        if _steps[0] == int(os.environ["KILL_AFTER_STEP"]):
            os.kill(os.getpid(), signal.SIGKILL)

    register_optimizer_step_post_hook(_after_step)

if os.environ.get("KILL_WHILE_WRITING"):
    import tasks.atomic as _atomic

    _write = _atomic.atomic_write

    def atomic_write(path, write):
        if not str(path).endswith(os.environ["KILL_WHILE_WRITING"]):
            return _write(path, write)
        tmp = _atomic._tmp_path(str(path))
        with open(tmp, "wb") as f:
            write(f)
        os.truncate(tmp, os.path.getsize(tmp) // 2)
        os.kill(os.getpid(), signal.SIGKILL)

    _atomic.atomic_write = atomic_write
'''


def det(out, *extra, env=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "train_det.py"), *DET_TINY, "--out", str(out), *extra],
                          cwd=ROOT, env=env or ENV, capture_output=True, text=True)


@pytest.fixture(scope="module")
def det_reference(tmp_path_factory):
    """train_det.py uninterrupted: 2 epochs of 2 steps (8 images, batch 4)."""
    out = tmp_path_factory.mktemp("det") / "ref"
    r = det(out)
    assert r.returncode == 0, r.stderr[-3000:]
    return out


KILLS = [  # id, environment of the killed run (see KILL_HOOK), the leftovers --resume reports
    ("mid-epoch 2", dict(KILL_AFTER_STEP="3"), None),
    ("writing epoch 2's adapters", dict(KILL_WHILE_WRITING="epoch_0002.safetensors"), "removed 1 leftover(s)"),
    ("writing epoch 2's state", dict(KILL_WHILE_WRITING="epoch_0002.pt"), "removed 2 leftover(s)"),
    ("writing epoch 1's last.json", dict(KILL_WHILE_WRITING="last.json"), "removed 1 leftover(s)"),
]


@pytest.mark.parametrize("kill, leftovers", [r[1:] for r in KILLS], ids=[r[0] for r in KILLS])
def test_train_det_killed_then_resumed(det_reference, tmp_path, kill, leftovers):
    """kill -9 at that moment, then --resume: the uninterrupted run's losses, COCO metrics and merged model, bit for
    bit; the half-written temporaries and the epoch files last.json does not name are removed and counted."""
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(KILL_HOOK)
    out = tmp_path / "run"
    killed = det(out, env=dict(ENV, PYTHONPATH=f"{hook}{os.pathsep}{ROOT}", **kill))
    assert killed.returncode == -9, killed.stderr[-3000:]
    assert not (out / "merged.safetensors").exists()
    r = det(out, "--resume")
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert "took over the lock of pid" in r.stdout + r.stderr  # the killed run's lock
    if leftovers:
        assert f"{leftovers} of an interrupted run in {out}" in r.stdout + r.stderr
    assert not [p for p in out.rglob("*") if ".tmp." in p.name]
    ref, ours = ([json.loads(line) for line in open(d / "log.jsonl")] for d in (det_reference, out))
    assert [e["train_loss"] for e in ours[:-1]] == [e["train_loss"] for e in ref[:-1]]
    keys = [k for k in ref[-1] if k.startswith(("bbox_", "segm_"))]
    assert keys and {k: ours[-1][k] for k in keys} == {k: ref[-1][k] for k in keys}
    from safetensors.torch import load_file
    a, b = load_file(str(det_reference / "merged.safetensors")), load_file(str(out / "merged.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def hold_lock_while_creating(out) -> subprocess.Popen:
    """A process in the middle of taking OUT/.lock (created, flocked, nothing written yet), then waiting on stdin."""
    code = ("import fcntl, os, sys; fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT, 0o666); "
            "fcntl.flock(fd, fcntl.LOCK_EX); print('held', flush=True); sys.stdin.read()")
    p = subprocess.Popen([sys.executable, "-c", code, str(out / ".lock")], stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline() == "held\n"
    return p


def test_lock_being_created_is_not_taken_over(tmp_path):
    """Two runs started on one --out at the same moment: the second finds the first's lock file created but still
    empty (the first is between creating and writing it). It must not take it over as a killed run's."""
    out = tmp_path / "o"
    out.mkdir()
    other = hold_lock_while_creating(out)
    try:
        code, o, e = run(*TINY, "--out", out)
    finally:
        other.communicate("")
    check(code, o, e, 2, f"--out {out} is in use by another run")
    assert not (out / "merged.safetensors").exists()


def test_two_runs_started_at_once(tmp_path):
    """Two train_cls.py processes on one --out, released at the same instant: exactly one runs, the other exits 2
    naming the first; the winner's result is complete."""
    out = tmp_path / "o"
    gate = ("import os, sys, runpy; sys.stdin.read(1); sys.argv = sys.argv[1:]; "
            "runpy.run_path(sys.argv[0], run_name='__main__')")
    procs = [subprocess.Popen([sys.executable, "-c", gate, SCRIPT, *TINY, "--out", str(out)], cwd=ROOT, env=ENV,
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    for p in procs:  # both are started and waiting on stdin (their imports done): release them together
        p.stdin.write("go")
    for p in procs:
        p.stdin.close()
    results = [(p.wait(), p.stdout.read(), p.stderr.read()) for p in procs]
    codes = sorted(r[0] for r in results)
    assert codes == [0, 2], results
    winner = next(r for r in results if r[0] == 0)
    loser = next(r for r in results if r[0] == 2)
    assert "done: top-1" in winner[1] + winner[2] and f"--out {out} is in use by another run" in loser[2]
    assert "Traceback" not in loser[2] and (out / "merged.safetensors").exists()


def test_torchrun_launcher_killed(tmp_path):
    """kill -9 of torchrun itself (it cannot stop its workers then): the workers notice and stop, instead of
    training on and writing into --out. Without that they would run all 30 epochs and write merged.safetensors."""
    out = tmp_path / "o"
    i = TINY.index("--epochs")
    args = [*TINY[:i], *TINY[i + 2:], "--epochs", "30", "--synthetic-train", "8", "--batch-size", "8"]
    p = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          SCRIPT, *args, "--out", str(out)], cwd=ROOT, env=ENV, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    for line in p.stdout:  # rank 0 reports each epoch; after the first, kill the launcher
        if line.startswith("epoch 1:"):
            break
    p.kill()
    out_text, err = p.communicate()  # the pipes close when the last worker has exited
    assert p.returncode == -9
    # every worker has exited (the pipes closed) without finishing; the one that notices first says why (the other
    # may end in its next collective, its partner gone, before its own watcher speaks)
    assert "the torchrun launcher (pid" in err, err[-3000:]
    assert "Traceback" not in err and not (out / "merged.safetensors").exists()
    assert json.load(open(out / "ckpt" / "last.json"))["epoch"] < 30
