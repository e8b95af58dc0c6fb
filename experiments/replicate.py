"""
A miniature of PETAH's classification tables (Tables 2, 3 and 5) that a 2-core CPU runs end to end.

    python experiments/replicate.py            # everything: 19 min on 2 idle cores; cached in experiments/cache/
    python experiments/replicate.py --quick    # smoke test of the whole pipeline (CI), under a minute

What it does, top to bottom:
  1. renders three synthetic downstream tasks (TASKS below) to PNG folders, once;
  2. "pretrains" a tiny EfficientFormer and a tiny ViT of similar size from scratch on a 64-class synthetic
     source task, prunes the EfficientFormer to 90% (global magnitude) and re-trains it on the source task
     with the mask kept (the stand-in for PETAH's 90% sparse EF L7), all cached;
  3. adapts every backbone to every task with every method of the tables: a small LR grid picked on the
     validation split, then 3 seeds of the picked setting evaluated on the test split (PETAH Appendix A);
  4. prints Tables 2, 3 and 5 (test accuracy mean +- std over the seeds per task, mean over tasks, #Params)
     and writes them, with every number behind them, to <cache>/tables.md and <cache>/results.json.

Every training run, pretraining included, IS train_cls.py: it is executed in-process (runpy) with a normal
command line, in a pool of worker processes, so the numbers come from exactly the code a user runs. The
exact command line of every run is in <cache>/runs/.../cmd.txt. Finished runs are cached: re-running the
script only trains what is missing (--redo-runs retrains the adaptation runs, keeping the pretraining).
"""

import argparse
import json
import math
import os
import platform
import runpy
import shlex
import shutil
import sys
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from contextlib import redirect_stderr, redirect_stdout
from dataclasses import dataclass, field
from multiprocessing import get_context

import torch
from tqdm import tqdm

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
TRAIN_CLS = os.path.join(REPO, "train_cls.py")

# -----------------------------------------------------------------------------
# the experiment, fixed before any result was looked at (see RESULTS.md)

IMG_SIZE = 64  # EfficientFormer needs a multiple of 32; at 64 its attention stage sees a 2x2 token grid
# A tiny EfficientFormer (same block types as L1: conv stem, Meta4D stages, stride-2 downsamples, one
# Meta3D attention block with the per-head fused qkv) and a tiny DeiT-III-style ViT of similar size.
BACKBONES = {
    "ef": dict(model="efl1", cfg=dict(depths=[1, 1, 2, 2], embed_dims=[16, 32, 64, 96], num_vit=1), pretrain_lr=0.002),
    "vit": dict(model="vits", cfg=dict(embed_dim=96, depth=4, num_heads=3, patch_size=16), pretrain_lr=0.001),
}
# The source ("ImageNet") task: SyntheticImages family 0, style 0, seed 0, 64 classes (train_cls --data synthetic).
SOURCE = dict(classes=64, train_per_class=150, val_per_class=10)
PRETRAIN = dict(epochs=6, batch_size=32, weight_decay=0.05, warmup_epochs=0.5)  # LR: BACKBONES[...]["pretrain_lr"]
SPARSE = dict(sparsity=0.9, epochs=3, batch_size=32, lr=0.001, weight_decay=0.05, warmup_epochs=0.5)

# Downstream tasks: SyntheticImages keyword arguments, and which source classes (label < keep) to keep.
TASKS = {
    # new classes of the same generator: family 1 draws new shape / texture / colour prototypes and new triples
    "new_classes": dict(num_classes=10, family=1, style=0, fine_grained=0, seed=101),
    # the source task's own classes 0..9 (family 0, defined among its 64 classes) re-rendered under style 1:
    # hues rotated, saturation/brightness rescaled, texture kinds permuted, texture frequency / sharpness
    # changed, busier background
    "restyled": dict(num_classes=SOURCE["classes"], keep=10, family=0, style=1, fine_grained=0, seed=102),
    # fine-grained: 2 groups x 5 classes; within a group shape, texture and colour are shared and only a small
    # mark at the object's centre (marker shape x colour) tells the classes apart
    "fine_grained": dict(num_classes=10, family=0, style=0, fine_grained=5, seed=103),
}
TASK_SPLITS = dict(train=20, val=15, test=40)  # images per class
ADAPT = dict(epochs=12, batch_size=16, warmup_epochs=1, weight_decay=0.0, eval_every=4)  # val: epochs 4, 8, 12
SEEDS = (0, 1, 2)

