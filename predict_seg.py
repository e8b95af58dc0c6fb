r"""
Use a segmentation model fine-tuned by train_seg.py: masks for a folder of images, or the evaluation of a
checkpoint on a dataset's validation split. The model is rebuilt from the settings stored in the checkpoint's
metadata (the task file adapters.safetensors, or a checkpoint of train_seg.py: final.safetensors, topk/ or
ckpt/ files) on the same base: pass the --weights the run used. A run without --weights saved its random base as
OUT/base.safetensors: without --weights that file is used when it lies next to the checkpoint (or one folder
up); a run older than that file gets its random base rebuilt from its --seed.

Masks (single-channel PNGs of class ids at each image's own size, OUT/<the image's path in its folder>.png; x.jpg
and x.png side by side become x.jpg.png and x.png.png) and the competition's run-length JSON:
    python predict_seg.py --checkpoint runs/petras/final.safetensors --weights sam_vit_b_01ec64.pth \
        --images ~/data/ucc/img/test --out runs/petras/pred --rle-json runs/petras/submission.json
Evaluation (one JSON line: miou, pixel_acc, iou_fg for binary tasks), with the protocol of the dataset
(data_seg.py: ADE20K as mmsegmentation scores it, at the original image size):
    python predict_seg.py --checkpoint runs/ade_petah2/final.safetensors --weights efficientformer_l7.pth \
        --eval ade20k --data-root ~/data
On 8 GPUs: torchrun --nproc_per_node 8 predict_seg.py -- <same flags> (every process takes every 8th image).
An image that cannot be read (undecodable, truncated, a broken link) is skipped and named in a summary at the end,
as predict_cls.py does; --strict stops at the first one instead.
"""

import argparse
import json
import os
import sys
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.distributed as torch_dist
from torch import nn
from torch.utils.data import DataLoader, Subset
from tqdm import tqdm

from data import CorruptImageError, find_images, read_image
from dataio import seg as data_seg
from lora import load_adapters, read_safetensors
from methods import apply_method, apply_sam_method
from models import PRESETS, create_model, ef_semantic_fpn, load_pretrained
from tasks.atomic import atomic_write, atomic_write_text
from training.cli import check_common_args, strip_leading_dashdash, user_errors
from training.distributed import cleanup_distributed, setup_distributed
from training.seg_metrics import evaluate, metrics, predict_logits, to_classes

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--checkpoint", required=True, metavar="FILE",
                    help="the task file (OUT/adapters.safetensors) or a checkpoint of train_seg.py (final.safetensors, "
                         "a topk/ or ckpt/ file)")
parser.add_argument("--weights", default=None, metavar="PATH",
                    help="the pretrained checkpoint the run started from (its --weights); default: the run's "
                         "base.safetensors next to --checkpoint (a run without --weights), else the random base "
                         "rebuilt from the run's --seed")
parser.add_argument("--images", default=None, nargs="+", metavar="IMG_OR_DIR",
                    help="write a mask PNG per image into --out: image files and folders (searched recursively, "
                         "the masks keep the images' relative paths)")
parser.add_argument("--strict", action="store_true",
                    help="--images: stop at the first image that cannot be read (default: skip it and name it in "
                         "the summary)")
parser.add_argument("--out", default="pred", metavar="DIR", help="--images: output folder; default ./pred")
parser.add_argument("--rle-json", default=None, metavar="FILE",
                    help="--images: also write {image name: run-length encoding of class 1} (1-based start/length "
                         "pairs, column-major; binary tasks)")
parser.add_argument("--eval", default=None, choices=data_seg.SEG_DATASETS, metavar="DATA",
                    help=f"evaluate on the validation split of this dataset ({', '.join(data_seg.SEG_DATASETS)})")
parser.add_argument("--data-root", default="data", help="--eval: directory holding the dataset; default ./data")
parser.add_argument("--synthetic-val", type=int, default=8,
                    help="--eval synthetic: validation images per class, as train_seg.py's flag; default 8")
parser.add_argument("--eval-mode", default="whole", choices=("whole", "slide"),
                    help="whole (default): the model on the whole image (SAM: resized to its input); slide: "
                         "windows of the model's input every --eval-stride pixels")
parser.add_argument("--eval-size", type=int, default=None,
                    help="folder / synthetic: the square canvas; ade20k: the scale (4 x, 1 x) the image must fit; "
                         "default the model's --img-size")
parser.add_argument("--eval-stride", type=int, default=None, help="--eval-mode slide: window stride; default 2/3 S")
parser.add_argument("--batch-size", type=int, default=1, help="images per forward pass and process; default 1")
parser.add_argument("--workers", type=int, default=2, help="DataLoader worker processes; default 2")
parser.add_argument("--device", default=None, choices=("cpu", "cuda"), help="default: cuda when available")
args = parser.parse_args(strip_leading_dashdash(sys.argv[1:]))  # a stray leading "--" (torchrun ... -- --flags)
check_common_args(parser, args)  # --batch-size, --workers ranges, --weights exists
with user_errors(parser):  # --device cuda without CUDA
    dist = setup_distributed(args.device)


