"""
Small helpers shared by the flat training scripts (train_cls.py, train_seg.py).

Only what both scripts would otherwise duplicate lives here: torchrun/DDP setup, per-epoch seeding,
the cosine learning-rate schedule with linear warmup, atomic file writes and the epoch checkpoint
(adapter-only safetensors + a small training-state file, tied together by `last.json`).
Everything a reader needs to follow one training run stays in the scripts themselves.
"""

import json
import os
import random
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as torch_dist

from lora import load_adapters, save_adapters


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
    `torchrun --nproc_per_node 2 train_cls.py ...` also runs on a machine without a GPU.
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
    if dist.ddp and torch_dist.is_initialized():
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

def _tmp_path(path: str) -> str:
    return f"{path}.tmp.{os.getpid()}"


def atomic_torch_save(obj, path: str) -> None:
    tmp = _tmp_path(path)
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def atomic_write_text(text: str, path: str) -> None:
    tmp = _tmp_path(path)
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def atomic_save_adapters(model: torch.nn.Module, path: str, *, metadata: dict | None = None) -> None:
    tmp = _tmp_path(path)
    save_adapters(model, tmp, metadata=metadata)
    os.replace(tmp, path)


def atomic_save_safetensors(tensors: dict[str, torch.Tensor], path: str, *, metadata: dict | None = None) -> None:
    from safetensors.torch import save_file
    tmp = _tmp_path(path)
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, tmp, metadata=metadata)
    os.replace(tmp, path)


def write_jsonl(records: list[dict], path: str) -> None:
    atomic_write_text("".join(json.dumps(r) + "\n" for r in records), path)


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
    `torch.load(weights_only=True)`).
    """
    os.makedirs(ckpt_dir, exist_ok=True)
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


def load_checkpoint(ckpt_dir: str, model: torch.nn.Module) -> dict | None:
    """Load the last completed epoch into `model` (adapters + trainable params); return its state
    dict, or None when `ckpt_dir` holds no checkpoint yet."""
    pointer = os.path.join(ckpt_dir, "last.json")
    if not os.path.exists(pointer):
        return None
    with open(pointer) as f:
        last = json.load(f)
    load_adapters(model, os.path.join(ckpt_dir, last["adapters"]))
    state = torch.load(os.path.join(ckpt_dir, last["state"]), map_location="cpu", weights_only=True)
    if state["epoch"] != last["epoch"]:
        raise ValueError(f"{ckpt_dir}: last.json names epoch {last['epoch']} but the state file holds "
                         f"epoch {state['epoch']}; delete {ckpt_dir} to start over")
    return state
