r"""
Run the tasks of a deployment bundle (export.py --bundle) on your images: the device side, without PyTorch.

It imports onnxruntime, numpy and Pillow only. Every task is one onnxruntime session on the bundle's shared
base; every preprocessing step (resize with the task's interpolation, crop, mean / std) comes from manifest.json.
Each file a task uses is checked against the sha256 in the manifest before it is loaded.

    python run_bundle.py --bundle bundle/ --images photos/ --out preds.jsonl             # every task
    python run_bundle.py --bundle bundle/ --images photos/ --task cub cars --topk 3      # some tasks

Classification tasks write predict_cls.py's JSON lines to --out (one per image and task, images in the order
given, folders sorted and searched recursively):
    {"image": "photos/a.jpg", "task": "cub", "top": [{"class": "Laysan_Albatross", "index": 1, "prob": 0.93}, ...]}
Segmentation tasks write predict_seg.py's mask PNGs (class ids, each image's own size) to --masks/TASK/NAME.png
(NAME: the image's path relative to the folder given, its extension replaced by .png).
Needs: pip install onnxruntime numpy pillow
"""

import argparse
import json
import os
import sys
from pathlib import Path

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".gif")  # what predict_cls.py reads

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--bundle", required=True, metavar="DIR", help="the bundle (export.py --bundle DIR)")
parser.add_argument("--images", required=True, nargs="+", metavar="IMG_OR_DIR",
                    help=f"image files and folders (searched recursively for {' '.join(IMG_EXTENSIONS)})")
parser.add_argument("--task", nargs="+", default=None, metavar="NAME", help="run these tasks (default: every task)")
parser.add_argument("--topk", type=int, default=5, help="classes per prediction, most probable first; default 5")
parser.add_argument("--out", default=None, help="classification output (JSON lines); default preds.jsonl")
parser.add_argument("--masks", default=None, metavar="DIR",
                    help="segmentation output: DIR/TASK/<image name>.png; default ./masks")
parser.add_argument("--batch-size", type=int, default=8, help="images per onnxruntime call; default 8")
parser.add_argument("--threads", type=int, default=0, help="onnxruntime intra-op threads; default 0 (its choice)")
args = parser.parse_args()

try:
    import numpy as np
    import onnxruntime as ort
    from PIL import Image
except ImportError as e:
    parser.error(f"{e.name} is not installed: pip install onnxruntime numpy pillow")

from tasks.manifest import BundleError, read_manifest, verify_files  # noqa: E402  (torch-free)

if args.topk < 1:
    parser.error(f"--topk {args.topk} must be >= 1")
if args.batch_size < 1:
    parser.error(f"--batch-size {args.batch_size} must be >= 1")
if args.threads < 0:
    parser.error(f"--threads {args.threads} must be >= 0")
try:
    manifest = read_manifest(args.bundle)
    if manifest.get("runtime") != "onnx":  # ExecuTorch's Python runtime (the executorch wheel) imports torch
        parser.error(f"--bundle {args.bundle} is a {manifest.get('runtime')!r} bundle; run_bundle.py runs ONNX "
                     f"bundles without PyTorch (export.py --bundle ... --format onnx). Run a pte task with PyTorch "
                     f"installed: tasks.pte.run_pte(DIR/<task graph>, x, data_path=DIR/base.ptd), or with "
                     f"ExecuTorch's C++ / Android / iOS runtime")
    names = args.task or list(manifest["tasks"])
    verify_files(args.bundle, manifest, names)  # an unknown task name, a missing or changed file
except BundleError as e:
    parser.error(str(e))
tasks = {n: manifest["tasks"][n] for n in names}
cls_tasks = [n for n, t in tasks.items() if t["task_type"] == "cls"]
seg_tasks = [n for n, t in tasks.items() if t["task_type"] == "seg"]
for flag, value, code, kind, chosen in (("--out", args.out, "cls", "classification", cls_tasks),
                                        ("--masks", args.masks, "seg", "segmentation", seg_tasks)):
    if value is not None and not chosen:  # an output that no task run writes
        have = [n for n, t in manifest["tasks"].items() if t["task_type"] == code]
        parser.error(f"{flag} {value} is the output of {kind} tasks, and none of the tasks run ({', '.join(tasks)}) "
                     f"is one: drop {flag}" + (f", or add one with --task (this bundle's: {', '.join(have)})" if have
                                                else f" (this bundle has no {kind} task)"))
