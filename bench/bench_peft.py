"""What a PETAH / LoRA / (IA)^3 training step costs, what merging saves, against timm + peft and the floor.

    .venv/bin/python bench/bench_peft.py                      # full CPU run: every method, every model, ~32 min
    .venv/bin/python bench/bench_peft.py --quick              # efl1 + vits, small batches, a few minutes
    .venv/bin/python bench/bench_peft.py --smoke              # tiny models, seconds: checks that everything runs
    .venv/bin/python bench/bench_peft.py --device cuda        # batch 32, bf16 autocast, CUDA-synchronised timing
    .venv/bin/python bench/bench_peft.py --models efl1 --methods petah-1 full --sections train memory

Questions, one table each (all numbers in --json: default bench/results_<device>.json, bench/out/ for --quick/--smoke):
  1. train     median time per optimizer step (AdamW, cross-entropy, train mode with frozen BatchNorm statistics as
               in train_cls.py) and images/s, for every model x method; memory: peak RSS of a fresh process per
               configuration (CUDA: torch.cuda.max_memory_allocated), ours and timm + peft.
  2. floor     forward + backward through the frozen base network down to the earliest adapted layer, no weight
               gradients (the input of that layer is the only tensor that wants a gradient); step / floor.
  3. reference the same method with timm's model + peft (LoraConfig on the same target modules, per-module rank,
               peft's Conv2d LoRA for the convs; IA3Config), timed alternately with ours and the floor.
  4. infer     eval forward of the base model, adapted-unmerged, merged (merge_adapters, adapter modules kept),
               merged-and-unloaded (plain layers = the base architecture), and BatchNorm-folded (EfficientFormer):
               batch-1 latency and batch throughput.
  5. forward   our model forward vs timm's / segment_anything's (bench_models.py's pairs and timer).
  6. adapters  bytes on disk of save_adapters() per method and model, next to the paper's #Params.
Targets print PASS / MISS: merged / base <= 1.01, PETAH step / floor <= 1.2, PETAH step / timm+peft <= 1.0,
forward ours / reference <= 1.0, PETAH peak memory / full <= 0.9 (memory above the worker's start RSS).

Every measurement runs in a new process forked from a server that imported torch, timm, peft and our code once
(bench/peft_workers.py); this script itself only schedules, prints and saves. Timings depend on the machine and
on its load: variants are timed alternately and medians are reported, so load hits all of them alike. Not a test.
"""
import argparse
import concurrent.futures
import json
import multiprocessing
import os
import platform
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

ALL_METHODS = ("linear", "full", "attn", "lora", "lora_mlp", "petah-1", "petah-2", "ia3")
SECTIONS = ("train", "memory", "infer", "forward", "adapters")

# Per model: training batch, inference throughput batch, input side. Full CPU defaults: 2 cores shared with other
# work, so single-threaded and small batches; every method on every model. PETAH rows, which the targets are about,
# get `target_steps` timed steps instead of `steps`.
FULL = dict(models=("efl1", "efl3", "vits", "efl7", "vitb"),
            batch=dict(efl1=4, efl3=2, vits=4, efl7=2, vitb=2),
            infer_batch=dict(efl1=16, efl3=8, vits=8, efl7=2, vitb=2),
            img_size=dict(), steps=4, target_steps=8, warmup=1, mem_steps=2, lat_repeats=20, thr_repeats=4,
            fwd_repeats=20, fwd_warmup=2, forward_models=("efl1", "efl3", "efl7", "vits", "vitb", "sam"), sam_size=512,
            ref_memory_methods=("lora", "lora_mlp", "petah-1", "petah-2", "ia3"))
QUICK = dict(models=("efl1", "vits"), batch=dict(efl1=2, vits=2), infer_batch=dict(efl1=4, vits=4),
             img_size=dict(vits=128), steps=3, target_steps=3, warmup=1, mem_steps=2, lat_repeats=5, thr_repeats=2,
             fwd_repeats=3, fwd_warmup=1, forward_models=("efl1", "vits"), sam_size=256,
             memory_methods=("linear", "full", "lora", "petah-1", "ia3"))