# Methods (rows of the tables): label, train_cls flags. The LR grids follow Appendix A in shape (a base LR
# for the head and a factor for the backbone / adapters), cut to two points per method to fit the budget.
METHODS = {
    "linear": ("Linear probing", ["--method", "linear"]),
    "attn": ("ATTN FT", ["--method", "attn"]),
    "full": ("Full FT", ["--method", "full"]),
    "lora": ("LoRA ATTN r=8", ["--method", "lora", "--r", "8"]),
    "lora_mlp": ("LoRA ATTN+MLP r=8", ["--method", "lora_mlp", "--r", "8"]),
    "petah1": ("PETAH-1", ["--method", "petah", "--r", "8", "--rc", "1"]),
    "petah2": ("PETAH-2", ["--method", "petah", "--r", "8", "--rc", "2"]),
    "ia3": ("(IA)^3", ["--method", "ia3"]),
}
GRIDS = {  # method -> list of (head LR, LR factor of the backbone (full/attn) or of the adapters (PEFT))
    "linear": [(0.01, 1.0), (0.05, 1.0)],
    "attn": [(0.005, 0.1), (0.005, 1.0)],
    "full": [(0.005, 0.1), (0.005, 1.0)],
    "peft": [(0.005, 1.0), (0.005, 5.0)],
}
EXPERIMENTS = {  # backbone key -> (pretrained weights, methods); "ef_sparse" is the 90% sparse EF
    "ef": ["linear", "attn", "full", "lora", "lora_mlp", "petah1", "petah2", "ia3"],
    "vit": ["linear", "attn", "full", "lora"],
    "ef_sparse": ["linear", "attn", "full", "lora", "petah1", "petah2"],
}
TABLES = [  # title, [(backbone, [methods])]
    ("Table 2 (ablation): which layers of the EfficientFormer to adapt",
     [("ef", ["linear", "lora", "lora_mlp", "petah1", "petah2"])]),
    ("Table 3: all methods, tiny EfficientFormer vs tiny ViT",
     [("ef", EXPERIMENTS["ef"]), ("vit", EXPERIMENTS["vit"])]),
    ("Table 5: 90% sparse EfficientFormer (full / attn keep the mask)",
     [("ef_sparse", EXPERIMENTS["ef_sparse"])]),
]
NAMES = {"ef": "tiny EF", "vit": "tiny ViT", "ef_sparse": "tiny EF-0.9"}


def quick_config():
    """--quick: the same pipeline at toy sizes (CI smoke test; the numbers mean nothing)."""
    global IMG_SIZE, SOURCE, PRETRAIN, SPARSE, TASK_SPLITS, ADAPT, SEEDS, GRIDS
    IMG_SIZE = 32
    SOURCE = dict(classes=SOURCE["classes"], train_per_class=1, val_per_class=1)
    PRETRAIN = dict(PRETRAIN, epochs=1, batch_size=32, warmup_epochs=0)
    SPARSE = dict(SPARSE, epochs=1, batch_size=32, warmup_epochs=0)
    TASK_SPLITS = dict(train=2, val=1, test=1)
    ADAPT = dict(ADAPT, epochs=1, batch_size=10, warmup_epochs=0)
    SEEDS = (0, 1)
    GRIDS = {k: v[:1] for k, v in GRIDS.items()}