def log(*a):
    if dist.master:
        print(*a, flush=True)


if (args.images is None) == (args.eval is None):
    parser.error("give --images DIR (write masks) or --eval DATA (score the validation split), one of the two")
if args.rle_json and not args.images:
    parser.error("--rle-json needs --images DIR (the images to encode)")
for name in ("eval_size", "eval_stride"):
    if getattr(args, name) is not None and getattr(args, name) < 1:
        parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
if not os.path.isfile(args.checkpoint):
    parser.error(f"--checkpoint {args.checkpoint} does not exist; pass the final.safetensors (or a topk/ or ckpt/ "
                 f"file) of a finished train_seg.py run")
try:
    user = json.loads(read_safetensors(args.checkpoint)[1].get("user", "{}"))  # the run's seed, dataset, eval size
    stored = json.loads(user.get("model_args", "{}"))  # and the settings that rebuild its model
except Exception as e:  # not a safetensors file, or metadata of another program
    parser.error(f"--checkpoint {args.checkpoint}: cannot read its metadata ({type(e).__name__}: {e}); pass an "
                 f"the task file or a checkpoint written by train_seg.py (adapters.safetensors, final.safetensors, "
                 f"topk/ or ckpt/ files)")
if not stored:
    parser.error(f"--checkpoint {args.checkpoint} has no model settings in its metadata; was it written by "
                 f"train_seg.py?")
cfg = argparse.Namespace(**stored)
log(f"model settings from {args.checkpoint}: {stored}")

# -----------------------------------------------------------------------------
# the model of the run: base (pretrained or the seeded random one), the method's adapters, the run's adapters

if args.weights is None:  # a run without --weights: its OUT/base.safetensors (the checkpoint may be in topk/, ckpt/)
    here = Path(args.checkpoint).resolve().parent
    base = next((d / "base.safetensors" for d in (here, here.parent) if (d / "base.safetensors").is_file()), None)
    if base is not None:
        args.weights = str(base)
        log(f"no --weights: using {base}, the random base the run saved")
    else:
        log(f"no --weights and no base.safetensors next to {args.checkpoint}: rebuilding the run's random base from "
            f"its --seed {user.get('seed', 0)}")
builder, preset_cfg = PRESETS.get(cfg.model, (cfg.model, {}))
model_cfg = {**preset_cfg, **json.loads(cfg.model_cfg)}
torch.manual_seed(user.get("seed", 0))  # as train_seg.py: the same random base when the run had no --weights
if builder == "sam_vitb":
    model = create_model(builder, img_size=cfg.img_size, num_classes=1 if cfg.num_classes <= 2 else cfg.num_classes,
                         **model_cfg)
    if args.weights:
        with user_errors(parser):  # a damaged file, a layout that does not fit the model
            load_pretrained(model, args.weights, strict=True, verbose=dist.master)
    apply_sam_method(model, cfg.method, num_classes=cfg.num_classes, r=cfg.r, alpha=cfg.alpha,
                     learn_interp=cfg.learn_interp, train_biases=cfg.train_biases, train_norms=cfg.train_norms)
else:
    model = create_model(builder, num_classes=0, img_size=cfg.img_size, **model_cfg)
    if args.weights:
        with user_errors(parser):
            load_pretrained(model, args.weights, strict=True, verbose=dist.master)
    model.norm = nn.Identity()
    apply_method(model, cfg.model, cfg.method, r=cfg.r, rc=cfg.rc, alpha=cfg.alpha, train_biases=cfg.train_biases,
                 train_norms=cfg.train_norms, learn_interp=cfg.learn_interp, head_names=())
    model = ef_semantic_fpn(model, num_classes=cfg.num_classes, channels=cfg.fpn_channels,
                            head_channels=cfg.fpn_head_channels)
try:
    load_adapters(model, args.checkpoint)
except ValueError as e:  # another base than the run's (lora.load_adapters checks a fingerprint of it)
    parser.error(f"--checkpoint {args.checkpoint} does not fit this base model: {e}. Pass the --weights the run "
                 f"used.")
model.to(dist.device).eval()
autocast = torch.autocast("cuda", dtype=torch.bfloat16) if dist.device.type == "cuda" else nullcontext()
mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # train_seg.py's normalisation (both recipes)
eval_size = args.eval_size or user.get("eval_size") or cfg.img_size

# -----------------------------------------------------------------------------
# --eval: the validation split, scored with the dataset's protocol

