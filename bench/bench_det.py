"""Training step of the Cascade Mask R-CNN (train_det.py's detector) per method: time, backbone / head share, memory.

    .venv/bin/python bench/bench_det.py                                  # EF-L1, 2 images of 512 x 384, CPU
    .venv/bin/python bench/bench_det.py --size 800 1088 --device cuda    # a COCO-sized batch on a GPU

Each method runs in its own process (so that one's memory does not hide in another's peak). Per method: the median
time of a whole training step (forward, backward, AdamW) over --repeats steps after one warm-up step (wall time on
CUDA; on the CPU the process's CPU time, which the other jobs of a shared machine do not inflate: run with
OMP_NUM_THREADS=1 so that it is the step's work; every step draws the same anchor / RoI samples, so the work is the
same); the backbone alone as it runs in the step (forward on the padded batch, backward into its trainable
parameters), whence its share of the step (the rest: GroupNorm + FPN + RPN + 3 cascade stages + mask heads, and
AdamW); and the peak memory of one step: on CUDA
torch.cuda.max_memory_allocated, on CPU the process's peak resident set (VmHWM, reset before the step through
/proc/self/clear_refs) and its growth during the step over what was resident before (weights, optimizer state).
The heads are the mmdetection sizes (FPN 256, 2 fc of 1024, mask convs 256, 512 RoIs per image and stage, 81 classes).
Not a test: the numbers depend on the machine and its load; BENCHMARKS.md records a run.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def rss_mb(field: str) -> float:
    """VmRSS (now) or VmHWM (peak since the last reset) of this process, in MiB (Linux)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def batch(n: int, h: int, w: int, device, seed: int = 0):
    """n images (3, h, w) with 3-6 objects each: random boxes, classes 1..80, masks = the box's inner ellipse."""
    g = torch.Generator().manual_seed(seed)
    images, targets = [], []
    for _ in range(n):
        k = int(torch.randint(3, 7, (1,), generator=g))
        wh = torch.rand(k, 2, generator=g) * torch.tensor([w / 3, h / 3]) + 24
        xy = torch.rand(k, 2, generator=g) * (torch.tensor([w, h]) - wh)
        boxes = torch.cat([xy, xy + wh], 1)
        yy, xx = torch.meshgrid(torch.arange(h) + 0.5, torch.arange(w) + 0.5, indexing="ij")
        c, r = (boxes[:, :2] + boxes[:, 2:]) / 2, wh / 2
        masks = (((xx - c[:, 0, None, None]) / r[:, 0, None, None]) ** 2
                 + ((yy - c[:, 1, None, None]) / r[:, 1, None, None]) ** 2 <= 1).to(torch.uint8)
        images.append(torch.rand(3, h, w, generator=g).to(device))
        targets.append(dict(boxes=boxes.to(device), labels=torch.randint(1, 81, (k,), generator=g).to(device),
                            masks=masks.to(device)))
    return images, targets