# -----------------------------------------------------------------------------
# configuration

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--quick", action="store_true", help="toy sizes, 1 epoch, 2 seeds: checks the pipeline (CI)")
parser.add_argument("--cache-dir", default=None,
                    help="where tasks, pretrained backbones, runs and tables go; default experiments/cache/full "
                         "(experiments/cache/quick with --quick)")
parser.add_argument("--jobs", type=int, default=2, help="worker processes (one thread each); default 2")
parser.add_argument("--redo-runs", action="store_true",
                    help="delete the cached adaptation runs first (keeps tasks and pretrained backbones)")
parser.add_argument("--only", default=None, metavar="BACKBONES",
                    help="comma-separated subset of " + ",".join(EXPERIMENTS) + " (default: all)")
parser.add_argument("--methods", default=None, metavar="METHODS",
                    help="comma-separated subset of the table rows " + ",".join(METHODS) + " (default: all)")
parser.add_argument("--epochs", type=int, default=None,
                    help=f"adaptation epochs (default {ADAPT['epochs']}); another value keeps its runs and tables "
                         "apart: <cache>/runs_e<N>/, tables_e<N>.md, results_e<N>.json")
RUNS = "runs"  # sub-folder of the cache with the adaptation runs (runs_e<N> for --epochs N)


# -----------------------------------------------------------------------------
# downstream tasks as PNG folders: ROOT/{train,val,test}/<class>/<n>.png (train_cls --data folder)

def render_task(name: str, root: str) -> None:
    from torchvision.io import write_png

    from data import SyntheticImages
    if os.path.exists(os.path.join(root, "done.json")):
        return
    spec = dict(TASKS[name])
    keep = spec.pop("keep", spec["num_classes"])
    for split, per_class in TASK_SPLITS.items():
        ds = SyntheticImages(split=split, samples_per_class=per_class, image_size=IMG_SIZE, **spec)
        for c in range(keep):
            d = os.path.join(root, split, f"c{c:02d}_{ds.classes[c]}")
            os.makedirs(d, exist_ok=True)
            for k in range(per_class):  # label = index % num_classes
                image, label = ds.render(k * ds.num_classes + c)
                assert label == c
                write_png((image * 255).round().to(torch.uint8), os.path.join(d, f"{k:03d}.png"))
    with open(os.path.join(root, "done.json"), "w") as f:
        json.dump(dict(TASKS[name], splits=TASK_SPLITS, img_size=IMG_SIZE), f)


# -----------------------------------------------------------------------------
# one train_cls.py run, in a worker process

def _init_worker():
    torch.set_num_threads(1)  # one core per worker; --jobs workers share the machine


def run_train_cls(argv: list[str], out: str, keep: tuple[str, ...] = ()) -> dict:
    """Execute train_cls.py with `argv` in this process; return its summary line (cached in OUT/log.jsonl)."""
    summary = read_summary(out)
    if summary is not None:
        return summary
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "cmd.txt"), "w") as f:
        f.write(shlex.join(["python", "train_cls.py", *argv]) + "\n")
    t0 = time.time()
    old_argv = sys.argv
    sys.argv = [TRAIN_CLS, *argv]
    try:
        with open(os.path.join(out, "train.log"), "w") as f, redirect_stdout(f), redirect_stderr(f):
            runpy.run_path(TRAIN_CLS, run_name="__main__")
    except SystemExit as e:  # argparse errors, the NaN guard
        if e.code not in (0, None):
            raise RuntimeError(f"train_cls.py failed (exit {e.code}); see {out}/train.log") from None
    finally:
        sys.argv = old_argv
    summary = read_summary(out)
    if summary is None:
        raise RuntimeError(f"train_cls.py wrote no summary; see {out}/train.log")
    # keep the record (log.jsonl, args.json, cmd.txt, train.log), drop the weights unless asked to keep them
    shutil.rmtree(os.path.join(out, "ckpt"), ignore_errors=True)
    for f in ("merged.safetensors", "merged_masked.safetensors", "masks.safetensors"):
        if f not in keep and os.path.exists(os.path.join(out, f)):
            os.remove(os.path.join(out, f))
    with open(os.path.join(out, "time.json"), "w") as f:
        json.dump(dict(seconds=round(time.time() - t0, 2)), f)
    return summary


