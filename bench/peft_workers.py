"""The measurements behind bench_peft.py, one function per question; each runs in its own fresh process.

bench_peft.py (the script you run) only orchestrates: it starts a forkserver that imports this file (and with it
torch, timm, peft and our models) once, then runs every measurement below in a new process forked from that
server. A forked worker starts with nothing allocated but the imported modules, so its peak RSS
(`ru_maxrss`) is the peak of that one configuration, and no measurement inherits another's allocator state.

    train_worker(spec)     Q1-Q3: one (model, method): our training step, the floor, timm + peft, alternating
    memory_worker(spec)    Q1: peak memory of one (model, method, ours | reference) training run
    infer_worker(spec)     Q4: base vs adapted-unmerged vs merged vs BN-folded, batch-1 latency and throughput
    forward_worker(spec)   Q5: our model forward vs timm / segment_anything (bench_models.py's pairs and timer)
    adapter_worker(spec)   Q6: adapter file bytes per method, next to the paper's #Params

Every worker takes a JSON-able dict and returns one. Each repeat times every variant back to back, in an order that
rotates from repeat to repeat; times are medians over repeats and ratios are medians of the per-repeat ratios, so
background load on the machine hits every variant alike.
"""
import copy
import os
import re
import resource
import statistics
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

import peft
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root: models, lora, methods, ...
sys.path.insert(0, str(Path(__file__).resolve().parent))      # bench/: bench_models
from bench_models import build_pair, time_pair  # noqa: E402

from lora import (  # noqa: E402
    adapter_state_dict,
    freeze_bn_stats,
    merge_adapters,
    merge_and_unload,
    save_adapters,
)
from methods import PAPER_PARAMS, apply_method, plan_method  # noqa: E402
from models import create_model, load_pretrained  # noqa: E402
from tasks.deploy import fold_all_bn  # noqa: E402  (every conv -> BatchNorm pair folded)

# benchmark key -> (our create_model name, timm model name, constructor kwargs given to both)
MODELS = {
    "efl1": ("efl1", "efficientformer_l1", {}),
    "efl3": ("efl3", "efficientformer_l3", {}),
    "efl7": ("efl7", "efficientformer_l7", {}),
    "vits": ("vits", "deit3_small_patch16_224", {}),
    "vitb": ("vitb", "deit3_base_patch16_224", {}),
    # tiny configurations for --smoke / tests: same code paths, a fraction of the work
    "efl_tiny": ("efl1", "efficientformer_l1", dict(depths=(1, 1, 2, 2), embed_dims=(16, 32, 48, 64), num_vit=1)),
    "vit_tiny": ("vits", "deit3_small_patch16_224", dict(embed_dim=64, depth=2, num_heads=2)),
}

# method label -> (methods.py method, conv-LoRA rank rc); the paper's PETAH-1 / PETAH-2 are rc = 1 / 2
METHODS = {"linear": ("linear", 1), "full": ("full", 1), "attn": ("attn", 1), "lora": ("lora", 1),
           "lora_mlp": ("lora_mlp", 1), "petah-1": ("petah", 1), "petah-2": ("petah", 2), "ia3": ("ia3", 1)}
R = 8  # LoRA rank of the linear layers, as in the paper's tables
HEADS = ("head", "head_dist")



def env_worker(spec: dict) -> dict:
    """Versions and threads as the workers see them."""
    cuda = spec["device"].startswith("cuda")
    return dict(torch=torch.__version__, timm=timm.__version__, peft=peft.__version__, threads=torch.get_num_threads(),
                gpu=torch.cuda.get_device_name() if cuda else None, cuda=torch.version.cuda if cuda else None,
                cudnn=torch.backends.cudnn.version() if cuda else None)


def paper_params(key: str, label: str) -> int | None:
    """The paper's #Params (methods.PAPER_PARAMS) for a bench model key and method label, None if not reported."""
    method, rc = METHODS[label]
    if not is_ef(key) and method == "petah":
        method, rc = "lora", 1  # ViT has no convolutional stages: PETAH == LoRA ATTN there
    return PAPER_PARAMS.get((key, method, R, rc))


def is_ef(key: str) -> bool:
    return MODELS[key][0].startswith("efl")


def build_ours(key: str, img_size: int, num_classes: int) -> nn.Module:
    name, _, kw = MODELS[key]
    return create_model(name, num_classes=num_classes, img_size=img_size, **kw)


