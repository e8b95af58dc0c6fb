"""The steps of bench/gpu_check.sh, one sub-command each: run the step, check it, write OUT/<step>.json.

    python bench/gpu_steps.py env        OUT --device cuda           # versions, GPU, driver, git commit
    python bench/gpu_steps.py pytest     OUT --device cuda [--smoke]  # a. pytest -m cuda (tests/test_cuda.py)
    python bench/gpu_steps.py train_cls  OUT --device cuda [--smoke]  # b. petah / lora / full: loss falls, merge exact
    python bench/gpu_steps.py torchrun   OUT --device cuda [--smoke]  # c. torchrun --nproc_per_node 1 (NCCL)
    python bench/gpu_steps.py seg_memory OUT --device cuda [--smoke]  # d. SAM ViT-B 1024, +- --grad-ckpt: peak memory
    python bench/gpu_steps.py bench_peft OUT --device cuda [--smoke]  # e. bench_peft.py: step time, memory, merged
    python bench/gpu_steps.py summary    OUT                          # OUT/summary.md from every step's JSON
    python bench/gpu_steps.py peak JSON -- SCRIPT [ARGS...]           # SCRIPT run in this process; its peak memory

Every step writes OUT/<step>.json with "ok" (its check passed) and its numbers, and exits 1 when its check
failed. The training runs write into OUT/runs/. --smoke: the tiny presets (ef_tiny, vit_tiny / efl_tiny,
sam_tiny) and a few steps, on the CPU when there is no CUDA, so that tests/test_gpu_check.py runs every step
here. Not a test itself: a driver.
"""
import argparse
import importlib.metadata
import importlib.util
import json
import math
import os
import platform
import resource
import runpy
import shutil
import socket
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable
CLS_METHODS = ("petah", "lora", "full")

# Sizes of the real check (one H100 / H200, about 8 minutes for all steps) and of --smoke (the CPU, minutes).
FULL = dict(
    # b: 10 classes x 64 = 640 training images, batch 32: 20 steps per epoch, 10 epochs = 200 steps
    cls=dict(model="efl7", img_size=224, batch_size=32, per_class=64, val_per_class=10, epochs=10, eval_every=10,
             workers=8),
    ddp=dict(model="efl7", img_size=224, batch_size=32, per_class=16, val_per_class=4, epochs=1, eval_every=1,
             workers=4),
    seg=dict(model="sam_vitb", img_size=1024, batch_size=2, iters=4, per_class=2, val_per_class=1, workers=4),
    bench=["--models", "efl7", "vitb", "--steps", "10", "--warmup", "3", "--mem-steps", "3"],
)
SMOKE = dict(
    cls=dict(model="ef_tiny", img_size=32, batch_size=16, per_class=32, val_per_class=8, epochs=3, eval_every=3,
             workers=0),
    ddp=dict(model="ef_tiny", img_size=32, batch_size=16, per_class=8, val_per_class=2, epochs=1, eval_every=1,
             workers=0),
    seg=dict(model="sam_tiny", img_size=64, batch_size=2, iters=2, per_class=2, val_per_class=1, workers=0),
    bench=["--smoke", "--models", "efl_tiny", "vit_tiny", "--memory-methods", "petah-2", "lora", "full"],
)
# AdamW LRs per method: the README demo's for the adapters (head 5e-3, adapters 1e-2); full fine-tuning of a random
# EfficientFormer moves the backbone at 5e-4 (at 5e-3 the loss can blow up in the first epoch).
CLS_LR = dict(petah=["--lr", "0.005", "--adapter-lr-factor", "2", "--train-norms", "--rc", "2"],
              lora=["--lr", "0.005", "--adapter-lr-factor", "2", "--train-norms"],
              full=["--lr", "0.005", "--backbone-lr-factor", "0.1"])


def write_json(path: Path, obj: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj, indent=1, default=str))
    tmp.replace(path)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def run(cmd: list[str], log: Path, env: dict | None = None) -> int:
    """Run cmd from the repository root, stdout and stderr appended to `log`; its exit status."""
    with open(log, "a") as f:
        f.write(f"\n$ {' '.join(cmd)}\n")
        f.flush()
        return subprocess.run(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT,
                              env={**os.environ, **(env or {})}).returncode