def read_summary(out: str) -> dict | None:
    path = os.path.join(out, "log.jsonl")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        lines = [json.loads(line) for line in f if line.strip()]
    return lines[-1] if lines and lines[-1].get("summary") else None


def prune_backbone(dense: str, masks_path: str) -> dict:
    """Global magnitude pruning of the pretrained EF (heads excluded) -> mask file."""
    from methods.sparse import magnitude_prune, save_masks, sparsity_report
    from models import create_model, load_pretrained
    spec = BACKBONES["ef"]
    model = create_model(spec["model"], num_classes=SOURCE["classes"], img_size=IMG_SIZE, **spec["cfg"])
    load_pretrained(model, dense, verbose=False)
    masks = magnitude_prune(model, SPARSE["sparsity"])
    save_masks(masks, masks_path)
    return sparsity_report(model, masks)["total"]


# -----------------------------------------------------------------------------
# the job graph: pretraining -> (pruning -> sparse re-training) -> LR grid -> seeds

@dataclass
class Job:
    key: str
    deps: list = field(default_factory=list)
    argv: object = None     # list, or a function (results so far) -> list, called when the deps are done
    out: str = ""
    keep: tuple = ()
    local: object = None    # run in the main process instead: a function (results) -> dict
    desc: str = ""
    cached: bool = False


def common_model_args(backbone: str) -> list[str]:
    spec = BACKBONES["ef" if backbone.startswith("ef") else "vit"]
    return ["--model", spec["model"], "--model-cfg", json.dumps(spec["cfg"]), "--img-size", str(IMG_SIZE),
            "--workers", "0", "--device", "cpu"]


def build_jobs(cache: str, backbones: list[str]) -> list[Job]:
    jobs, pre = [], os.path.join(cache, "pretrain")
    src = ["--data", "synthetic", "--synthetic-classes", str(SOURCE["classes"]),
           "--synthetic-train", str(SOURCE["train_per_class"]), "--synthetic-val", str(SOURCE["val_per_class"])]

    def opt(cfg):
        return ["--epochs", str(cfg["epochs"]), "--batch-size", str(cfg["batch_size"]), "--lr", str(cfg["lr"]),
                "--weight-decay", str(cfg["weight_decay"]), "--warmup-epochs", str(cfg["warmup_epochs"]),
                "--eval-every", str(cfg.get("eval_every", 1))]

    weights = {}
    for b in ("vit", "ef"):  # the ViT is slower: start it first
        if b in backbones or (b == "ef" and "ef_sparse" in backbones):
            out = os.path.join(pre, b)
            jobs.append(Job(f"pretrain:{b}", out=out, keep=("merged.safetensors",), desc=f"pretrain {b}",
                            argv=common_model_args(b) + ["--method", "full", "--seed", "0"] + src
                            + opt(dict(PRETRAIN, lr=BACKBONES[b]["pretrain_lr"]))
                            + ["--out", out]))
            weights[b] = (f"pretrain:{b}", os.path.join(out, "merged.safetensors"))
    masks = os.path.join(pre, "ef_sparse_masks.safetensors")
    if "ef_sparse" in backbones:
        jobs.append(Job("prune:ef", deps=["pretrain:ef"], desc="prune ef",
                        local=lambda res: prune_backbone(weights["ef"][1], masks)))
        out = os.path.join(pre, "ef_sparse")
        jobs.append(Job("pretrain:ef_sparse", deps=["prune:ef"], out=out, keep=("merged.safetensors",),
                        desc="re-train sparse ef",
                        argv=common_model_args("ef") + ["--method", "full", "--seed", "0", "--weights",
                                                        weights["ef"][1], "--mask", masks] + src + opt(SPARSE)
                        + ["--out", out]))
        weights["ef_sparse"] = ("pretrain:ef_sparse", os.path.join(out, "merged.safetensors"))

    for b in backbones:
        dep, w = weights[b]
        extra = ["--mask", masks] if b == "ef_sparse" else []
        for t in TASKS:
            data = ["--data", "folder", "--data-root", os.path.join(cache, "tasks", t)]
            for m in EXPERIMENTS[b]:
                grid = grid_of(m)
                flag = "--backbone-lr-factor" if m in ("full", "attn") else "--adapter-lr-factor"

                def argv(lr, factor, seed, out, m=m, flag=flag, data=data, w=w, extra=extra, b=b):
                    return (common_model_args(b) + METHODS[m][1] + ["--weights", w] + extra + data
                            + [flag, str(factor), "--seed", str(seed)] + opt(dict(ADAPT, lr=lr))
                            + ["--out", out])

                run_dir = os.path.join(cache, RUNS, b, t, m)
                grid_keys = []
                for lr, factor in grid:
                    out = os.path.join(run_dir, f"lr{lr}_f{factor}_s{SEEDS[0]}")
                    key = grid_key(b, t, m, lr, factor)
                    jobs.append(Job(key, deps=[dep], out=out, argv=argv(lr, factor, SEEDS[0], out), desc=key))
                    grid_keys.append(key)
                for seed in SEEDS[1:]:
                    def seed_argv(res, grid_keys=grid_keys, seed=seed, argv=argv, run_dir=run_dir):
                        lr, factor = best_setting(res, grid_keys)
                        out = os.path.join(run_dir, f"lr{lr}_f{factor}_s{seed}")
                        return argv(lr, factor, seed, out), out
                    jobs.append(Job(f"{b}/{t}/{m}/best/s{seed}", deps=grid_keys, argv=seed_argv,
                                    desc=f"{b}/{t}/{m}/s{seed}"))
    return jobs


