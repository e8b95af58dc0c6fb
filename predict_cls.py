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
centre crop, the checkpoint's mean / std), as train_cls.py evaluates. An image that cannot be read (undecodable,
truncated, a broken link) is skipped and named in a summary at the end, as predict_seg.py does; --strict stops at
the first one instead. A run trained without --weights saved its random base as OUT/base.safetensors: pass it as
--weights, or leave --weights out and it is found next to the task files.
"""

import argparse
import json
import os
import sys

import torch
from torch.utils.data import DataLoader, Dataset

from data import IMG_EXTENSIONS, CorruptImageError, build_transform, find_images, read_image
from models import create_model, load_pretrained
from tasks.bank import TaskBank
from tasks.task_file import read_task
from training.report import progress

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--model", default=None,
                    help="the base model name (efl1 efl3 efl7 vits vitb or a tiny preset); it must be the one the "
                         "tasks were trained on (default: read from the task files)")
parser.add_argument("--weights", default=None, metavar="PATH",
                    help="the base checkpoint the tasks were trained on (train_cls.py's --weights); default: the "
                         "base.safetensors next to the task files (what a run without --weights saved)")
parser.add_argument("--tasks", required=True, nargs="+", metavar="NAME=FILE",
                    help="tasks as name=task file (OUT/adapters.safetensors of train_cls.py), e.g. "
                         "cub=runs/cub/adapters.safetensors")
parser.add_argument("--images", required=True, nargs="+", metavar="IMG_OR_DIR",
                    help=f"image files and folders (searched recursively for {' '.join(IMG_EXTENSIONS)})")
parser.add_argument("--task", default=None, help="predict with this task only (default: every task)")
parser.add_argument("--topk", type=int, default=5, help="classes per prediction, most probable first; default 5")
parser.add_argument("--out", default="preds.jsonl", help="output file (JSON lines); default preds.jsonl")
parser.add_argument("--strict", action="store_true",
                    help="stop at the first image that cannot be read (default: skip it and name it in the summary)")
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
if os.path.isdir(args.out):
    parser.error(f"--out {args.out} is a folder; --out names the JSON-lines file to write, e.g. "
                 f"{os.path.join(args.out, 'preds.jsonl')}")


def _gone(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # another user's process: alive
        return False
    except (OverflowError, ValueError):  # no such pid can exist
        return True
    return False


# the temporary of a predict_cls.py killed while writing this --out (os.replace never ran): removed, and said
stem = os.path.basename(args.out) + ".tmp."
for name in os.listdir(out_dir):
    if name.startswith(stem) and name[len(stem):].isdigit() and _gone(int(name[len(stem):])):
        os.remove(os.path.join(out_dir, name))
        print(f"removed {os.path.join(out_dir, name)}, left by an interrupted predict_cls.py", file=sys.stderr)
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
    task_type = meta.get("task_type")
    if task_type != "cls":
        parser.error(f"--tasks {name}={path} is a {task_type!r} task; predict_cls.py runs classification "
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

try:
    found, problems = find_images(args.images)
except (FileNotFoundError, ValueError) as e:
    parser.error(f"--images {e}")
if args.strict and problems:
    parser.error(f"--strict: cannot read {problems[0][0]}: {problems[0][1]}")
paths = [str(p) for p, _ in found]
unreadable = [(str(p), why) for p, why in problems]  # named in the summary; --strict stops at the first

if args.weights is None:  # a run without --weights saved its random base next to its task file
    bases = {os.path.join(os.path.dirname(os.path.abspath(p)), "base.safetensors") for p in task_files.values()}
    present = sorted(b for b in bases if os.path.isfile(b))
    if not present:
        parser.error("--weights is needed: the base checkpoint the tasks were trained on (train_cls.py's --weights; "
                     "a run without --weights saved OUT/base.safetensors, but none lies next to the task files)")
    args.weights = present[0]  # the fingerprint check of TaskBank.add tells a base of another run
    print(f"no --weights: using {args.weights}, the random base its run saved", file=sys.stderr, flush=True)

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
if len(run) == 1:
    bank.select(run[0])  # one task: its layers merged, as fast as a merged model (and whatever it trained applies)
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
        except CorruptImageError as e:  # reported by the main process (skipped and named), not a worker traceback
            return torch.zeros(3, base_cfg["img_size"], base_cfg["img_size"]), i, str(e.__cause__ or e)


loader = DataLoader(Pairs(), batch_size=args.batch_size, num_workers=args.workers)
names = {n: t.meta.get("class_names") or [str(i) for i in range(t.meta["num_classes"])] for n, t in tasks.items()}
class UsageStop(Exception):
    """Stop with a usage error (argparse-style) once the partial output is removed."""


tmp = f"{args.out}.tmp.{os.getpid()}"
written = 0
try:
    with open(tmp, "w") as f, torch.inference_mode():
        for x, idx, errors in progress(loader, desc="predict"):
            ok = [j for j, e in enumerate(errors) if not e]
            for j, e in enumerate(errors):
                i = int(idx[j])
                if e and i % len(run) == 0:  # an unreadable image: once, not once per task
                    if args.strict:
                        raise CorruptImageError(f"--strict: cannot read image {paths[i // len(run)]} ({e})")
                    unreadable.append((paths[i // len(run)], e))
            if not ok:
                continue
            x, idx = x[ok].to(device), idx[ok]
            batch_tasks = [run[i % len(run)] for i in idx.tolist()]
            try:
                outs = bank(x) if len(run) == 1 else bank(x, batch_tasks)  # (B, C) / per-sample logits
            except ValueError as e:  # a task trained tensors mixed-task batches cannot route (e.g. full FT)
                raise UsageStop(f"these tasks cannot share a batch: {e}. Run predict_cls.py once per task with "
                                f"--task NAME") from None
            for j, i in enumerate(idx.tolist()):
                t = batch_tasks[j]
                prob = outs[j].float().softmax(-1)  # (num_classes,)
                top = prob.topk(min(args.topk, prob.numel()))
                f.write(json.dumps({"image": paths[i // len(run)], "task": t, "top": [
                    {"class": names[t][k], "index": k, "prob": round(p, 6)}
                    for p, k in zip(top.values.tolist(), top.indices.tolist())]}) + "\n")
                written += 1
    if written == 0:
        raise CorruptImageError(f"cannot read image {unreadable[0][0]} ({unreadable[0][1]}), nor any other of the "
                                f"{len(unreadable)} given: no prediction written" if unreadable else
                                "no image to predict on")
    os.replace(tmp, args.out)
except (CorruptImageError, UsageStop) as e:  # --strict, nothing readable, tasks that cannot share a batch
    os.remove(tmp)
    parser.error(str(e))
except BaseException:
    if os.path.exists(tmp):
        os.remove(tmp)
    raise
print(f"wrote {written} predictions ({written // len(run)} image(s) x {len(run)} task(s)) "
      f"to {args.out}", file=sys.stderr, flush=True)
if unreadable:
    print(f"skipped {len(unreadable)} image(s) that cannot be read (replace or remove them; --strict stops at the "
          f"first):\n" + "\n".join(f"  {p}: {why}" for p, why in sorted(unreadable)), file=sys.stderr, flush=True)