def fresh(path: Path) -> Path:
    """An output directory that does not exist yet (a rerun into the same OUT starts its runs over)."""
    shutil.rmtree(path, ignore_errors=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def prune(run_dir: Path, limit_mb: float = 8) -> None:
    """Delete a checked run's files over `limit_mb` (merged models, checkpoints, a full fine-tune's task file: EF-L7
    and SAM ViT-B are 330-360 MB each), so that OUT stays small enough to copy back from the GPU machine."""
    for path in run_dir.rglob("*"):
        if path.is_file() and path.stat().st_size > limit_mb * 2**20:
            path.unlink()


def cls_args(cfg: dict, method: str, out: Path, device: str) -> list[str]:
    args = ["--model", cfg["model"], "--method", method, *CLS_LR[method], "--data", "synthetic",
            "--img-size", str(cfg["img_size"]), "--batch-size", str(cfg["batch_size"]),
            "--synthetic-train", str(cfg["per_class"]), "--synthetic-val", str(cfg["val_per_class"]),
            "--epochs", str(cfg["epochs"]), "--warmup-epochs", "1" if cfg["epochs"] > 1 else "0",
            "--eval-every", str(cfg["eval_every"]), "--workers", str(cfg["workers"]), "--device", device,
            "--amp", "bf16" if device == "cuda" else "off", "--out", str(out)]
    return args


# ---- a. pytest -m cuda -------------------------------------------------------------------------------------

def step_pytest(out: Path, device: str, smoke: bool) -> dict:
    """tests/test_cuda.py on the device. Without CUDA (--smoke) the tests' bodies run on the CPU
    (CUDA_TESTS_DEVICE=cpu), so a test that broke is seen before a GPU is lent."""
    xml = out / "a_pytest.xml"
    env = {"CUDA_TESTS_DEVICE": "cpu"} if device == "cpu" else {}
    rc = run([PY, "-m", "pytest", "-m", "cuda", "-q", "-rs", "-p", "no:cacheprovider", "tests/test_cuda.py",
              f"--junitxml={xml}"], out / "a_pytest.log", env)
    counts = dict(tests=0, failures=0, errors=0, skipped=0)
    if xml.exists():
        suite = ET.parse(xml).getroot()
        suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
        counts = {k: int(suite.get(k, 0)) for k in counts}
    passed = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    return dict(ok=rc == 0 and passed > 0, rc=rc, passed=passed, tests=counts["tests"], failures=counts["failures"],
                errors=counts["errors"], skipped_tests=counts["skipped"], dry_run_on_cpu=device == "cpu")


# ---- b. train_cls.py: the loss falls, merged predicts what unmerged does ---------------------------------

def check_cls_run(run_dir: Path) -> dict:
    """From a finished run's log.jsonl: the per-epoch training losses, the merge check, the speed, and on CUDA the
    peak memory the script logs per epoch (torch.cuda.max_memory_allocated, evaluation included)."""
    rows = read_jsonl(run_dir / "log.jsonl")
    epochs = [r for r in rows if not r.get("summary")]
    summary = next((r for r in rows if r.get("summary")), None)
    losses = [r["train_loss"] for r in epochs]
    out = dict(train_loss=losses, steps=summary and summary["steps"], img_per_s=[r["img_per_s"] for r in epochs],
               eval_acc=summary and summary["eval_acc"], merged_acc=summary and summary["merged_acc"],
               merged_pred_diff=summary and summary["merged_pred_diff"],
               cuda_max_allocated_mb=max((r["cuda_max_allocated_mb"] for r in epochs if "cuda_max_allocated_mb" in r),
                                         default=None))
    out["loss_falls"] = len(losses) >= 2 and all(map(math.isfinite, losses)) and losses[-1] < losses[0]
    return out


def merge_check_fp32(run_dir: Path, device: str) -> dict:
    """The run's task on its base (OUT/base.safetensors) in a TaskBank on the device, fp32 with TF32 off: the
    unmerged adapters (the bank's per-sample path) against the merged layers (bank.select) on 16 random inputs.
    fp32 reordering moves logits by ~1e-6 of their scale, a wrong merge by about the adapters' effect, so the bound
    is 1e-4 of the scale, and the adapters' effect (adapted - base) must be far above the difference."""
    import torch
    sys.path.insert(0, str(ROOT))
    from models import create_model, load_pretrained
    from tasks.bank import TaskBank
    from tasks.task_file import read_task
    task = read_task(run_dir / "adapters.safetensors")
    meta = task.meta
    base = create_model(meta["model"], num_classes=meta["num_classes"], img_size=meta["img_size"], **meta["model_cfg"])
    load_pretrained(base, run_dir / "base.safetensors", verbose=False)
    bank = TaskBank(base.to(device))
    bank.add("task", task)
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    x = torch.randn(16, 3, meta["img_size"], meta["img_size"], generator=torch.Generator().manual_seed(0)).to(device)
    with torch.no_grad():
        unmerged = torch.stack(bank(x, tasks=["task"] * len(x)))  # (16, num_classes)
        bank.select("task")
        merged = bank(x)
        bank.select(None)
        plain = bank(x)
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved
    diff, scale = (merged - unmerged).abs().max().item(), unmerged.abs().max().item()
    effect = (unmerged - plain).abs().max().item()
    return dict(max_abs_diff=diff, scale=scale, adapter_effect=effect,
                exact=diff <= 1e-4 * scale and effect > 100 * diff)


def step_train_cls(out: Path, device: str, smoke: bool) -> dict:
    """The loss falls; the merge is exact. The script's own check (merged_pred_diff: predictions of the merged vs
    the adapted model on the validation set) runs under the run's autocast, where bf16 rounding can flip a near
    tie, so it is reported and the exactness is checked in fp32 (merge_check_fp32); full fine-tuning has no
    adapters, its merged model is the trained one and must predict identically."""
    cfg = (SMOKE if smoke else FULL)["cls"]
    runs = {}
    for method in CLS_METHODS:
        run_dir = fresh(out / "runs" / f"cls_{method}")
        rc = run([PY, "train_cls.py", *cls_args(cfg, method, run_dir, device)], out / "b_train_cls.log")
        runs[method] = dict(rc=rc, **check_cls_run(run_dir))
        if rc == 0 and method != "full":
            runs[method]["merge_fp32"] = merge_check_fp32(run_dir, device)
        prune(run_dir)
    ok = all(r["rc"] == 0 and r["loss_falls"] for r in runs.values())
    ok = ok and runs["full"]["merged_pred_diff"] == 0
    ok = ok and all(r["merge_fp32"]["exact"] for m, r in runs.items() if m != "full")
    return dict(ok=ok, config=cfg, runs=runs)


# ---- c. torchrun ---------------------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def step_torchrun(out: Path, device: str, smoke: bool) -> dict:
    """One process under torchrun: the process group (NCCL on CUDA, gloo on the CPU), DDP, the sampler."""
    cfg = (SMOKE if smoke else FULL)["ddp"]
    run_dir = fresh(out / "runs" / "cls_torchrun")
    log = out / "c_torchrun.log"
    rc = run([PY, "-m", "torch.distributed.run", "--nproc_per_node", "1", "--master_addr", "127.0.0.1",
              "--master_port", str(free_port()), "--", "train_cls.py",
              *cls_args(cfg, "petah", run_dir, device)], log)
    said = f"1 process(es) on {device}"  # train_cls.py's line, printed after the process group came up
    ran_ddp = said in log.read_text()
    result = check_cls_run(run_dir)
    prune(run_dir)
    return dict(ok=rc == 0 and ran_ddp and result["steps"] is not None, rc=rc, backend="nccl" if device == "cuda"
                else "gloo", process_group_line_seen=ran_ddp, **result)


# ---- d. train_seg.py SAM ViT-B: peak memory with and without activation checkpointing --------------------------

def step_seg_memory(out: Path, device: str, smoke: bool) -> dict:
    cfg = (SMOKE if smoke else FULL)["seg"]
    rows = []
    for ckpt in (False, True):
        tag = "ckpt" if ckpt else "plain"
        run_dir, peak = fresh(out / "runs" / f"seg_{tag}"), out / "runs" / f"seg_{tag}_peak.json"
        args = ["--model", cfg["model"], "--method", "lora", "--learn-interp", "--data", "synthetic",
                "--img-size", str(cfg["img_size"]), "--batch-size", str(cfg["batch_size"]), "--iters",
                str(cfg["iters"]), "--synthetic-train", str(cfg["per_class"]), "--synthetic-val",
                str(cfg["val_per_class"]), "--eval-every", "1000", "--vis-images", "0", "--workers",
                str(cfg["workers"]), "--device", device, "--amp", "bf16" if device == "cuda" else "off",
                "--out", str(run_dir)] + (["--grad-ckpt"] if ckpt else [])
        rc = run([PY, str(Path(__file__).resolve()), "peak", str(peak), "--", "train_seg.py", *args],
                 out / "d_seg_memory.log")
        measured = json.loads(peak.read_text()) if peak.exists() else {}
        log = read_jsonl(run_dir / "log.jsonl")
        prune(run_dir)
        logged = [r["cuda_max_allocated_mb"] for r in log if "cuda_max_allocated_mb" in r]  # the script's own
        rows.append(dict(grad_ckpt=ckpt, rc=rc, finished=any(r.get("summary") for r in log),
                         logged_cuda_max_mb=max(logged, default=None),
                         **{k: v for k, v in measured.items() if k not in ("rc", "script")}))
    ok = all(r["rc"] == 0 and r["finished"] for r in rows)
    by = {r["grad_ckpt"]: r for r in rows}
    ratio = None
    if True in by and False in by and by[False].get("cuda_peak_mb"):
        ratio = by[True]["cuda_peak_mb"] / by[False]["cuda_peak_mb"]
        ok = ok and ratio < 1  # checkpointing exists to lower the activation memory
    return dict(ok=ok, config=cfg, rows=rows, ckpt_over_plain=ratio)


def step_peak(json_path: Path, argv: list[str]) -> int:
    """Run a training script in this process (as `python SCRIPT ARGS`), then record the process's peak memory:
    torch.cuda.max_memory_allocated (the tensors' peak) on CUDA and the peak resident set size."""
    import torch
    script = str(ROOT / argv[0])
    sys.argv = [script, *argv[1:]]
    sys.path.insert(0, str(ROOT))
    rc = 0
    try:
        runpy.run_path(script, run_name="__main__")
    except SystemExit as e:
        rc = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    out = dict(script=argv[0], rc=rc, peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    if torch.cuda.is_initialized():
        out["cuda_peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
        out["cuda_peak_reserved_mb"] = torch.cuda.max_memory_reserved() / 2**20
    write_json(json_path, out)
    return rc


# ---- e. bench_peft.py ----------------------------------------------------------------------------------------

def step_bench_peft(out: Path, device: str, smoke: bool) -> dict:
    """PETAH-2, LoRA ATTN and full: ours / floor / timm + peft step time and peak memory (batch 32, bf16 on CUDA),
    and merged vs base inference, on EF-L7 and ViT-B. The reference's memory where peft is involved (bench_peft's
    full preset: timm alone, for full, matched ours within 6% on the CPU); --smoke measures it for all three."""
    results = out / "bench_peft.json"
    results.unlink(missing_ok=True)
    methods = ["petah-2", "lora", "full"]
    rc = run([PY, "bench/bench_peft.py", "--device", device, *(SMOKE if smoke else FULL)["bench"],
              "--methods", *methods, "--sections", "train", "memory", "infer",
              "--json", str(results)], out / "e_bench_peft.log")
    if not results.exists():
        return dict(ok=False, rc=rc, error="bench_peft.py wrote no results")
    r = json.loads(results.read_text())
    errors = [f"{x.get('model')} {x.get('method')}: {x['error']}" for k in ("train", "memory", "infer") for x in r[k]
              if "error" in x]
    merge_diff = max((max(x["max_abs_diff_vs_unmerged"].values()) for x in r["infer"] if "error" not in x),
                     default=None)
    ok = rc == 0 and not errors and len(r["train"]) == len(r["infer"]) * len(methods)
    return dict(ok=ok, rc=rc, errors=errors, results=str(results.name), merged_max_abs_diff=merge_diff,
                train=[{k: x.get(k) for k in ("model", "method", "batch", "ours_ms", "floor_ms", "ref_ms",
                                              "step_over_floor", "ours_over_ref", "parity_max_abs_diff")}
                       for x in r["train"]],
                memory=[{k: x.get(k) for k in ("model", "method", "which", "batch", "cuda_max_allocated_mb",
                                               "peak_over_start_mb")} for x in r["memory"]],
                infer=[dict(model=x["model"], method=x["method"], merged_over_base_b1=x["latency_over_base"]["merged"],
                            merged_over_base_batch=x["throughput_over_base"]["merged"],
                            batch=x["batch_throughput"]) for x in r["infer"] if "error" not in x],
                targets=r["targets"])


# ---- the environment and the summary -------------------------------------------------------------------------

def step_env(out: Path, device: str, smoke: bool) -> dict:
    import torch
    info = dict(ok=True, date=subprocess.run(["date", "-u", "+%Y-%m-%d %H:%M UTC"], capture_output=True,
                                              text=True).stdout.strip(),
                python=platform.python_version(), torch=torch.__version__, cuda=torch.version.cuda,
                cudnn=torch.backends.cudnn.version(), device=device, smoke=smoke)
    if device == "cuda":
        info.update(gpu=torch.cuda.get_device_name(), gpu_count=torch.cuda.device_count())
    if shutil.which("nvidia-smi"):
        info["nvidia_smi"] = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total",
                                             "--format=csv,noheader"], capture_output=True, text=True).stdout.strip()
    # the installed versions, read from the packages' metadata (importing timm, peft, ... would take seconds)
    for name in ("timm", "peft", "torchvision", "segment_anything", "pycocotools", "onnxruntime"):
        try:
            info[name] = importlib.metadata.version(name.replace("_", "-"))
        except importlib.metadata.PackageNotFoundError:  # e.g. onnxruntime-gpu's wheel: another name
            info[name] = "installed" if importlib.util.find_spec(name) else None
    git = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    info["git"] = git.stdout.strip() or None
    return info


def fmt(v, spec=".1f") -> str:
    return "-" if v is None else format(v, spec)


def summary(out: Path) -> str:
    """OUT/summary.md: the environment, every step's status, and its numbers."""
    def load(name):
        p = out / f"{name}.json"
        return json.loads(p.read_text()) if p.exists() else {}
    env, steps = load("env"), read_jsonl(out / "steps.jsonl")
    lines = [f"# GPU check, {env.get('date')}", "",
             f"{env.get('gpu') or env.get('device')} ({env.get('nvidia_smi') or 'no nvidia-smi'}); torch "
             f"{env.get('torch')}, CUDA {env.get('cuda')}, cuDNN {env.get('cudnn')}, Python {env.get('python')}, "
             f"timm {env.get('timm')}, peft {env.get('peft')}; git {env.get('git')}"
             f"{'; --smoke' if env.get('smoke') else ''}", "",
             "| step | status | rc | s |", "|---|---|---|---|"]
    for s in steps:
        r = load(s["step"])
        # a step's JSON says ok (gpu_profile.py's numbers have no verdict: its exit status is the check)
        status = "ok" if s["rc"] == 0 and r and r.get("ok", True) else (
            "timed out" if s["rc"] in (124, 137) else "FAILED")
        lines.append(f"| {s['step']} | {status} | {s['rc']} | {s['seconds']} |")
    a = load("a_pytest")
    if a:
        dry = " (bodies run on the CPU: dry run)" if a["dry_run_on_cpu"] else ""
        lines += ["", f"a. pytest -m cuda: {a['passed']} passed, {a['failures']} failed, {a['errors']} errors, "
                      f"{a['skipped_tests']} skipped{dry}"]
    b = load("b_train_cls")
    for method, r in b.get("runs", {}).items():
        mc = r.get("merge_fp32")
        exact = (f"; fp32 merged vs unmerged max |diff| {mc['max_abs_diff']:.1e} of logits up to {mc['scale']:.2f} "
                 f"(adapters move them by {mc['adapter_effect']:.2f})") if mc else ""
        lines.append(f"b. train_cls {b['config']['model']} {method}: rc {r['rc']}, {r['steps']} steps, loss "
                     f"{' -> '.join(fmt(x, '.3f') for x in r['train_loss'][:1] + r['train_loss'][-1:])}, top-1 "
                     f"{fmt(r['eval_acc'], '.3f')} / merged {fmt(r['merged_acc'], '.3f')}, "
                     f"{r['merged_pred_diff']} predictions differ, {fmt(max(r['img_per_s'], default=None), '.0f')} "
                     f"img/s, max_memory_allocated {fmt(r['cuda_max_allocated_mb'], '.0f')} MiB{exact}")
    c = load("c_torchrun")
    if c:
        lines.append(f"c. torchrun --nproc_per_node 1 ({c['backend']}): rc {c['rc']}, {c['steps']} steps")
    d = load("d_seg_memory")
    for r in d.get("rows", []):
        lines.append(f"d. train_seg {d['config']['model']} at {d['config']['img_size']}, batch "
                     f"{d['config']['batch_size']}, grad_ckpt {r['grad_ckpt']}: max_memory_allocated "
                     f"{fmt(r.get('cuda_peak_mb'), '.0f')} MiB over the run ({fmt(r['logged_cuda_max_mb'], '.0f')} "
                     f"MiB in log.jsonl), peak RSS {fmt(r.get('peak_rss_mb'), '.0f')} MiB")
    e = load("e_bench_peft")
    if e.get("train"):
        lines += ["", "| e. model | method | batch | ours ms | floor ms | timm+peft ms | step/floor | ours/ref |",
                  "|---|---|---|---|---|---|---|---|"]
        lines += [f"| {r['model']} | {r['method']} | {r['batch']} | {fmt(r['ours_ms'])} | {fmt(r['floor_ms'])} | "
                  f"{fmt(r['ref_ms'])} | {fmt(r['step_over_floor'], '.2f')} | {fmt(r['ours_over_ref'], '.2f')} |"
                  for r in e["train"]]
        lines += ["", "| e. model | method | which | peak MiB (CUDA allocated, else RSS above start) |",
                  "|---|---|---|---|"]
        lines += [f"| {r['model']} | {r['method']} | {r['which']} | "
                  f"{fmt(r['cuda_max_allocated_mb'] or r['peak_over_start_mb'], '.0f')} |" for r in e["memory"]]
        lines += [f"e. merged / base inference {r['model']} {r['method']}: {r['merged_over_base_b1']:.3f} at batch 1, "
                  f"{r['merged_over_base_batch']:.3f} at batch {r['batch']}" for r in e["infer"]]
    f = load("f_profile")
    if f:
        lines += ["", f"f. profile of one {f.get('model')} PETAH-2 step: see f_profile.txt; {f.get('summary')}"]
    text = "\n".join(lines) + "\n"
    (out / "summary.md").write_text(text)
    return text


STEPS = dict(env=step_env, pytest=step_pytest, train_cls=step_train_cls, torchrun=step_torchrun,
             seg_memory=step_seg_memory, bench_peft=step_bench_peft)
FILES = dict(env="env", pytest="a_pytest", train_cls="b_train_cls", torchrun="c_torchrun",
             seg_memory="d_seg_memory", bench_peft="e_bench_peft")


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "peak":  # peak JSON -- SCRIPT ARGS...: the rest belongs to SCRIPT
        rest = sys.argv[3:]
        return step_peak(Path(sys.argv[2]), rest[1:] if rest[:1] == ["--"] else rest)
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("step", choices=[*STEPS, "summary"])
    p.add_argument("out", type=Path, help="the output folder of bench/gpu_check.sh")
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    p.add_argument("--smoke", action="store_true", help="tiny presets, a few steps")
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    if args.step == "summary":
        print(summary(args.out), end="")
        return 0
    result = dict(step=FILES[args.step], ok=False)
    result.update(STEPS[args.step](args.out.resolve(), args.device, args.smoke))
    write_json(args.out / f"{FILES[args.step]}.json", result)
    print(json.dumps({k: v for k, v in result.items() if k in ("step", "ok", "rc")}))
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