def grid_of(method: str) -> list[tuple[float, float]]:
    return GRIDS.get(method, GRIDS["peft"])


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    mean = sum(values) / len(values)
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / max(len(values) - 1, 1))


def grid_key(backbone: str, task: str, method: str, lr: float, factor: float) -> str:
    return f"{backbone}/{task}/{method}/lr{lr}_f{factor}/s{SEEDS[0]}"


def best_setting(results: dict, grid_keys: list[str]) -> tuple[float, float]:
    """The grid point with the best final VALIDATION accuracy (ties: the first listed)."""
    best = max(grid_keys, key=lambda k: (results[k]["eval_acc"], -grid_keys.index(k)))
    return results[best]["lr"], results[best]["factor"]


def _parse_setting(argv: list[str]) -> tuple[float, float]:
    lr = float(argv[argv.index("--lr") + 1])
    flag = "--backbone-lr-factor" if "--backbone-lr-factor" in argv else "--adapter-lr-factor"
    return lr, float(argv[argv.index(flag) + 1])


def run_jobs(jobs: list[Job], workers: int) -> dict:
    """Run the job graph on a pool of `workers` processes, a job as soon as its dependencies are done."""
    results, pending, running = {}, list(jobs), {}
    # a bar on a terminal; in a log file one plain line per finished run (tqdm's carriage-return frames would fill it)
    tty = sys.stderr.isatty()
    pbar = tqdm(total=len(jobs), desc="runs", dynamic_ncols=True, disable=not tty)
    with ProcessPoolExecutor(max_workers=workers, mp_context=get_context("spawn"), initializer=_init_worker) as pool:
        while pending or running:
            for job in [j for j in pending if all(d in results for d in j.deps)]:
                if job.local is not None:
                    results[job.key] = job.local(results)
                    pending.remove(job)
                    pbar.update(1)
                    continue
                if len(running) >= 2 * workers:
                    break
                argv, out = (job.argv, job.out) if isinstance(job.argv, list) else job.argv(results)
                job.out = out
                job.cached = read_summary(out) is not None  # finished in an earlier call: only read back
                running[pool.submit(run_train_cls, argv, out, job.keep)] = (job, argv)
                pending.remove(job)
            if not running:
                continue
            done, _ = wait(running, timeout=10, return_when=FIRST_COMPLETED)
            for fut in done:
                job, argv = running.pop(fut)
                summary = fut.result()  # a failed run stops everything, with the path of its log
                lr, factor = _parse_setting(argv) if not job.key.startswith("pretrain") else (None, None)
                results[job.key] = dict(summary, lr=lr, factor=factor, out=job.out, cached=job.cached,
                                        seconds=json.load(open(os.path.join(job.out, "time.json")))["seconds"]
                                        if os.path.exists(os.path.join(job.out, "time.json")) else None)
                pbar.update(1)
                if not tty:
                    print(f"runs: {len(results)}/{len(jobs)} done ({job.key}{', cached' if job.cached else ''})",
                          file=sys.stderr, flush=True)
            # long pretraining runs: show their epoch in the bar
            status = [f"{j.desc}: epoch {_epochs_done(j.out)}" for j, _ in running.values()
                      if j.key.startswith("pretrain")]
            pbar.set_postfix_str("; ".join(status))
    pbar.close()
    return results