SMOKE = dict(models=("efl_tiny", "vit_tiny"), batch=dict(efl_tiny=2, vit_tiny=2),
             infer_batch=dict(efl_tiny=2, vit_tiny=2),
             img_size=dict(vit_tiny=64), steps=1, target_steps=1, warmup=1, mem_steps=1, lat_repeats=2, thr_repeats=1,
             fwd_repeats=2, fwd_warmup=1, forward_models=("efl_tiny", "vit_tiny"), sam_size=256,
             methods=("full", "attn", "petah-1", "ia3"), memory_methods=("full", "petah-1"))
NUM_CLASSES = 100
TARGETS = dict(merged_over_base=1.01, petah_step_over_floor=1.2, petah_over_ref=1.0, forward_over_ref=1.0,
               petah_mem_over_full=0.9)


def _run(name: str, spec: dict) -> dict:
    """Runs in the forked worker: peft_workers is already imported there (forkserver preload)."""
    import peft_workers
    if spec.get("threads"):
        peft_workers.torch.set_num_threads(spec["threads"])
    return getattr(peft_workers, name)(spec)


class Runner:
    """One fresh process per measurement, forked from a server that imported the heavy modules once."""

    def __init__(self) -> None:
        # The forkserver is a new interpreter that imports the preload modules by name, and Python 3.11 ignores the
        # sys.path it is handed: put bench/ on its PYTHONPATH, or the preload fails silently and every worker
        # imports torch, timm and peft again (~10-20 s each on a loaded machine).
        here = str(Path(__file__).resolve().parent)
        os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [here, os.environ.get("PYTHONPATH")]))
        ctx = multiprocessing.get_context("forkserver")
        ctx.set_forkserver_preload(["__main__", "peft_workers"])
        self.ctx = ctx

    def __call__(self, name: str, spec: dict) -> dict:
        t = time.perf_counter()
        with concurrent.futures.ProcessPoolExecutor(max_workers=1, mp_context=self.ctx, max_tasks_per_child=1) as ex:
            try:
                out = ex.submit(_run, name, spec).result()
            except Exception as e:  # noqa: BLE001  a failed configuration is reported, the others still run
                out = dict(error=f"{type(e).__name__}: {e}")
                print(f"  ! {name} {spec.get('model')} {spec.get('method', '')}: {out['error']}", flush=True)
        out["wall_s"] = time.perf_counter() - t
        return out


def fmt(v, spec: str = ".2f", none: str = "-") -> str:
    return none if v is None else format(v, spec)


def verdict(value, limit) -> str:
    return "-" if value is None else ("PASS" if value <= limit else "MISS")


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="efl1 + ViT-S at 128, small batches, few steps (minutes)")
    p.add_argument("--smoke", action="store_true", help="tiny models, 1-2 steps: does everything run (seconds)")
    p.add_argument("--models", nargs="+", help="efl1 efl3 efl7 vits vitb (efl_tiny vit_tiny); default per preset")
    p.add_argument("--methods", nargs="+", choices=ALL_METHODS,
                   help="training methods (petah-1 / petah-2: conv-LoRA rank rc = 1 / 2); default all (--smoke: "
                        "full attn petah-1 ia3, one per kind of reference setup)")
    p.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS),
                   help="which questions to run (train = Q1-Q3 timing, memory = Q1 peak memory)")
    p.add_argument("--batch", type=int,
                   help="training batch for every model (default: per model, see FULL; 32 on CUDA)")
    p.add_argument("--infer-batch", type=int, help="inference throughput batch for every model (default: per model; "
                                                    "32 on CUDA)")
    p.add_argument("--img-size", type=int, help="input side for every model (EfficientFormer's timm reference "
                                                 "exists at 224 only; default 224, ViT 128 in --quick)")
    p.add_argument("--steps", type=int, help="timed optimizer steps per variant (after warm-up)")
    p.add_argument("--warmup", type=int, help="warm-up steps per variant")
    p.add_argument("--mem-steps", type=int, help="training steps in each memory worker")
    p.add_argument("--no-ref", action="store_true", help="skip timm + peft in the training timing")
    p.add_argument("--no-ref-memory", action="store_true", help="skip the reference's peak-memory workers")
    p.add_argument("--memory-methods", nargs="+", choices=ALL_METHODS,
                   help="methods whose peak memory is measured (default: all; --quick: linear full lora petah-1 "
                        "ia3; --smoke: full petah-1)")
    p.add_argument("--forward-models", nargs="+",
                   help="Q5 models (bench_models.py names: efl1 efl3 efl7 vits vitb sam)")
    p.add_argument("--sam-size", type=int, help="SAM image-encoder input side for Q5 (default 512 CPU, 1024 CUDA)")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--threads", type=int, help="torch.set_num_threads in every worker (default 1 on CPU: on a "
                                                "shared machine 2 OpenMP threads stall on each other; torch's own "
                                                "default on CUDA)")
    p.add_argument("--json", help="where to write all numbers (default bench/results_<device>[_quick|_smoke].json)")
    return p.parse_args()


