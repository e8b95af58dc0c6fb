"""
Small helpers shared by the flat training scripts (train_cls.py, train_seg.py, train_det.py).

Only what the scripts would otherwise duplicate lives here; everything a reader needs to follow one training
run stays in the scripts themselves. The names and signatures below are stable (the scripts call them):

command line
    strip_leading_dashdash(argv) -> argv   drop one stray leading "--" (torchrun ... script.py -- --flags)
    check_common_args(parser, args)        range checks of the flags the scripts share (batch size, LR, epochs,
                                           warmup, dropout, workers, alpha, ranks, paths that must exist, ...);
                                           flags a script does not have, and None values, are skipped
    user_errors(parser, *types)            `with user_errors(parser): ...`: a ValueError / FileNotFoundError /
                                           WriteError from library code becomes parser.error(message): usage +
                                           message, exit 2, no traceback (real bugs keep theirs)
torchrun / DDP
    setup_distributed, cleanup_distributed, all_reduce_sum, seed_everything, epoch_seed
learning-rate schedule
    cosine_lr_factor
the output directory (master rank only)
    prepare_out_dir(out, *, resume, ckpt_dir) -> notes   --out must be a writable directory; a lock file
                                           OUT/.lock (pid, host) so that two runs never write one directory
                                           (a dead holder's lock is taken over); a finished run is not
                                           overwritten without --resume; leftovers of killed runs are removed
    release_out_dir(out)                   drop the lock (also at interpreter exit)
    check_resume_settings(saved, now, *, ckpt_dir)  refuse --resume with other settings, naming each one
files (atomic: a temporary next to the target, then os.replace; mode 0666 minus the umask, like open())
    atomic_write(path, write), atomic_write_text, atomic_torch_save, atomic_save_adapters,
    atomic_save_safetensors, write_jsonl, write_csv
    WriteError (an OSError): disk full, read-only file system, no permission, file too large, with the fix
epoch checkpoints
    save_checkpoint, load_checkpoint (a damaged file is named, with the epoch that can still be resumed)
what a run leaves for people
    progress(iterable, desc=..., enabled=...)   tqdm on a terminal; on a file or pipe a plain line at most
                                           every 30 s instead of carriage-return frames
    plot_curves(rows, path, ...)           training curves as PNG when matplotlib is installed (optional)
    open_tensorboard(parser, logdir)       a SummaryWriter, or parser.error naming `pip install tensorboard`
the same in every script
    parse_model_cfg(parser, preset_cfg, text)   --model-cfg JSON over a preset's builder kwargs
    open_run(parser, args, dist, log)      master: prepare_out_dir + the loud warning without --weights
    train_loader_for(ds, ...), shard_loader(ds, ...)   DistributedSampler + drop_last; each eval sample once
    stop_if_not_finite(loss, ...)          a NaN / inf loss on any rank stops every rank (exit 1)
    stop_after(epoch, dist, log)           --stop-after-epoch: exit 0 as if killed
    resume_run(parser, ckpt_dir, model, optimizer, settings=...)   --resume: settings checked, state loaded
"""

import atexit
import contextlib
import errno
import io
import json
import math
import os
import random
import re
import socket
import sys
import time
import zipfile
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as torch_dist

from lora import load_adapters, save_adapters, write_safetensors


# -----------------------------------------------------------------------------
# command line

def strip_leading_dashdash(argv: list[str]) -> list[str]:
    """argv without one leading "--".

    torchrun's own parser resolves abbreviations inside the training script's flags too (`--r` is "ambiguous:
    --rdzv-backend, --role, ..."), so the commands put a "--" between torchrun's options and the script. Both
    `torchrun ... -- train_cls.py --r 8` and `torchrun ... train_cls.py -- --r 8` work; this makes
    `torchrun ... -- train_cls.py -- --r 8` (and `python train_cls.py -- --r 8`) work as well.
    Usage: args = parser.parse_args(strip_leading_dashdash(sys.argv[1:]))
    """
    return list(argv[1:]) if argv and argv[0] == "--" else list(argv)


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(v)