def build_timm(key: str, img_size: int, num_classes: int) -> nn.Module | None:
    """timm's model, or None where timm cannot build it (its EfficientFormer is fixed at 224 x 224)."""
    _, name, kw = MODELS[key]
    if is_ef(key) and img_size != 224:
        return None
    extra = {} if is_ef(key) else dict(img_size=img_size)
    return timm.create_model(name, pretrained=False, num_classes=num_classes, **kw, **extra)


def device_context(device: str):
    """(autocast context, synchronize function): bf16 autocast and CUDA-synchronised timing on a GPU."""
    if device.startswith("cuda"):
        return torch.autocast("cuda", dtype=torch.bfloat16), torch.cuda.synchronize
    return nullcontext(), (lambda: None)


def rss_mb() -> float:
    """Current resident set size of this process in MiB (Linux /proc)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def rows_ms(times: list[float]) -> float:
    return statistics.median(times) * 1e3


def paired_ratio(a: list[float], b: list[float]) -> float:
    """Median over repeats of a[i] / b[i]: a and b were timed back to back in repeat i, so load that drifts over
    seconds cancels in each pair (steadier than the ratio of the two medians on a shared machine)."""
    return statistics.median(x / y for x, y in zip(a, b))


# ---- the same method on timm + peft ------------------------------------------------------------------------

def apply_reference(ref: nn.Module, plan: dict, method: str) -> nn.Module:
    """Put `plan` (methods.plan_method on our model: same module names) onto a timm model with peft.

    lora / lora_mlp / petah: peft LoRA on the same target modules, rank and alpha per module (alpha = r, scale 1
    as ours), so the convs get peft's Conv2d LoRA at rank rc. ia3: peft (IA)^3 on the same modules, fc2 as
    feed-forward (input scaling); peft scales every output row of qkv where ours scales the k and v rows only.
    linear / full / attn: timm alone with the same parameters trainable. The head always trains.
    """
    if plan["lora"]:
        names = list(plan["lora"])
        cfg = peft.LoraConfig(target_modules=names, r=R, lora_alpha=R, lora_dropout=0.0, bias="none",
                              rank_pattern={re.escape(n): c["r"] for n, c in plan["lora"].items()},
                              alpha_pattern={re.escape(n): c["r"] for n, c in plan["lora"].items()})
        ref = peft.inject_adapter_in_model(cfg, ref)
    elif plan["ia3"]:
        names = list(plan["ia3"])
        cfg = peft.IA3Config(target_modules=names,
                             feedforward_modules=[n for n, c in plan["ia3"].items() if c["mode"] == "in"])
        ref = peft.inject_adapter_in_model(cfg, ref)
    prefixes = tuple(p + "." for p in HEADS + tuple(plan["train_modules"]))
    for name, p in ref.named_parameters():
        p.requires_grad_(plan["train_all"] or "lora_" in name or "ia3_l" in name or name.startswith(prefixes))
    return ref


@torch.no_grad()
def perturb_(model: nn.Module, std: float = 0.02) -> nn.Module:
    """Move every weight away from its init, as bench_models.py does: with layer scales of 1e-5 / 1e-6 the blocks
    of a freshly built model are near-identity and any two implementations would agree trivially."""
    for p in model.parameters():
        p.add_(torch.randn_like(p) * std)
    return model


@torch.no_grad()
def randomize_adapters(model: nn.Module) -> None:
    """Move adapters away from their identity init (B = 0, l = 1), so parity and merge checks prove something."""
    for m in model.modules():
        if hasattr(m, "lora_B"):
            m.lora_B.normal_(0, 0.02)
        if hasattr(m, "ia3_l"):
            m.ia3_l.add_(torch.randn_like(m.ia3_l) * 0.1)


@torch.no_grad()
def copy_adapters_to_peft(ours: nn.Module, ref: nn.Module) -> None:
    """Give peft's adapters our adapter values, so the two models compute the same function."""
    for name, m in ours.named_modules():
        if not hasattr(m, "adapter_names"):
            continue
        target = ref.get_submodule(name)
        if hasattr(m, "lora_A"):
            a, b = target.lora_A["default"].weight, target.lora_B["default"].weight
            a.copy_(m.lora_A.view_as(a))
            if getattr(m, "lora_rows", None) is None:
                b.copy_(m.lora_B.view_as(b))
            else:  # peft adapts every row: zeros outside ours
                b.zero_().view(b.shape[0], -1)[m.lora_rows] = m.lora_B
        else:  # (IA)^3: our full scale vector (ones outside `rows`)
            vec = m.ia3_l if m.mode == "in" else m._out_scale()
            target.ia3_l["default"].copy_(vec.view_as(target.ia3_l["default"]))


