"""training/run_dir.py: the lock of the output directory, the --resume settings check (the end-to-end kill / resume
cases run the scripts: tests/test_train_*.py, tests/test_user_errors.py)."""

import json
import os

import pytest

from training import run_dir


def test_lock_of_another_host_is_refused_naming_how_to_clear_it(tmp_path):
    (tmp_path / ".lock").write_text(json.dumps(dict(pid=1, host="elsewhere", started="now", command="train_seg.py")))
    with pytest.raises(ValueError, match=r"pid 1 on host elsewhere.*If that run is gone, delete .*\.lock"):
        run_dir.prepare_out_dir(str(tmp_path), resume=False)


def test_resume_settings_compare_paths_after_expansion():
    home = os.path.expanduser("~")
    run_dir.check_resume_settings({"data_root": "~/data/", "lr": 0.1}, {"data_root": f"{home}/data", "lr": 0.1},
                                      ckpt_dir="c")
    with pytest.raises(ValueError, match=r"--lr 0.1 -> 0.2\)"):  # only what differs is named
        run_dir.check_resume_settings(json.dumps({"data_root": "d", "lr": 0.1}), {"data_root": "d", "lr": 0.2},
                                          ckpt_dir="c")


def test_a_state_holding_a_refused_type_is_named_not_called_damaged(tmp_path):
    """A whole state file holding an object torch.load(weights_only=True) refuses (a TorchVersion, as the run record
    stored before it was made plain str) is said to be that, not "damaged"."""
    import torch
    torch.save({"epoch": 1, "version": torch.__version__}, tmp_path / "epoch_0001.pt")
    with pytest.raises(ValueError, match=r"holds a torch\.torch_version\.TorchVersion object, which "
                                         r"torch\.load\(weights_only=True\) refuses") as e:
        run_dir._load_epoch(str(tmp_path), 1, "epoch_0001.safetensors", "epoch_0001.pt", None, None)
    assert "damaged" not in str(e.value)


def test_folders_made_for_a_run_go_again_while_empty(tmp_path):
    """prepare_out_dir makes --out and its missing parents; release_out_dir removes them while they are empty (a run
    refused over its data), keeps whatever holds a file, and never touches a folder that was there before."""
    out = tmp_path / "runs" / "seg"
    run_dir.prepare_out_dir(str(out), resume=False)
    assert (out / run_dir.LOCK_NAME).exists()
    run_dir.release_out_dir(str(out))
    assert os.listdir(tmp_path) == []  # seg and runs: both made for the run, both gone

    run_dir.prepare_out_dir(str(out), resume=False)
    (out / "log.jsonl").write_text("{}\n")
    run_dir.release_out_dir(str(out))
    assert os.listdir(out) == ["log.jsonl"]  # the run wrote there: out and its parents stay

    (tmp_path / "empty").mkdir()
    run_dir.prepare_out_dir(str(tmp_path / "empty"), resume=False)
    run_dir.release_out_dir(str(tmp_path / "empty"))
    assert (tmp_path / "empty").is_dir()  # there before the run