# (attribute, test, what it must be). A check runs only when args has the attribute and its value is not None.
_COMMON_CHECKS = [
    ("batch_size", lambda v: v >= 1, "must be >= 1 (images per optimizer step)"),
    ("epochs", lambda v: v >= 1, "must be >= 1 (with 0 nothing would be trained)"),
    ("lr", lambda v: _finite(v) and v >= 0, "must be a finite number >= 0"),
    ("adapter_lr_factor", lambda v: _finite(v) and v >= 0, "must be a finite number >= 0"),
    ("backbone_lr_factor", lambda v: _finite(v) and v >= 0, "must be a finite number >= 0"),
    ("weight_decay", lambda v: _finite(v) and v >= 0, "must be a finite number >= 0"),
    ("warmup_epochs", lambda v: _finite(v) and v >= 0, "must be a finite number >= 0"),
    ("dropout", lambda v: _finite(v) and 0 <= v < 1, "must lie in [0, 1)"),
    ("drop_path", lambda v: _finite(v) and 0 <= v < 1, "must lie in [0, 1)"),
    ("workers", lambda v: v >= 0, "must be >= 0 (0 loads the data in the main process)"),
    ("alpha", lambda v: _finite(v) and v > 0,
     "must be > 0: the LoRA update is scaled by alpha / r, so with 0 the adapters would change nothing"),
    ("r", lambda v: v >= 1, "must be >= 1 (the LoRA rank)"),
    ("rc", lambda v: v >= 1, "must be >= 1 (the conv-LoRA rank)"),
    ("img_size", lambda v: v >= 1, "must be >= 1"),
    ("eval_every", lambda v: v >= 1, "must be >= 1 (1 = evaluate after every epoch)"),
    ("sparsity", lambda v: _finite(v) and 0 <= v < 1, "must lie in [0, 1), e.g. 0.9 for 90% zeros"),
    ("num_classes", lambda v: v >= 1, "must be >= 1"),
    ("synthetic_classes", lambda v: v >= 2, "must be >= 2"),
    ("synthetic_train", lambda v: v >= 1, "must be >= 1"),
    ("synthetic_val", lambda v: v >= 1, "must be >= 1"),
    ("stop_after_epoch", lambda v: v >= 1, "must be >= 1"),
    ("top_k", lambda v: v >= 1, "must be >= 1"),
]
_MUST_EXIST = ("weights", "mask")  # file arguments: checked before anything is built


def check_common_args(parser, args) -> None:
    """parser.error (usage + message, exit 2) for the first shared flag out of its range.

    Checked when `args` has them: the ranges of _COMMON_CHECKS, --warmup-epochs < --epochs (else the LR would
    warm up for the whole run and never decay), and that --weights / --mask name existing files.
    """
    flag = lambda a: "--" + a.replace("_", "-")  # noqa: E731
    for attr, ok, rule in _COMMON_CHECKS:
        v = getattr(args, attr, None)
        if v is not None and not ok(v):
            parser.error(f"{flag(attr)} {v} {rule}")
    warmup, epochs = getattr(args, "warmup_epochs", None), getattr(args, "epochs", None)
    if warmup is not None and epochs is not None and warmup > 0 and warmup >= epochs:
        parser.error(f"--warmup-epochs {warmup:g} must be < --epochs {epochs}: the LR would still be warming up at "
                     f"the end and never decay; lower it, e.g. --warmup-epochs {epochs / 2:g} (or 0)")
    for attr in _MUST_EXIST:
        v = getattr(args, attr, None)
        if v and not os.path.isfile(os.path.expanduser(v)):
            what = "is a directory, not a file" if os.path.isdir(os.path.expanduser(v)) else "does not exist"
            parser.error(f"{flag(attr)} {v}: {what}")


@contextlib.contextmanager
def user_errors(parser, *types, quiet: bool = False):
    """`with user_errors(parser): call()`: the clear message of a ValueError / FileNotFoundError / WriteError
    (or of `types`) raised inside, printed argparse-style (usage + message, exit 2) without a traceback.
    quiet=True (the non-master ranks of torchrun) exits 2 without printing, so the message appears once."""
    try:
        yield
    except (types or (ValueError, FileNotFoundError, WriteError)) as e:
        if quiet:
            sys.exit(2)
        parser.error(str(e))


# -----------------------------------------------------------------------------
# torchrun / DDP

@dataclass
class Dist:
    ddp: bool            # launched by torchrun (RANK set in the environment)
    rank: int            # global rank, 0 without torchrun
    local_rank: int      # rank on this node: picks the GPU
    world_size: int      # number of processes
    device: torch.device
    master: bool         # rank 0: logs, evaluates for the record, writes files


def setup_distributed(device: str | None = None) -> Dist:
    """Detect torchrun from RANK/LOCAL_RANK/WORLD_SIZE and initialise the process group.

    NCCL when CUDA is available (one GPU per process, chosen by LOCAL_RANK), gloo on CPU, so
    `torchrun --nproc_per_node 2 -- train_cls.py ...` also runs on a machine without a GPU.
    `device`: "cpu" / "cuda" to override the automatic choice.
    """
    use_cuda = torch.cuda.is_available() if device is None else device.startswith("cuda")
    if use_cuda and not torch.cuda.is_available():
        raise ValueError(f"--device {device} asked for CUDA but torch.cuda.is_available() is False; "
                         "use --device cpu")
    ddp = int(os.environ.get("RANK", -1)) != -1
    if not ddp:
        return Dist(False, 0, 0, 1, torch.device("cuda" if use_cuda else "cpu"), True)
    rank, local_rank = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
    world_size = int(os.environ["WORLD_SIZE"])
    if use_cuda:
        dev = torch.device(f"cuda:{local_rank}")
        torch.cuda.set_device(dev)
        torch_dist.init_process_group(backend="nccl", device_id=dev)
    else:
        dev = torch.device("cpu")
        torch_dist.init_process_group(backend="gloo")
    return Dist(True, rank, local_rank, world_size, dev, rank == 0)


