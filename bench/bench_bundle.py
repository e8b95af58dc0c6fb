r"""
Deployment bundle numbers (BENCHMARKS.md, "Deployment bundle"): bytes per task against the base, task / base
latency in onnxruntime with an A/A band, and resident memory for 1, 4 and 8 tasks against as many merged models.

    OMP_NUM_THREADS=1 python bench/bench_bundle.py --model efl7 --work /tmp/bundle_bench      # ~15 min on 1 core
    OMP_NUM_THREADS=1 python bench/bench_bundle.py --model ef_tiny --img-size 64 --work /tmp/bb --rounds 5

Steps (random weights with random BatchNorm statistics: sizes, timing and memory do not depend on the values):
    1. WORK/base.safetensors (the base) and WORK/task.safetensors (a PETAH-2 task: LoRA r 8 + conv-LoRA rc 2, a
       100-class head, random adapters), written as the training scripts write them.
    2. `export.py --bundle WORK/bundle` (the bundle) and `export.py --out WORK/merged.onnx` (the merged model).
    3. Latency at batch 1, CPU time of this process, 1 thread: base.onnx in two sessions (A and A', the A/A band)
       and the task's graph, one call each per round, round-robin; medians of per-round ratios.
    4. Memory, each in a fresh process: N sessions (N = 1, 4, 8) of the merged model, of the task graph (the same
       file N times: N tasks of one shape), and of the task graph with the base's tensors handed to every session
       from one shared memory map (SessionOptions.add_initializer), and the same with onnxruntime's weight
       prepacking off (session.disable_prepacking). Reported: the process's proportional set size
       (Pss, /proc/self/smaps_rollup: a page mapped twice counts once) after one run of every session, minus the
       process before loading.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--model", default="efl7")
parser.add_argument("--img-size", type=int, default=224)
parser.add_argument("--work", required=True, help="folder for the files (created)")
parser.add_argument("--rounds", type=int, default=15, help="latency rounds (median); default 15")
parser.add_argument("--counts", default="1,4,8", help="session counts for the memory table; default 1,4,8")
parser.add_argument("--kinds", default="merged,task,shared,shared_noprepack",
                    help="memory configurations; default all four")
parser.add_argument("--int8-run", default=None, metavar="OUT",
                    help="instead: int8 against fp32 for the trained task of the train_cls.py run OUT (--data "
                         "synthetic): top-1 on its validation set, size, latency")
parser.add_argument("--memory-child", default=None, help=argparse.SUPPRESS)  # internal: one memory measurement
args = parser.parse_args()


def pss_kib() -> int:
    with open("/proc/self/smaps_rollup") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("Pss:"))


def int8_numbers() -> None:
    """export.py fp32 and --quantize int8 (calibrated on the synthetic validation images) of the run's task; both
    scored on the whole synthetic validation set; latency at batch 1 round-robin with an fp32 A/A session."""
    import numpy as np
    import onnxruntime as ort

    from data import build_datasets
    from tasks.task_file import read_task
    os.makedirs(args.work, exist_ok=True)
    task = os.path.join(args.int8_run, "adapters.safetensors")
    meta = read_task(task).meta
    files = {}
    for q in ("fp32", "int8"):
        files[q] = os.path.join(args.work, f"{q}.onnx")
        subprocess.run([sys.executable, os.path.join(ROOT, "export.py"), "--task", task, "--format", "onnx", "--out",
                        files[q], "--repeats", "0", *(["--quantize", "int8"] if q == "int8" else [])], check=True,
                       env=dict(os.environ, OMP_NUM_THREADS="1"), stdout=subprocess.DEVNULL)
    _, val, _, _ = build_datasets("synthetic", img_size=meta["img_size"], mean=meta["mean"], std=meta["std"],
                                  crop_pct=meta["crop_pct"], interpolation=meta["interpolation"],
                                  synthetic_cfg=dict(num_classes=meta["num_classes"]))
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    sess = {q: ort.InferenceSession(p, opts, providers=["CPUExecutionProvider"]) for q, p in files.items()}
    sess["fp32_b"] = ort.InferenceSession(files["fp32"], opts, providers=["CPUExecutionProvider"])
    preds, labels = {"fp32": [], "int8": []}, []
    for i in range(0, len(val), 50):
        x = np.stack([val[j][0].numpy() for j in range(i, min(i + 50, len(val)))])
        labels += [val[j][1] for j in range(i, min(i + 50, len(val)))]
        for q in preds:
            preds[q] += sess[q].run(None, {"image": x})[0].argmax(1).tolist()
    labels = np.array(labels)
    x1 = {"image": np.stack([val[0][0].numpy()])}
    times = {k: [] for k in sess}
    for r in range(args.rounds):
        for k in list(sess)[r % 3:] + list(sess)[:r % 3]:
            t0 = time.process_time()
            sess[k].run(None, x1)
            times[k].append(time.process_time() - t0)
    res = dict(run=args.int8_run, val_images=len(labels),
               top1_fp32=round(float((np.array(preds["fp32"]) == labels).mean()), 4),
               top1_int8=round(float((np.array(preds["int8"]) == labels).mean()), 4),
               argmax_agreement=round(float((np.array(preds["fp32"]) == np.array(preds["int8"])).mean()), 4),
               bytes_fp32=os.path.getsize(files["fp32"]), bytes_int8=os.path.getsize(files["int8"]),
               ms_fp32=round(1e3 * statistics.median(times["fp32"]), 3),
               ms_int8=round(1e3 * statistics.median(times["int8"]), 3),
               int8_over_fp32=round(statistics.median([b / a for a, b in zip(times["fp32"], times["int8"])]), 3),
               aa=[round(min(b / a for a, b in zip(times["fp32"], times["fp32_b"])), 3),
                   round(max(b / a for a, b in zip(times["fp32"], times["fp32_b"])), 3)], rounds=args.rounds)
    print(json.dumps(res), flush=True)


def memory_child(spec: str) -> None:
    """One measurement in this fresh process: spec = 'kind:path:N'; prints {"pss_mib": ...}."""
    import numpy as np
    import onnx
    import onnxruntime as ort
    from onnx import helper
    kind, path, n = spec.rsplit(":", 2)
    x = np.zeros((1, 3, args.img_size, args.img_size), np.float32)
    before = pss_kib()
    sessions, keep = [], []
    shared = {}
    if kind.startswith("shared"):  # the base's tensors: OrtValues on one memory map of base.data, for every session
        proto = onnx.load(path, load_external_data=False)
        data = np.memmap(os.path.join(os.path.dirname(path), "base.data"), dtype=np.uint8, mode="r")
        for t in proto.graph.initializer:
            if t.data_location == onnx.TensorProto.EXTERNAL:
                info = {e.key: e.value for e in t.external_data}
                off, length = int(info["offset"]), int(info["length"])
                arr = np.frombuffer(data, dtype=helper.tensor_dtype_to_np_dtype(t.data_type), count=length //
                                    np.dtype(helper.tensor_dtype_to_np_dtype(t.data_type)).itemsize, offset=off)
                shared[t.name] = ort.OrtValue.ortvalue_from_numpy(arr.reshape(tuple(t.dims)))
    for _ in range(int(n)):
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = 1
        for name, v in shared.items():
            opts.add_initializer(name, v)
        if kind == "shared_noprepack":  # no per-session repacked copy of the weights (its kernels read them as given)
            opts.add_session_config_entry("session.disable_prepacking", "1")
        keep.append(opts)
        sessions.append(ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"]))
    for s in sessions:
        s.run(None, {"image": x})
    print(json.dumps({"pss_mib": round((pss_kib() - before) / 1024, 1)}))


if args.memory_child:
    memory_child(args.memory_child)
    raise SystemExit(0)
if args.int8_run:
    int8_numbers()
    raise SystemExit(0)

import numpy as np  # noqa: E402
import onnxruntime as ort  # noqa: E402
import torch  # noqa: E402
import torch.nn as nn  # noqa: E402

from methods import apply_method  # noqa: E402
from tasks.atomic import atomic_save_safetensors  # noqa: E402
from tasks.deploy import build_model  # noqa: E402
from tasks.task_file import save_task  # noqa: E402


def make_files(work: str) -> tuple[str, str]:
    base_file, task_file = os.path.join(work, "base.safetensors"), os.path.join(work, "task.safetensors")
    if os.path.exists(task_file):
        return base_file, task_file
    torch.manual_seed(0)
    base = build_model(args.model, head="cls", num_classes=1000, img_size=args.img_size)
    with torch.no_grad():
        for m in base.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.2)
                m.running_var.uniform_(0.5, 2.0)
    atomic_save_safetensors(base.state_dict(), base_file)
    model = build_model(args.model, head="cls", num_classes=100, img_size=args.img_size, weights=base_file)
    apply_method(model, args.model, "petah", r=8, rc=2)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.requires_grad:
                p.normal_(0, 0.02) if n.endswith("lora_B") else p.add_(0.02 * torch.randn_like(p))
    save_task(model, task_file, meta=dict(task_type="cls", model=args.model, method="petah", r=8, rc=2,
                                          num_classes=100, img_size=args.img_size, model_cfg={}))
    return base_file, task_file


def export(argv: list[str]) -> float:
    t0 = time.perf_counter()
    subprocess.run([sys.executable, os.path.join(ROOT, "export.py"), *argv], check=True,
                   env=dict(os.environ, OMP_NUM_THREADS="1"), stdout=subprocess.DEVNULL)
    return time.perf_counter() - t0


def latency(bundle: str, task_graph: str) -> dict:
    def session(path):
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = 1
        return ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
    runs = {"A": session(os.path.join(bundle, "base.onnx")), "A2": session(os.path.join(bundle, "base.onnx")),
            "task": session(os.path.join(bundle, task_graph))}
    x = {"image": np.random.default_rng(0).standard_normal((1, 3, args.img_size, args.img_size), np.float32)}
    for s in runs.values():
        s.run(None, x)
    times = {k: [] for k in runs}
    order = list(runs)
    for r in range(args.rounds):
        for k in order[r % 3:] + order[:r % 3]:  # the order rotated between rounds
            t0 = time.process_time()
            runs[k].run(None, x)
            times[k].append(time.process_time() - t0)
    aa = [a2 / a for a, a2 in zip(times["A"], times["A2"])]
    ratio = [t / a for a, t in zip(times["A"], times["task"])]
    return dict(ms_base=round(1e3 * statistics.median(times["A"]), 2),
                ms_task=round(1e3 * statistics.median(times["task"]), 2),
                task_over_base=round(statistics.median(ratio), 3), aa=round(statistics.median(aa), 3),
                aa_band=[round(min(aa), 3), round(max(aa), 3)], rounds=args.rounds)


def main() -> None:
    os.makedirs(args.work, exist_ok=True)
    base_file, task_file = make_files(args.work)
    bundle, merged = os.path.join(args.work, "bundle"), os.path.join(args.work, "merged.onnx")
    res = dict(model=args.model, img_size=args.img_size, machine=os.uname().nodename, cpus=os.cpu_count())
    if not os.path.exists(os.path.join(bundle, "manifest.json")):
        res["s_export_bundle"] = round(export(["--bundle", bundle, "--weights", base_file, "--task",
                                               f"t={task_file}", "--format", "onnx"]), 1)
    if not os.path.exists(merged):
        res["s_export_merged"] = round(export(["--weights", base_file, "--task", task_file, "--format", "onnx",
                                               "--out", merged, "--repeats", "0"]), 1)
    with open(os.path.join(bundle, "manifest.json")) as f:
        manifest = json.load(f)
    t = manifest["tasks"]["t"]
    base_bytes = sum(v["bytes"] for v in manifest["base"]["files"].values())
    task_bytes = sum(v["bytes"] for v in t["files"].values())
    res.update(base_bytes=base_bytes, task_bytes=task_bytes, task_over_base_pct=round(100 * task_bytes / base_bytes, 2),
               task_file_bytes=os.path.getsize(task_file), merged_onnx_bytes=os.path.getsize(merged))
    print(json.dumps(res), flush=True)
    res["latency_b1"] = latency(bundle, t["graph"])
    print(json.dumps(res["latency_b1"]), flush=True)
    res["memory_pss_mib"] = {}
    for kind in args.kinds.split(","):
        path = merged if kind == "merged" else os.path.join(bundle, t["graph"])
        for n in args.counts.split(","):
            out = subprocess.run([sys.executable, __file__, "--work", args.work, "--img-size", str(args.img_size),
                                  "--memory-child", f"{kind}:{path}:{n}"], check=True, capture_output=True,
                                 text=True, env=dict(os.environ, OMP_NUM_THREADS="1")).stdout
            res["memory_pss_mib"][f"{kind} x{n}"] = json.loads(out.strip().splitlines()[-1])["pss_mib"]
            print(kind, n, res["memory_pss_mib"][f"{kind} x{n}"], flush=True)
    with open(os.path.join(args.work, "results.json"), "w") as f:
        json.dump(res, f, indent=1)
    print(json.dumps(res), flush=True)


main()
