"""bench/gpu_check.sh --smoke: every step of the GPU check runs here (tiny presets, a few steps, the CPU) and
records its exit status and its result file, so that the script cannot rot before a GPU is lent. Bounded by
steps: the smoke run's per-step limits are 20 x the GPU ones, far above what it needs on a busy 2-core machine."""
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STEPS = ["env", "a_pytest", "b_train_cls", "c_torchrun", "d_seg_memory", "e_bench_peft", "f_profile"]


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_gpu_check_smoke(tmp_path):
    out = tmp_path / "gpu"
    proc = subprocess.run(["bash", str(ROOT / "bench" / "gpu_check.sh"), str(out), "--smoke"], cwd=tmp_path,
                          capture_output=True, text=True, env={**os.environ, "PYTHON": sys.executable})
    steps = {s["step"]: s for s in read_jsonl(out / "steps.jsonl")}
    assert list(steps) == STEPS, proc.stdout + proc.stderr
    logs = {name: (out / f"{name}.log").read_text()[-3000:] for name in STEPS if (out / f"{name}.log").exists()}
    for name, s in steps.items():
        assert s["rc"] == 0, f"{name}: rc {s['rc']}\n{logs.get(name)}"
    assert proc.returncode == 0, proc.stdout + proc.stderr
    result = {name: json.loads((out / f"{name}.json").read_text()) for name in STEPS}
    for name in STEPS[:-1]:  # gpu_profile.py's numbers carry no verdict: its exit status is the check
        assert result[name]["ok"] is True, (name, result[name])

    assert result["env"]["device"] == "cpu" and result["env"]["torch"] and result["env"]["smoke"] is True
    # a: the CUDA tests' bodies ran on the CPU (the dry run), none failed
    a = result["a_pytest"]
    assert a["dry_run_on_cpu"] and a["passed"] >= 20 and a["failures"] == a["errors"] == 0
    # b: each method trained 3 epochs x 20 steps, its loss fell, the merged model predicted exactly as the adapted
    # (fp32 here), and the adapters' merge in a TaskBank on the run's base is exact in fp32
    b = result["b_train_cls"]["runs"]
    assert set(b) == {"petah", "lora", "full"}
    for method, r in b.items():
        assert r["rc"] == 0 and r["steps"] == 60 and len(r["train_loss"]) == 3, (method, r)
        assert r["train_loss"][-1] < r["train_loss"][0] and r["merged_pred_diff"] == 0, (method, r)
        if method != "full":
            mc = r["merge_fp32"]
            assert mc["exact"] and mc["max_abs_diff"] <= 1e-4 * mc["scale"] < mc["adapter_effect"], (method, mc)
    # c: one process under torchrun (gloo here, NCCL on the GPU) finished its epoch
    c = result["c_torchrun"]
    assert c["backend"] == "gloo" and c["process_group_line_seen"] and c["steps"] == 5  # 10 x 8 images / 16
    # d: SAM (tiny) trained without and with --grad-ckpt, the peak memory of each measured (RSS here: CUDA's
    # max_memory_allocated exists on a GPU only, in the runner and in the script's log.jsonl)
    d = result["d_seg_memory"]
    assert [r["grad_ckpt"] for r in d["rows"]] == [False, True]
    assert all(r["finished"] and r["peak_rss_mb"] > 0 and r["logged_cuda_max_mb"] is None for r in d["rows"])
    # e: PETAH-2 / LoRA ATTN / full on both tiny models: timed against the floor and timm + peft, peak memory of
    # ours and the reference, merged outputs equal unmerged ones
    e = result["e_bench_peft"]
    assert not e["errors"] and len(e["train"]) == 6 and all(r["ours_ms"] > 0 and r["ref_ms"] > 0 for r in e["train"])
    assert {(r["method"], r["which"]) for r in e["memory"]} == {(m, w) for m in ("petah-2", "lora", "full")
                                                                for w in ("ours", "ref")}
    assert e["merged_max_abs_diff"] < 1e-4
    # f: the profile of one PETAH-2 step, as text and numbers
    f = result["f_profile"]
    assert f["method"] == "petah-2" and f["wall_ms"] > 0 and len(f["top"]) > 5
    assert "ops by CPU self time" in (out / "f_profile.txt").read_text()
    summary = (out / "summary.md").read_text()
    assert all(f"| {name} | ok |" in summary for name in STEPS), summary


def test_gpu_check_usage_errors(tmp_path):
    """No OUTDIR, an unknown option, or the real check without CUDA: exit 2 and a message naming the fix."""
    script = str(ROOT / "bench" / "gpu_check.sh")
    env = {**os.environ, "PYTHON": sys.executable}
    proc = subprocess.run(["bash", script], capture_output=True, text=True, env=env)
    assert proc.returncode == 2 and "usage: bash bench/gpu_check.sh OUTDIR [--smoke]" in proc.stderr
    proc = subprocess.run(["bash", script, str(tmp_path / "o"), "--fast"], capture_output=True, text=True, env=env)
    assert proc.returncode == 2 and "unknown option --fast" in proc.stderr
    proc = subprocess.run(["bash", script, str(tmp_path / "o")], capture_output=True, text=True, env=env)
    assert proc.returncode == 2 and "no CUDA device" in proc.stderr and "--smoke" in proc.stderr


def test_suite_runs_without_pytest_xdist():
    """The GPU machine's step a has pytest but not always pytest-xdist: tests/conftest.py's xdist hook is optional,
    so a plain pytest without the plugin collects and runs (pytest refuses a conftest with an unknown hook)."""
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:xdist", "tests/test_training_schedule.py"],
                          cwd=ROOT, capture_output=True, text=True)  # a module of a second: the conftest is the point
    assert proc.returncode == 0 and " passed" in proc.stdout, proc.stdout[-3000:] + proc.stderr[-3000:]