def cleanup_distributed(dist: Dist) -> None:
    """Leave together: a barrier, then destroy the process group. Every rank calls this at the same point of the
    script (the end, --stop-after-epoch, the NaN stop that all ranks agreed on); without the barrier a rank that
    finishes first tears its gloo / NCCL connections down while rank 0 still writes files, which can abort it."""
    if dist.ddp and torch_dist.is_initialized():
        torch_dist.barrier()
        torch_dist.destroy_process_group()


def all_reduce_sum(values: list[float], dist: Dist) -> list[float]:
    """Sum a few Python numbers over all ranks (identity without DDP). float64 so counts stay exact."""
    if not dist.ddp:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=dist.device)
    torch_dist.all_reduce(t)
    return t.tolist()


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (CPU and every GPU).

    The scripts call this at the start of EVERY epoch with a seed derived from (--seed, epoch, rank).
    Data order, augmentation and dropout of an epoch then depend only on those three numbers, so a run
    resumed after epoch k draws exactly the random numbers an uninterrupted run draws, on every rank,
    without saving generator states.
    """
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def epoch_seed(seed: int, epoch: int, rank: int) -> int:
    return seed + 1_000_003 * epoch + 7919 * rank


# -----------------------------------------------------------------------------
# learning-rate schedule

def cosine_lr_factor(step: int, *, total_steps: int, warmup_steps: int, min_factor: float = 0.0) -> float:
    """Multiplier on the base LR at optimizer step `step` (0-based): linear warmup from 1/warmup to 1
    over `warmup_steps`, then cosine decay to `min_factor` at `total_steps`."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    progress = min(progress, 1.0)
    return min_factor + (1.0 - min_factor) * 0.5 * (1.0 + math.cos(math.pi * progress))


# -----------------------------------------------------------------------------
# atomic writes: write a temporary file next to the target, then os.replace (atomic on POSIX), so a
# run killed at any moment leaves either the old file or the new one, never a half-written file.
# The temporary is created with mode 0666 and the umask applies, as for any open(): a colleague can read
# what the umask lets them read (safetensors.torch.save_file would make it 0600).

class WriteError(OSError):
    """A file could not be written for a reason the user can fix (disk full, read-only file system, no
    permission, a file size limit). str() is the whole message; .errno the operating system's code."""


def write_error(e: OSError, path: str) -> WriteError:
    """The clear message for an OSError raised while writing `path`."""
    if isinstance(e, WriteError):
        return e
    code = e.errno
    if code in (errno.ENOSPC, getattr(errno, "EDQUOT", -1)):
        msg = f"disk full while writing {path} ({e.strerror}); free space or choose another --out"
    elif code == errno.EROFS:
        msg = f"read-only file system: cannot write {path}; choose another --out on a writable disk"
    elif code in (errno.EACCES, errno.EPERM):
        msg = f"permission denied: cannot write {path}; choose another --out that you can write to"
    elif code == errno.EFBIG:
        msg = (f"file too large while writing {path} (a file size limit, `ulimit -f`, or the file system's "
               f"maximum); raise the limit or choose another --out")
    elif code == errno.ENOTDIR:
        msg = f"cannot write {path}: a part of that path is a file, not a directory; choose another --out"
    else:
        msg = f"cannot write {path}: {e.strerror or e}"
    err = WriteError(msg)
    err.errno = code
    return err


def _tmp_path(path: str) -> str:
    return f"{path}.tmp.{os.getpid()}"


_TMP = re.compile(r"\.tmp\.(\d+)$")  # what _tmp_path appends


def atomic_write(path: str, write) -> None:
    """Create or replace `path` atomically: write(f) fills a binary file object opened on a temporary next
    to it, then flush, fsync, os.replace. On any error the temporary is removed; an OSError becomes a
    WriteError that names the file and the fix (never a half-written file, never a partial temporary)."""
    tmp = _tmp_path(path)
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)  # 0666 & ~umask, as open() does
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        if isinstance(e, OSError):
            raise write_error(e, path) from None
        raise


def atomic_write_text(text: str, path: str) -> None:
    atomic_write(path, lambda f: f.write(text.encode()))


