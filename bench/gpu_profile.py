"""torch.profiler summary of one training step of EF-L7 PETAH-2: the top kernels and the host overhead.

    python bench/gpu_profile.py --out OUT/f_profile.txt                 # CUDA: EF-L7, batch 32, 224 px, bf16 autocast
    python bench/gpu_profile.py --out OUT/f_profile.txt --smoke         # ef_tiny, batch 4, 64 px (the CPU when no CUDA)

The step is train_cls.py's (AdamW over the trainable tensors, cross-entropy, BatchNorm statistics frozen), on random
weights and a random batch, after `--warmup` steps. Written as text: the wall time of the step, the time the host
needs to issue it (Python + dispatch + launches, measured without synchronising) and the device time of its kernels,
then the ops and kernels by device time (by CPU time on the CPU). `--json` (default: OUT with .json) holds the same
numbers. The host is the bottleneck when the issue time comes near the wall time while the kernels' sum stays
well below it. Not a test: numbers depend on the machine.
"""
import argparse
import json
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from lora import freeze_bn_stats  # noqa: E402
from methods import apply_method  # noqa: E402
from models import create_model  # noqa: E402


def device_time(evt) -> float:
    """Self device time of a profiler event in us (the attribute was renamed from cuda to device in torch 2.4)."""
    return getattr(evt, "self_device_time_total", None) or getattr(evt, "self_cuda_time_total", 0.0)


def build_step(model_name: str, batch: int, img_size: int, device: str):
    """One train_cls.py step of `model_name` with PETAH-2 (LoRA r 8 on attention, conv-LoRA rc 2): a closure."""
    torch.manual_seed(0)
    model = create_model(model_name, num_classes=100, img_size=img_size)
    info = apply_method(model, model_name, "petah", r=8, rc=2)
    model.to(device).train()
    freeze_bn_stats(model)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, fused=device == "cuda")
    x = torch.randn(batch, 3, img_size, img_size, device=device)
    y = torch.randint(0, 100, (batch,), device=device)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device == "cuda" else nullcontext()

    def step():
        with autocast:
            logits = model(x)  # (B, 100)
        loss = F.cross_entropy(logits.float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return step, info


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True, help="the text summary")
    p.add_argument("--json", type=Path, help="the numbers (default: --out with .json)")
    p.add_argument("--smoke", action="store_true", help="ef_tiny, batch 4, 64 px: seconds, also on the CPU")
    p.add_argument("--device", default=None, choices=("cuda", "cpu"), help="default: cuda when available")
    p.add_argument("--warmup", type=int, default=5, help="steps before the profiled one (cuDNN autotuning, "
                                                         "allocator, AdamW state)")
    p.add_argument("--top", type=int, default=25, help="rows of each table")
    args = p.parse_args()
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: torch.cuda.is_available() is False; use --device cpu")
    model_name, batch, img = ("ef_tiny", 4, 64) if args.smoke else ("efl7", 32, 224)
    cuda = device == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    step, info = build_step(model_name, batch, img, device)
    for _ in range(args.warmup):
        step()
    sync()
    # host issue time: the step returns once every kernel is queued (CUDA runs asynchronously); wall: until done
    t0 = time.perf_counter()
    step()
    issue_ms = (time.perf_counter() - t0) * 1e3
    sync()
    wall_ms = (time.perf_counter() - t0) * 1e3

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        step()
        sync()
    events = prof.key_averages()
    kernels = [e for e in prof.events() if cuda and getattr(e.device_type, "name", "") == "CUDA"]
    kernel_ms = sum(device_time(e) for e in kernels) / 1e3
    sort = "self_device_time_total" if cuda else "self_cpu_time_total"
    top_ops = events.table(sort_by=sort, row_limit=args.top, max_name_column_width=60)
    numbers = dict(model=model_name, method="petah-2", batch=batch, img_size=img, device=device,
                   gpu=torch.cuda.get_device_name() if cuda else None, torch=torch.__version__,
                   amp="bf16" if cuda else "off", adapter_params=info["adapter_params"],
                   trainable_params=info["trainable_params"], wall_ms=wall_ms, host_issue_ms=issue_ms,
                   kernel_ms=kernel_ms if cuda else None, kernel_launches=len(kernels) if cuda else None,
                   top=[dict(name=e.key, calls=e.count, self_device_us=device_time(e),
                             self_cpu_us=e.self_cpu_time_total)
                        for e in sorted(events, key=lambda e: -(device_time(e) if cuda else e.self_cpu_time_total))
                        [:args.top]])
    busy = f", kernels {kernel_ms:.1f} ms ({100 * kernel_ms / wall_ms:.0f}% of the wall time) in {len(kernels)} " \
           f"launches" if cuda else ""
    numbers["summary"] = (f"{model_name} PETAH-2 step, batch {batch}, {img} px, {numbers['amp']}: "
                          f"wall {wall_ms:.1f} ms, host issue {issue_ms:.1f} ms{busy}")
    text = (f"{numbers['summary']}\n{device}{' ' + numbers['gpu'] if cuda else ''}, torch {torch.__version__}; "
            f"{info['adapter_params']:,} adapter parameters, {info['trainable_params']:,} trainable\n\n"
            f"ops by {'device' if cuda else 'CPU'} self time (one step):\n{top_ops}\n")
    if cuda:
        by_kernel = {}
        for e in kernels:
            by_kernel.setdefault(e.name, [0, 0.0])
            by_kernel[e.name][0] += 1
            by_kernel[e.name][1] += device_time(e)
        rows = sorted(by_kernel.items(), key=lambda kv: -kv[1][1])[:args.top]
        numbers["top_kernels"] = [dict(name=k, calls=n, us=us) for k, (n, us) in rows]
        text += "kernels by device time (one step):\n" + "".join(
            f"{us / 1e3:9.3f} ms {n:5d} x  {k[:110]}\n" for k, (n, us) in rows)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    (args.json or args.out.with_suffix(".json")).write_text(json.dumps(numbers, indent=1))
    print(text)


if __name__ == "__main__":
    main()
