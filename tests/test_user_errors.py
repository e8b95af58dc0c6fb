"""
What a user gets for bad input: one row per case (command, expected exit code, a phrase the message must
contain, and never a Python traceback for an error the user can fix), for train_cls.py and the library calls.

Script rows run train_cls.py in this process (runpy, as tests/test_train_cls.py does) and record what a terminal
would show: exit code, stdout, stderr, and the traceback Python would print if an exception other than SystemExit
escaped. Rows that need a real process (a disk that fills up, a read-only file system, another live run holding
the output directory) run one. Tiny settings: ef_tiny at 32 px, 2 classes, 4 training images, one step per epoch.
"""

import contextlib
import io
import json
import os
import re
import runpy
import shutil
import socket
import stat
import subprocess
import sys
import traceback
from pathlib import Path

import pytest
import torch
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


def run(*argv) -> tuple[int, str, str]:
    """train_cls.py with argv, in this process: (exit code, stdout, stderr); an exception other than SystemExit
    ends it with code 1 and its traceback in stderr, as the interpreter would print it."""
    out, err = io.StringIO(), io.StringIO()
    old = sys.argv
    sys.argv = [SCRIPT, *map(str, argv)]
    code = 0
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                runpy.run_path(SCRIPT, run_name="__main__")
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
            except Exception:  # noqa: BLE001
                traceback.print_exc()
                code = 1
    finally:
        sys.argv = old
    return code, out.getvalue(), err.getvalue()


def check(code, out, err, expect, phrase):
    text = out + err
    assert "Traceback" not in err, err[-3000:]
    assert code == expect, f"exit {code}, expected {expect}:\n{text[-3000:]}"
    assert phrase in text, f"{phrase!r} not in:\n{text[-3000:]}"
    if expect == 2:  # argparse-style: usage, then "train_cls.py: error: <message>"
        assert "usage: train_cls.py" in err and "train_cls.py: error:" in err


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
]


@pytest.mark.parametrize("extra, phrase", CALL_SITE_ROWS, ids=[" ".join(r[0]) for r in CALL_SITE_ROWS])
def test_library_error_at_a_call_site(tmp_path, extra, phrase):
    (tmp_path / "garbage.pth").write_text("garbage")
    extra = [str(tmp_path / "garbage.pth") if a == "GARBAGE" else a for a in extra]
    check(*run(*TINY, *extra, "--out", tmp_path / "o"), 2, phrase)


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
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
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
    check(*run(*TINY, "--epochs", "2", "--out", out, "--resume"), 2, "Epoch 1's files are still there: to resume "
                                                                     "from it, delete last.json and the files of epoch 2")
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

def in_namespace(script: str, timeout=300) -> subprocess.CompletedProcess:
    probe = subprocess.run(["unshare", "-rm", "true"], capture_output=True)
    if probe.returncode != 0:
        pytest.skip("no unprivileged user + mount namespace here (unshare -rm): " + probe.stderr.decode()[:200])
    return subprocess.run(["unshare", "-rm", "sh", "-c", script], cwd=ROOT, env=ENV, capture_output=True, text=True,
                          timeout=timeout)


def cli(out) -> str:
    return " ".join([sys.executable, SCRIPT, *TINY, "--out", str(out)])


@pytest.mark.parametrize("size, file", [("64k", "epoch_0001.safetensors"), ("200k", "epoch_0001.pt")])
def test_disk_full(tmp_path, size, file):
    """The adapters (~100 KB) or the state (torch.save, ~220 KB) do not fit: 'disk full', naming the file, never
    'inline_container.cc ... unexpected pos'; no temporary is left."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    r = in_namespace(f"mount -t tmpfs -o size={size} tmpfs {mnt} && {cli(mnt / 'run')}; echo EXIT $?; "
                     f"ls -R {mnt}")
    assert "Traceback" not in r.stderr and "inline_container" not in r.stderr, r.stderr[-3000:]
    assert "EXIT 2" in r.stdout and f"disk full while writing {mnt / 'run' / 'ckpt' / file}" in r.stderr
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
    r = subprocess.run(["sh", "-c", f"ulimit -f 150 && {cli(tmp_path / 'run')}"], cwd=ROOT, env=ENV,
                       capture_output=True, text=True, timeout=300)
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