def _epochs_done(out: str) -> int:
    try:
        with open(os.path.join(out, "log.jsonl")) as f:
            return sum(1 for _ in f)
    except FileNotFoundError:
        return 0


# -----------------------------------------------------------------------------
# tables

def trainable_nonzero(backbone: str, method: str, masks_path: str) -> int:
    """#Params of full / attn FT on the sparse backbone: the trainable non-zero weights (outside the head)."""
    from methods import apply_method
    from methods.sparse import load_masks
    from models import create_model
    spec = BACKBONES["ef"]
    model = create_model(spec["model"], num_classes=10, img_size=IMG_SIZE, **spec["cfg"])
    apply_method(model, spec["model"], METHODS[method][1][1])
    masks = load_masks(masks_path)
    return sum(int(masks[n].sum()) if n in masks else p.numel() for n, p in model.named_parameters()
               if p.requires_grad and not n.startswith(("head.", "head_dist.")))


def collect(results: dict, cache: str, backbones: list[str]) -> dict:
    rows = {}
    for b in backbones:
        for m in EXPERIMENTS[b]:
            per_task, params = {}, None
            for t in TASKS:
                grid_keys = [grid_key(b, t, m, lr, f) for lr, f in grid_of(m)]  # GRIDS order
                lr, factor = best_setting(results, grid_keys)  # the same choice the seed runs were started with
                seeds = [results[grid_key(b, t, m, lr, factor)]] + [results[f"{b}/{t}/{m}/best/s{s}"]
                                                                     for s in SEEDS[1:]]
                if any((r["lr"], r["factor"]) != (lr, factor) for r in seeds):
                    raise RuntimeError(f"{b}/{t}/{m}: the seed runs used another grid point than {lr} x {factor}")
                accs = [100 * r["test_acc"] for r in seeds]
                mean, std = mean_std(accs)
                per_task[t] = dict(mean=mean, std=std, accs=accs, lr=lr, factor=factor,
                                   val=[100 * r["eval_acc"] for r in seeds][0],
                                   grid={k.split("/")[3]: 100 * results[k]["eval_acc"] for k in grid_keys})
                params = seeds[0]["adapter_params"]
            if b == "ef_sparse" and m in ("full", "attn"):
                params = trainable_nonzero(b, m, os.path.join(cache, "pretrain", "ef_sparse_masks.safetensors"))
            if m == "linear":
                params = 0
            rows[f"{b}/{m}"] = dict(tasks=per_task, mean=sum(v["mean"] for v in per_task.values()) / len(per_task),
                                    params=params)
    return rows


def fmt_params(n: int) -> str:
    return "0" if n == 0 else f"{n / 1e3:.1f}K" if n < 1e6 else f"{n / 1e6:.2f}M"