args.out = "preds.jsonl" if args.out is None else args.out  # the defaults (None above: was the flag given?)
args.masks = "masks" if args.masks is None else args.masks
for path, what in ((args.out, "--out"),) if cls_tasks else ():
    if not path:
        parser.error(f"{what} is empty: give a file name, e.g. preds.jsonl")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        parser.error(f"{what} {path}: the folder {folder} does not exist; create it first")
    if os.path.isdir(path):
        parser.error(f"{what} {path} is a directory; give a file name, e.g. {os.path.join(path, 'preds.jsonl')}")

# -----------------------------------------------------------------------------
# images, as predict_cls.py lists them

paths, rel = [], []  # rel: each image's name relative to what was given (the mask's name)
for item in args.images:
    if os.path.isdir(item):  # predict_cls.py's order: each folder's files sorted, then its subfolders, sorted
        found = []
        for d, subdirs, fs in os.walk(item, followlinks=True):
            subdirs.sort()
            found += [str(Path(d) / f) for f in sorted(fs) if f.lower().endswith(IMG_EXTENSIONS)]
        if not found:
            parser.error(f"--images {item}: the folder holds no {'/'.join(IMG_EXTENSIONS)} files")
        paths += found
        rel += [os.path.relpath(p, item) for p in found]
    elif os.path.isfile(item):
        paths.append(str(Path(item)))
        rel.append(os.path.basename(item))
    else:
        parser.error(f"--images {item}: no such file or folder")


def mask_names(names: list[str]) -> list[str]:
    """predict_seg.py's mask names: the name with its extension replaced by .png where no other image gets that
    name; else (x.jpg and x.png in one folder) the whole name + .png."""
    stems = [os.path.splitext(n)[0] + ".png" for n in names]
    out = [s if stems.count(s) == 1 else f"{n}.png" for n, s in zip(names, stems)]
    return out if len(set(out)) == len(out) else [f"{n}.png" for n in names]


def read_rgb(path: str) -> "Image.Image":
    """The image as 8-bit RGB (an animated GIF: its first frame); the error names the file."""
    try:
        with Image.open(path) as im:
            im.seek(0)
            return im.convert("RGB")
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        parser.error(f"cannot read image {path} ({e}): replace it, or leave it out of --images")


PIL_MODES = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR,
             "nearest": Image.Resampling.NEAREST}


def normalise(im: "Image.Image", mean, std) -> "np.ndarray":
    x = np.asarray(im, dtype=np.float32).transpose(2, 0, 1) / 255.0  # (3, H, W) in [0, 1]
    return (x - np.asarray(mean, np.float32)[:, None, None]) / np.asarray(std, np.float32)[:, None, None]


def prepare_cls(im: "Image.Image", p: dict) -> "np.ndarray":
    """predict_cls.py's evaluation transform: the shorter side to resize_to, centre crop, mean / std."""
    w, h = im.size
    s = p["resize_to"]
    size = (s, int(s * h / w)) if w <= h else (int(s * w / h), s)  # (W, H), torchvision's rounding
    if size != (w, h):
        im = im.resize(size, PIL_MODES[p["interpolation"]])
    w, h = im.size
    c = p["crop"]
    top, left = int(round((h - c) / 2.0)), int(round((w - c) / 2.0))
    return normalise(im.crop((left, top, left + c, top + c)), p["mean"], p["std"])  # (3, c, c)


def prepare_seg(im: "Image.Image", p: dict) -> tuple:
    """predict_seg.py's canvas: the longer side to `size` (bilinear, antialiased), normalised, zero-padded at the
    bottom / right. Returns ((3, S, S), (h, w) of the image's part)."""
    w, h = im.size
    S = p["size"]
    f = S / max(h, w)
    nh, nw = max(1, round(h * f)), max(1, round(w * f))
    if (nh, nw) != (h, w):
        im = im.resize((nw, nh), PIL_MODES[p["interpolation"]])
    x = np.zeros((3, S, S), np.float32)
    x[:, :nh, :nw] = normalise(im, p["mean"], p["std"])
    return x, (nh, nw)