def worker(a) -> dict:
    from lora import freeze_bn_stats
    from methods import apply_method
    from models import create_model
    from models.det.detector import build_cascade_mask_rcnn

    torch.manual_seed(0)
    device = torch.device(a.device)
    body = create_model(a.model, num_classes=0, img_size=224)
    apply_method(body, a.model, "linear" if a.worker == "frozen" else a.worker, r=8, rc=2, head_names=())
    torch.manual_seed(1)  # the same head weights for every method (the adapters drew from the generator above)
    det = build_cascade_mask_rcnn(body, num_classes=81).to(device)
    trainable = [p for p in det.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=1e-4, weight_decay=0.05)
    images, targets = batch(a.batch, a.size[0], a.size[1], device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    # on the CPU the process's CPU time (time.process_time) is the measure: on a shared machine the wall time also
    # counts the time other processes held the cores (with one thread, CPU time = the work of the step)
    clock = time.perf_counter if device.type == "cuda" else time.process_time

    def step() -> float:
        torch.manual_seed(1)  # every step samples the same anchors and RoIs: the same work, comparable times
        sync()
        t = clock()
        det.train()
        freeze_bn_stats(det)
        loss = sum(det(images, targets).values())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sync()
        return clock() - t

    step()  # warm-up: allocator, optimizer state
    rss_before = rss_mb("VmRSS")
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base_cuda = torch.cuda.memory_allocated() / 2 ** 20
    else:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM to the current RSS
    times = [step() for _ in range(a.repeats)]
    out = dict(method=a.worker, model=a.model, size=list(a.size), batch=a.batch, device=a.device,
               threads=torch.get_num_threads(), clock="wall" if device.type == "cuda" else "process CPU time",
               trainable_params=sum(p.numel() for p in trainable),
               step_s=statistics.median(times), step_times_s=[round(t, 3) for t in times])
    if device.type == "cuda":
        out.update(peak_mb=torch.cuda.max_memory_allocated() / 2 ** 20, resident_before_mb=base_cuda)
    else:
        out.update(peak_mb=rss_mb("VmHWM"), resident_before_mb=rss_before)
    out["step_growth_mb"] = out["peak_mb"] - out["resident_before_mb"]

    # the backbone alone, as it runs inside the step: forward on the padded batch, backward of the stage maps
    # against fixed cotangents when anything in it trains (frozen: forward only, no graph is built)
    image_list, _ = det.transform(images, targets)
    x = image_list.tensors
    g = [torch.randn_like(m) for m in det.backbone.body.forward_pyramid(x)]

    def backbone_step() -> float:
        sync()
        t = clock()
        maps = det.backbone.body.forward_pyramid(x)
        if maps[0].requires_grad:
            torch.autograd.backward(maps, g)
        sync()
        return clock() - t

    det.train()
    freeze_bn_stats(det)
    backbone_step()
    out["backbone_s"] = statistics.median([backbone_step() for _ in range(a.repeats)])
    out["backbone_share"] = out["backbone_s"] / out["step_s"]
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="efl1", help="EfficientFormer (efl1, efl3, efl7, ef_tiny); default efl1")
    p.add_argument("--size", type=int, nargs=2, default=(512, 384), metavar=("H", "W"),
                   help="image size (a multiple of 32 avoids padding); default 512 384")
    p.add_argument("--batch", type=int, default=2, help="images per step; default 2 (mmdetection: 2 per GPU)")
    p.add_argument("--repeats", type=int, default=3, help="timed steps per measurement; default 3")
    p.add_argument("--methods", nargs="+", default=["petah", "full", "frozen"],
                   choices=["petah", "full", "frozen", "lora", "attn"], help="default: petah (rc 2) full frozen")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--out", default=None, metavar="FILE", help="also write the rows as JSON lines here")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker:
        print(json.dumps(worker(a)), flush=True)
        return
    rows = []
    for m in a.methods:
        cmd = [sys.executable, __file__, "--worker", m, "--model", a.model, "--size", *map(str, a.size),
               "--batch", str(a.batch), "--repeats", str(a.repeats), "--device", a.device]
        res = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ})
        if res.returncode:
            sys.exit(f"worker {m} failed:\n{res.stderr}")
        rows.append(json.loads(res.stdout.strip().splitlines()[-1]))
        r = rows[-1]
        print(f"{m:7s} step {r['step_s']:.2f} s (backbone forward + backward {r['backbone_s']:.2f} s: "
              f"{100 * r['backbone_share']:.0f}%), peak {r['peak_mb']:.0f} MiB (+{r['step_growth_mb']:.0f} MiB during "
              f"the step), {r['trainable_params']:,} trainable", flush=True)
    by = {r["method"]: r for r in rows}
    if "petah" in by and "full" in by:
        print(f"PETAH-2 / full: step time {by['petah']['step_s'] / by['full']['step_s']:.2f}, peak memory "
              f"{by['petah']['peak_mb'] / by['full']['peak_mb']:.2f}, step growth "
              f"{by['petah']['step_growth_mb'] / by['full']['step_growth_mb']:.2f}")
    if a.out:
        Path(a.out).write_text("".join(json.dumps(r) + "\n" for r in rows))


if __name__ == "__main__":
    main()