def make_tables(rows: dict, backbones: list[str]) -> str:
    lines = []
    for title, groups in TABLES:
        groups = [(b, ms) for b, ms in groups if b in backbones]
        if not groups:
            continue
        lines += [f"### {title}", "", "| Backbone | Method | " + " | ".join(TASKS) + " | Mean | #Params |",
                  "|---|---|" + "---|" * (len(TASKS) + 2)]
        for b, ms in groups:
            for m in [m for m in ms if f"{b}/{m}" in rows]:
                r = rows[f"{b}/{m}"]
                cells = [f"{r['tasks'][t]['mean']:.2f} ± {r['tasks'][t]['std']:.2f}" for t in TASKS]
                lines.append(f"| {NAMES[b]} | {METHODS[m][0]} | " + " | ".join(cells)
                             + f" | {r['mean']:.2f} | {fmt_params(r['params'])} |")
        lines.append("")
    return "\n".join(lines)


def seed_means(row: dict) -> list[float]:
    """The mean over tasks of each seed (seeds are paired across tasks by their index)."""
    return [sum(row["tasks"][t]["accs"][i] for t in TASKS) / len(TASKS) for i in range(len(SEEDS))]


def claims(rows: dict) -> str:
    """The paper's ordering (RESULTS.md, fixed in advance), checked on the mean over tasks. A difference counts
    only when it exceeds the spread of the seeds: 'yes' if higher by more than the larger seed std of the two
    rows, 'no' if lower by more than that, 'tie' otherwise."""
    def above(a, b):  # "a above b"
        if a not in rows or b not in rows:
            return None
        (ma, sa), (mb, sb) = mean_std(seed_means(rows[a])), mean_std(seed_means(rows[b]))
        d, tol = ma - mb, max(sa, sb)
        verdict = "yes" if d > tol else "no" if d < -tol else "tie"
        return f"| {NAMES[a.split('/')[0]]} {METHODS[a.split('/')[1]][0]} > {NAMES[b.split('/')[0]]} " \
               f"{METHODS[b.split('/')[1]][0]} | {ma:.2f} ± {sa:.2f} | {mb:.2f} ± {sb:.2f} | {d:+.2f} | {verdict} |"

    pairs = [("ef/petah2", "ef/petah1"), ("ef/petah1", "ef/lora"), ("ef/petah2", "ef/lora"),
             ("ef/petah2", "ef/lora_mlp"), ("ef/lora", "ef/linear"), ("ef/lora_mlp", "ef/linear"),
             ("ef/petah2", "ef/attn"), ("ef/petah2", "ef/full"), ("ef/petah2", "ef/ia3"),
             ("ef/petah2", "vit/lora"), ("ef_sparse/petah2", "ef_sparse/full"), ("ef_sparse/petah1", "ef_sparse/full"),
             ("ef_sparse/petah2", "ef_sparse/lora")]
    lines = ["| claim (mean over tasks) | left | right | difference | holds? |", "|---|---|---|---|---|"]
    lines += [x for x in (above(a, b) for a, b in pairs) if x]
    if "ef/petah2" in rows and "ef/lora" in rows:
        gains = {t: rows["ef/petah2"]["tasks"][t]["mean"] - rows["ef/lora"]["tasks"][t]["mean"] for t in TASKS}
        lines += ["", "PETAH-2 minus LoRA ATTN on the tiny EF, per task (expected largest on restyled and "
                  "fine_grained, smallest on new_classes): " + ", ".join(f"{t} {g:+.2f}" for t, g in gains.items())]
    return "\n".join(lines) + "\n"


