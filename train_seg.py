"""
Fine-tune a segmentation model with the recipes of the two papers:

  PETRAS  (--model sam_vitb)          prompt-free SAM ViT-B, adapted end to end with LoRA or (IA)^3 on the image
                                      encoder AND the mask decoder, norms and biases trained too, BCE + Dice,
                                      cosine LR with warmup, flips + RandAugment, top-3 checkpoint averaging.
  PETAH   (--model efl1|efl3|efl7)    EfficientFormer stage maps (strides 4/8/16/32) into a Semantic FPN, the
                                      backbone adapted with the methods of methods.py (linear = "Frozen", full,
                                      attn, lora, petah, ...), AdamW 2e-4, poly LR by iterations, CE, mIoU.

Single process (one GPU, or the CPU):
    python train_seg.py --model sam_vitb --weights sam_vit_b_01ec64.pth --method lora --learn-interp \
        --data folder --data-root ~/data/ucc --img-size 1024 --epochs 3 --batch-size 4 --out runs/petras
    python train_seg.py --model efl7 --weights efficientformer_l7.pth --method petah --rc 2 \
        --data ade20k --data-root ~/data --iters 40000 --batch-size 32 --out runs/ade_petah2
On one node with 8 GPUs (global --batch-size is split over the processes):
    torchrun --nproc_per_node 8 train_seg.py --model efl7 --weights efficientformer_l7.pth --method petah ...
Parameter count of a method (no data, no training):
    python train_seg.py --model sam_vitb --method lora --count-only
Masks (and the competition's run-length JSON) for a folder of images, with the adapters of a finished run:
    python train_seg.py --predict DIR --checkpoint runs/petras/final.safetensors --weights sam_vit_b_01ec64.pth \
        --rle-json runs/petras/submission.json
CPU demos (tiny models on the built-in synthetic data, about a minute each; on a busy machine OMP_NUM_THREADS=1
makes such tiny models many times faster):
    python train_seg.py --model sam_tiny --method lora --learn-interp --data synthetic --img-size 64 \
        --epochs 4 --batch-size 4 --lr 1e-2 --workers 0 --out runs/demo_sam
    python train_seg.py --model ef_tiny --head fpn --method petah --data synthetic --img-size 64 \
        --fpn-channels 32 --fpn-head-channels 32 --epochs 4 --batch-size 4 --lr 1e-2 --workers 0 --out runs/demo_ef

Interrupted runs continue from the last completed epoch with the same command plus --resume.
Outputs in --out: log.jsonl (one line per evaluation + a summary line), ckpt/ (adapter-only safetensors + training
state of the last epoch), topk/ (the k best epochs' adapters), vis/ (PNG grids: image | truth | prediction),
final.safetensors (adapters of the final model: the top-k average), merged.safetensors (adapters folded into the
weights, the official key layout).
"""

import argparse
import copy
import json
import math
import os
import sys
import time
import warnings
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.distributed as torch_dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, DistributedSampler, Subset
from torchvision.utils import draw_segmentation_masks, make_grid, save_image
from tqdm import tqdm

import data_seg
from data import read_image
from lora import freeze_bn_stats, load_adapters, merge_and_unload, read_safetensors
from methods import METHODS as EF_METHODS, SAM_METHODS, apply_method, apply_sam_method, count_parameters
from models import PRESETS as ALL_PRESETS, EFSemanticFPN, SemanticFPN, create_model, load_pretrained, stage_widths
from train_utils import (all_reduce_sum, atomic_save_adapters, atomic_save_safetensors, atomic_write_text,
                         cleanup_distributed, cosine_lr_factor, epoch_seed, load_checkpoint, save_checkpoint,
                         seed_everything, setup_distributed, write_jsonl)

# tiny presets (models.PRESETS) for tests and the CPU demo: segmentation models only
PRESETS = {k: v for k, v in ALL_PRESETS.items() if k in ("sam_tiny", "ef_tiny")}
MODELS = ("sam_vitb", "efl1", "efl3", "efl7", *PRESETS)
IGNORE = 255  # label of pixels that count nowhere (ADE20K "other", padding)

class Segment(nn.Module):
    """forward(x) = model.segment(x): lets DDP (which hooks `forward`) wrap SAM's prompt-free path while the
    model itself, with its checkpoint key names, is what gets saved."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.segment(x)


# -----------------------------------------------------------------------------
# losses, metrics, schedule


def dice_loss(probs: torch.Tensor, onehot: torch.Tensor, valid: torch.Tensor, smooth: float = 1.0) -> torch.Tensor:
    """1 - mean over classes of (2 |P G| + s) / (|P| + |G| + s), sums over the valid pixels of the batch.
    probs, onehot: (B, K, H, W); valid: (B, H, W) bool."""
    v = valid[:, None].to(probs.dtype)  # (B, 1, H, W)
    p, g = probs * v, onehot * v
    inter = (p * g).sum(dim=(0, 2, 3))  # (K,)
    return 1 - ((2 * inter + smooth) / (p.sum(dim=(0, 2, 3)) + g.sum(dim=(0, 2, 3)) + smooth)).mean()


def seg_loss(logits: torch.Tensor, target: torch.Tensor, kind: str) -> torch.Tensor:
    """logits (B, K, H, W) float, target (B, H, W) long with IGNORE where nothing counts.

    bce_dice (K = 1, binary: the logit reads "foreground"), ce_dice and ce (K classes)."""
    valid = target != IGNORE
    if kind == "bce_dice":
        x = logits[:, 0]  # (B, H, W)
        t = (target == 1).to(x.dtype)
        bce = F.binary_cross_entropy_with_logits(x[valid], t[valid]) if valid.any() else x.sum() * 0
        return bce + dice_loss(torch.sigmoid(x)[:, None], t[:, None], valid)
    ce = F.cross_entropy(logits, target, ignore_index=IGNORE)
    if kind == "ce":
        return ce
    onehot = F.one_hot(target.where(valid, 0), logits.shape[1]).permute(0, 3, 1, 2).to(logits.dtype)  # (B, K, H, W)
    return ce + dice_loss(logits.softmax(dim=1), onehot, valid)


def to_classes(logits: torch.Tensor) -> torch.Tensor:
    """(B, K, H, W) logits -> (B, H, W) class indices (K = 1: logit > 0 is class 1)."""
    return (logits[:, 0] > 0).long() if logits.shape[1] == 1 else logits.argmax(dim=1)


def confusion_matrix(pred: torch.Tensor, target: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(K, K) int64 counts, rows = truth, columns = prediction, over pixels whose target is not IGNORE."""
    valid = target != IGNORE
    t, p = target[valid], pred[valid]
    if t.numel() and int(t.max()) >= num_classes:
        raise ValueError(f"a mask holds label {int(t.max())} but there are {num_classes} classes (labels 0.."
                         f"{num_classes - 1}, {IGNORE} = ignore); check the masks or pass --num-classes")
    return torch.bincount(t * num_classes + p, minlength=num_classes ** 2).reshape(num_classes, num_classes)


