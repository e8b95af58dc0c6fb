r"""
Classify your own images with one or more tasks trained by train_cls.py, on ONE resident base model.

Each task is its task file (OUT/adapters.safetensors of a train_cls.py run: adapters + head + metadata). The base
is built once from the tasks' metadata (model, model_cfg, img_size) and --weights (the checkpoint the runs
started from); the tasks are loaded into a tasks.bank.TaskBank, which never copies the backbone.

Every image by every task, in mixed-task batches (one forward pass serves several tasks):
    python predict_cls.py --model efl7 --weights efficientformer_l7.pth \
        --tasks cub=runs/cub/adapters.safetensors cars=runs/cars/adapters.safetensors \
        --images photos/ extra.jpg --topk 5 --out preds.jsonl
One task only (its adapters merged into the layers it adapts: the speed of a merged model):
    python predict_cls.py ... --task cub

Output: one JSON line per (image, task), images in the order given (folders: sorted, recursively):
    {"image": "photos/a.jpg", "task": "cub", "top": [{"class": "Laysan_Albatross", "index": 1, "prob": 0.93}, ...]}
Images are prepared with the evaluation transform of the base's checkpoint (resize to img_size / crop_pct,
centre crop, the checkpoint's mean / std), as train_cls.py evaluates.
"""

import argparse
import json
import os
import sys
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset

from data import IMG_EXTENSIONS, CorruptImageError, build_transform, read_image
from models import create_model, load_pretrained
from tasks.bank import TaskBank
from tasks.task_file import read_task
from training.report import progress

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--model", default=None,
                    help="the base model name (efl1 efl3 efl7 vits vitb or a tiny preset); it must be the one the "
                         "tasks were trained on (default: read from the task files)")
parser.add_argument("--weights", required=True, metavar="PATH",
                    help="the base checkpoint the tasks were trained on (train_cls.py's --weights)")
parser.add_argument("--tasks", required=True, nargs="+", metavar="NAME=FILE",
                    help="tasks as name=task file (OUT/adapters.safetensors of train_cls.py), e.g. "
                         "cub=runs/cub/adapters.safetensors")
parser.add_argument("--images", required=True, nargs="+", metavar="IMG_OR_DIR",
                    help=f"image files and folders (searched recursively for {' '.join(IMG_EXTENSIONS)})")
parser.add_argument("--task", default=None, help="predict with this task only (default: every task)")
parser.add_argument("--topk", type=int, default=5, help="classes per prediction, most probable first; default 5")
parser.add_argument("--out", default="preds.jsonl", help="output file (JSON lines); default preds.jsonl")
parser.add_argument("--batch-size", type=int, default=32,
                    help="samples (image, task pairs) per forward pass; default 32")
parser.add_argument("--workers", type=int, default=2, help="DataLoader processes decoding images; default 2")
parser.add_argument("--device", default=None, choices=("cpu", "cuda"), help="default: cuda when available")
args = parser.parse_args()

if args.topk < 1:
    parser.error(f"--topk {args.topk} must be >= 1")
if args.batch_size < 1:
    parser.error(f"--batch-size {args.batch_size} must be >= 1")
if args.workers < 0:
    parser.error(f"--workers {args.workers} must be >= 0")
out_dir = os.path.dirname(os.path.abspath(args.out))
if not os.path.isdir(out_dir):
    parser.error(f"--out {args.out}: the folder {out_dir} does not exist; create it first")
device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
if device.type == "cuda" and not torch.cuda.is_available():
    parser.error("--device cuda, but torch.cuda.is_available() is False; use --device cpu")

# -----------------------------------------------------------------------------
# tasks: name=file pairs, their metadata must describe one base model

task_files = {}
for spec in args.tasks:
    name, sep, path = spec.partition("=")
    if not sep or not name or not path:
        parser.error(f"--tasks {spec!r}: write each task as NAME=FILE, e.g. cub=runs/cub/adapters.safetensors")
    if name in task_files:
        parser.error(f"--tasks names {name!r} twice; give each task its own name")
    task_files[name] = path
if args.task is not None and args.task not in task_files:
    parser.error(f"--task {args.task!r} is not among --tasks (loaded tasks: {', '.join(task_files)})")
tasks = {}
for name, path in task_files.items():
    try:
        tasks[name] = read_task(path)
    except (ValueError, FileNotFoundError) as e:
        parser.error(f"--tasks {name}={path}: {e}")
    meta = tasks[name].meta
    if meta.get("kind") != "cls":
        parser.error(f"--tasks {name}={path} is a {meta.get('kind')!r} task; predict_cls.py runs classification "
                     f"tasks (train_cls.py); use predict_seg.py for segmentation")
    missing = [k for k in ("model", "num_classes", "img_size") if meta.get(k) is None]
    if missing:
        parser.error(f"--tasks {name}={path}: the task's metadata lacks {missing}; write it with a current "
                     f"train_cls.py")


