"""Which conv-LoRA forward path is cheaper, layer by layer and over a whole PETAH training step (CPU, 1 thread).

    .venv/bin/python bench/bench_conv_paths.py layers efl1 --batch 4 --rc 1     # every distinct adapted conv
    .venv/bin/python bench/bench_conv_paths.py step efl1 --batch 4 --rc 2       # path="auto" vs all "factored"

conv_lora.LoRAConv2d computes its unmerged update either as two convs through A and B ("factored") or as one conv
with W0 + dW ("kernel"); path="auto" picks per layer by a cost rule whose one constant (TRAFFIC_MACS) comes from
the `layers` table: the extra forward + backward time of each path over the frozen conv, with the input wanting a
gradient as inside a network (not for stem.conv1, whose input is the image). `step` times whole optimizer steps
of the same model with path="auto" and with every conv forced to "factored", alternating, and prints the median
of the paired ratios. Not a test; numbers in BENCHMARKS.md.
"""
import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from conv_lora import LoRAConv2d  # noqa: E402
from lora import freeze_bn_stats  # noqa: E402
from methods import apply_method  # noqa: E402
from models import create_model  # noqa: E402


def alternate(fns: dict, repeats: int) -> dict:
    """Each repeat runs every fn once, in an order that rotates; returns the lists of times."""
    for fn in fns.values():
        fn()
    times, names = {k: [] for k in fns}, list(fns)
    for i in range(repeats):
        for k in names[i % len(names):] + names[:i % len(names)]:
            t = time.perf_counter()
            fns[k]()
            times[k].append(time.perf_counter() - t)
    return times


def petah_model(name: str, rc: int) -> nn.Module:
    torch.manual_seed(0)
    model = create_model(name, num_classes=100)
    apply_method(model, name, "petah", r=8, rc=rc)
    with torch.no_grad():
        for m in model.modules():
            if hasattr(m, "lora_B"):
                m.lora_B.normal_(0, 0.02)  # away from B = 0
    return model


def layers(args) -> None:
    model = petah_model(args.model, args.rc)
    inputs, seen, hooks = [], set(), []

    def record(name):
        def hook(mod, a):
            key = (mod.in_channels, mod.out_channels, mod.kernel_size, mod.stride, tuple(a[0].shape[2:]))
            if key not in seen:  # one row per distinct shape
                seen.add(key)
                inputs.append((name, mod, tuple(a[0].shape[1:])))
        return hook

    for n, m in model.named_modules():
        if isinstance(m, LoRAConv2d):
            hooks.append(m.register_forward_pre_hook(record(n)))
    with torch.no_grad():
        model.eval()(torch.randn(1, 3, 224, 224))
    for h in hooks:
        h.remove()
    print(f"{args.model} batch {args.batch} rc {args.rc}: extra ms over the frozen conv (forward + backward), "
          f"median of {args.repeats} paired differences; ratio = c_out c_in kh kw / g / (c_in kh kw + c_out)")
    print(f"{'layer':<30}{'c_in':>6}{'c_out':>6}{'k':>3}{'out':>8}{'ratio':>7}{'frozen':>8}{'+fact':>7}{'+kern':>7}"
          f"  auto")
    for name, mod, shape in inputs:
        base = nn.Conv2d(mod.in_channels, mod.out_channels, mod.kernel_size, mod.stride, mod.padding,
                         bias=mod.bias is not None).requires_grad_(False)
        variants = {"frozen": base}
        for path in ("factored", "kernel"):
            variants[path] = LoRAConv2d.from_module(base, r=args.rc, path=path)
            variants[path].lora_B.data.normal_(0, 0.02)
        x = torch.randn(args.batch, *shape, requires_grad=name != "stem.conv1")
        with torch.no_grad():
            grad_out = torch.randn_like(base(x))

        def fwd_bwd(layer):
            y = layer(x)
            if y.requires_grad:
                y.backward(grad_out)
            x.grad = None
            for p in layer.parameters():
                p.grad = None

        t = alternate({k: (lambda v=v: fwd_bwd(v)) for k, v in variants.items()}, args.repeats)
        extra = {k: statistics.median(a - b for a, b in zip(t[k], t["frozen"])) * 1e3 for k in ("factored", "kernel")}
        kh, kw = mod.kernel_size
        ratio = mod.out_channels * mod.fan_in / (mod.in_channels * kh * kw + mod.out_channels)
        auto = "kernel" if variants["kernel"].kernel_path_is_cheaper() else "factored"
        out, frozen = "x".join(map(str, grad_out.shape[2:])), statistics.median(t["frozen"]) * 1e3
        print(f"{name:<30}{mod.in_channels:>6}{mod.out_channels:>6}{kh:>3}{out:>8}{ratio:>7.1f}{frozen:>8.1f}"
              f"{extra['factored']:>7.1f}{extra['kernel']:>7.1f}  {auto}", flush=True)


def step(args) -> None:
    auto = petah_model(args.model, args.rc)
    factored = copy.deepcopy(auto)
    for m in factored.modules():
        if isinstance(m, LoRAConv2d):
            m.path = "factored"
    kernel = [n for n, m in auto.named_modules() if isinstance(m, LoRAConv2d) and m.kernel_path_is_cheaper()]
    x, y = torch.randn(args.batch, 3, 224, 224), torch.randint(0, 100, (args.batch,))
    with torch.no_grad():
        diff = (auto.eval()(x) - factored.eval()(x)).abs().max().item()

    def trainer(model):
        model.train()
        freeze_bn_stats(model)
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

        def one_step():
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        return one_step

    t = alternate({"auto": trainer(auto), "factored": trainer(factored)}, args.repeats)
    print(f"{args.model} batch {args.batch} rc {args.rc}: kernel path on {len(kernel)} convs ({', '.join(kernel)}); "
          f"max |auto - factored| output {diff:.1e}\n  factored {statistics.median(t['factored']) * 1e3:.0f} ms, "
          f"auto {statistics.median(t['auto']) * 1e3:.0f} ms per step; auto / factored = "
          f"{statistics.median(a / b for a, b in zip(t['auto'], t['factored'])):.3f} (median of {args.repeats} "
          f"paired ratios)", flush=True)


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=("layers", "step"))
    p.add_argument("model", help="efl1 efl3 efl7")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--rc", type=int, default=1, help="conv-LoRA rank (PETAH-1 / PETAH-2)")
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if args.what == "layers":
        layers(args)
    else:
        step(args)
