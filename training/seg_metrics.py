"""
Segmentation losses, metrics and inference, shared by train_seg.py and predict_seg.py.

    loss = seg_loss(logits, target, "ce")                 # (B, K, H, W) logits, (B, H, W) targets
    logits = predict_logits(model, x, mode="whole", out_size=(H, W))
    cm = confusion_matrix(to_classes(logits), target, K)  # summed over the whole set, then
    metrics(cm)                                           # {"miou", "pixel_acc"(, "iou_fg" for 2 classes)}

mIoU is mmsegmentation's: intersections and unions are summed over the whole set (one confusion matrix),
then IoU_c = TP_c / (TP_c + FP_c + FN_c) per class and the mean over the classes that occur in the truth or
the prediction; pixels labelled IGNORE_INDEX (255) count nowhere.
"""

from contextlib import nullcontext

import torch
import torch.distributed as torch_dist
import torch.nn.functional as F
from torch import nn

from dataio.seg import IGNORE_INDEX

# -----------------------------------------------------------------------------
# losses


def dice_loss(probs: torch.Tensor, onehot: torch.Tensor, valid: torch.Tensor, smooth: float = 1.0) -> torch.Tensor:
    """1 - mean over classes of (2 |P G| + s) / (|P| + |G| + s), sums over the valid pixels of the batch.
    probs, onehot: (B, K, H, W); valid: (B, H, W) bool."""
    v = valid[:, None].to(probs.dtype)  # (B, 1, H, W)
    p, g = probs * v, onehot * v
    inter = (p * g).sum(dim=(0, 2, 3))  # (K,)
    return 1 - ((2 * inter + smooth) / (p.sum(dim=(0, 2, 3)) + g.sum(dim=(0, 2, 3)) + smooth)).mean()


LOSSES = ("bce_dice", "ce_dice", "ce")


def seg_loss(logits: torch.Tensor, target: torch.Tensor, loss: str) -> torch.Tensor:
    """logits (B, K, H, W) float, target (B, H, W) long with IGNORE_INDEX where nothing counts.

    loss: bce_dice (K = 1, binary: the logit reads "foreground"), ce_dice or ce (K classes)."""
    if loss not in LOSSES:
        raise ValueError(f"unknown segmentation loss {loss!r}; choose one of {', '.join(LOSSES)}")
    valid = target != IGNORE_INDEX
    if loss == "bce_dice":
        x = logits[:, 0]  # (B, H, W)
        t = (target == 1).to(x.dtype)
        bce = F.binary_cross_entropy_with_logits(x[valid], t[valid]) if valid.any() else x.sum() * 0
        return bce + dice_loss(torch.sigmoid(x)[:, None], t[:, None], valid)
    ce = F.cross_entropy(logits, target, ignore_index=IGNORE_INDEX)
    if loss == "ce":
        return ce
    onehot = F.one_hot(target.where(valid, 0), logits.shape[1]).permute(0, 3, 1, 2).to(logits.dtype)  # (B, K, H, W)
    return ce + dice_loss(logits.softmax(dim=1), onehot, valid)


# -----------------------------------------------------------------------------
# metrics


def to_classes(logits: torch.Tensor) -> torch.Tensor:
    """(B, K, H, W) logits -> (B, H, W) class indices (K = 1: logit > 0 is class 1)."""
    return (logits[:, 0] > 0).long() if logits.shape[1] == 1 else logits.argmax(dim=1)