# ---- Q1-Q3: training step, floor, reference ------------------------------------------------------------------

def earliest_trainable(model: nn.Module, x: torch.Tensor) -> str:
    """Name of the first module, in execution order, that owns a trainable parameter (the head included)."""
    owners = {n for n, m in model.named_modules() if any(p.requires_grad for p in m.parameters(recurse=False))}
    order, handles = [], []
    for n, m in model.named_modules():
        if n in owners:
            handles.append(m.register_forward_pre_hook(_Recorder(order, n)))
    with torch.no_grad():
        model.eval()(x[:1])
    for h in handles:
        h.remove()
    return order[0]


class _Recorder:
    def __init__(self, order: list, name: str):
        self.order, self.name = order, name

    def __call__(self, module, args):
        self.order.append(self.name)


def _grad_leaf_hook(module, args):
    # The floor's input to the earliest adapted layer: a leaf that wants a gradient, so backward runs down to here
    # (every activation gradient above it) and no further; with every weight frozen no weight gradient is formed.
    return (args[0].detach().requires_grad_(True),) + tuple(args[1:])


def make_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor, autocast, optimizer=None):
    def step():
        with autocast:
            logits = model(x)  # (B, num_classes)
        loss = F.cross_entropy(logits.float(), y)
        if optimizer is not None:
            optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if optimizer is not None:
            optimizer.step()
    return step


def prepare_training(model: nn.Module, device: str):
    model.to(device).train()
    freeze_bn_stats(model)  # BatchNorms with frozen params keep their running statistics, as in train_cls.py
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.AdamW(params, lr=1e-4, fused=device.startswith("cuda")) if params else None


def train_worker(spec: dict) -> dict:
    """Median optimizer-step time of ours, the floor and timm + peft for one (model, method), alternating."""
    key, label, device = spec["model"], spec["method"], spec["device"]
    method, rc = METHODS[label]
    B, S, nc = spec["batch"], spec["img_size"], spec["num_classes"]
    torch.manual_seed(0)
    ref = build_timm(key, S, nc) if spec["reference"] else None
    ours = build_ours(key, S, nc)
    if ref is not None:
        load_pretrained(ours, perturb_(ref).state_dict(), verbose=False)  # identical weights in both
    else:
        perturb_(ours)
    floor = copy.deepcopy(ours)
    plan = plan_method(ours, method, r=R, rc=rc)
    info = apply_method(ours, key, method, r=R, rc=rc)
    x = torch.randn(B, 3, S, S)
    y = torch.randint(0, nc, (B,))

    # floor: the base network, every weight frozen, input of the earliest adapted module wants a gradient
    earliest = earliest_trainable(ours, x)
    for p in floor.parameters():
        p.requires_grad_(False)
    floor.get_submodule(earliest).register_forward_pre_hook(_grad_leaf_hook)

    parity = None
    if ref is not None:
        ref = apply_reference(ref, plan, method)
        randomize_adapters(ours)
        if plan["lora"] or plan["ia3"]:
            copy_adapters_to_peft(ours, ref)
        with torch.no_grad():
            parity = (ours.eval()(x[:2]) - ref.eval()(x[:2])).abs().max().item()

    autocast, sync = device_context(device)
    x, y = x.to(device), y.to(device)
    prepare_training(floor, device)  # no optimizer: nothing in the floor is trainable
    variants = {"ours": make_step(ours, x, y, autocast, prepare_training(ours, device)),
                "floor": make_step(floor, x, y, autocast)}
    if ref is not None:
        variants["ref"] = make_step(ref, x, y, autocast, prepare_training(ref, device))
    times = {k: [] for k in variants}
    names = list(variants)
    for _ in range(spec["warmup"]):
        for k in names:
            variants[k]()
    for i in range(spec["steps"]):
        for k in names[i % len(names):] + names[:i % len(names)]:  # rotate the order every repeat
            sync()
            t = time.perf_counter()
            variants[k]()
            sync()
            times[k].append(time.perf_counter() - t)
    med = {k: rows_ms(v) for k, v in times.items()}
    ref_trainable = None if ref is None else sum(p.numel() for p in ref.parameters() if p.requires_grad)
    return dict(model=key, method=label, batch=B, img_size=S, steps=spec["steps"], earliest_adapted=earliest,
                adapter_params=info["adapter_params"], trainable_params=info["trainable_params"],
                ref_trainable_params=ref_trainable, parity_max_abs_diff=parity,
                ours_ms=med["ours"], floor_ms=med["floor"], ref_ms=med.get("ref"),
                ours_img_s=B / med["ours"] * 1e3, ref_img_s=None if ref is None else B / med["ref"] * 1e3,
                step_over_floor=paired_ratio(times["ours"], times["floor"]),
                ours_over_ref=None if ref is None else paired_ratio(times["ours"], times["ref"]),
                ours_ms_all=[t * 1e3 for t in times["ours"]], floor_ms_all=[t * 1e3 for t in times["floor"]],
                ref_ms_all=None if ref is None else [t * 1e3 for t in times["ref"]])