def atomic_torch_save(obj, path: str) -> None:
    # serialise in memory first: torch.save writing into a full disk reports "inline_container.cc ... unexpected
    # pos", while a plain write of the bytes raises the OSError (ENOSPC) that names the problem
    buf = io.BytesIO()
    torch.save(obj, buf)
    atomic_write(path, lambda f: f.write(buf.getbuffer()))


def atomic_save_adapters(model: torch.nn.Module, path: str, *, metadata: dict | None = None) -> None:
    """lora.save_adapters, atomically. A model without adapter layers (linear probing, full fine-tuning) saves
    its trainable parameters: the scripts' checkpoints of those methods."""
    atomic_write(path, lambda f: save_adapters(model, f, metadata=metadata, allow_no_adapters=True))


def atomic_save_safetensors(tensors: dict[str, torch.Tensor], path: str, *, metadata: dict | None = None) -> None:
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    atomic_write(path, lambda f: write_safetensors(tensors, f, {k: str(v) for k, v in (metadata or {}).items()}))


def write_jsonl(records: list[dict], path: str) -> None:
    atomic_write_text("".join(json.dumps(r) + "\n" for r in records), path)


def write_csv(rows: list[dict], path: str, columns: list[str]) -> None:
    """A CSV table (header + one line per row; a missing or None value is an empty cell), atomically."""
    def cell(v):
        return "" if v is None else (f"{v:.6g}" if isinstance(v, float) else str(v))
    lines = [",".join(columns)] + [",".join(cell(r.get(c)) for c in columns) for r in rows]
    atomic_write_text("\n".join(lines) + "\n", path)


# -----------------------------------------------------------------------------
# the output directory: checks, one run at a time (a lock file), leftovers of killed runs

LOCK_NAME = ".lock"
_HOST = socket.gethostname()
_released = set()


