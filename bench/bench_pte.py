r"""
ExecuTorch numbers for BENCHMARKS.md ("Deployment bundle", "ExecuTorch"): what a task costs on a shared base
.ptd, in bytes, in latency and in memory; and (--int8 RUN) what int8 does to a trained task.

    OMP_NUM_THREADS=1 python bench/bench_pte.py --model efl7              # bytes, latency, memory (random weights)
    OMP_NUM_THREADS=1 python bench/bench_pte.py --int8 runs/demo          # int8 on a train_cls.py run

Share (default): a random base (random BatchNorm statistics) with a 1000-class head and a PETAH-2 task on it (LoRA
r 8 on the attention linears, conv-LoRA rc 2 on every conv, a new 100-class head, every trained tensor random),
at --img-size. tasks.pte.export_pte_base writes base.pte + base.ptd, export_pte_task the task's .pte (unmerged:
the low-rank paths run beside the base layers). Reported:
    bytes        base.ptd, base.pte, task.pte, and the task's own bytes over the base files'
    exact        max |task in ExecuTorch - merged PyTorch| / max |merged PyTorch| at batch 1 and 2
    latency      batch 1, XNNPACK on one thread, this process's CPU time per call; base, a second load of the base
                 (the A/A band: the spread of base / base ratios) and the task timed round-robin, one call each per
                 round, the order rotated between rounds; medians over rounds, ratios medians of per-round ratios
    memory       resident set growth of a fresh process that loads and runs 1, 4 and 8 task programs on the one
                 base.ptd, against as many loads of the base program (each a full model, what a merged task costs)
int8 (--int8 RUN): RUN/merged.safetensors (train_cls.py) exported fp32 and int8 (XNNPACK PT2E, calibrated on
--calib training images), both run by ExecuTorch on the validation split; top-1 of each, the PyTorch model's top-1,
the files' bytes, the relative logit drift (L2) and the latency at batch 1 as above.
"""

import argparse
import copy
import json
import os
import statistics
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from lora import merge_and_unload  # noqa: E402
from methods import apply_method  # noqa: E402
from tasks.deploy import build_model  # noqa: E402
from tasks.pte import export_pte, export_pte_base, export_pte_task, load_pte  # noqa: E402

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--model", default="efl7", help="EfficientFormer name (efl1, efl3, efl7, ef_tiny); default efl7")
parser.add_argument("--img-size", type=int, default=224)
parser.add_argument("--rounds", type=int, default=15, help="latency rounds (median); default 15")
parser.add_argument("--calls", type=int, default=1,
                    help="calls per timing (a tiny model's call is below the CPU clock's resolution); default 1")
parser.add_argument("--merge-up-to", default="0", metavar="N[,N...]",
                    help="one task per value: adapted layers of at most N weight elements merged (the task owns them, "
                         "tasks.pte.deployable); memory is measured for the first; default 0")
parser.add_argument("--int8", default=None, metavar="RUN", help="a train_cls.py --out folder: the int8 part instead")
parser.add_argument("--calib", type=int, default=64, help="--int8: calibration images from the train split")
parser.add_argument("--out", default=None, help="JSON results file; default bench/results_pte[_int8].json")
args = parser.parse_args()


def round_robin(fns: dict, x, rounds: int) -> dict:
    """Every round's CPU seconds per call of each fn: one timing (of --calls calls) each per round, the order
    rotated from round to round, after one warm-up round."""
    times, keys = {k: [] for k in fns}, list(fns)
    for r in range(rounds + 1):
        for k in keys[r % len(keys):] + keys[:r % len(keys)]:
            t0 = time.process_time()
            for _ in range(args.calls):
                fns[k](x)
            if r:
                times[k].append((time.process_time() - t0) / args.calls)
    return times


def paired(times: dict, a: str, b: str) -> dict:
    """Median and range of the per-round ratios a / b."""
    ratios = [x / y for x, y in zip(times[a], times[b])]
    return dict(median=round(statistics.median(ratios), 3), range=[round(min(ratios), 3), round(max(ratios), 3)])


