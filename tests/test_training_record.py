"""training/record.py: the run record (versions, hardware, git commit and dirty flag) and --resume's comparison."""
import platform
import subprocess

import pytest
import torch
import torchvision

from training.record import COMPARED, git_state, record_differences, run_record


def test_run_record_names_this_software_and_hardware():
    rec = run_record(world_size=3, device=torch.device("cpu"))
    assert rec["torch"] == torch.__version__ and rec["torchvision"] == torchvision.__version__
    assert rec["cuda"] == torch.version.cuda
    assert rec["python"] == platform.python_version()
    assert rec["world_size"] == 3
    assert rec["gpu"] is None  # a CPU run names no GPU
    assert rec["gpu_count"] == (torch.cuda.device_count() if torch.cuda.is_available() else 0)
    assert set(COMPARED) <= set(rec)


def test_git_commit_and_dirty_flag_are_the_checkouts():
    root = subprocess.run(["git", "rev-parse", "--show-toplevel"], capture_output=True, text=True)
    if root.returncode != 0:
        pytest.skip("the tests do not run from a git checkout")
    head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                            text=True).stdout
    commit, dirty = git_state()
    assert commit == head
    assert dirty == bool(status.strip())


def test_outside_a_checkout_the_commit_is_none(monkeypatch, tmp_path):
    import training.record as record
    monkeypatch.setattr(record, "_ROOT", str(tmp_path))  # a directory that is no git checkout
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path.parent))
    assert git_state() == (None, None)
    monkeypatch.setenv("PATH", str(tmp_path))  # and without git at all
    assert git_state() == (None, None)


def test_record_differences_lists_what_changed():
    old = run_record()
    assert record_differences(old, dict(old)) == []
    new = dict(old, torch="9.9.9", gpu="NVIDIA H100", git_dirty=not old["git_dirty"], gpu_count=7)
    diff = record_differences(old, new)
    assert f"torch: {old['torch']} -> 9.9.9" in diff and "gpu: None -> NVIDIA H100" in diff
    assert any(d.startswith("git_dirty:") for d in diff)
    assert not any(d.startswith("gpu_count") for d in diff)  # idle GPUs do not change a run
    assert record_differences(None, new) == []  # a checkpoint older than the record: nothing to compare
    assert record_differences({"torch": old["torch"]}, new) == [f"torch: {old['torch']} -> 9.9.9"]


def test_record_goes_through_a_weights_only_checkpoint(tmp_path):
    """The record is stored in the checkpoint's state, which --resume reads with torch.load(weights_only=True):
    every value must be a plain type (torch.__version__ is a TorchVersion, which that loader refuses)."""
    rec = run_record()
    torch.save(dict(run_record=rec), tmp_path / "state.pt")
    assert torch.load(tmp_path / "state.pt", map_location="cpu", weights_only=True)["run_record"] == rec