class Plan:
    """What to run, from the flags and the preset (FULL, QUICK or SMOKE): models, methods, sizes, steps."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.preset = preset = SMOKE if args.smoke else QUICK if args.quick else FULL
        self.models = args.models or list(preset["models"])
        self.cuda = args.device.startswith("cuda")
        self.steps, self.warmup = args.steps or preset["steps"], args.warmup or preset["warmup"]
        self.target_steps = args.steps or preset["target_steps"]
        self.mem_steps = args.mem_steps or preset["mem_steps"]
        # The reference of linear / full / attn is timm alone, whose peak memory matched ours within 6% in a full
        # run: the full CPU preset measures the reference's memory only where peft is involved.
        self.ref_memory_methods = ALL_METHODS if args.memory_methods else preset.get("ref_memory_methods", ALL_METHODS)
        self.sam_size = args.sam_size or (1024 if self.cuda and not (args.quick or args.smoke) else preset["sam_size"])
        tag = "_smoke" if args.smoke else "_quick" if args.quick else ""
        # the full run's numbers sit next to BENCHMARKS.md; --quick / --smoke ones go to the git-ignored bench/out/
        folder = Path(__file__).parent / ("out" if tag else "")
        self.json_path = Path(args.json or folder / f"results_{args.device.split(':')[0]}{tag}.json")
        threads = args.threads or (None if self.cuda else 1)
        self.common = dict(device=args.device, threads=threads, num_classes=NUM_CLASSES)
        self.mem_key = "cuda_max_allocated_mb" if self.cuda else "peak_over_start_mb"

    def methods_of(self, m: str) -> list[str]:
        return list(self.args.methods or self.preset.get("methods", ALL_METHODS))

    def memory_methods_of(self, m: str) -> list[str]:
        wanted = self.args.memory_methods or self.preset.get("memory_methods", ALL_METHODS)
        return [x for x in wanted if x in self.methods_of(m)]

    def img(self, m: str) -> int:
        return self.args.img_size or self.preset["img_size"].get(m, 224)

    def batch(self, m: str) -> int:
        return self.args.batch or (32 if self.cuda and not self.args.smoke else self.preset["batch"].get(m, 2))

    def infer_batch(self, m: str) -> int:
        default = 32 if self.cuda and not self.args.smoke else self.preset["infer_batch"].get(m, 4)
        return self.args.infer_batch or default


def train_section(plan: Plan, run: Runner, results: dict) -> None:
    """Q1-Q3: training step, floor, timm + peft."""
    steps, target_steps, warmup = plan.steps, plan.target_steps, plan.warmup
    print(f"\n[1-3] training step: median ms per optimizer step over {steps} steps ({target_steps} for PETAH) after "
          f"{warmup} warm-up, ours / floor / timm+peft back to back in rotating order; ratios are medians of "
          f"per-step ratios", flush=True)
    head = (f"{'model':<9}{'method':<9}{'batch':>5}{'img':>5}{'ours ms':>9}{'img/s':>7}{'floor ms':>9}"
            f"{'step/floor':>11}{'ref ms':>9}{'ours/ref':>9}{'parity':>9}  earliest adapted")
    print(head, flush=True)
    for m in plan.models:
        for meth in plan.methods_of(m):
            n = target_steps if meth.startswith("petah") else steps
            r = run("train_worker", dict(plan.common, model=m, method=meth, batch=plan.batch(m), img_size=plan.img(m),
                                         steps=n, warmup=warmup, reference=not plan.args.no_ref))
            results["train"].append(r)
            if "error" in r:
                continue
            print(f"{m:<9}{meth:<9}{r['batch']:>5}{r['img_size']:>5}{r['ours_ms']:>9.1f}{r['ours_img_s']:>7.1f}"
                  f"{r['floor_ms']:>9.1f}{r['step_over_floor']:>11.2f}{fmt(r['ref_ms'], '.1f'):>9}"
                  f"{fmt(r['ours_over_ref']):>9}{fmt(r['parity_max_abs_diff'], '.1e'):>9}  "
                  f"{r['earliest_adapted'] or '(input)'}", flush=True)


def memory_section(plan: Plan, run: Runner, results: dict) -> None:
    """Q1: peak memory of a fresh process per (model, method, ours | reference)."""
    unit = "cuda max_memory_allocated MiB" if plan.cuda else "peak RSS MiB of a fresh process, and above its start"
    print(f"\n[1] peak training memory ({unit}; {plan.mem_steps} steps)", flush=True)
    print(f"{'model':<9}{'method':<9}{'batch':>5}{'img':>5}{'ours peak':>10}{'ours +':>8}{'ref peak':>10}"
          f"{'ref +':>8}{'ours/ref':>9}", flush=True)
    key = plan.mem_key
    for m in plan.models:
        for meth in plan.memory_methods_of(m):
            row = {}
            for which in ("ours", "ref"):
                if which == "ref" and (plan.args.no_ref_memory or meth not in plan.ref_memory_methods):
                    continue
                r = run("memory_worker", dict(plan.common, model=m, method=meth, which=which, batch=plan.batch(m),
                                              img_size=plan.img(m), steps=plan.mem_steps))
                results["memory"].append(r)
                row[which] = r
            o, f = row.get("ours", {}), row.get("ref", {})
            ratio = o[key] / f[key] if o.get(key) and f.get(key) else None
            print(f"{m:<9}{meth:<9}{plan.batch(m):>5}{plan.img(m):>5}{fmt(o.get('peak_rss_mb'), '.0f'):>10}"
                  f"{fmt(o.get(key), '.0f'):>8}{fmt(f.get('peak_rss_mb'), '.0f'):>10}{fmt(f.get(key), '.0f'):>8}"
                  f"{fmt(ratio):>9}", flush=True)


def infer_section(plan: Plan, run: Runner, results: dict) -> None:
    """Q4: base vs adapted-unmerged vs merged vs BatchNorm-folded inference."""
    print("\n[4] inference (eval, no grad): median ms at batch 1, images/s at the throughput batch, and x base (median "
          "of paired ratios). merged = merge_and_unload (plain layers: the base architecture), inplace = "
          "merge_adapters, folded = merged + BatchNorm folded into the convs, base_copy = a copy of base (A/A "
          "control: its ratio is this machine's timing noise)", flush=True)
    names = ("base", "base_copy", "unmerged", "merged_inplace", "merged", "merged_bn_folded")
    print(f"{'model':<9}{'method':<9}{'':>7}" + "".join(f"{n[:14]:>15}" for n in names), flush=True)
    for m in plan.models:
        methods = plan.methods_of(m)
        meth = next((x for x in ("petah-1", "petah-2", "lora", "ia3") if x in methods), methods[0])
        r = run("infer_worker", dict(plan.common, model=m, method=meth, img_size=plan.img(m), batch=plan.infer_batch(m),
                                     repeats_latency=plan.preset["lat_repeats"],
                                     repeats_throughput=plan.preset["thr_repeats"]))
        results["infer"].append(r)
        if "error" in r:
            continue
        for label, vals, f in (("ms b1", r["latency_ms"], ".1f"), ("x base", r["latency_over_base"], ".3f"),
                               ("img/s", r["throughput_img_s"], ".1f"), ("x base", r["throughput_over_base"], ".3f")):
            first = f"{m:<9}{meth:<9}" if label == "ms b1" else f"{'':<18}"
            print(f"{first}{label:>7}" + "".join(f"{fmt(vals.get(n), f):>15}" for n in names)
                  + (f"   (batch {r['batch_throughput']})" if label == "img/s" else ""), flush=True)
        print(f"{'':<18}max |out - unmerged|: " + ", ".join(f"{k} {v:.1e}" for k, v in
                                                             r["max_abs_diff_vs_unmerged"].items())
              + f"; merged has the base architecture (classes, shapes, strides): "
                f"{r['merged_same_architecture']}", flush=True)


def forward_section(plan: Plan, run: Runner, results: dict) -> None:
    """Q5: our model forward vs timm's / segment_anything's."""
    preset = plan.preset
    fwd_models = plan.args.forward_models or list(preset["forward_models"])
    print(f"\n[5] model forward, ours vs timm / segment_anything (eval, no grad, batch 1, "
          f"{preset['fwd_repeats']} alternating repeats, SAM image encoder at {plan.sam_size}: at most 6 on CPU; "
          f"ratio of the medians, bench_models.time_pair)", flush=True)
    print(f"{'model':<10}{'input':<16}{'ours ms':>9}{'ref ms':>9}{'ours/ref':>9}{'max|diff|':>11}", flush=True)
    for m in fwd_models:
        # SAM on the CPU: seconds per forward
        reps = min(preset["fwd_repeats"], 6) if m == "sam" and not plan.cuda else preset["fwd_repeats"]
        r = run("forward_worker", dict(plan.common, model=m, img_size=plan.img(m), sam_size=plan.sam_size, batch=1,
                                       repeats=reps, warmup=preset["fwd_warmup"]))
        results["forward"].append(r)
        if "error" in r or r.get("ours_ms") is None:
            continue
        print(f"{m:<10}{'x'.join(map(str, r['input'])):<16}{r['ours_ms']:>9.1f}{r['ref_ms']:>9.1f}"
              f"{r['ours_over_ref']:>9.3f}{r['max_abs_diff']:>11.1e}", flush=True)


def adapters_section(plan: Plan, run: Runner, results: dict) -> None:
    """Q6: bytes on disk of save_adapters() per method and model."""
    print(f"\n[6] adapter files (save_adapters, fp32 safetensors; head for {NUM_CLASSES} classes stored too)",
          flush=True)
    print(f"{'model':<9}{'method':<9}{'#Params':>12}{'paper':>12}{'file bytes':>13}{'adapter B':>12}"
          f"{'head B':>10}{'header B':>10}", flush=True)
    for m in plan.models:
        r = run("adapter_worker", dict(plan.common, model=m, img_size=plan.img(m),
                                       methods=list(plan.args.methods or plan.preset.get("methods", ALL_METHODS))))
        if "error" in r:
            continue
        for row in r["rows"]:
            results["adapters"].append(row)
            print(f"{m:<9}{row['method']:<9}{row['adapter_params']:>12,}{fmt(row['paper_params'], ',d'):>12}"
                  f"{row['file_bytes']:>13,}{row['adapter_tensor_bytes']:>12,}{row['head_tensor_bytes']:>10,}"
                  f"{row['header_bytes']:>10,}", flush=True)


def targets_section(plan: Plan, results: dict) -> None:
    """The PASS / MISS verdicts of TARGETS, from the numbers the sections gathered."""
    targets = results["targets"]

    def add(name, model, method, value, limit, note=""):
        targets.append(dict(target=name, model=model, method=method, value=value, limit=limit,
                            verdict=verdict(value, limit), note=note))

    for r in results["infer"]:
        if "error" not in r:
            for tag, what in (("latency", "latency b1"), ("throughput", f"time b{r['batch_throughput']}")):
                aa = r[f"{tag}_over_base"]["base_copy"]
                add(f"merged/base {what}", r["model"], r["method"], r[f"{tag}_over_base"]["merged"],
                    TARGETS["merged_over_base"], f"A/A noise: base_copy/base {aa:.3f}; same architecture: "
                                                 f"{r['merged_same_architecture']}")
    for r in results["train"]:
        if "error" not in r and r["method"].startswith("petah"):
            note = f"batch {r['batch']}, {r['img_size']}px"
            add("petah step/floor", r["model"], r["method"], r["step_over_floor"], TARGETS["petah_step_over_floor"],
                note)
            add("petah step/timm+peft", r["model"], r["method"], r["ours_over_ref"], TARGETS["petah_over_ref"], note)
    for r in results["forward"]:
        if "error" not in r:
            add("forward ours/ref", r["model"], "-", r.get("ours_over_ref"), TARGETS["forward_over_ref"],
                "x".join(map(str, r.get("input", []))))
    mem = {(r["model"], r["method"]): r.get(plan.mem_key) for r in results["memory"] if r.get("which") == "ours"}
    for m in plan.models:
        for meth in ("petah-1", "petah-2"):
            if mem.get((m, meth)) and mem.get((m, "full")):
                add("petah mem/full mem", m, meth, mem[m, meth] / mem[m, "full"], TARGETS["petah_mem_over_full"],
                    f"{mem[m, meth]:.0f} vs {mem[m, 'full']:.0f} MiB")
    print("\n[targets]", flush=True)
    print(f"{'target':<26}{'model':<9}{'method':<9}{'value':>8}{'limit':>7}  verdict", flush=True)
    for t in targets:
        print(f"{t['target']:<26}{t['model']:<9}{t['method']:<9}{fmt(t['value'], '.3f'):>8}{t['limit']:>7.2f}  "
              f"{t['verdict']:<7} {t['note']}", flush=True)


SECTION_RUNNERS = dict(train=train_section, memory=memory_section, infer=infer_section, forward=forward_section,
                       adapters=adapters_section)


def main() -> None:
    args = parse_args()
    plan = Plan(args)
    plan.json_path.parent.mkdir(parents=True, exist_ok=True)
    run = Runner()
    t_start = time.perf_counter()
    results = dict(meta=dict(date=datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                             command="python " + " ".join(sys.argv), device=args.device,
                             machine=f"{platform.processor() or platform.machine()}, "
                                     f"{multiprocessing.cpu_count()} cores, {platform.system()}",
                             python=platform.python_version()),
                   train=[], memory=[], infer=[], forward=[], adapters=[], targets=[])
    env = run("env_worker", dict(plan.common))
    results["meta"].update(env)
    print(f"bench_peft: {results['meta']['date']}, {args.device}, torch {env.get('torch')}, timm {env.get('timm')}, "
          f"peft {env.get('peft')}, {env.get('threads')} threads, {results['meta']['machine']}"
          + (f", {env['gpu']}, CUDA {env.get('cuda')}, cuDNN {env.get('cudnn')}" if env.get("gpu") else "") + "\n"
          f"command: {results['meta']['command']}", flush=True)
    for name in SECTIONS:  # in the order of the questions, whatever the order of --sections
        if name in args.sections:
            SECTION_RUNNERS[name](plan, run, results)
    targets_section(plan, results)
    results["meta"]["total_wall_s"] = time.perf_counter() - t_start
    plan.json_path.write_text(json.dumps(results, indent=1))
    print(f"\nwrote {plan.json_path} ({results['meta']['total_wall_s']:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
