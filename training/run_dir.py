"""The run directory (--out) of a training script: one run at a time (a lock), leftovers of killed runs removed,
epoch checkpoints, --resume."""


import atexit
import contextlib
import json
import math
import os
import re
import socket
import sys
import time
import zipfile

import torch

from lora import load_adapters
from tasks.atomic import (
    _TMP,
    atomic_save_adapters,
    atomic_save_safetensors,
    atomic_torch_save,
    atomic_write_text,
    write_error,
)
from training.cli import user_errors
from training.distributed import Dist, all_reduce_sum, cleanup_distributed

# -----------------------------------------------------------------------------
# the output directory: checks, one run at a time (a lock file), leftovers of killed runs

LOCK_NAME = ".lock"
_HOST = socket.gethostname()


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


_held = {}  # out -> the open file descriptor holding OUT/.lock's flock (closing it would release the lock)
_created = {}  # out -> the folders prepare_out_dir made for it, deepest first (removed at release while empty)


def _acquire_lock(out: str) -> str | None:
    """Hold OUT/.lock for this run: an exclusive flock on it (the kernel drops a flock when its process ends,
    kill -9 included, and grants it to one process only, so two runs started at the same moment cannot both
    win), the file naming the holder (pid, host, start time, command) for the message another run gets. A lock
    file that names a live process of this host that holds no flock (a run of older code) is refused as well."""
    import fcntl
    path = os.path.join(out, LOCK_NAME)
    if out in _held:  # this process: an earlier run in it (runpy) stopped without releasing
        return None
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            other = _read_json(path)
            other = other if isinstance(other, dict) else {}
            raise ValueError(f"--out {out} is in use by another run: pid {other.get('pid', '?')}, started "
                             f"{other.get('started', 'just now')} ({other.get('command', 'starting')}). Two runs "
                             f"must not write one directory: wait for it to finish or stop it (kill "
                             f"{other.get('pid', '<pid>')}; under torchrun, its workers too), or choose another --out.")
        try:  # the holder may have removed the file between our open and flock: lock the file that is there now
            same = os.path.samestat(os.fstat(fd), os.stat(path))
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    other, note = _read_json(path), None
    if isinstance(other, dict) and isinstance(other.get("pid"), int) and other["pid"] != os.getpid():
        if other.get("host") not in (None, _HOST) or _alive(other["pid"], other.get("proc_start")):
            os.close(fd)
            raise ValueError(f"--out {out} is in use by another run: pid {other['pid']} on host {other.get('host')}, "
                             f"started {other.get('started')} ({other.get('command')}). Two runs must not write one "
                             f"directory: wait for it, or choose another --out. If that run is gone, delete {path}.")
        note = f"took over the lock of pid {other['pid']} (no longer running) in {out}"
    elif other is None and os.path.getsize(path):
        note = f"took over {path}: unreadable (a run killed while creating it)"
    me = dict(pid=os.getpid(), host=_HOST, proc_start=_proc_start(os.getpid()),
              started=time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()), command=" ".join(sys.argv))
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(me).encode(), 0)
    _held[out] = fd
    atexit.register(release_out_dir, out)
    return note


def release_out_dir(out: str) -> None:
    """Remove OUT/.lock and drop its flock if this process holds it (the scripts call this at the end; also at
    exit)."""
    fd = _held.pop(out, None)
    if fd is not None:
        with contextlib.suppress(OSError):
            os.remove(os.path.join(out, LOCK_NAME))
        os.close(fd)
    for d in _created.pop(out, []):  # a run refused before it wrote anything leaves no empty folder behind
        try:
            os.rmdir(d)
        except OSError:  # not empty (the run wrote there), or gone: keep it and its parents
            break


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
      or a missing permission raise ValueError / WriteError with the fix. The folders it makes are removed again
      by release_out_dir while they are empty (a run refused over its data leaves nothing behind).
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
    missing, d = [], os.path.abspath(out)
    while not os.path.exists(d):
        missing.append(d)
        d = os.path.dirname(d)
    try:
        os.makedirs(out, exist_ok=True)
        if missing and out not in _created:
            _created[out] = missing
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
        unsupported = re.search(r"Unsupported global: GLOBAL (\S+)", str(e))
        if unsupported:  # a whole file holding a type weights_only loading refuses: not damage
            raise ValueError(f"{path} (the training state of epoch {epoch}) holds a {unsupported.group(1)} object, "
                             f"which torch.load(weights_only=True) refuses: it was written by another version of "
                             f"this code") from None
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


BASE_NAME = "base.safetensors"  # a run without --weights: the random base its task file was trained on


def save_random_base(parser, args, model: torch.nn.Module, *, master: bool) -> None:
    """Without --weights, the backbone is random and exists nowhere else: write it to OUT/base.safetensors
    (model state_dict keys, before any adapter is added) so that the task file can be used by the next tools
    (predict_cls.py, predict_seg.py and export.py take it as --weights, and find it next to the task file when
    --weights is omitted). Every frozen tensor keeps this value during training, so the task's base fingerprint
    is the fingerprint of this file. Master rank only; a resumed run keeps the file it finds."""
    if args.weights or not master or getattr(args, "count_only", False):
        return
    path = os.path.join(args.out, BASE_NAME)
    if args.resume and os.path.exists(path):
        return
    meta = dict(model=args.model, seed=args.seed, note="random base of a run without --weights")
    with user_errors(parser):
        atomic_save_safetensors(model.state_dict(), path, metadata=meta)


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
