"""Peak memory of one training step with and without activation checkpointing (--grad-ckpt), CPU RSS.

    .venv/bin/python bench/bench_grad_ckpt.py                      # SAM ViT-B LoRA at 1024 b1, EF-L7 PETAH-2 224 b32
    .venv/bin/python bench/bench_grad_ckpt.py --sam-size 512       # SAM at 512 (where 1024 does not finish in time)
    .venv/bin/python bench/bench_grad_ckpt.py --only ef            # one model

Each configuration runs in its own process (a fresh allocator: one run's freed memory cannot hide another's
peak). It builds the model with random weights and the method's adapters, resets the kernel's peak-RSS mark
(writing 5 to /proc/self/clear_refs resets VmHWM), runs one training step (forward, backward, AdamW step) and
reports VmHWM minus the RSS at the start of the step: the activations, the gradients and the optimizer state of
the trained tensors (the frozen weights are in the start). This is the process' resident memory, not only
tensors, which is what a CPU run is limited by; on a GPU torch.cuda.max_memory_allocated is the number to use.
Not a test; numbers in
BENCHMARKS.md ("Activation checkpointing: peak memory").
"""
import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def rss_mb() -> float:
    """This process' resident set now (Linux /proc), in MB."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20


def reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # Linux >= 4.0: VmHWM (the peak RSS) := the RSS now


def peak_mb() -> float:
    """The peak RSS since the last reset_peak (VmHWM), in MB."""
    with open("/proc/self/status") as f:
        line = next(line for line in f if line.startswith("VmHWM:"))
    return int(line.split()[1]) / 1024  # kB


def child(model: str, size: int, batch: int, ckpt: bool) -> dict:
    """One configuration, in this process: build, one training step, the peak above the start."""
    import torch
    import torch.nn.functional as F

    sys.path.insert(0, str(ROOT))
    from methods import apply_method, apply_sam_method
    from models import create_model
    from models.grad_ckpt import set_grad_checkpointing

    torch.manual_seed(0)
    if model == "sam":
        net = create_model("sam_vitb", img_size=size, num_classes=1)
        apply_sam_method(net, "lora", num_classes=2, r=8, learn_interp=True)  # PETRAS: LoRA + norms + biases
        forward = net.segment
    else:
        net = create_model("efl7", img_size=size, num_classes=100)
        apply_method(net, "efl7", "petah", r=8, rc=2)
        forward = net
    if ckpt:
        assert set_grad_checkpointing(net) > 0
    params = [p for p in net.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    x = torch.randn(batch, 3, size, size)
    reset_peak()
    start = rss_mb()
    t0 = time.time()
    net.train()
    out = forward(x)  # (B, K, H, W) or (B, classes)
    loss = out.float().pow(2).mean() if model == "sam" else F.cross_entropy(out, torch.zeros(batch, dtype=torch.long))
    loss.backward()
    optimizer.step()
    return dict(model=model, size=size, batch=batch, grad_ckpt=ckpt, start_rss_mb=round(start, 1),
                peak_above_start_mb=round(peak_mb() - start, 1),
                step_s=round(time.time() - t0, 1), trainable=sum(p.numel() for p in params), torch=torch.__version__,
                threads=torch.get_num_threads())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sam-size", type=int, default=1024)
    ap.add_argument("--ef-batch", type=int, default=32)
    ap.add_argument("--only", choices=("sam", "ef"), default=None)
    ap.add_argument("--timeout", type=float, default=900, help="seconds per configuration; default 900")
    ap.add_argument("--child", nargs=4, metavar=("MODEL", "SIZE", "BATCH", "CKPT"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        m, s, b, c = args.child
        print(json.dumps(child(m, int(s), int(b), c == "1")), flush=True)
        return
    configs = [("sam", args.sam_size, 1), ("ef", 224, args.ef_batch)]
    for model, size, batch in configs:
        if args.only and model != args.only:
            continue
        for ckpt in (0, 1):
            cmd = [sys.executable, __file__, "--child", model, str(size), str(batch), str(ckpt)]
            try:
                out = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
            except subprocess.TimeoutExpired:
                print(json.dumps(dict(model=model, size=size, batch=batch, grad_ckpt=bool(ckpt),
                                      error=f"did not finish in {args.timeout:g} s")), flush=True)
                continue
            print(out.stdout.strip() or json.dumps(dict(model=model, error=out.stderr[-500:])), flush=True)


if __name__ == "__main__":
    main()