if args.eval:
    try:
        _, val_ds, _, num_classes = data_seg.build_seg_datasets(
            args.eval, args.data_root, img_size=eval_size, mean=mean, std=std, num_classes=cfg.num_classes,
            synthetic_cfg=dict(val_per_class=args.synthetic_val))
    except (FileNotFoundError, ValueError) as e:
        parser.error(str(e))
    loader = DataLoader(Subset(val_ds, range(dist.rank, len(val_ds), dist.world_size)), batch_size=args.batch_size,
                        collate_fn=list, num_workers=args.workers)
    with user_errors(parser, quiet=not dist.master):  # an unreadable image, a mask that does not fit its image
        cm, _, _ = evaluate(model, loader, num_classes=num_classes, dist=dist, mode=args.eval_mode,
                            stride=args.eval_stride, amp=autocast)
    if dist.master:
        print(json.dumps(dict(checkpoint=args.checkpoint, data=args.eval, images=len(val_ds), **metrics(cm))),
              flush=True)
    cleanup_distributed(dist)
    sys.exit(0)

# -----------------------------------------------------------------------------
# --images: a mask PNG per image at the image's own size (and the run-length JSON). The image goes through the
# evaluation transform of the run's protocol with a dummy mask: folder / synthetic runs see the square canvas
# (longer side resized to --eval-size, padded), ADE20K runs the image resized keeping its ratio.

try:
    found, problems = find_images(args.images)
except (FileNotFoundError, ValueError) as e:
    parser.error(f"--images {e}")
names = data_seg.mask_names([name for _, name in found])
ade = data_seg.AdeEvalTransform(img_size=eval_size, mean=mean, std=std) if user.get("data") == "ade20k" else None
canvas = data_seg.SegTransform(train=False, img_size=eval_size, mean=mean, std=std)
out_dir = Path(args.out)
if out_dir.exists() and not out_dir.is_dir():
    parser.error(f"--out {out_dir} is an existing file, not a directory; choose another --out")
if args.strict and problems:
    parser.error(f"--strict: cannot read {problems[0][0]}: {problems[0][1]}")
with user_errors(parser, OSError):
    out_dir.mkdir(parents=True, exist_ok=True)


@torch.no_grad()
def predict_mask(img):
    """(3, H, W) uint8 image -> (H, W) class ids at the image's size, with the run's evaluation transform."""
    H, W = img.shape[-2:]
    if ade is not None:
        x, _ = ade(img, torch.zeros(H, W, dtype=torch.uint8))  # (3, h, w)
        logits = predict_logits(model, x[None].to(dist.device), mode=args.eval_mode, out_size=(H, W),
                                stride=args.eval_stride, amp=autocast)  # (1, K, H, W)
    else:
        x, where = canvas(img, torch.zeros(H, W, dtype=torch.uint8))  # (3, C, C), (C, C): ignore = padding
        inside = where != data_seg.IGNORE_INDEX  # (C, C): the image's part of the canvas
        h, w = int(inside.any(1).sum()), int(inside.any(0).sum())
        logits = predict_logits(model, x[None].to(dist.device), mode=args.eval_mode, out_size=x.shape[-2:],
                                stride=args.eval_stride, amp=autocast)[..., :h, :w]  # the image's part
        logits = torch.nn.functional.interpolate(logits, size=(H, W), mode="bilinear", align_corners=False)
    return to_classes(logits)[0].cpu()


rle, written, unreadable = {}, 0, []
mine = list(zip(found, names))[dist.rank::dist.world_size]
for ((path, _), name) in tqdm(mine, desc="predict", disable=not dist.master):
    try:
        img = read_image(path)  # (3, H, W) uint8
    except CorruptImageError as e:  # undecodable, truncated: skipped and named at the end (--strict: stop)
        if args.strict:
            parser.error(f"--strict: {e.__cause__ or e} [{path}]")
        unreadable.append((str(path), str(e.__cause__ or e)))
        continue
    mask = predict_mask(img)
    target = out_dir / name
    with user_errors(parser):  # disk full, read-only file system: named, no partial file
        target.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(str(target), lambda f: f.write(data_seg.encode_mask_png(mask)))
    written += 1
    if args.rle_json:
        rle[name[:-len(".png")]] = data_seg.rle_encode(mask == 1)
counts = [(written, unreadable)]
if dist.ddp:
    counts = [None] * dist.world_size
    torch_dist.all_gather_object(counts, (written, unreadable))
written = sum(n for n, _ in counts)
unreadable = [u for _, us in counts for u in us] + [(str(p), why) for p, why in problems]
if args.rle_json:
    parts = [rle]
    if dist.ddp:
        parts = [None] * dist.world_size
        torch_dist.all_gather_object(parts, rle)
    if dist.master:
        with user_errors(parser):
            atomic_write_text(json.dumps({k: v for p in parts for k, v in sorted(p.items())}), args.rle_json)
log(f"wrote {written} masks to {out_dir}" + (f" and run-length encodings to {args.rle_json}" if args.rle_json
                                              else ""))
if unreadable:
    log(f"skipped {len(unreadable)} image(s) that cannot be read (replace or remove them; --strict stops at the "
        f"first):\n" + "\n".join(f"  {p}: {why}" for p, why in sorted(unreadable)))
cleanup_distributed(dist)