def _proc_start(pid: int) -> str | None:
    """The process' start time in clock ticks since boot (Linux /proc), to tell a reused pid from the original."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[19]
    except (OSError, IndexError):
        return None


def _alive(pid: int, start: str | None = None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: it exists
        pass
    except (OverflowError, ValueError):
        return False
    now = _proc_start(pid)
    return not (start and now and now != start)  # a new process that got the same pid


def _read_json(path: str):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _acquire_lock(out: str) -> str | None:
    """Create OUT/.lock (pid, host, start time, command), or take over a lock whose process is gone (or is
    this very process: an earlier run executed in-process). Another live run -> ValueError naming it."""
    path = os.path.join(out, LOCK_NAME)
    me = dict(pid=os.getpid(), host=_HOST, proc_start=_proc_start(os.getpid()),
              started=time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()), command=" ".join(sys.argv))
    note = None
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        with os.fdopen(fd, "w") as f:
            json.dump(me, f)
    except FileExistsError:
        other = _read_json(path)
        if not isinstance(other, dict) or not isinstance(other.get("pid"), int):
            note = f"took over {path}: unreadable (a run killed while creating it)"
        elif other.get("host") == _HOST and other["pid"] == os.getpid():
            pass  # this process: an earlier run in it (runpy) stopped without releasing
        elif other.get("host") != _HOST:
            raise ValueError(f"--out {out} is in use by another run: pid {other['pid']} on host {other.get('host')}, "
                             f"started {other.get('started')} ({other.get('command')}). Two runs must not write one "
                             f"directory: wait for it, or choose another --out. If that run is gone, delete {path}.")
        elif _alive(other["pid"], other.get("proc_start")):
            raise ValueError(f"--out {out} is in use by another run: pid {other['pid']}, started {other.get('started')}"
                             f" ({other.get('command')}). Two runs must not write one directory: wait for it to finish"
                             f" or stop it (kill {other['pid']}; under torchrun, its workers too), or choose another "
                             f"--out.")
        else:
            note = f"took over the lock of pid {other['pid']} (no longer running) in {out}"
        atomic_write_text(json.dumps(me), path)
    if out not in _released:
        atexit.register(release_out_dir, out)
    _released.add(out)
    return note


def release_out_dir(out: str) -> None:
    """Remove OUT/.lock if this process holds it (the scripts call this at the end; also at exit)."""
    path = os.path.join(out, LOCK_NAME)
    held = _read_json(path)
    if isinstance(held, dict) and held.get("pid") == os.getpid() and held.get("host") == _HOST:
        with contextlib.suppress(OSError):
            os.remove(path)


def _finished(out: str) -> bool:
    """log.jsonl ends with the summary line a completed run writes."""
    try:
        with open(os.path.join(out, "log.jsonl")) as f:
            lines = [line for line in f if line.strip()]
        return bool(lines) and json.loads(lines[-1]).get("summary") is True
    except (OSError, ValueError, AttributeError):
        return False


def _epoch_files(ckpt_dir: str) -> dict[int, list[str]]:
    """{epoch: [file names]} of the epoch_NNNN.* files in ckpt_dir."""
    found = {}
    for name in (os.listdir(ckpt_dir) if os.path.isdir(ckpt_dir) else []):
        m = re.fullmatch(r"epoch_(\d+)\.(safetensors|pt)", name)
        if m:
            found.setdefault(int(m.group(1)), []).append(name)
    return found


def _looks_complete(ckpt_dir: str, adapters: str, state: str) -> bool:
    """A cheap check that an epoch's two files are whole: the safetensors header parses and its tensors end where
    the file ends; the torch.save zip archive's central directory (at its very end) is there."""
    try:
        path = os.path.join(ckpt_dir, adapters)
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(n)) if 0 < n <= os.path.getsize(path) - 8 else None
        ends = [v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"] if header else None
        if ends is None or 8 + n + max(ends, default=0) != os.path.getsize(path):
            return False
        with zipfile.ZipFile(os.path.join(ckpt_dir, state)):
            return True
    except (OSError, ValueError, KeyError, TypeError, IndexError, zipfile.BadZipFile):
        return False


def prepare_out_dir(out: str, *, resume: bool, ckpt_dir: str | None = None) -> list[str]:
    """Make `out` ready for a run and return notes for the log. Call on the master rank, before writing there.

    - `out` must be a directory that can be written: an existing file, a read-only file system, a full disk
      or a missing permission raise ValueError / WriteError with the fix.
    - OUT/.lock (pid, host, start, command): another live run in `out` raises ValueError naming its pid, so
      two runs (e.g. the workers of a killed torchrun and a new run) never write one directory. The lock of a
      process that is gone is taken over; release_out_dir(out) removes it at the end (and at exit).
    - A finished run (log.jsonl ends with its summary) is not overwritten without `resume`: ValueError naming
      --resume and another --out. An unfinished one (a checkpoint in ckpt_dir) gets a note: it is replaced.
    - Leftovers of killed runs are removed and counted: temporaries `*.tmp.<pid>` of processes that are gone
      (in `out` and its sub-directories), and in ckpt_dir the epoch files other than those last.json names
      (when last.json is readable and its two files look whole; otherwise load_checkpoint decides, and an
      older epoch's files may still be what can be resumed).
    """
    if os.path.exists(out) and not os.path.isdir(out):
        raise ValueError(f"--out {out} is an existing file, not a directory; choose another --out")
    try:
        os.makedirs(out, exist_ok=True)
        note = _acquire_lock(out)
    except OSError as e:
        raise write_error(e, os.path.join(out, LOCK_NAME) if os.path.isdir(out) else out) from None
    notes = [note] if note else []
    if _finished(out) and not resume:
        release_out_dir(out)
        raise ValueError(f"--out {out} holds a finished run (its log.jsonl ends with the summary). Pass --resume to "
                         f"continue it (after its last epoch: evaluate and export again), or choose another --out "
                         f"(or delete {out}) to start a new run")
    removed = []
    for d in [out] + [e.path for e in os.scandir(out) if e.is_dir()]:
        for name in os.listdir(d):
            m = _TMP.search(name)
            if m and (int(m.group(1)) == os.getpid() or not _alive(int(m.group(1)))):
                os.remove(os.path.join(d, name))
                removed.append(os.path.relpath(os.path.join(d, name), out))
    if ckpt_dir is not None:
        last = _read_json(os.path.join(ckpt_dir, "last.json"))
        if isinstance(last, dict) and _looks_complete(ckpt_dir, str(last.get("adapters")), str(last.get("state"))):
            for n, names in _epoch_files(ckpt_dir).items():
                for name in names:
                    if name not in (last["adapters"], last["state"]):
                        os.remove(os.path.join(ckpt_dir, name))
                        removed.append(os.path.relpath(os.path.join(ckpt_dir, name), out))
            if not resume:
                notes.append(f"{out} holds the checkpoint of epoch {last.get('epoch')} of an unfinished run: starting "
                             f"over replaces it (stop now and add --resume to continue it instead)")
    if removed:
        notes.append(f"removed {len(removed)} leftover(s) of an interrupted run in {out}: {', '.join(sorted(removed))}")
    return notes


def check_resume_settings(saved, now: dict, *, ckpt_dir: str) -> None:
    """ValueError naming every setting in `now` (a dict: flag attribute -> value) that differs from the one
    stored with the checkpoint (`saved`: a dict or its JSON string). Paths are compared after ~ expansion and
    normalisation; settings the checkpoint did not store (older files) are not compared."""
    if isinstance(saved, str):
        saved = json.loads(saved)

    def norm(k, v):
        if isinstance(v, str) and k in ("data_root", "weights", "mask", "data_dir", "ann_file"):
            return os.path.normpath(os.path.expanduser(v))
        return tuple(v) if isinstance(v, list) else v

    diff = [f"--{k.replace('_', '-')} {saved[k]!r} -> {v!r}" for k, v in now.items()
            if k in saved and norm(k, saved[k]) != norm(k, v)]
    if diff:
        raise _SettingsMismatch(f"--resume: the checkpoint in {ckpt_dir} was made with other settings "
                                f"({', '.join(diff)}); rerun with the checkpoint's settings, or choose another --out "
                                f"to start a new run")


class _SettingsMismatch(ValueError):
    pass


# -----------------------------------------------------------------------------
# epoch checkpoints
#
#   <ckpt_dir>/epoch_0003.safetensors   adapter-only weights (adapters + head + trained norms/biases)
#   <ckpt_dir>/epoch_0003.pt            training state: optimizer, step, epoch, history, ...
#   <ckpt_dir>/last.json                {"epoch": 3, "adapters": ..., "state": ...}, written last
#
# last.json is replaced only after both files of the epoch are complete, so it always names a
# consistent pair; the previous epoch's pair is deleted afterwards.

def save_checkpoint(ckpt_dir: str, model: torch.nn.Module, *, epoch: int, state: dict,
                    metadata: dict | None = None) -> str:
    """Write the checkpoint of a completed epoch (call on the master rank only). Returns the adapter path.

    `state` must hold only tensors, numbers, strings, lists and dicts (it is read back with
    `torch.load(weights_only=True)`). A full disk or a read-only file system raise WriteError.
    """
    try:
        os.makedirs(ckpt_dir, exist_ok=True)
    except OSError as e:
        raise write_error(e, ckpt_dir) from None
    stem = f"epoch_{epoch:04d}"
    adapters, state_file = f"{stem}.safetensors", f"{stem}.pt"
    meta = {"epoch": str(epoch), **{k: str(v) for k, v in (metadata or {}).items()}}
    atomic_save_adapters(model, os.path.join(ckpt_dir, adapters), metadata=meta)
    atomic_torch_save({**state, "epoch": epoch}, os.path.join(ckpt_dir, state_file))
    atomic_write_text(json.dumps({"epoch": epoch, "adapters": adapters, "state": state_file}),
                      os.path.join(ckpt_dir, "last.json"))
    for name in os.listdir(ckpt_dir):  # drop older epochs (and temporaries of killed runs)
        if name.startswith("epoch_") and not name.startswith(stem + "."):
            os.remove(os.path.join(ckpt_dir, name))
    return os.path.join(ckpt_dir, adapters)


def _load_epoch(ckpt_dir: str, epoch: int, adapters: str, state_file: str, model, settings) -> dict:
    """Load one epoch's pair: the state first (cheap to check, holds the settings), then the adapters."""
    path = os.path.join(ckpt_dir, state_file)
    if not os.path.isfile(path):
        raise ValueError(f"{path} (the training state of epoch {epoch}) is missing")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001  truncated zip, bad pickle, ...: any reason means the same here
        raise ValueError(f"{path} (the training state of epoch {epoch}) is damaged: {type(e).__name__}: "
                         f"{str(e).splitlines()[0] if str(e) else ''}") from None
    if not isinstance(state, dict) or state.get("epoch") != epoch:
        raise ValueError(f"{path}: last.json names epoch {epoch} but the state file holds epoch "
                         f"{state.get('epoch') if isinstance(state, dict) else '?'}")
    if settings is not None and "args" in state:
        check_resume_settings(state["args"], settings, ckpt_dir=ckpt_dir)
    path = os.path.join(ckpt_dir, adapters)
    try:
        load_adapters(model, path)
    except FileNotFoundError:
        raise ValueError(f"{path} (the adapters of epoch {epoch}) is missing") from None
    except ValueError as e:
        if "is not a readable safetensors file" in str(e) or "metadata is damaged" in str(e):
            raise ValueError(f"{e} (the adapters of epoch {epoch})") from None
        raise  # the file is fine but does not fit this model: load_adapters says how
    return state


def load_checkpoint(ckpt_dir: str, model: torch.nn.Module, *, settings: dict | None = None,
                    log=None) -> dict | None:
    """Load the last completed epoch into `model` (adapters + trainable params); return its state dict, or
    None when `ckpt_dir` holds no checkpoint yet.

    settings: {flag attribute: value} that must equal those stored in the state's "args" (check_resume_settings),
        compared before the adapters are loaded.
    log: where a note goes (default: warnings.warn).
    A missing or damaged last.json is repaired from the newest epoch whose two files load (a note says so).
    A damaged or missing file of the epoch last.json names raises ValueError naming the file and saying which
    epoch can still be resumed (normally none: each checkpoint replaces the previous one).
    """
    pointer = os.path.join(ckpt_dir, "last.json")
    epochs = _epoch_files(ckpt_dir)
    start_over = f"delete {ckpt_dir} (or choose another --out) to start over"
    if os.path.exists(pointer):
        last = _read_json(pointer)
        ok = isinstance(last, dict) and isinstance(last.get("epoch"), int) and all(
            isinstance(last.get(k), str) for k in ("adapters", "state"))
        if ok:
            try:
                return _load_epoch(ckpt_dir, last["epoch"], last["adapters"], last["state"], model, settings)
            except _SettingsMismatch:
                raise
            except ValueError as e:
                older = sorted((n for n, names in epochs.items() if n < last["epoch"] and len(names) == 2),
                               reverse=True)
                hint = (f"Epoch {older[0]}'s files are still there: to resume from it, delete last.json and the "
                        f"files of epoch {last['epoch']}, then rerun with --resume; or {start_over}" if older else
                        f"No earlier epoch is kept (each checkpoint replaces the previous one): {start_over}")
                raise ValueError(f"cannot resume: {e}. {hint}") from None
        what = f"{pointer} is damaged (not the JSON the run writes)"
    elif not epochs:
        return None
    else:
        what = f"{pointer} is missing"
    # no usable pointer: the newest epoch whose pair loads (both files are written atomically, the pointer last)
    problems = []
    for n in sorted(epochs, reverse=True):
        names = {name.rpartition(".")[2]: name for name in epochs[n]}
        try:
            state = _load_epoch(ckpt_dir, n, names.get("safetensors", f"epoch_{n:04d}.safetensors"),
                                names.get("pt", f"epoch_{n:04d}.pt"), model, settings)
        except _SettingsMismatch:
            raise
        except ValueError as e:
            problems.append(str(e))
            continue
        note = f"{what}: resuming from epoch {n}, the newest complete checkpoint in {ckpt_dir}"
        atomic_write_text(json.dumps({"epoch": n, "adapters": names["safetensors"], "state": names["pt"]}), pointer)
        if log is not None:
            log(note)
        else:
            import warnings
            warnings.warn(note, stacklevel=2)
        return state
    raise ValueError(f"cannot resume: {what} and no epoch in {ckpt_dir} can be read"
                     + "".join(f"\n  - {p}" for p in problems) + f"\n{start_over[0].upper() + start_over[1:]}")


# -----------------------------------------------------------------------------
# what a run leaves for people: progress on a terminal, readable logs in files, curves

class _PlainProgress:
    """tqdm's interface (iteration, set_postfix, close) printing one plain line at most every `every` seconds,
    for stderr redirected to a file: no carriage-return frames."""

    def __init__(self, iterable, desc: str, every: float = 30.0):
        self.iterable, self.desc, self.every, self.postfix = iterable, desc, every, ""
        self.total = len(iterable) if hasattr(iterable, "__len__") else None

    def __iter__(self):
        last = t0 = time.time()
        for i, item in enumerate(self.iterable, 1):
            yield item
            if time.time() - last >= self.every:
                last = time.time()
                total = f"/{self.total}" if self.total else ""
                print(f"{self.desc}: step {i}{total}, {time.time() - t0:.0f} s{self.postfix}", file=sys.stderr,
                      flush=True)

    def set_postfix(self, **kw):
        self.postfix = "".join(f", {k} {v}" for k, v in kw.items())

    def close(self):
        pass


def progress(iterable, *, desc: str, enabled: bool = True, every: float = 30.0):
    """A progress bar on a terminal (tqdm); with stderr redirected to a file or a pipe, a plain line at most
    every `every` seconds instead (tqdm's carriage-return frames would fill the log); nothing when not enabled
    (the non-master ranks)."""
    if not enabled:
        return _PlainProgress(iterable, desc, every=float("inf"))
    if sys.stderr.isatty():
        from tqdm import tqdm
        return tqdm(iterable, desc=desc, dynamic_ncols=True)
    return _PlainProgress(iterable, desc, every=every)


def plot_curves(rows: list[dict], path: str, *, x: str = "epoch", panels=(("train_loss", "eval_loss"),
                ("eval_top1", "eval_top5"), ("lr",)), title: str = "") -> bool:
    """Training curves as a PNG (one panel per group of columns; missing values skipped), atomically.
    Returns False, writing nothing, when matplotlib is not installed (it is optional)."""
    try:
        import matplotlib
        matplotlib.use("Agg")  # no display needed
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.2), squeeze=False)
    for ax, cols in zip(axes[0], panels):
        for c in cols:
            pts = [(r[x], r[c]) for r in rows if r.get(c) is not None and r.get(x) is not None]
            if pts:
                ax.plot(*zip(*pts), marker="o", markersize=3, label=c)
        ax.set_xlabel(x)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    atomic_write(path, lambda f: f.write(buf.getbuffer()))
    return True