def settings_table(rows: dict) -> str:
    """Which grid point the validation split picked, per row and task: head LR x factor (the validation
    accuracy of each grid point, seed 0, in GRIDS order)."""
    lines = ["| Backbone | Method | grid (GRIDS) | " + " | ".join(TASKS) + " |", "|---|---|---|" + "---|" * len(TASKS)]
    for key, r in rows.items():
        b, m = key.split("/")
        cells = []
        for t in TASKS:
            c = r["tasks"][t]
            grid = " / ".join(f"{v:.1f}" for v in c["grid"].values())
            cells.append(f"{c['lr']:g} x {c['factor']:g} ({grid})")
        grid = " / ".join(f"{lr:g} x {f:g}" for lr, f in grid_of(m))
        lines.append(f"| {NAMES[b]} | {METHODS[m][0]} | {grid} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def machine() -> str:
    cpu = platform.processor() or "?"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}, Python {platform.python_version()}"


# -----------------------------------------------------------------------------

def main():
    global RUNS
    args = parser.parse_args()
    if args.quick:
        quick_config()
    suffix = ""
    if args.epochs is not None and args.epochs != ADAPT["epochs"]:
        ADAPT["epochs"], suffix = args.epochs, f"_e{args.epochs}"
        RUNS = "runs" + suffix
    if args.methods is not None:
        unknown = [m for m in args.methods.split(",") if m not in METHODS]
        if unknown:
            parser.error(f"--methods: unknown method(s) {unknown}; choose from {list(METHODS)}")
        for b in EXPERIMENTS:
            EXPERIMENTS[b] = [m for m in EXPERIMENTS[b] if m in args.methods.split(",")]
    cache = args.cache_dir or os.path.join(REPO, "experiments", "cache", "quick" if args.quick else "full")
    backbones = list(EXPERIMENTS) if args.only is None else args.only.split(",")
    unknown = [b for b in backbones if b not in EXPERIMENTS]
    if unknown:
        parser.error(f"--only: unknown backbone(s) {unknown}; choose from {list(EXPERIMENTS)}")
    if args.redo_runs:
        shutil.rmtree(os.path.join(cache, RUNS), ignore_errors=True)
    t0 = time.time()
    for t in TASKS:
        render_task(t, os.path.join(cache, "tasks", t))
    jobs = build_jobs(cache, backbones)
    results = run_jobs(jobs, args.jobs)
    rows = collect(results, cache, backbones)
    tables = make_tables(rows, backbones)
    tables += "\n### Does the paper's ordering hold?\n\n" + claims(rows)
    tables += "\n### LR settings picked on the validation split\n\n" + settings_table(rows)
    wall = time.time() - t0
    ran = {k: r for k, r in results.items() if "seconds" in r and not r["cached"]}  # trained in this call
    pre_s = sum(r["seconds"] or 0 for k, r in ran.items() if k.startswith("pretrain"))
    adapt_s = sum(r["seconds"] or 0 for k, r in ran.items() if not k.startswith("pretrain"))
    info = dict(command=shlex.join(["python", "experiments/replicate.py", *sys.argv[1:]]), wall_seconds=round(wall, 1),
                machine=machine(), jobs=args.jobs, quick=args.quick,
                pretrain={k: {kk: v[kk] for kk in ("eval_acc", "seconds", "adapter_params", "total_params",
                                                   "nonzero_params") if kk in v}
                          for k, v in results.items() if k.startswith(("pretrain", "prune"))},
                pretrain_seconds_this_call=round(pre_s, 1), adapt_seconds_this_call=round(adapt_s, 1),
                runs_this_call=len(ran), runs_cached=sum(1 for r in results.values() if r.get("cached")))
    with open(os.path.join(cache, f"results{suffix}.json"), "w") as f:
        json.dump(dict(info=info, rows=rows, runs=results), f, indent=1)
    header = (f"{info['command']}: {wall / 60:.1f} min wall on {info['machine']} with {args.jobs} workers; "
              f"{len(ran)} runs trained in this call ({pre_s / 60:.1f} min of worker time pretraining, "
              f"{adapt_s / 60:.1f} min adapting), {info['runs_cached']} read from the cache\n")
    with open(os.path.join(cache, f"tables{suffix}.md"), "w") as f:
        f.write(header + "\n" + tables)
    print("\n" + header)
    print(tables)


if __name__ == "__main__":
    main()
