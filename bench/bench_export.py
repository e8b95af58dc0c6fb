r"""
Deployment numbers (BENCHMARKS.md, "Deployment"): onnxruntime latency at batch 1 and throughput at batch 16 of
an exported task next to the exported base model, with and without BatchNorm folding, and the unmerged PyTorch
model next to the merged ONNX one, for EF-L1/L3/L7 and ViT-S/B.

    OMP_NUM_THREADS=1 python bench/bench_export.py                       # every model, ~10 min on 1 core
    OMP_NUM_THREADS=1 python bench/bench_export.py --models efl1 --repeats 5

Per model (random weights with random BatchNorm statistics: timing and structure do not depend on the values):
    base          the base model with a 100-class head, exported (deploy.export_onnx, as export.py does)
    task          a PETAH-2 task (LoRA r 8 + conv-LoRA rc 2; ViT: LoRA r 8) with random adapters, merged and exported
    base / task folded   the same with every BatchNorm folded into its conv (EfficientFormer only)
    PyTorch unmerged     the adapted model as trained, eager, adapters active
The claim under test: the exported task IS the base graph. Structurally (same ONNX op types and counts) and in
time: task / base latency within the A/A band, the spread of base / base ratios of two sessions on one file.
All variants of a model are timed round-robin (one call each per round, the order rotated between rounds), so a
load change on the shared machine hits them alike; times are medians over rounds, ratios medians of the per-round
ratios. onnxruntime and PyTorch use the same thread count. By default the clock is this process's CPU time
(`--clock cpu`, with 1 thread what the call itself costs, little moved by other jobs on the machine); `--clock wall`
for wall time.
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

CLOCKS = {"cpu": time.process_time, "wall": time.perf_counter}

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from lora import merge_and_unload  # noqa: E402
from methods import apply_method  # noqa: E402
from models import create_model  # noqa: E402
from tasks.deploy import export_onnx, fold_all_bn, onnx_op_counts  # noqa: E402

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--models", default="efl1,efl3,efl7,vits,vitb", help="comma-separated; default all five")
parser.add_argument("--img-size", type=int, default=224)
parser.add_argument("--repeats", type=int, default=9, help="rounds at batch 1 (median); default 9")
parser.add_argument("--repeats16", type=int, default=3, help="rounds at batch 16 (median); default 3")
parser.add_argument("--threads", type=int, default=None, help="default: torch.get_num_threads() (OMP_NUM_THREADS)")
parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results_export.json"))
parser.add_argument("--clock", default="cpu", choices=("cpu", "wall"),
                    help="cpu: this process's CPU time per call (default; 1 thread, a shared machine), wall: wall time")
parser.add_argument("--table", action="store_true", help="print BENCHMARKS.md's tables from --out and exit")
args = parser.parse_args()


def tables(res: dict) -> str:
    """The markdown tables of BENCHMARKS.md, "Deployment", from a results file."""
    lines = ["| model | ONNX nodes (base = task) | file MB | b1 base ms | b1 task / base | b1 A/A (rounds) | "
             "b16 base img/s | b16 task / base | b16 A/A (rounds) |", "|---|---|---|---|---|---|---|---|---|"]
    for name, r in res["models"].items():
        b1, b16 = r["b1"], r["b16"]
        same = "yes" if all(r["same_graph"].values()) else "NO"
        lines.append(f"| {name} | {r['onnx_nodes']['base']} ({same}) | {r['size_mb']['base']} | {b1['ms']['base']} | "
                     f"{b1['task_over_base']} ({b1['task_over_base_rounds'][0]}-{b1['task_over_base_rounds'][1]}) | "
                     f"{b1['aa_ratio']} ({b1['aa_band'][0]}-{b1['aa_band'][1]}) | {b16['img_per_s']['base']} | "
                     f"{b16['task_over_base']} ({b16['task_over_base_rounds'][0]}-{b16['task_over_base_rounds'][1]}) "
                     f"| {b16['aa_ratio']} ({b16['aa_band'][0]}-{b16['aa_band'][1]}) |")
    lines += ["", "| model | BN-folded / not, b1 | b16 | PyTorch unmerged b1 ms | PyTorch merged b1 ms | "
              "ONNX task b1 ms | unmerged PyTorch / ONNX task, b1 | b16 |", "|---|---|---|---|---|---|---|---|"]
    for name, r in res["models"].items():
        b1, b16 = r["b1"], r["b16"]
        fold1 = b1["folded_over_unfolded"] if b1["folded_over_unfolded"] is not None else "-"
        fold16 = b16["folded_over_unfolded"] if b16["folded_over_unfolded"] is not None else "-"
        lines.append(f"| {name} | {fold1} | {fold16} | {b1['ms']['pytorch_unmerged']} | {b1['ms']['pytorch_merged']} | "
                     f"{b1['ms']['task']} | {b1['pytorch_unmerged_over_onnx_task']} | "
                     f"{b16['pytorch_unmerged_over_onnx_task']} |")
    return "\n".join(lines)


if args.table:
    with open(args.out) as f:
        print(tables(json.load(f)))
    sys.exit(0)

import onnxruntime as ort  # noqa: E402  (after argparse: --help works without it)

threads = args.threads or torch.get_num_threads()
torch.set_num_threads(threads)
S = args.img_size


def random_model(name):
    torch.manual_seed(0)
    m = create_model(name, num_classes=100, img_size=S)
    with torch.no_grad():
        for mod in m.modules():
            if isinstance(mod, torch.nn.BatchNorm2d):
                mod.running_mean.normal_(0, 0.2)
                mod.running_var.uniform_(0.5, 2.0)
    return m.eval()


def session(path):
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    s = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
    return lambda x: s.run(None, {"image": x})[0]


def round_robin(fns: dict, x, rounds: int, clock=time.perf_counter) -> tuple[dict, dict]:
    """Median seconds per call of each fn, and every round's times: one call each per round, the order rotated
    from round to round (the first call of a round is often slower), after one warm-up round. clock: wall time
    (perf_counter) or this process's CPU time (process_time: on a shared machine, what the call itself cost)."""
    times, keys = {k: [] for k in fns}, list(fns)
    for r in range(rounds + 1):
        for k in keys[r % len(keys):] + keys[:r % len(keys)]:
            t0 = clock()
            fns[k](x)
            if r:
                times[k].append(clock() - t0)
    return {k: statistics.median(v) for k, v in times.items()}, times