def one_thread() -> None:
    from executorch.extension.pybindings.portable_lib import _unsafe_reset_threadpool
    _unsafe_reset_threadpool(1)
    torch.set_num_threads(1)


def runner(method):
    return lambda x: method.execute((x,))[0]


def share(tmp: str) -> dict:
    S = args.img_size
    torch.manual_seed(0)
    base = build_model(args.model, head="cls", num_classes=1000, img_size=S)
    with torch.no_grad():
        for m in base.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.2)
                m.running_var.uniform_(0.5, 2.0)
    task = copy.deepcopy(base)
    task.reset_classifier(100)
    apply_method(task, args.model, "petah", r=8, rc=2)
    with torch.no_grad():
        for p in task.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.02)
    task.eval()
    merged = merge_and_unload(copy.deepcopy(task)).eval()
    x = torch.randn(2, 3, S, S)
    limits = [int(v) for v in args.merge_up_to.split(",")]
    f = {k: os.path.join(tmp, k) for k in ("base.pte", "base.ptd")}
    f |= {f"task_{n}": os.path.join(tmp, f"task_{n}.pte") for n in limits}
    t0 = time.time()
    export_pte_base(base, x, f["base.pte"], data_path=f["base.ptd"])
    res = dict(model=args.model, img_size=S, lower_s=dict(base=round(time.time() - t0)), shared_tensors={})
    for n in limits:
        t0 = time.time()
        info = export_pte_task(task, x, f[f"task_{n}"], base=base, base_data_path=f["base.ptd"], merge_up_to=n)
        res["lower_s"][f"task_{n}"], res["shared_tensors"][f"task_{n}"] = round(time.time() - t0), info["shared"]
    size = {k: os.path.getsize(v) for k, v in f.items()}
    res["bytes"] = size
    res["task_over_base"] = {f"task_{n}": round(size[f"task_{n}"] / (size["base.ptd"] + size["base.pte"]), 4)
                             for n in limits}
    print(json.dumps(res), flush=True)

    one_thread()
    programs = {"base": load_pte(f["base.pte"], data_path=f["base.ptd"]),
                "base_again": load_pte(f["base.pte"], data_path=f["base.ptd"])}
    programs |= {f"task_{n}": load_pte(f[f"task_{n}"], data_path=f["base.ptd"]) for n in limits}
    with torch.no_grad():
        res["exact"] = {}
        for B in (1, 2):
            ref = merged(x[:B])
            res["exact"][f"b{B}"] = max(float((programs[f"task_{n}"].execute((x[:B],))[0] - ref).abs().max()
                                              / ref.abs().max()) for n in limits)
    times = round_robin({k: runner(m) for k, m in programs.items()}, x[:1], args.rounds)
    res["latency"] = dict(base_ms=round(1e3 * statistics.median(times["base"]), 2),
                          aa=paired(times, "base_again", "base"), rounds=args.rounds, calls=args.calls)
    for n in limits:
        res["latency"][f"task_{n}"] = dict(ms=round(1e3 * statistics.median(times[f"task_{n}"]), 2),
                                           over_base=paired(times, f"task_{n}", "base"))
    print(json.dumps(res), flush=True)
    del programs
    res["rss_mb"] = memory(f | {"task.pte": f[f"task_{limits[0]}"]})
    return res


MEMORY_CHILD = r"""
import sys, torch
from tasks.pte import load_pte
def rss():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))
pte, ptd, n, S = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
x = torch.randn(1, 3, S, S)
load_pte(pte, data_path=ptd).execute((x,))  # the runtime's own first-use allocations, then the baseline
start, held = rss(), []
for _ in range(n):
    held.append(load_pte(pte, data_path=ptd))
    held[-1].execute((x,))
print((rss() - start) / 2**20)
"""


def memory(f: dict) -> dict:
    """RSS growth (MB) of a fresh process that loads and runs n programs (after one load it then drops): n tasks
    on the one base.ptd, against n loads of the base program (each a full model, what a merged task costs)."""
    import subprocess

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = {}
    for kind, pte in (("tasks", f["task.pte"]), ("full_models", f["base.pte"])):
        for n in (1, 4, 8):
            r = subprocess.run([sys.executable, "-c", MEMORY_CHILD, pte, f["base.ptd"], str(n), str(args.img_size)],
                               cwd=root, capture_output=True, text=True, check=True)
            out[f"{kind}_{n}"] = round(float(r.stdout.strip().splitlines()[-1]), 1)
    return out


