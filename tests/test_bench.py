"""bench/bench_peft.py --smoke runs end to end and writes every number it promises (no timing is asserted)."""
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_bench_peft_smoke(tmp_path):
    out = tmp_path / "smoke.json"
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "bench_peft.py"), "--smoke", "--json", str(out)],
                          cwd=tmp_path, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    r = json.loads(out.read_text())
    assert {"meta", "train", "memory", "infer", "forward", "adapters", "targets"} <= set(r)
    assert r["meta"]["torch"] and r["meta"]["command"] and r["meta"]["threads"] == 1

    # Q1-Q3: every (model, method) timed for ours, the floor and timm + peft, no worker failed
    assert len(r["train"]) == 2 * 4 and not [t for t in r["train"] if "error" in t]
    for t in r["train"]:
        for k in ("ours_ms", "floor_ms", "ref_ms", "ours_img_s", "step_over_floor", "ours_over_ref"):
            assert t[k] > 0, (t["model"], t["method"], k)
        # the reference computes our function: same weights, our adapter values copied into peft's
        assert t["parity_max_abs_diff"] < 1e-3, (t["model"], t["method"], t["parity_max_abs_diff"])
    petah = {t["model"]: t for t in r["train"] if t["method"] == "petah-1"}
    assert petah["efl_tiny"]["earliest_adapted"] == "stem.conv1"  # PETAH adapts the stem: the floor reaches the image
    assert petah["vit_tiny"]["earliest_adapted"] == "blocks.0.attn.qkv"
    # PETAH = 1 conv-LoRA + LoRA ATTN on EfficientFormer: more trainable than LoRA alone, far fewer than full
    full = {t["model"]: t for t in r["train"] if t["method"] == "full"}
    assert petah["efl_tiny"]["adapter_params"] < full["efl_tiny"]["adapter_params"] / 5

    # Q1 memory: peak RSS of a fresh process per configuration, ours and the reference
    mem = [m for m in r["memory"] if "error" not in m]
    assert len(mem) == len(r["memory"]) == 2 * 2 * 2
    assert all(m["peak_rss_mb"] >= m["start_rss_mb"] > 0 for m in mem)

    # Q4: merged outputs equal unmerged ones; every variant timed
    for i in r["infer"]:
        assert max(i["max_abs_diff_vs_unmerged"].values()) < 1e-4
        assert i["merged_same_architecture"] is True  # merge_and_unload gives back exactly the base model's layers
        assert {"base", "unmerged", "merged_inplace", "merged"} <= set(i["latency_ms"])
        assert "merged" in i["throughput_over_base"]
    assert "merged_bn_folded" in r["infer"][0]["latency_ms"]  # EfficientFormer: BatchNorm folded deploy model

    # Q5 / Q6
    assert all(f["ours_over_ref"] > 0 and f["max_abs_diff"] < 1e-3 for f in r["forward"])
    for a in r["adapters"]:
        assert a["file_bytes"] == a["adapter_tensor_bytes"] + a["head_tensor_bytes"] + a["header_bytes"]
        if a["method"] != "full":  # full also stores the BatchNorm running statistics
            assert a["adapter_tensor_bytes"] == 4 * a["adapter_params"], a  # fp32, exactly the #Params
    verdicts = {t["verdict"] for t in r["targets"]}
    assert verdicts <= {"PASS", "MISS", "-"} and len(r["targets"]) >= 10
