"""One backbone, many tasks: switch time, resident memory, mixed-batch speed and storage of tasks.bank.TaskBank.

    .venv/bin/python bench/bench_multitask.py switch  --model efl7 --img-size 224       # select() times, memory
    .venv/bin/python bench/bench_multitask.py mixed   --model efl1 --batch 16 --repeats 3   # images/s ratios
    .venv/bin/python bench/bench_multitask.py storage                                  # EF-L7 / ViT-B, 6 tasks

Tasks are PETAH-2 (LoRA r 8 on attention, conv-LoRA r 2 on every conv; LoRA ATTN r 8 on a ViT) with random
adapters and heads of the six fine-grained sets' class counts; the backbone is random (no checkpoint needed: speed
and sizes do not depend on the values). CPU, torch threads from OMP_NUM_THREADS (1 in BENCHMARKS.md).

switch   time of bank.select(A) from the base, A -> B, and back to the base, on a bank of 2 tasks; resident bytes
         (unique tensor storages the model and the loaded tasks hold, and the process RSS) for 1, 4 and 8 tasks
         against the bytes of as many merged models.
mixed    images/s of one forward over a batch whose samples belong to 1, 2, 4 or 8 tasks, of one merged model
         (the speed of a single-task deployment), of the unmerged PETAH model (the adapters computed beside the
         frozen layers: the floor a mixed batch cannot beat) and of bank.select(task); the ratio to the merged
         model. Runs alternate; images/s from the median time of `repeats`, ratios as the median over repeats of
         the ratio to the merged run of the same repeat; by CPU time of the process (what a forward costs; on a
         shared machine the wall time mostly measures the other processes) and by wall time.
storage  bytes of the base checkpoint + 6 task files vs 6 merged models, EF-L7 PETAH-2 and ViT-B LoRA ATTN.
Not a test; numbers in BENCHMARKS.md and the README.
"""
import argparse
import copy
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from lora import merge_and_unload  # noqa: E402
from methods import apply_method  # noqa: E402
from models import create_model  # noqa: E402
from tasks.bank import TaskBank  # noqa: E402
from tasks.task_file import save_task  # noqa: E402

# PETAH's six fine-grained sets (its Tables 2, 3 and 5) and their class counts, as data.py has them
CLASSES = dict(cub=200, cars=196, pets=37, aircraft=100, dtd=47, food101=101)


def make_task(base, model_name, path, num_classes, seed, *, method="petah", rc=2):
    """A task file of `method` on `base` with random adapters and head; returns the task's merged model."""
    torch.manual_seed(seed)
    m = copy.deepcopy(base)
    m.reset_classifier(num_classes)
    apply_method(m, model_name, method, r=8, rc=rc)
    with torch.no_grad():
        for p in m.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.01)
    save_task(m, path, meta=dict(task_type="cls", model=model_name, method=method, r=8, rc=rc, num_classes=num_classes))
    return m


def storage_bytes(tensors) -> int:
    seen = {}
    for t in tensors:
        if t is not None:
            s = t.untyped_storage()
            seen[s.data_ptr()] = s.nbytes()
    return sum(seen.values())


def bank_bytes(bank) -> int:
    ts = list(bank.model.state_dict().values())
    for loaded in bank.tasks.values():
        for v in loaded.variants.values():
            ts += list(v.parameters()) + list(v.buffers())
    return storage_bytes(ts)


def rss() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS"))


def model_bytes(m) -> int:
    return sum(t.numel() * t.element_size() for t in m.state_dict().values())


def cmd_switch(args, tmp):
    base = create_model(args.model, num_classes=1000, img_size=args.img_size).eval()
    names = list(CLASSES) + ["extra1", "extra2"]
    merged_bytes = []
    for i, n in enumerate(names):
        m = make_task(base, args.model, f"{tmp}/{n}.safetensors", CLASSES.get(n, 100), i)
        merged_bytes.append(model_bytes(merge_and_unload(m)))
        del m
    bank = TaskBank(base)
    rss0, rows = rss(), []
    for k in (1, 4, 8):
        while len(bank.names) < k:
            bank.add(names[len(bank.names)], f"{tmp}/{names[len(bank.names)]}.safetensors")
        rows.append(dict(tasks=k, bank_bytes=bank_bytes(bank), rss_growth=rss() - rss0,
                         merged_models_bytes=sum(merged_bytes[:k])))
    times = {"base -> A": [], "A -> B": [], "B -> base": []}
    for _ in range(args.repeats):
        for label, name in (("base -> A", names[0]), ("A -> B", names[1]), ("B -> base", None)):
            t = time.perf_counter()
            bank.select(name)
            times[label].append(time.perf_counter() - t)
    out = dict(bench="switch", model=args.model, img_size=args.img_size, threads=torch.get_num_threads(),
               select_s={k: round(statistics.median(v), 4) for k, v in times.items()}, memory=rows)
    print(json.dumps(out))