def confusion_matrix(pred: torch.Tensor, target: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(K, K) int64 counts, rows = truth, columns = prediction, over pixels whose target is not IGNORE_INDEX."""
    valid = target != IGNORE_INDEX
    t, p = target[valid], pred[valid]
    if t.numel() and int(t.max()) >= num_classes:
        raise ValueError(f"a mask holds label {int(t.max())} but there are {num_classes} classes (labels 0.."
                         f"{num_classes - 1}, {IGNORE_INDEX} = ignore); check the masks or pass --num-classes")
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


# -----------------------------------------------------------------------------
# inference


def _run_whole(model: nn.Module, x: torch.Tensor, amp) -> torch.Tensor:
    """model.segment on a whole image. Models with a `stride` (EfficientFormer + FPN) take any multiple of it:
    the image is padded at the bottom / right with 0 (the mean colour) and the padding's logits are cut off,
    (B, K, H, W). The others (SAM) take only their S x S input: the image is resized to it, (B, K, S, S)."""
    H, W = x.shape[-2:]
    S, stride = model.img_size, getattr(model, "stride", None)
    if stride is None:
        xs = x if (H, W) == (S, S) else F.interpolate(x, size=(S, S), mode="bilinear", align_corners=False)
        with amp:
            return model.segment(xs).float()  # (B, K, S, S)
    ph, pw = -H % stride, -W % stride
    with amp:
        out = model.segment(F.pad(x, (0, pw, 0, ph)) if ph or pw else x).float()  # (B, K, H + ph, W + pw)
    return out[..., :H, :W]


def predict_logits(model: nn.Module, x: torch.Tensor, *, mode: str, out_size: tuple[int, int],
                   stride: int | None = None, amp=nullcontext()) -> torch.Tensor:
    """(B, 3, H, W) normalised images -> (B, K, *out_size) float logits.

    whole: the model on the whole image (see _run_whole), the logits resized bilinearly to out_size (mmseg's "whole").
    slide: windows of the model's S x S input every `stride` pixels (default 2/3 S; images smaller than S are
           zero-padded), logits averaged where windows overlap (mmseg's "slide"), then resized to out_size.
    amp: the autocast context of the forward passes.
    """
    S = model.img_size
    H, W = x.shape[-2:]
    if mode == "whole" or (H == S and W == S):
        logits = _run_whole(model, x, amp)
    else:
        stride = stride or max(1, S * 2 // 3)
        ph, pw = max(S - H, 0), max(S - W, 0)
        xp = F.pad(x, (0, pw, 0, ph))  # (B, 3, H', W')
        Hp, Wp = xp.shape[-2:]
        ys = list(range(0, Hp - S + 1, stride)) + ([Hp - S] if (Hp - S) % stride else [])
        xs = list(range(0, Wp - S + 1, stride)) + ([Wp - S] if (Wp - S) % stride else [])
        logits, count = None, torch.zeros(1, 1, Hp, Wp, device=x.device)
        for y0 in ys:
            for x0 in xs:
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


def readable(loader):
    """The loader's batches; an error raised in a DataLoader worker (an unreadable image, a mask of another size
    than its image or with values outside the classes: dataio.seg's CorruptImageError, a ValueError) is raised
    again with its own message only (the worker's traceback, which DataLoader puts into the text, dropped)."""
    try:
        yield from loader
    except ValueError as e:
        text = str(e)
        if "Original Traceback" in text:
            text = text.rstrip().rpartition(f"{type(e).__name__}: ")[2]
        raise type(e)(text) from None


@torch.no_grad()
def evaluate(model: nn.Module, loader, *, num_classes: int, dist, mode: str = "whole", stride: int | None = None,
             amp=nullcontext(), compare: nn.Module | None = None, vis: int = 0) -> tuple[torch.Tensor, dict, list]:
    """One confusion matrix over the whole eval set (every rank scores its share, the counts are summed).

    loader: yields lists of (image (3, h, w), mask (H, W)) pairs (collate_fn=list): the logits of each image are
        resized to its mask's size and scored there (ADE20K: the original image size).
    dist: training.distributed.Dist (device, ddp).
    compare: a second model (the merged export) run on the same images; returns how many pixels' predicted classes
        differ and the largest absolute logit difference.
    vis: keep the first `vis` (image, truth, prediction) triples of this rank for a picture.
    """
    model.eval()
    if compare is not None:
        compare.eval()
    cm = torch.zeros(num_classes, num_classes, dtype=torch.int64)
    diff = dict(pixels_differ=0.0, max_logit_diff=0.0)
    samples = []
    for batch in readable(loader):
        sizes = [(tuple(img.shape[-2:]), tuple(m.shape)) for img, m in batch]
        for size in dict.fromkeys(sizes):  # one forward pass per (image size, mask size) group
            group = [pair for pair, s in zip(batch, sizes) if s == size]
            x = torch.stack([img for img, _ in group]).to(dist.device)  # (B, 3, h, w)
            y = torch.stack([m for _, m in group]).to(dist.device).long()  # (B, H, W)
            logits = predict_logits(model, x, mode=mode, out_size=y.shape[-2:], stride=stride, amp=amp)
            pred = to_classes(logits)  # (B, H, W)
            cm += confusion_matrix(pred, y, num_classes).cpu()
            if compare is not None:
                other = predict_logits(compare, x, mode=mode, out_size=y.shape[-2:], stride=stride, amp=amp)
                diff["pixels_differ"] += float((to_classes(other) != pred).sum())
                diff["max_logit_diff"] = max(diff["max_logit_diff"], float((other - logits).abs().max()))
            for i in range(min(vis - len(samples), len(group))):
                samples.append((x[i].cpu(), y[i].cpu(), pred[i].cpu()))
    if dist.ddp:
        cm = cm.to(dist.device)
        torch_dist.all_reduce(cm)
        cm = cm.cpu()
        t = torch.tensor([diff["pixels_differ"]], dtype=torch.float64, device=dist.device)
        torch_dist.all_reduce(t)
        m = torch.tensor([diff["max_logit_diff"]], dtype=torch.float64, device=dist.device)
        torch_dist.all_reduce(m, op=torch_dist.ReduceOp.MAX)
        diff = dict(pixels_differ=float(t), max_logit_diff=float(m))
    return cm, diff, samples