def base_of(meta):  # what a task says about its base model
    return dict(model=meta["model"], model_cfg=meta.get("model_cfg") or {}, img_size=meta["img_size"])


first = next(iter(tasks))
base_cfg = base_of(tasks[first].meta)
for name, t in tasks.items():
    if base_of(t.meta) != base_cfg:
        parser.error(f"tasks {first!r} and {name!r} were trained on different base models ({base_cfg} vs "
                     f"{base_of(t.meta)}); one run of predict_cls.py serves tasks of one base")
if args.model is not None and args.model != base_cfg["model"]:
    parser.error(f"--model {args.model}, but the tasks were trained on {base_cfg['model']!r}: pass --model "
                 f"{base_cfg['model']} (or leave it out)")

# -----------------------------------------------------------------------------
# images

paths = []
for item in args.images:
    p = Path(item)
    if p.is_dir():
        found = sorted(q for q in p.rglob("*") if q.is_file() and q.suffix.lower() in IMG_EXTENSIONS)
        if not found:
            parser.error(f"--images {item}: the folder holds no {'/'.join(IMG_EXTENSIONS)} files")
        paths += [str(q) for q in found]
    elif p.is_file():
        paths.append(str(p))
    else:
        parser.error(f"--images {item}: no such file or folder")

# -----------------------------------------------------------------------------
# the base model, once, and the task bank

try:
    model = create_model(base_cfg["model"], num_classes=1, img_size=base_cfg["img_size"], **base_cfg["model_cfg"])
    load_pretrained(model, args.weights, strict=True, verbose=False)
except (ValueError, TypeError, FileNotFoundError) as e:
    parser.error(f"cannot build the base model {base_cfg} from --weights {args.weights}: {e}")
model.to(device)
bank = TaskBank(model)
for name, t in tasks.items():
    try:
        bank.add(name, t)
    except ValueError as e:
        parser.error(f"--tasks {name}={t.path}: {e}")
run = [args.task] if args.task is not None else list(tasks)
if args.task is not None:
    bank.select(args.task)  # one task: its layers merged, as fast as a merged model
dc = model.data_cfg  # the base checkpoint's evaluation transform
transform = build_transform(train=False, img_size=base_cfg["img_size"], mean=dc["mean"], std=dc["std"],
                            crop_pct=dc["crop_pct"], interpolation=dc["interpolation"])
print(f"{len(paths)} image(s) x {len(run)} task(s) ({', '.join(run)}) on one {base_cfg['model']} base "
      f"({sum(t.nbytes() for t in tasks.values()) / 1e6:.2f} MB of task tensors)", file=sys.stderr, flush=True)


class Pairs(Dataset):
    """(image, task) pairs, image-major: each image is decoded once per task (cheap next to the forward)."""

    def __len__(self):
        return len(paths) * len(run)

    def __getitem__(self, i):
        try:
            return transform(read_image(paths[i // len(run)])), i, ""
        except CorruptImageError as e:  # reported by the main process as a user error, not a worker traceback
            msg = f"cannot read image {paths[i // len(run)]} ({e.__cause__}): replace it, or leave it out of --images"
            return torch.zeros(3, base_cfg["img_size"], base_cfg["img_size"]), i, msg


loader = DataLoader(Pairs(), batch_size=args.batch_size, num_workers=args.workers)
names = {n: t.meta.get("class_names") or [str(i) for i in range(t.meta["num_classes"])] for n, t in tasks.items()}
tmp = f"{args.out}.tmp.{os.getpid()}"
try:
    with open(tmp, "w") as f, torch.inference_mode():
        for x, idx, errors in progress(loader, desc="predict"):
            bad = [e for e in errors if e]
            if bad:
                raise CorruptImageError(bad[0])
            x = x.to(device)
            batch_tasks = [run[i % len(run)] for i in idx.tolist()]
            outs = bank(x) if args.task is not None else bank(x, batch_tasks)  # (B, C) / per-sample logits
            for j, i in enumerate(idx.tolist()):
                t = batch_tasks[j]
                prob = outs[j].float().softmax(-1)  # (num_classes,)
                top = prob.topk(min(args.topk, prob.numel()))
                f.write(json.dumps({"image": paths[i // len(run)], "task": t, "top": [
                    {"class": names[t][k], "index": k, "prob": round(p, 6)}
                    for p, k in zip(top.values.tolist(), top.indices.tolist())]}) + "\n")
    os.replace(tmp, args.out)
except CorruptImageError as e:  # an unreadable image: the message names the file
    os.remove(tmp)
    parser.error(str(e))
except BaseException:
    if os.path.exists(tmp):
        os.remove(tmp)
    raise
print(f"wrote {len(paths) * len(run)} predictions to {args.out}", file=sys.stderr, flush=True)