def iou_per_class(cm: torch.Tensor) -> torch.Tensor:
    """IoU_c = TP / (TP + FP + FN); NaN for a class absent from both truth and prediction."""
    cm = cm.double()
    tp = cm.diag()
    union = cm.sum(0) + cm.sum(1) - tp
    return torch.where(union > 0, tp / union.clamp(min=1), torch.full_like(tp, float("nan")))


def metrics(cm: torch.Tensor) -> dict:
    """mIoU over the classes that occur (truth or prediction), pixel accuracy, and for two classes the IoU of the
    foreground class 1 (the competition's metric)."""
    iou = iou_per_class(cm)
    out = dict(miou=float(iou[~iou.isnan()].mean()) if (~iou.isnan()).any() else 0.0,
               pixel_acc=float(cm.diag().sum() / cm.sum().clamp(min=1)))
    if cm.shape[0] == 2:
        out["iou_fg"] = 0.0 if iou[1].isnan() else float(iou[1])
    return out


def poly_lr_factor(step: int, *, total_steps: int, warmup_steps: int, power: float = 0.9) -> float:
    """Linear warmup, then (1 - progress) ** power (mmseg's "poly" schedule, by iterations)."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min((step - warmup_steps) / max(1, total_steps - warmup_steps), 1.0)
    return (1.0 - progress) ** power


# -----------------------------------------------------------------------------
# inference: whole image or sliding window, at the model's square input size


def predict_logits(model: nn.Module, x: torch.Tensor, *, mode: str, out_size: tuple[int, int],
                   stride: int | None = None, amp=nullcontext()) -> torch.Tensor:
    """(B, 3, H, W) normalised images -> (B, K, *out_size) float logits.

    whole: resize to the model's S x S input, predict, resize the logits back.
    slide: S x S windows every `stride` pixels (images smaller than S are zero-padded), logits averaged where
           windows overlap (mmseg's "slide" inference).
    amp: the autocast context of the forward passes.
    """
    S = model.img_size
    H, W = x.shape[-2:]
    if mode == "whole" or (H == S and W == S):
        xs = x if (H, W) == (S, S) else F.interpolate(x, size=(S, S), mode="bilinear", align_corners=False)
        with amp:
            logits = model.segment(xs).float()  # (B, K, S, S)
    else:
        stride = stride or max(1, S * 2 // 3)
        ph, pw = max(S - H, 0), max(S - W, 0)
        xp = F.pad(x, (0, pw, 0, ph))  # (B, 3, H', W')
        Hp, Wp = xp.shape[-2:]
        ys = list(range(0, Hp - S + 1, stride)) + ([Hp - S] if (Hp - S) % stride else [])
        xs_ = list(range(0, Wp - S + 1, stride)) + ([Wp - S] if (Wp - S) % stride else [])
        logits, count = None, torch.zeros(1, 1, Hp, Wp, device=x.device)
        for y0 in ys:
            for x0 in xs_:
                with amp:
                    out = model.segment(xp[..., y0:y0 + S, x0:x0 + S]).float()  # (B, K, S, S)
                if logits is None:
                    logits = torch.zeros(x.shape[0], out.shape[1], Hp, Wp, device=x.device)
                logits[..., y0:y0 + S, x0:x0 + S] += out
                count[..., y0:y0 + S, x0:x0 + S] += 1
        logits = (logits / count)[..., :H, :W]
    if tuple(logits.shape[-2:]) != tuple(out_size):
        logits = F.interpolate(logits, size=tuple(out_size), mode="bilinear", align_corners=False)
    return logits


@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader, *, compare: nn.Module | None = None,
             vis: int = 0) -> tuple[torch.Tensor, dict, list]:
    """Confusion matrix over the whole eval set (every rank evaluates its share, the counts are summed).

    compare: a second model (the merged export) run on the same batches; returns how many pixels' predicted
    classes differ and the largest absolute logit difference. vis: keep the first `vis` (image, truth, prediction)
    triples of this rank for the picture.
    """
    model.eval()
    if compare is not None:
        compare.eval()
    cm = torch.zeros(num_classes, num_classes, dtype=torch.int64)
    diff = dict(pixels_differ=0.0, max_logit_diff=0.0)
    samples = []
    for batch in loader:  # a list of (image, mask) pairs: eval images may differ in size
        for size in dict.fromkeys(tuple(img.shape[-2:]) for img, _ in batch):
            group = [(img, m) for img, m in batch if tuple(img.shape[-2:]) == size]
            x = torch.stack([img for img, _ in group]).to(dist.device)  # (B, 3, H, W)
            y = torch.stack([m for _, m in group]).to(dist.device).long()  # (B, H, W)
            logits = predict_logits(model, x, mode=args.eval_mode, out_size=y.shape[-2:], stride=args.eval_stride,
                                    amp=autocast)
            pred = to_classes(logits)
            cm += confusion_matrix(pred, y, num_classes).cpu()
            if compare is not None:
                other = predict_logits(compare, x, mode=args.eval_mode, out_size=y.shape[-2:],
                                       stride=args.eval_stride, amp=autocast)
                diff["pixels_differ"] += float((to_classes(other) != pred).sum())
                diff["max_logit_diff"] = max(diff["max_logit_diff"], float((other - logits).abs().max()))
            for i in range(min(vis - len(samples), len(group))):
                samples.append((x[i].cpu(), y[i].cpu(), pred[i].cpu()))
    if dist.ddp:
        cm = cm.to(dist.device)
        torch_dist.all_reduce(cm)
        cm = cm.cpu()
        diff["pixels_differ"] = all_reduce_sum([diff["pixels_differ"]], dist)[0]
        t = torch.tensor([diff["max_logit_diff"]], dtype=torch.float64, device=dist.device)
        torch_dist.all_reduce(t, op=torch_dist.ReduceOp.MAX)
        diff["max_logit_diff"] = float(t)
    return cm, diff, samples


def save_vis(samples: list, path: str, *, mean, std, n_classes: int) -> None:
    """PNG grid, one row per image: image | truth overlaid | prediction overlaid (torchvision's
    draw_segmentation_masks; class 0 of a binary task and ignored pixels are left uncoloured)."""
    g = torch.Generator().manual_seed(0)
    palette = [tuple(int(c) for c in torch.randint(40, 256, (3,), generator=g)) for _ in range(n_classes)]
    palette[min(1, n_classes - 1)] = (0, 255, 0)
    classes = [1] if n_classes == 2 else list(range(n_classes))
    side = 256  # every tile resized to 256 x 256 (eval canvases may differ in size)
    tiles = []
    for img, truth, pred in samples:
        rgb = (img * torch.tensor(std)[:, None, None] + torch.tensor(mean)[:, None, None]).clamp(0, 1)
        rgb = (F.interpolate(rgb[None], size=(side, side), mode="bilinear", align_corners=False)[0] * 255).to(torch.uint8)
        tiles.append(rgb)
        for lab in (truth, pred):
            lab = F.interpolate(lab[None, None].float(), size=(side, side), mode="nearest")[0, 0].long()
            present = [c for c in classes if (lab == c).any()]
            if present:
                masks = torch.stack([lab == c for c in present])  # (C, side, side) bool
                tiles.append(draw_segmentation_masks(rgb, masks, alpha=0.5, colors=[palette[c] for c in present]))
            else:
                tiles.append(rgb)
    save_image(make_grid([t.float() / 255 for t in tiles], nrow=3, padding=2, pad_value=1.0), path)


def average_state_dicts(paths: list[str]) -> dict[str, torch.Tensor]:
    """Element-wise mean of the tensors of several adapter files (float64 accumulation, cast back; integer tensors,
    e.g. BatchNorm's num_batches_tracked, are taken from the first file). The LoRA factors A and B are averaged
    separately, i.e. the checkpoints' parameters are averaged, as checkpoint averaging does."""
    dicts = [read_safetensors(p)[0] for p in paths]
    keys = set(dicts[0])
    for p, d in zip(paths, dicts):
        if set(d) != keys:
            raise ValueError(f"top-k averaging: {p} holds other tensors than {paths[0]}: "
                             f"{sorted(set(d) ^ keys)[:5]}")
    return {k: torch.stack([d[k].double() for d in dicts]).mean(0).to(dicts[0][k].dtype)
            if dicts[0][k].is_floating_point() else dicts[0][k] for k in dicts[0]}


# -----------------------------------------------------------------------------
# configuration

parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
g = parser.add_argument_group("model and method")
g.add_argument("--model", default="sam_vitb", choices=MODELS,
               help=f"sam_vitb: PETRAS recipe; efl1/efl3/efl7: PETAH recipe (EfficientFormer + Semantic FPN); "
                    f"{', '.join(PRESETS)} are tiny test/demo configs: "
                    + "; ".join(f"{k} = {b} with {c}" for k, (b, c) in PRESETS.items()))
g.add_argument("--model-cfg", default="{}", metavar="JSON",
               help='extra keyword arguments for models.create_model, e.g. \'{"encoder_depth": 4}\'')
g.add_argument("--head", default=None, choices=("fpn",), help="EfficientFormer only: the segmentation head")
g.add_argument("--weights", default=None, metavar="PATH",
               help="pretrained checkpoint: Meta's sam_vit_b_01ec64.pth, or timm / snap EfficientFormer; position "
                    "and attention-bias tables are resized to --img-size. Without it the model is random (smoke test)")
g.add_argument("--method", default=None,
               help=f"SAM: {', '.join(SAM_METHODS)} (default lora); EfficientFormer: {', '.join(EF_METHODS)} "
                    f"(default petah; linear = frozen backbone, the paper's 'Frozen' row)")
g.add_argument("--r", type=int, default=8, help="LoRA rank of the linear layers")
g.add_argument("--rc", type=int, default=None, help="conv-LoRA rank of --method petah (EfficientFormer; default 1)")
g.add_argument("--alpha", type=float, default=None, help="LoRA alpha (default: alpha = rank, scale 1)")
g.add_argument("--learn-interp", action="store_true",
               help="PETRAS learned interpolation y = a W0 x + (1 - a) dW x in every LoRA layer")
g.add_argument("--train-biases", action=argparse.BooleanOptionalAction, default=None,
               help="train every bias (default: on for SAM lora/ia3 as in PETRAS, off for EfficientFormer)")
g.add_argument("--train-norms", action=argparse.BooleanOptionalAction, default=None,
               help="train every norm layer (default: on for SAM lora/ia3 as in PETRAS, off for EfficientFormer)")
g.add_argument("--num-classes", type=int, default=None,
               help="classes including background (default: the dataset's; 2 = binary, for SAM one logit map and "
                    "BCE + Dice; N > 2 adds mask tokens for N-class segmentation with CE + Dice)")
g.add_argument("--fpn-channels", type=int, default=256, help="Semantic FPN width")
g.add_argument("--fpn-head-channels", type=int, default=128, help="Semantic FPN per-level head width")

g = parser.add_argument_group("data")
g.add_argument("--data", default="synthetic", choices=data_seg.SEG_DATASETS,
               help="synthetic needs no files; folder: img/{train,valid} + ann/{train,valid} (or images/ + masks/); "
                    "ade20k: ADEChallengeData2016")
g.add_argument("--data-root", default="data", help="directory holding the dataset")
g.add_argument("--img-size", type=int, default=None,
               help="model input side (default 1024 for SAM, 512 for EfficientFormer; tables are resized)")
g.add_argument("--randaug", action=argparse.BooleanOptionalAction, default=None,
               help="RandAugment on training images (geometric ops move the mask too); default on for SAM")
g.add_argument("--train-on-val", action="store_true",
               help="train on train + val (PETRAS' final run); the test split, where one exists, stays held out")
g.add_argument("--scale-range", type=float, nargs=2, default=None, metavar=("LO", "HI"),
               help="training: random scale of the shorter side relative to --img-size, then an --img-size crop "
                    "(default 0.5 2.0 for EfficientFormer as mmseg's ADE20K recipe, 1 1 for SAM)")
g.add_argument("--eval-mode", default="whole", choices=("whole", "slide"),
               help="whole: the eval canvas resized to the model input; slide: --img-size windows over it")
g.add_argument("--eval-size", type=int, default=None,
               help="eval canvas: the longer image side is resized to this and padded to a square (default "
                    "--img-size; with --eval-mode slide e.g. 683 = short side 512 for 4:3 ADE20K images)")
g.add_argument("--eval-stride", type=int, default=None, help="slide: window stride (default 2/3 of --img-size)")
g.add_argument("--synthetic-train", type=int, default=64, help="--data synthetic: training images")
g.add_argument("--synthetic-val", type=int, default=16, help="--data synthetic: validation (and test) images")
g.add_argument("--workers", type=int, default=4, help="DataLoader worker processes per rank")

g = parser.add_argument_group("optimisation")
g.add_argument("--epochs", type=int, default=None, help="training epochs (default 3 for SAM, as PETRAS)")
g.add_argument("--iters", type=int, default=None,
               help="training length in optimizer steps instead of epochs (default 40000 for EfficientFormer)")
g.add_argument("--eval-interval", type=int, default=1, help="evaluate (and checkpoint) every this many epochs")
g.add_argument("--schedule", default=None, choices=("cosine", "poly"),
               help="LR schedule by iterations (default cosine for SAM, poly 0.9 for EfficientFormer)")
g.add_argument("--warmup-epochs", type=float, default=None,
               help="linear LR warmup (default 0.5 for SAM, 0 for EfficientFormer)")
g.add_argument("--batch-size", type=int, default=None, help="GLOBAL batch size (default 4 SAM, 32 EF)")
g.add_argument("--lr", type=float, default=None, help="AdamW LR (default 3e-4 SAM, 2e-4 EF)")
g.add_argument("--weight-decay", type=float, default=None,
               help="AdamW weight decay on matrices (default 1e-2 SAM, 1e-4 EF)")
g.add_argument("--loss", default=None, choices=("bce_dice", "ce_dice", "ce"),
               help="default: bce_dice for binary SAM, ce_dice for N-class SAM, ce for EfficientFormer")
g.add_argument("--top-k", type=int, default=3,
               help="keep the adapters of the k best evaluations (by foreground IoU, or mIoU for N classes) and "
                    "use their average as the final model; 1 = best single checkpoint")
g.add_argument("--seed", type=int, default=0)

g = parser.add_argument_group("system and output")
g.add_argument("--out", default="runs/seg", help="output directory")
g.add_argument("--resume", action="store_true", help="continue from the last completed epoch in --out/ckpt")
g.add_argument("--count-only", action="store_true",
               help="print one JSON line with the parameter counts and exit (no data loading, no training)")
g.add_argument("--device", default=None, choices=("cpu", "cuda"), help="default: cuda when available")
g.add_argument("--vis-images", type=int, default=4, help="validation images in each PNG grid (0: none)")
g.add_argument("--predict", default=None, metavar="DIR",
               help="no training: write a mask PNG (values 0..K-1) per image of DIR into --predict-out")
g.add_argument("--predict-out", default=None, metavar="DIR", help="--predict: output folder (default --out/pred)")
g.add_argument("--rle-json", default=None, metavar="FILE",
               help="--predict: also write {image name: run-length encoding} (1-based start/length pairs, "
                    "column-major; binary tasks)")
g.add_argument("--eval-only", action="store_true", help="no training: evaluate --checkpoint on the val split")
g.add_argument("--checkpoint", default=None, metavar="FILE",
               help="--predict / --eval-only: adapter file written by this script (default --out/final.safetensors); "
                    "the model settings are read from its metadata")
g.add_argument("--stop-after-epoch", type=int, default=None,
               help="testing: stop (without the final export) once this epoch's checkpoint is written")
g.add_argument("--inject-nan-step", type=int, default=None,
               help="testing: make the loss NaN at this global optimizer step, to exercise the NaN guard")

# settings that define the model's structure; stored in every adapter file so --predict can rebuild it
MODEL_KEYS = ("model", "model_cfg", "head", "method", "r", "rc", "alpha", "learn_interp", "train_biases",
              "train_norms", "num_classes", "img_size", "fpn_channels", "fpn_head_channels")


def log(*a):
    if dist.master:
        print(*a, flush=True)


def build_model(num_classes: int) -> tuple[nn.Module, dict, set]:
    """The model of --model with pretrained --weights and the adapters / freezing of --method.
    Returns (model, parameter counts, the base model's state_dict keys)."""
    torch.manual_seed(args.seed)  # identical initialisation on every rank (DDP also broadcasts it)
    if is_sam:
        model = create_model(builder, img_size=args.img_size, num_classes=1 if num_classes <= 2 else num_classes,
                             **model_cfg)
        if args.weights:
            load_pretrained(model, args.weights, strict=True, verbose=dist.master)
        base_keys = set(model.state_dict())
        counts = apply_sam_method(model, args.method, num_classes=num_classes, r=args.r, alpha=args.alpha,
                                  learn_interp=args.learn_interp, train_biases=args.train_biases,
                                  train_norms=args.train_norms)
    else:
        backbone = create_model(builder, num_classes=0, img_size=args.img_size, **model_cfg)
        if args.weights:
            load_pretrained(backbone, args.weights, strict=True, verbose=dist.master)
        backbone.norm = nn.Identity()  # forward_pyramid never reaches the final norm: no dead trainable params
        base_keys = {f"backbone.{k}" for k in backbone.state_dict()}
        apply_method(backbone, args.model, args.method, r=args.r, rc=args.rc, alpha=args.alpha,
                     train_biases=args.train_biases, train_norms=args.train_norms, learn_interp=args.learn_interp,
                     head_names=())
        head = SemanticFPN(in_channels=stage_widths(backbone), num_classes=num_classes, channels=args.fpn_channels,
                           head_channels=args.fpn_head_channels)
        model = EFSemanticFPN(backbone=backbone, decode_head=head)  # the new head trains in every method
        base_keys |= {f"decode_head.{k}" for k in head.state_dict()}
        counts = count_parameters(model, head_names=("decode_head",))
    adapter_names = {n for m in model.modules() for n in getattr(m, "adapter_names", ())}
    counts["adapters_only"] = sum(p.numel() for n, p in model.named_parameters()
                                  if n.rsplit(".", 1)[-1] in adapter_names)
    return model, counts, base_keys


args = parser.parse_args() if __name__ == "__main__" else None
if args is not None:
    dist = setup_distributed(args.device)
    master = dist.master

    # ---- settings stored in a checkpoint (--predict / --eval-only rebuild the model from them)
    if args.predict or args.eval_only:
        ckpt_file = args.checkpoint or os.path.join(args.out, "final.safetensors")
        if not os.path.isfile(ckpt_file):
            parser.error(f"--checkpoint {ckpt_file} does not exist; pass the final.safetensors (or a topk/ckpt "
                         f"file) of a finished run")
        try:
            stored = json.loads(json.loads(read_safetensors(ckpt_file)[1].get("user", "{}")).get("model_args", "{}"))
        except Exception as e:  # not a safetensors file, or metadata of another program
            parser.error(f"--checkpoint {ckpt_file}: cannot read its metadata ({type(e).__name__}: {e}); pass an "
                         f"adapter file written by train_seg.py (final.safetensors, topk/ or ckpt/ files)")
        if not stored:
            parser.error(f"--checkpoint {ckpt_file} has no model settings in its metadata; was it written by "
                         f"train_seg.py?")
        for k, v in stored.items():
            setattr(args, k, v)
        log(f"model settings from {ckpt_file}: {stored}")
    if args.predict and args.eval_only:
        parser.error("--predict and --eval-only are exclusive")
    if args.rle_json and not args.predict:
        parser.error("--rle-json needs --predict DIR (the images to encode)")

    # ---- recipe defaults and argument checks (argparse already rejected unknown models / datasets)
    builder, preset_cfg = PRESETS.get(args.model, (args.model, {}))
    is_sam = builder == "sam_vitb"
    try:
        model_cfg = json.loads(args.model_cfg) if isinstance(args.model_cfg, str) else dict(args.model_cfg)
        assert isinstance(model_cfg, dict)
    except (json.JSONDecodeError, AssertionError):
        parser.error(f"--model-cfg must be a JSON object, e.g. '{{\"encoder_depth\": 4}}'; got {args.model_cfg!r}")
    model_cfg = {**preset_cfg, **model_cfg}
    methods = SAM_METHODS if is_sam else EF_METHODS
    args.method = args.method or ("lora" if is_sam else "petah")
    if args.method not in methods:
        parser.error(f"--method {args.method} is not a method for {args.model}; choose one of {', '.join(methods)}")
    if is_sam and args.head is not None:
        parser.error("--head is for EfficientFormer; SAM segments with its own mask decoder")
    args.head = None if is_sam else (args.head or "fpn")
    if args.rc is not None and (is_sam or args.method != "petah") and not (args.predict or args.eval_only):
        warnings.warn(f"--rc {args.rc} is ignored: conv-LoRA is only part of --method petah on EfficientFormer")
    args.rc = 1 if args.rc is None else args.rc
    if args.learn_interp and args.method not in ("lora", "lora_mlp", "petah") and not (args.predict or args.eval_only):
        warnings.warn(f"--learn-interp is ignored: --method {args.method} has no LoRA layers")
    peft_sam = is_sam and args.method in ("lora", "ia3")
    args.train_biases = peft_sam if args.train_biases is None else args.train_biases
    args.train_norms = peft_sam if args.train_norms is None else args.train_norms
    args.img_size = args.img_size or (1024 if is_sam else 512)
    args.randaug = is_sam if args.randaug is None else args.randaug
    args.batch_size = args.batch_size or (4 if is_sam else 32)
    args.lr = args.lr or (3e-4 if is_sam else 2e-4)
    args.weight_decay = (1e-2 if is_sam else 1e-4) if args.weight_decay is None else args.weight_decay
    args.schedule = args.schedule or ("cosine" if is_sam else "poly")
    args.warmup_epochs = (0.5 if is_sam else 0.0) if args.warmup_epochs is None else args.warmup_epochs
    if args.epochs is not None and args.iters is not None:
        parser.error("give the training length as --epochs or as --iters, not both")
    if args.epochs is None and args.iters is None:
        args.epochs, args.iters = (3, None) if is_sam else (None, 40000)
    for name in ("r", "rc", "batch_size", "img_size", "top_k", "eval_interval", "fpn_channels", "fpn_head_channels"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if (args.epochs is not None and args.epochs < 1) or (args.iters is not None and args.iters < 1):
        parser.error("--epochs / --iters must be >= 1")
    if args.num_classes is not None and args.num_classes < 2:
        parser.error(f"--num-classes {args.num_classes}: count the background too (2 = binary)")
    if args.batch_size % dist.world_size:
        parser.error(f"--batch-size {args.batch_size} must be divisible by the {dist.world_size} processes")
    if is_sam and args.img_size % model_cfg.get("patch_size", 16):
        parser.error(f"--img-size {args.img_size} must be a multiple of SAM's patch size {model_cfg.get('patch_size', 16)}")
    if not is_sam and args.img_size % 32:
        parser.error(f"--img-size {args.img_size} must be a multiple of 32 for EfficientFormer (e.g. 512)")
    if args.weights and not os.path.isfile(args.weights):
        parser.error(f"--weights {args.weights} does not exist")
    if not args.weights and master and not args.count_only:
        print("\n" + "!" * 100 + "\n!!! WARNING: no --weights given: the model is RANDOMLY initialised. Adapting a "
              "random model is\n!!! only a smoke test; pass --weights PATH to fine-tune a pretrained model.\n"
              + "!" * 100 + "\n", file=sys.stderr, flush=True)

    # ---- --count-only: the paper's #Params column, no data needed
    if args.count_only:
        num_classes = args.num_classes or (2 if is_sam else 150)
        _, counts, _ = build_model(num_classes)
        if master:
            print(json.dumps(dict(model=args.model, method=args.method, adapter_params=counts["adapter_params"],
                                  head_params=counts["head_params"], total_params=counts["total_params"],
                                  adapters_only=counts["adapters_only"], num_classes=num_classes)), flush=True)
        cleanup_distributed(dist)
        sys.exit(0)

    # ---- data
    mean, std = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))  # SAM's pixel mean/std / 255 = EF's (ImageNet)
    args.eval_size = args.eval_size or args.img_size
    args.scale_range = args.scale_range or ((1.0, 1.0) if is_sam else (0.5, 2.0))
    train_ds = val_ds = test_ds = None
    if not args.predict:
        data_kw = dict(randaug=args.randaug, scale_range=tuple(args.scale_range), num_classes=args.num_classes,
                       train_on_val=args.train_on_val,
                       synthetic_cfg=dict(train_samples=args.synthetic_train, val_samples=args.synthetic_val,
                                          test_samples=args.synthetic_val))
        try:
            train_ds, val_ds, test_ds, data_classes, _ = data_seg.build_seg_datasets(
                args.data, args.data_root, img_size=args.img_size, mean=mean, std=std, **data_kw)
            if args.eval_size != args.img_size:  # the same splits on another evaluation canvas
                _, val_ds, test_ds, _, _ = data_seg.build_seg_datasets(
                    args.data, args.data_root, img_size=args.eval_size, mean=mean, std=std, **data_kw)
        except (FileNotFoundError, ValueError) as e:
            parser.error(str(e))
        if args.num_classes is not None and args.num_classes != data_classes:
            parser.error(f"--num-classes {args.num_classes} but --data {args.data} has {data_classes} classes")
        num_classes = data_classes
    else:
        num_classes = args.num_classes
    args.num_classes = num_classes
    loss_kind = args.loss or (("bce_dice" if num_classes == 2 else "ce_dice") if is_sam else "ce")
    if (loss_kind == "bce_dice") != (is_sam and num_classes == 2):
        parser.error(f"--loss {loss_kind} does not fit {num_classes} classes on {args.model}: bce_dice is for "
                     f"binary SAM (one logit map), ce / ce_dice for K logit maps")

    # ---- model
    model, counts, base_keys = build_model(num_classes)
    log(f"{args.model} {args.method}: trainable {counts['trainable_params']:,} of {counts['total_params']:,} params "
        f"(adapters {counts['adapters_only']:,}, with norms/biases {counts['adapter_params']:,}; head "
        f"{counts['head_params']:,})")
    model.to(dist.device)
    raw_model = model
    use_bf16 = dist.device.type == "cuda"
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if use_bf16 else nullcontext()
    model_args = {k: getattr(args, k) for k in MODEL_KEYS}
    model_args["model_cfg"] = args.model_cfg if isinstance(args.model_cfg, str) else json.dumps(args.model_cfg)
    adapter_meta = dict(model_args=json.dumps(model_args))

    # ---- --predict: a mask PNG per image (and the run-length JSON), at each image's own size
    if args.predict or args.eval_only:
        load_adapters(raw_model, ckpt_file)
        raw_model.eval()
    if args.predict:
        try:
            files = data_seg.list_images(args.predict)
        except (FileNotFoundError, ValueError) as e:
            parser.error(f"--predict: {e}")
        out_dir = Path(args.predict_out or os.path.join(args.out, "pred"))
        out_dir.mkdir(parents=True, exist_ok=True)
        to_canvas = data_seg.SegTransform(train=False, img_size=args.eval_size, mean=mean, std=std)
        rle = {}
        with torch.no_grad():
            for path in tqdm(files[dist.rank::dist.world_size], desc="predict", disable=not master):
                img = read_image(path)  # (3, H, W) uint8
                H, W = img.shape[-2:]
                # the eval transform: longer side -> canvas, padded; a dummy mask marks where the image lies
                x, where = to_canvas(img, torch.zeros(H, W, dtype=torch.uint8))  # (3, C, C), (C, C)
                h, w = int((where != IGNORE).any(1).sum()), int((where != IGNORE).any(0).sum())
                logits = predict_logits(raw_model, x[None].to(dist.device), mode=args.eval_mode,
                                        out_size=x.shape[-2:], stride=args.eval_stride, amp=autocast)[..., :h, :w]
                logits = F.interpolate(logits, size=(H, W), mode="bilinear", align_corners=False)
                mask = to_classes(logits)[0].cpu()  # (H, W) class ids
                data_seg.save_mask_png(mask, out_dir / (path.stem + ".png"))
                if args.rle_json:
                    rle[path.stem] = data_seg.rle_encode(mask == 1)
        if args.rle_json:
            parts = [rle]
            if dist.ddp:
                parts = [None] * dist.world_size
                torch_dist.all_gather_object(parts, rle)
            if master:
                atomic_write_text(json.dumps({k: v for p in parts for k, v in sorted(p.items())}), args.rle_json)
        log(f"wrote {len(files)} masks to {out_dir}" + (f" and run-length encodings to {args.rle_json}"
                                                        if args.rle_json else ""))
        cleanup_distributed(dist)
        sys.exit(0)

    # ---- data loaders: DistributedSampler also on one process (same shuffling code path; drop_last so the
    # number of steps is len(train) // batch whatever the number of processes)
    per_rank_batch = args.batch_size // dist.world_size
    train_sampler = DistributedSampler(train_ds, num_replicas=dist.world_size, rank=dist.rank, shuffle=True,
                                       seed=args.seed, drop_last=True)
    loader_kw = dict(num_workers=args.workers, pin_memory=dist.device.type == "cuda",
                     persistent_workers=args.workers > 0)
    train_loader = DataLoader(train_ds, batch_size=per_rank_batch, sampler=train_sampler, drop_last=True, **loader_kw)
    eval_part = Subset(val_ds, range(dist.rank, len(val_ds), dist.world_size))  # exact: no padded duplicates
    eval_loader = DataLoader(eval_part, batch_size=max(1, per_rank_batch), shuffle=False, collate_fn=list,
                             **loader_kw)
    steps_per_epoch = len(train_loader)
    if steps_per_epoch == 0:
        parser.error(f"the training set ({len(train_ds)} images) is smaller than one --batch-size {args.batch_size}")
    total_steps = args.iters or args.epochs * steps_per_epoch
    epochs = math.ceil(total_steps / steps_per_epoch)
    warmup_steps = round(args.warmup_epochs * steps_per_epoch)
    lr_factor = cosine_lr_factor if args.schedule == "cosine" else poly_lr_factor

    if args.eval_only:
        cm, _, _ = evaluate(raw_model, eval_loader)
        rec = dict(eval_only=True, checkpoint=ckpt_file, **metrics(cm))
        if master:
            print(json.dumps(rec), flush=True)
        cleanup_distributed(dist)
        sys.exit(0)

    # ---- optimizer: AdamW over the trainable params only; no weight decay on vectors (biases, norms, scales)
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
    param_groups = [dict(params=decay, weight_decay=args.weight_decay), dict(params=no_decay, weight_decay=0.0)]
    param_groups = [pg for pg in param_groups if pg["params"]]
    optimizer = torch.optim.AdamW(param_groups, lr=args.lr, betas=(0.9, 0.999), fused=dist.device.type == "cuda")
    log(f"AdamW over {sum(p.numel() for pg in param_groups for p in pg['params']):,} params "
        f"({len(decay)} matrices with weight decay {args.weight_decay}, {len(no_decay)} vectors without)")

    # ---- resume
    ckpt_dir, topk_dir, vis_dir = (os.path.join(args.out, d) for d in ("ckpt", "topk", "vis"))
    if master:
        for d in (ckpt_dir, topk_dir, vis_dir):
            os.makedirs(d, exist_ok=True)
    start_epoch, history, topk = 0, [], []  # topk: [dict(epoch, score, file)], best first
    if args.resume:
        state = load_checkpoint(ckpt_dir, raw_model)
        if state is None:
            log(f"--resume: no checkpoint in {ckpt_dir} yet, starting from scratch")
        else:
            same = MODEL_KEYS + ("data", "batch_size", "lr", "epochs", "iters", "seed", "schedule", "loss", "top_k",
                                 "weight_decay", "train_on_val")
            old = state["args"]
            diff = {k: (old.get(k), vars(args).get(k)) for k in same if old.get(k) != vars(args).get(k)}
            if diff:
                raise ValueError(f"--resume with other settings than the checkpoint in {ckpt_dir}: "
                                 f"{ {k: f'{a!r} -> {b!r}' for k, (a, b) in diff.items()} }; use the original "
                                 f"command or another --out")
            optimizer.load_state_dict(state["optimizer"])
            start_epoch, history, topk = state["epoch"], json.loads(state["history"]), json.loads(state["topk"])
            log(f"resumed from {ckpt_dir} after epoch {start_epoch}")

    # ---- DDP over the trainable parameters (frozen ones are not registered); Segment routes forward to segment()
    train_model = Segment(raw_model)
    if dist.ddp:
        train_model = DDP(train_model, device_ids=[dist.local_rank] if dist.device.type == "cuda" else None)
    log(f"{dist.world_size} process(es) on {dist.device}, {per_rank_batch} images per process and step, "
        f"{steps_per_epoch} steps per epoch, {total_steps} steps ({epochs} epochs), {args.schedule} LR "
        f"{args.lr:g}, loss {loss_kind}, {num_classes} classes" + (", bf16 autocast" if use_bf16 else ""))
    if master:
        atomic_write_text(json.dumps(vars(args), indent=1), os.path.join(args.out, "args.json"))

    # ---- training loop
    step = min(start_epoch * steps_per_epoch, total_steps)
    for epoch in range(start_epoch, epochs):
        seed_everything(epoch_seed(args.seed, epoch, dist.rank))  # data order, augmentation, dropout of this epoch
        train_sampler.set_epoch(epoch)
        train_model.train()
        freeze_bn_stats(raw_model)  # frozen BNs keep the pretrained running statistics
        t0, loss_sum, seen = time.time(), 0.0, 0
        n_steps = min(steps_per_epoch, total_steps - step)
        pbar = tqdm(total=n_steps, desc=f"epoch {epoch + 1}/{epochs}", disable=not master, dynamic_ncols=True)
        for i, (x, y) in enumerate(train_loader):
            if i == n_steps:
                break
            lr = args.lr * lr_factor(step, total_steps=total_steps, warmup_steps=warmup_steps)
            for group in optimizer.param_groups:
                group["lr"] = lr
            x, y = x.to(dist.device, non_blocking=True), y.to(dist.device, non_blocking=True).long()
            with autocast:
                logits = train_model(x)  # (B, K, H, W)
            loss = seg_loss(logits.float(), y, loss_kind)
            if step == args.inject_nan_step:
                loss = loss * float("nan")
            # a NaN/inf loss on any rank stops every rank before the update; the last checkpoint stays intact
            if all_reduce_sum([0.0 if math.isfinite(loss.item()) else 1.0], dist)[0]:
                log(f"\nloss is {loss.item()} at step {step} (epoch {epoch + 1}); stopping. Last good checkpoint: "
                    f"{'epoch ' + str(history[-1]['epoch']) if history else 'none yet'} in {ckpt_dir}. Lower --lr "
                    f"and continue with --resume.")
                cleanup_distributed(dist)
                sys.exit(1)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
            loss_sum += loss.item() * len(y)
            seen += len(y)
            pbar.update(1)
            pbar.set_postfix(loss=f"{loss.item():.4f}", lr=f"{lr:.2e}")
        pbar.close()
        train_time = time.time() - t0
        last_epoch = epoch + 1 == epochs
        if (epoch + 1) % args.eval_interval and not last_epoch:
            continue
        loss_sum, seen = all_reduce_sum([loss_sum, seen], dist)
        cm, _, samples = evaluate(raw_model, eval_loader, vis=args.vis_images)
        m = metrics(cm)
        score = m["iou_fg"] if num_classes == 2 else m["miou"]
        rec = dict(epoch=epoch + 1, step=step, train_loss=loss_sum / max(seen, 1), **m, score=score, lr=lr,
                   img_per_s=seen / train_time, time=time.time() - t0)
        history.append(rec)
        log(f"epoch {epoch + 1}: train loss {rec['train_loss']:.4f}, "
            + (f"IoU fg {m['iou_fg']:.4f}, " if "iou_fg" in m else "") + f"mIoU {m['miou']:.4f}, "
            f"pixel acc {m['pixel_acc']:.4f}, {rec['img_per_s']:.1f} img/s")
        if master:
            if samples:
                save_vis(samples, os.path.join(vis_dir, f"epoch_{epoch + 1:04d}.png"), mean=mean, std=std,
                         n_classes=num_classes)
            # top-k: keep this evaluation's adapters if it ranks among the k best so far
            topk.append(dict(epoch=epoch + 1, score=score, file=f"epoch_{epoch + 1:04d}.safetensors"))
            topk.sort(key=lambda t: (-t["score"], t["epoch"]))
            dropped, topk = topk[args.top_k:], topk[:args.top_k]
            if any(t["epoch"] == epoch + 1 for t in topk):
                atomic_save_adapters(raw_model, os.path.join(topk_dir, topk[[t["epoch"] for t in topk].index(
                    epoch + 1)]["file"]), metadata=dict(adapter_meta, epoch=epoch + 1, score=score))
            for t in dropped:
                if os.path.exists(os.path.join(topk_dir, t["file"])):
                    os.remove(os.path.join(topk_dir, t["file"]))
            save_checkpoint(ckpt_dir, raw_model, epoch=epoch + 1,
                            state=dict(optimizer=optimizer.state_dict(), step=step, history=json.dumps(history),
                                       topk=json.dumps(topk), args=vars(args)),
                            metadata=adapter_meta)
            write_jsonl(history, os.path.join(args.out, "log.jsonl"))
        if dist.ddp:
            torch_dist.barrier()
        if args.stop_after_epoch is not None and epoch + 1 >= args.stop_after_epoch and not last_epoch:
            log(f"stopping after epoch {epoch + 1} as asked (--stop-after-epoch); continue with --resume")
            cleanup_distributed(dist)
            sys.exit(0)

    # ---- final model: the average of the top-k checkpoints (top-1: the best one), evaluated like every epoch
    if dist.ddp:
        obj = [topk]
        torch_dist.broadcast_object_list(obj, src=0)
        topk = obj[0]
    last_m = history[-1]
    topk_files = [os.path.join(topk_dir, t["file"]) for t in topk]
    unexpected = raw_model.load_state_dict(average_state_dicts(topk_files), strict=False).unexpected_keys
    if unexpected:
        raise RuntimeError(f"top-k files hold tensors the model does not have: {unexpected[:5]}")
    if master:
        atomic_save_adapters(raw_model, os.path.join(args.out, "final.safetensors"),
                             metadata=dict(adapter_meta, topk=[t["epoch"] for t in topk]))

    # ---- merge the adapters into the weights, verify on the val set, export (official keys)
    merged = merge_and_unload(copy.deepcopy(raw_model))
    cm, diff, _ = evaluate(raw_model, eval_loader, compare=merged)
    final_m = metrics(cm)
    best = topk[0]
    summary = dict(summary=True, model=args.model, method=args.method, adapter_params=counts["adapter_params"],
                   head_params=counts["head_params"], total_params=counts["total_params"], epochs=epochs, steps=step,
                   topk_epochs=[t["epoch"] for t in topk], best_epoch=best["epoch"], best_score=best["score"],
                   final_score=final_m["iou_fg"] if num_classes == 2 else final_m["miou"],
                   last_score=last_m["score"], **{f"final_{k}": v for k, v in final_m.items()},
                   merged_pixels_differ=int(diff["pixels_differ"]), merged_max_logit_diff=diff["max_logit_diff"])
    if diff["pixels_differ"]:
        warnings.warn(f"the merged model predicts {int(diff['pixels_differ'])} val pixels differently from the "
                      f"unmerged one (max logit difference {diff['max_logit_diff']:.2e}): ties, or a merge bug")
    export = merged.state_dict()
    if set(export) != base_keys:
        raise RuntimeError(f"merged model keys differ from the base model's: {sorted(set(export) ^ base_keys)[:5]}")
    if master:
        atomic_save_safetensors(export, os.path.join(args.out, "merged.safetensors"),
                                metadata=dict(model_args=json.dumps(model_args)))
    if test_ds is not None:
        test_part = Subset(test_ds, range(dist.rank, len(test_ds), dist.world_size))
        test_cm, _, _ = evaluate(raw_model, DataLoader(test_part, batch_size=max(1, per_rank_batch),
                                                       collate_fn=list, **loader_kw))
        summary.update({f"test_{k}": v for k, v in metrics(test_cm).items()})
    name = "IoU fg" if num_classes == 2 else "mIoU"
    log(f"done: {name} of the top-{len(topk)} average {summary['final_score']:.4f} (epochs {summary['topk_epochs']}), "
        f"best single checkpoint {best['score']:.4f} (epoch {best['epoch']}), last {last_m['score']:.4f}; merged "
        f"export differs in {int(diff['pixels_differ'])} val pixels (max logit diff {diff['max_logit_diff']:.1e}), "
        f"saved to {os.path.join(args.out, 'merged.safetensors')}")
    if master:
        write_jsonl(history + [summary], os.path.join(args.out, "log.jsonl"))
        print(json.dumps(summary), flush=True)
    cleanup_distributed(dist)