def open_tensorboard(parser, logdir: str):
    """torch.utils.tensorboard.SummaryWriter(logdir), or parser.error naming the missing package."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        parser.error("--tensorboard needs the tensorboard package: pip install tensorboard (or drop --tensorboard)")
    return SummaryWriter(logdir)


# -----------------------------------------------------------------------------
# what every script does the same way at the start of a run, around its loaders and at a bad step

def parse_model_cfg(parser, preset_cfg: dict, text: str, *, example: str = '{"depths": [1, 1, 1, 2]}') -> dict:
    """--model-cfg (a JSON object of builder keyword arguments) over a preset's values; anything else is a
    usage error showing `example`."""
    try:
        extra = json.loads(text)
    except json.JSONDecodeError:
        extra = None
    if not isinstance(extra, dict):
        parser.error(f"--model-cfg must be a JSON object such as '{example}', got {text!r}")
    return {**preset_cfg, **extra}


def open_run(parser, args, dist: Dist, log, *, what: str = "backbone") -> None:
    """Master rank, real runs only: prepare --out (prepare_out_dir: writable, locked, a finished run refused
    without --resume, leftovers of a killed run removed and counted) and warn loudly without --weights."""
    if not dist.master or args.count_only:
        return
    with user_errors(parser):
        for note in prepare_out_dir(args.out, resume=args.resume, ckpt_dir=os.path.join(args.out, "ckpt")):
            log("note: " + note)
    if not args.weights:
        bar = "!" * 100
        print(f"\n{bar}\n!!! WARNING: no --weights: the {what} is RANDOMLY initialised. Adapting a random {what} is "
              f"only a smoke test;\n!!! pass --weights PATH (a pretrained checkpoint, see the README) for real "
              f"fine-tuning.\n{bar}\n", file=sys.stderr, flush=True)


def train_loader_for(ds, *, batch_size: int, dist: Dist, seed: int, workers: int, **kw):
    """A DistributedSampler also on one process (the same shuffle) and drop_last on both sampler and loader:
    len(ds) // (batch_size * world_size) steps per epoch whatever the number of processes. batch_size: per rank."""
    from torch.utils.data import DataLoader, DistributedSampler
    sampler = DistributedSampler(ds, num_replicas=dist.world_size, rank=dist.rank, shuffle=True, seed=seed,
                                 drop_last=True)
    return DataLoader(ds, batch_size=batch_size, sampler=sampler, drop_last=True, num_workers=workers,
                      pin_memory=dist.device.type == "cuda", persistent_workers=workers > 0, **kw)