def memory_worker(spec: dict) -> dict:
    """Peak memory of a few training steps of one (model, method) in this fresh process: ours or the reference."""
    key, label, device, which = spec["model"], spec["method"], spec["device"], spec["which"]
    method, rc = METHODS[label]
    B, S, nc = spec["batch"], spec["img_size"], spec["num_classes"]
    start = rss_mb()
    torch.manual_seed(0)
    if which == "ours":
        model = build_ours(key, S, nc)
        apply_method(model, key, method, r=R, rc=rc)
    else:
        with torch.device("meta"):  # our model only for the plan's module names: no memory
            plan = plan_method(build_ours(key, S, nc), method, r=R, rc=rc)
        model = build_timm(key, S, nc)
        if model is None:
            return dict(model=key, method=label, which=which, peak_rss_mb=None)
        model = apply_reference(model, plan, method)
    autocast, sync = device_context(device)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    opt = prepare_training(model, device)
    built = rss_mb()
    step = make_step(model, torch.randn(B, 3, S, S, device=device), torch.randint(0, nc, (B,), device=device),
                     autocast, opt)
    for _ in range(spec["steps"]):
        step()
    sync()
    out = dict(model=key, method=label, which=which, batch=B, img_size=S, start_rss_mb=start, built_rss_mb=built,
               peak_rss_mb=peak_rss_mb(), peak_over_start_mb=peak_rss_mb() - start)
    if device.startswith("cuda"):
        out["cuda_max_allocated_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return out


# ---- Q4: inference -------------------------------------------------------------------------------------------

@torch.no_grad()
def infer_worker(spec: dict) -> dict:
    """Eval-mode forward of base / adapted (unmerged) / merged in place / merged to plain layers / BN-folded."""
    key, label, device = spec["model"], spec["method"], spec["device"]
    method, rc = METHODS[label]
    S = spec["img_size"]
    torch.manual_seed(0)
    base = perturb_(build_ours(key, S, spec["num_classes"]))
    adapted = copy.deepcopy(base)
    apply_method(adapted, key, method, r=R, rc=rc)
    randomize_adapters(adapted)
    merged_inplace = copy.deepcopy(adapted)
    merge_adapters(merged_inplace)  # adapter modules stay; forward is one F.linear / F.conv2d each
    merged = merge_and_unload(copy.deepcopy(adapted))  # plain nn.Linear / nn.Conv2d: the base architecture
    # base_copy (a deepcopy of base) is an A/A control: base_copy / base shows the timing noise of this machine
    variants = dict(base=base, base_copy=copy.deepcopy(base), unmerged=adapted, merged_inplace=merged_inplace,
                    merged=merged)
    if is_ef(key):
        folded = copy.deepcopy(merged)
        fold_all_bn(folded)
        variants["merged_bn_folded"] = folded
    variants = {k: m.to(device).eval() for k, m in variants.items()}

    # merged must BE the base architecture: same module classes, parameter names, shapes, strides and dtypes
    def layout(m):
        return ([type(mod) for mod in m.modules()],
                [(n, p.shape, p.stride(), p.dtype) for n, p in m.named_parameters()])
    same_architecture = layout(variants["merged"]) == layout(variants["base"])

    x = torch.randn(2, 3, S, S, device=device)
    ref_out = variants["unmerged"](x)
    max_diff = {k: (m(x) - ref_out).abs().max().item() for k, m in variants.items()
                if k not in ("base", "base_copy", "unmerged")}

    autocast, sync = device_context(device)
    out = dict(model=key, method=label, img_size=S, batch_latency=1, batch_throughput=spec["batch"],
               max_abs_diff_vs_unmerged=max_diff, merged_same_architecture=same_architecture)
    for tag, batch, repeats in (("latency", 1, spec["repeats_latency"]), ("throughput", spec["batch"],
                                                                          spec["repeats_throughput"])):
        xb = torch.randn(batch, 3, S, S, device=device)
        times = {k: [] for k in variants}
        names = list(variants)
        with autocast:
            for k in names:
                variants[k](xb)  # warm-up
            for i in range(repeats):
                for k in names[i % len(names):] + names[:i % len(names)]:
                    sync()
                    t = time.perf_counter()
                    variants[k](xb)
                    sync()
                    times[k].append(time.perf_counter() - t)
        med = {k: statistics.median(v) for k, v in times.items()}
        out[f"{tag}_ms"] = {k: v * 1e3 for k, v in med.items()}
        out[f"{tag}_over_base"] = {k: paired_ratio(v, times["base"]) for k, v in times.items()}
        out[f"{tag}_min_over_base"] = {k: min(v) / min(times["base"]) for k, v in times.items()}
        if tag == "throughput":
            out["throughput_img_s"] = {k: batch / v for k, v in med.items()}
    return out


# ---- Q5: model forward ---------------------------------------------------------------------------------------

def forward_worker(spec: dict) -> dict:
    """Our forward vs the reference's on the same weights (bench_models.time_pair: alternating, eval, no_grad)."""
    key, device = spec["model"], spec["device"]
    torch.manual_seed(0)
    if key == "sam" or (key in MODELS and not MODELS[key][2] and spec["img_size"] == 224):
        ours, ref, shape = build_pair(key, spec["sam_size"])  # bench_models.py: full-size models
        shape = (3, spec["sam_size"], spec["sam_size"]) if key == "sam" else shape
    else:
        ref = build_timm(key, spec["img_size"], 1000)
        if ref is None:
            return dict(model=key, ours_ms=None, ref_ms=None, ours_over_ref=None)
        ours = build_ours(key, spec["img_size"], 1000)
        load_pretrained(ours, ref.state_dict(), verbose=False)
        shape = (3, spec["img_size"], spec["img_size"])
    with torch.no_grad():  # away from init, as bench_models.py does (layer scales make blocks near-identity)
        for p in ref.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    ours.load_state_dict(ref.state_dict())
    ours, ref = ours.eval().to(device), ref.eval().to(device)
    x = torch.randn(spec["batch"], *shape, device=device)
    autocast, _ = device_context(device)
    with autocast:
        t_ours, t_ref, diff = time_pair(ours, ref, x, spec["repeats"], spec["warmup"])
    return dict(model=key, input=list(x.shape), ours_ms=t_ours * 1e3, ref_ms=t_ref * 1e3,
                ours_over_ref=t_ours / t_ref, max_abs_diff=diff)


# ---- Q6: adapter files -----------------------------------------------------------------------------------------

def adapter_worker(spec: dict) -> dict:
    """save_adapters() file size for every method on one model (random weights: the size depends on shapes only)."""
    key, nc = spec["model"], spec["num_classes"]
    torch.manual_seed(0)
    base = build_ours(key, spec["img_size"], nc)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for label in spec["methods"]:
            method, rc = METHODS[label]
            model = copy.deepcopy(base)
            info = apply_method(model, key, method, r=R, rc=rc)
            path = Path(tmp) / f"{key}_{label}.safetensors"
            save_adapters(model, path, allow_no_adapters=True)  # "full": nothing frozen, no adapters
            tensors = adapter_state_dict(model)
            head = sum(t.numel() * t.element_size() for k, t in tensors.items() if k.startswith(HEADS))
            body = sum(t.numel() * t.element_size() for k, t in tensors.items() if not k.startswith(HEADS))
            size = path.stat().st_size
            rows.append(dict(model=key, method=label, adapter_params=info["adapter_params"],
                             head_params=info["head_params"], paper_params=paper_params(key, label),
                             file_bytes=size, adapter_tensor_bytes=body, head_tensor_bytes=head,
                             header_bytes=size - body - head, num_tensors=len(tensors)))
    return dict(model=key, num_classes=nc, rows=rows)
