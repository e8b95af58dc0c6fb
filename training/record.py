"""The run record: what software and hardware made a run, in args.json and in the task file's metadata.

    run_record(dist)              {"torch": "2.14.1+cu130", "torchvision": ..., "cuda": "13.0" | None, "cudnn": 91002
                                   | None, "gpu": "NVIDIA H100 80GB HBM3" | None, "gpu_count": 1, "world_size": 8,
                                   "python": "3.11.2", "git_commit": "abfcdd8..." | None, "git_dirty": True | None}
    record_differences(old, new)  the entries that differ, for --resume's warning

The same flags on another torch build, GPU or commit can give other numbers (kernels, reduction orders, fixes),
so a resumed run says what changed. git_commit is the commit of the checkout the script runs from (None outside
one, or without git); git_dirty whether tracked files differ from it.
"""
import os
import platform
import subprocess

import torch

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the checkout: training/..


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", "-C", _ROOT, *args], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):  # no git, a hung file system
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def git_state() -> tuple[str | None, bool | None]:
    """(commit, dirty) of the checkout holding this code; (None, None) outside a git checkout or without git."""
    commit = _git("rev-parse", "HEAD")
    if commit is None:
        return None, None
    status = _git("status", "--porcelain", "--untracked-files=no")
    return commit, None if status is None else bool(status)


def run_record(world_size: int = 1, device: torch.device | str = "cpu") -> dict:
    """The record of this process' software and hardware (see the module docstring)."""
    import torchvision  # the scripts import it anyway; here only for its version

    cuda = torch.device(device).type == "cuda"
    commit, dirty = git_state()
    return dict(
        torch=str(torch.__version__), torchvision=str(torchvision.__version__),  # plain str: TorchVersion does not
        # pass torch.load(weights_only=True)
        cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        gpu=torch.cuda.get_device_name(torch.device(device)) if cuda else None,
        gpu_count=torch.cuda.device_count() if torch.cuda.is_available() else 0,
        world_size=world_size, python=platform.python_version(), git_commit=commit, git_dirty=dirty)


# what a run's numbers may depend on; gpu_count is left out (world_size decides the run; idle GPUs do not)
COMPARED = ("torch", "torchvision", "cuda", "cudnn", "gpu", "world_size", "python", "git_commit", "git_dirty")


def record_differences(old: dict | None, new: dict) -> list[str]:
    """"key: old -> new" for each compared entry that differs (entries an older record lacks are skipped)."""
    if not isinstance(old, dict):
        return []
    return [f"{k}: {old[k]} -> {new.get(k)}" for k in COMPARED if k in old and old[k] != new.get(k)]