def shard_loader(ds, *, batch_size: int, dist: Dist, workers: int, **kw):
    """Evaluation: every rank takes every world_size-th sample, so each sample is scored exactly once."""
    from torch.utils.data import DataLoader, Subset
    return DataLoader(Subset(ds, range(dist.rank, len(ds), dist.world_size)), batch_size=batch_size,
                      num_workers=workers, pin_memory=dist.device.type == "cuda", persistent_workers=workers > 0, **kw)


def stop_if_not_finite(loss: torch.Tensor, *, step: int, epoch: int, history: list, ckpt_dir: str, dist: Dist,
                       log, fix: str = "Lower --lr") -> None:
    """A NaN / inf loss on any rank stops every rank before the update (exit 1); the last checkpoint stays."""
    if all_reduce_sum([0.0 if math.isfinite(loss.item()) else 1.0], dist)[0]:
        last = f"epoch {history[-1]['epoch']}" if history else "none yet"
        log(f"\nERROR: loss is {loss.item()} at step {step} (epoch {epoch + 1}); stopping. Last good checkpoint: "
            f"{last}, in {ckpt_dir}. {fix}, then rerun (with --resume to keep it).")
        cleanup_distributed(dist)
        sys.exit(1)


def stop_after(epoch: int, dist: Dist, log) -> None:
    """--stop-after-epoch (testing): exit 0 once this epoch's checkpoint is written, as if the run were killed."""
    log(f"stopping after epoch {epoch} (--stop-after-epoch); continue with --resume")
    cleanup_distributed(dist)
    sys.exit(0)


def resume_run(parser, ckpt_dir: str, model: torch.nn.Module, optimizer, *, settings: dict, master: bool,
               log) -> dict | None:
    """--resume: load the last completed epoch's trainable tensors into `model` and its optimizer state, after
    checking that the settings that decide the result are the checkpoint's (a damaged file is named, with the epoch
    that can still be resumed: argparse-style). Returns the training state, or None when there is no checkpoint."""
    with user_errors(parser, quiet=not master):
        state = load_checkpoint(ckpt_dir, model, settings=settings, log=log)
    if state is None:
        log(f"--resume: no checkpoint in {ckpt_dir} yet, starting from scratch")
        return None
    optimizer.load_state_dict(state["optimizer"])
    log(f"resumed from {ckpt_dir} after epoch {state['epoch']}")
    return state
