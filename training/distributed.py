"""torchrun / DDP: process-group setup and teardown, sums over ranks, seeding, and the loaders that shard a
dataset over the ranks."""


import os
import random
import sys
import threading
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as torch_dist

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


def _stop_with_the_launcher(rank: int) -> None:
    """torchrun's workers are its child processes. A launcher killed with kill -9 cannot stop them: re-parented,
    they would keep training and writing into --out. A daemon thread watches the parent and ends this worker
    (os._exit: no cleanup that could block on the other ranks) once the launcher is gone. A worker whose collective
    fails first (another worker stopped a moment earlier) ends the same way, with the same message instead of the
    collective's traceback."""
    launcher = os.getppid()

    def stop():
        print(f"rank {rank}: the torchrun launcher (pid {launcher}) is gone; this worker stops so that it does not "
              f"keep writing into --out (continue with --resume)", file=sys.stderr, flush=True)
        os._exit(1)

    def watch():
        while os.getppid() == launcher:
            time.sleep(1.0)
        stop()

    previous = sys.excepthook

    def excepthook(*exc_info):
        if os.getppid() != launcher:
            stop()
        previous(*exc_info)

    sys.excepthook = excepthook
    threading.Thread(target=watch, name="watch-torchrun", daemon=True).start()


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
    if "TORCHELASTIC_RUN_ID" in os.environ:  # started by torchrun (not by hand with RANK set)
        _stop_with_the_launcher(rank)
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