def cmd_mixed(args, tmp):
    base = create_model(args.model, num_classes=1000, img_size=args.img_size).eval()
    names = list(CLASSES) + ["extra1", "extra2"]
    tasks = {}
    for i, n in enumerate(names):
        tasks[n] = make_task(base, args.model, f"{tmp}/{n}.safetensors", CLASSES.get(n, 100), i).eval()
    unmerged = tasks[names[0]]
    merged = merge_and_unload(copy.deepcopy(unmerged)).eval()
    for n in names[1:]:
        tasks[n] = None  # only the first task's model is kept (as merged and unmerged references)
    bank = TaskBank(base)
    for n in names:
        bank.add(n, f"{tmp}/{n}.safetensors")
    x = torch.randn(args.batch, 3, args.img_size, args.img_size)

    def mixed(k):
        per = [names[i % k] for i in range(args.batch)]
        return lambda: bank(x, per)

    bank.select(names[0])  # for "selected"; a mixed batch routes through the unmerged variants whatever is selected
    fns = {"merged": lambda: merged(x), "unmerged": lambda: unmerged(x), "selected": lambda: bank(x),
           **{f"mixed_{k}": mixed(k) for k in (1, 2, 4, 8)}}
    # CPU time of this process (1 thread) as well as wall time: on a shared machine the wall time mostly measures
    # the other processes; the CPU time is what the forward costs
    times, cpu = {k: [] for k in fns}, {k: [] for k in fns}
    with torch.inference_mode():
        for fn in fns.values():  # warm-up
            fn()
        keys = list(fns)
        for i in range(args.repeats):
            for k in keys[i % len(keys):] + keys[:i % len(keys)]:
                t, c = time.perf_counter(), time.process_time()
                fns[k]()
                times[k].append(time.perf_counter() - t)
                cpu[k].append(time.process_time() - c)

    def ratios(ts):  # per repeat against the merged run of the same rotation, then the median
        return {k: round(statistics.median(m / t for m, t in zip(ts["merged"], v)), 3) for k, v in ts.items()}

    out = dict(bench="mixed", model=args.model, batch=args.batch, img_size=args.img_size, repeats=args.repeats,
               threads=torch.get_num_threads(),
               img_per_cpu_s={k: round(args.batch / statistics.median(v), 2) for k, v in cpu.items()},
               ratio_to_merged_cpu=ratios(cpu),
               img_per_s_wall={k: round(args.batch / statistics.median(v), 2) for k, v in times.items()},
               ratio_to_merged_wall=ratios(times))
    print(json.dumps(out))


def cmd_storage(args, tmp):
    rows = []
    for model_name, method in (("efl7", "petah"), ("vitb", "lora")):
        base = create_model(model_name, num_classes=1000, img_size=224).eval()
        files, merged = 0, 0
        for i, (n, c) in enumerate(CLASSES.items()):
            path = f"{tmp}/{model_name}_{n}.safetensors"
            m = make_task(base, model_name, path, c, i, method=method)
            files += os.path.getsize(path)
            merged += model_bytes(merge_and_unload(m))
            del m
        base_b = model_bytes(base)
        label = "petah-2" if method == "petah" else "lora ATTN r8"
        rows.append(dict(model=model_name, method=label, tasks=len(CLASSES),
                         base_bytes=base_b, task_files_bytes=files, merged_models_bytes=merged,
                         ratio=round(merged / (base_b + files), 2)))
        del base
    print(json.dumps(dict(bench="storage", rows=rows)))


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=("switch", "mixed", "storage"))
    p.add_argument("--model", default="efl7")
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        {"switch": cmd_switch, "mixed": cmd_mixed, "storage": cmd_storage}[args.what](args, tmp)