def upsample_bilinear(y: "np.ndarray", H: int, W: int) -> "np.ndarray":
    """(K, h, w) -> (K, H, W), bilinear with half-pixel centres (torch's interpolate, align_corners=False)."""
    def taps(n_out, n_in):
        src = np.maximum((np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5, 0.0)
        i0 = np.minimum(np.floor(src).astype(np.int64), n_in - 1)
        i1 = np.minimum(i0 + 1, n_in - 1)
        return i0, i1, (src - i0).astype(np.float32)
    r0, r1, fy = taps(H, y.shape[1])
    c0, c1, fx = taps(W, y.shape[2])
    rows = y[:, r0] * (1 - fy)[None, :, None] + y[:, r1] * fy[None, :, None]  # (K, H, w)
    return rows[:, :, c0] * (1 - fx) + rows[:, :, c1] * fx  # (K, H, W)


# -----------------------------------------------------------------------------
# one session per task on the shared base


opts = ort.SessionOptions()
opts.intra_op_num_threads = args.threads
sessions = {}
for n, t in tasks.items():
    try:
        sessions[n] = ort.InferenceSession(os.path.join(args.bundle, t["graph"]), opts,
                                           providers=["CPUExecutionProvider"])
    except Exception as e:  # onnxruntime raises its own exception types
        parser.error(f"task {n}: onnxruntime cannot load {t['graph']} ({e})")
print(f"{len(paths)} image(s) x {len(tasks)} task(s) ({', '.join(tasks)}) of bundle {args.bundle}", file=sys.stderr,
      flush=True)


def softmax(z: "np.ndarray") -> "np.ndarray":
    z = z.astype(np.float64) - z.max(-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(-1, keepdims=True)


def classify() -> None:
    """Every image by every classification task, written as predict_cls.py writes (image-major)."""
    rows = {}
    for n in cls_tasks:
        t = tasks[n]
        names = t.get("class_names") or [str(i) for i in range(t["num_classes"])]
        for b in range(0, len(paths), args.batch_size):
            chunk = paths[b:b + args.batch_size]
            x = np.stack([prepare_cls(read_rgb(p), t["preprocess"]) for p in chunk])  # (B, 3, S, S)
            prob = softmax(sessions[n].run(None, {t["input"]: x})[0])  # (B, K)
            for p, pr in zip(chunk, prob):
                top = np.argsort(-pr, kind="stable")[:min(args.topk, pr.size)]
                rows[(p, n)] = {"image": p, "task": n, "top": [
                    {"class": names[k], "index": int(k), "prob": round(float(pr[k]), 6)} for k in top]}
    tmp = f"{args.out}.tmp.{os.getpid()}"
    try:
        with open(tmp, "w") as f:
            for p in paths:
                for n in cls_tasks:
                    f.write(json.dumps(rows[(p, n)]) + "\n")
        os.replace(tmp, args.out)
    except OSError as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        parser.error(f"cannot write --out {args.out} ({e.strerror or e}); choose another --out")
    print(f"wrote {len(rows)} predictions to {args.out}", file=sys.stderr, flush=True)


def segment() -> None:
    """A mask PNG of class ids per image and segmentation task, at the image's own size."""
    for n in seg_tasks:
        t = tasks[n]
        folder = os.path.join(args.masks, n)
        try:
            os.makedirs(folder, exist_ok=True)
        except OSError as e:
            parser.error(f"cannot create {folder} ({e.strerror or e}); choose another --masks")
        for p, mask_name in zip(paths, mask_names(rel)):
            im = read_rgb(p)
            W, H = im.size
            x, (h, w) = prepare_seg(im, t["preprocess"])
            y = sessions[n].run(None, {t["input"]: x[None]})[0][0, :, :h, :w]  # (K, h, w) the image's part
            y = upsample_bilinear(y, H, W)  # (K, H, W)
            mask = (y[0] > 0) if y.shape[0] == 1 else y.argmax(0)  # K = 1: logit > 0 is class 1
            out = os.path.join(folder, mask_name)
            os.makedirs(os.path.dirname(out), exist_ok=True)
            Image.fromarray(mask.astype(np.uint8), mode="L").save(out)
        print(f"wrote {len(paths)} masks to {folder}", file=sys.stderr, flush=True)


classify() if cls_tasks else None
segment() if seg_tasks else None