def int8(tmp: str) -> dict:
    from safetensors import safe_open
    from safetensors.torch import load_file

    from data import build_datasets
    from tasks.deploy import parse_json_meta

    path = os.path.join(args.int8, "merged.safetensors")
    with safe_open(path, "pt") as fh:
        meta = {k: parse_json_meta(fh.metadata(), k) for k in fh.metadata()}
    run_args = json.load(open(os.path.join(args.int8, "args.json")))
    S = int(meta["img_size"])
    net = build_model(meta["model"], head="cls", num_classes=int(meta["num_classes"]), img_size=S,
                      model_cfg=meta.get("model_cfg") or {})
    net.load_state_dict(load_file(path), strict=True)
    net.eval()
    a = run_args
    train, val = build_datasets(a["data"], a.get("data_root"), img_size=S, mean=meta["mean"], std=meta["std"],
                                crop_pct=meta.get("crop_pct", 0.95), interpolation=meta.get("interpolation", "bicubic"),
                                synthetic_cfg=dict(num_classes=a.get("synthetic_classes", 10),
                                                   train_per_class=a.get("synthetic_train", 200),
                                                   val_per_class=a.get("synthetic_val", 50),
                                                   test_per_class=a.get("synthetic_val", 50)))[:2]
    torch.manual_seed(0)  # the training split's random crops: the same calibration images every run
    calib = torch.stack([train[i][0] for i in range(min(args.calib, len(train)))])
    xs = torch.stack([val[i][0] for i in range(len(val))])
    ys = torch.tensor([val[i][1] for i in range(len(val))])
    f = {"fp32": os.path.join(tmp, "fp32.pte"), "int8": os.path.join(tmp, "int8.pte")}
    export_pte(net, xs[:8], f["fp32"], batch_sizes=(1, 8))
    export_pte(net, xs[:8], f["int8"], batch_sizes=(1, 8), quantize="int8", calibration=calib.split(8))
    one_thread()
    methods = {k: load_pte(v) for k, v in f.items()}
    with torch.no_grad():
        logits = {"pytorch": torch.cat([net(b) for b in xs.split(8)])}
        for k, m in methods.items():
            logits[k] = torch.cat([m.execute((b,))[0] for b in xs.split(8)])
    top1 = {k: round(100 * float((v.argmax(1) == ys).float().mean()), 2) for k, v in logits.items()}
    drift = float((logits["int8"] - logits["fp32"]).norm() / logits["fp32"].norm())
    changed = int((logits["int8"].argmax(1) != logits["fp32"].argmax(1)).sum())
    methods["int8_again"] = load_pte(f["int8"])
    times = round_robin({k: runner(m) for k, m in methods.items()}, xs[:1], args.rounds)
    return dict(run=args.int8, model=meta["model"], img_size=S, val_images=len(ys), calib_images=len(calib),
                top1=top1, predictions_changed=changed, logit_drift=round(drift, 4),
                bytes={k: os.path.getsize(v) for k, v in f.items()},
                latency=dict(fp32_ms=round(1e3 * statistics.median(times["fp32"]), 3),
                             int8_ms=round(1e3 * statistics.median(times["int8"]), 3),
                             int8_over_fp32=paired(times, "int8", "fp32"), aa=paired(times, "int8_again", "int8"),
                             rounds=args.rounds, calls=args.calls))


with tempfile.TemporaryDirectory() as tmp:
    result = int8(tmp) if args.int8 else share(tmp)
result.update(torch=torch.__version__, executorch=__import__("executorch.version").version.__version__,
              cpu_count=os.cpu_count(), finished=time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()))
out = args.out or os.path.join(os.path.dirname(os.path.abspath(__file__)),
                               "results_pte_int8.json" if args.int8 else "results_pte.json")
print(json.dumps(result, indent=1))
with open(out, "w") as fh:
    json.dump(result, fh, indent=1)