def paired(times: dict, a: str, b: str) -> tuple[float, list[float]]:
    """Median and range of the per-round ratios a / b (both timed in the same round)."""
    ratios = [x / y for x, y in zip(times[a], times[b])]
    return round(statistics.median(ratios), 3), [round(min(ratios), 3), round(max(ratios), 3)]


results = dict(clock=args.clock, threads=threads, img_size=S, cpu_count=os.cpu_count(), torch=torch.__version__,
               onnxruntime=ort.__version__, started=time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()), models={})
t_start = time.time()
with tempfile.TemporaryDirectory() as tmp:
    for name in args.models.split(","):
        t_model = time.time()
        ef = name.startswith("ef")
        base = random_model(name)
        adapted = copy.deepcopy(base)
        apply_method(adapted, name, "petah" if ef else "lora", r=8, rc=2)
        with torch.no_grad():
            for n, p in adapted.named_parameters():
                if n.endswith("lora_B"):
                    p.normal_(0, 0.02)
        adapted.eval().requires_grad_(False)
        task = merge_and_unload(copy.deepcopy(adapted))
        nets = {"base": base, "task": task}
        if ef:
            nets["base_folded"] = copy.deepcopy(base)
            nets["task_folded"] = copy.deepcopy(task)
            fold_all_bn(nets["base_folded"])
            fold_all_bn(nets["task_folded"])
        x2 = torch.randn(2, 3, S, S)
        files = {}
        for k, net in nets.items():
            files[k] = os.path.join(tmp, f"{name}_{k}.onnx")
            t0 = time.time()
            export_onnx(net, x2, files[k])
            print(f"{name} {k}: exported in {time.time() - t0:.0f} s", flush=True)
        ops = {k: onnx_op_counts(f) for k, f in files.items()}
        same = {"task == base": ops["task"] == ops["base"]}
        if ef:
            same["task_folded == base_folded"] = ops["task_folded"] == ops["base_folded"]
        sess = {k: session(f) for k, f in files.items()}
        sess["base_again"] = session(files["base"])  # A/A: a second session on the same file
        row = dict(onnx_nodes={k: sum(v.values()) for k, v in ops.items()}, same_graph=same,
                   bn_nodes={k: v.get("BatchNormalization", 0) for k, v in ops.items()},
                   size_mb={k: round(os.path.getsize(f) / 2**20, 2) for k, f in files.items()})

        def pytorch(net):
            def fn(x):
                with torch.no_grad():
                    return net(torch.from_numpy(x))
            return fn

        for B, rounds in ((1, args.repeats), (16, args.repeats16)):
            x = torch.randn(B, 3, S, S).numpy()
            fns = {**sess, "pytorch_unmerged": pytorch(adapted), "pytorch_merged": pytorch(task)}
            if B > 1:  # the slow batch: what the table needs (task vs base, A/A, folded, unmerged PyTorch) only
                fns = {k: v for k, v in fns.items() if k not in ("task_folded", "pytorch_merged")}
            med, raw = round_robin(fns, x, rounds, clock=CLOCKS[args.clock])
            aa, aa_band = paired(raw, "base_again", "base")  # A/A: two sessions on one file
            tb, tb_band = paired(raw, "task", "base")
            row[f"b{B}"] = dict(ms={k: round(1e3 * v, 2) for k, v in med.items()},
                                img_per_s={k: round(B / v, 1) for k, v in med.items()},
                                aa_ratio=aa, aa_band=aa_band, task_over_base=tb, task_over_base_rounds=tb_band,
                                folded_over_unfolded=paired(raw, "base_folded", "base")[0] if ef else None,
                                pytorch_unmerged_over_onnx_task=paired(raw, "pytorch_unmerged", "task")[0])
            print(f"{name} batch {B}: " + ", ".join(f"{k} {1e3 * v:.1f} ms" for k, v in med.items())
                  + f"; task/base {row[f'b{B}']['task_over_base']}, A/A {row[f'b{B}']['aa_ratio']} "
                  f"(rounds {row[f'b{B}']['aa_band']})", flush=True)
        row["seconds"] = round(time.time() - t_model)
        results["models"][name] = row
        print(json.dumps({name: row}), flush=True)
results["seconds"] = round(time.time() - t_start)
with open(args.out, "w") as f:
    json.dump(results, f, indent=1)
print(tables(results))
print(f"wrote {args.out} ({results['seconds']} s)")
