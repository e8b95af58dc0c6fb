r"""
Object detection and instance segmentation with a fine-tuned EfficientFormer: Cascade Mask R-CNN + FPN on COCO,
as in PETAH Table 6 (Frozen, ATTN FT, Full FT, LoRA ATTN, PETAH-1, PETAH-2). The FPN, the RPN and the cascade
RoI heads are the new task's head: every method trains them; --method decides what happens in the backbone
(methods.py, the same layer policy as classification; `frozen` = nothing in the backbone trains).

Single process (one GPU, or the CPU):
    python train_det.py --model efl7 --weights efficientformer_l7.pth --method petah --r 8 --rc 2 \
        --data coco --data-root ~/data/coco --out runs/coco_petah2
One node with 8 GPUs (the global --batch-size, default 16 = 2 per GPU as mmdetection's 1x schedule, is split
over the processes; a leading `--` before the script's flags is accepted):
    torchrun --nproc_per_node 8 train_det.py -- --model efl7 --weights efficientformer_l7.pth --method petah \
        --rc 2 --data coco --data-root ~/data/coco --out runs/coco_petah2
The paper's #Params column (backbone) with the head (FPN / RPN / RoI heads) counted apart, no data:
    python train_det.py --model efl7 --method petah --rc 2 --data coco --count-only
CPU demo: a tiny EfficientFormer (random backbone) with narrow heads on the built-in synthetic instance set
(2-4 shapes per 128 px image, 3 classes; README states the time and the AP it reaches):
    OMP_NUM_THREADS=1 python train_det.py --model ef_tiny --method full --data synthetic --img-size 128 \
        --fpn-channels 32 --fc-dim 128 --mask-channels 32 --roi-batch 64 --rpn-batch 64 --synthetic-train 64 \
        --synthetic-val 16 --epochs 6 --batch-size 4 --lr 2e-3 --warmup-iters 10 --lr-steps 5 --workers 0 \
        --out runs/det_demo

Schedule (PETAH Appendix A.2 = mmdetection 1x): AdamW, LR 1e-4, weight decay 0.05 (on matrices and kernels),
12 epochs, linear warmup over 500 steps from 0.001 x LR, LR x 0.1 after epochs 8 and 11.
A run stopped at any moment continues from its last completed epoch with the same command plus --resume.
Training controls, the same in the three training scripts (training/controls.py): --amp {bf16,fp16,off},
--accum-steps K, --clip-grad NORM, --grad-ckpt, --compile [BACKEND], --channels-last, --ema DECAY (--final-model
ema); the run record (torch / CUDA / GPU / git versions) goes into args.json, the checkpoints and the task file.
Score a finished run's task file without training: the same flags plus --eval-only OUT/adapters.safetensors.
In --out: args.json, log.jsonl (one line per epoch, then a summary line), ckpt/ (trainable weights and training
state of the last completed epoch), adapters.safetensors (the task file: what this fine-tune changed, adapters +
the detection head, with the settings to rebuild the model), merged.safetensors (adapters folded into the
weights: the plain detector's state_dict).
"""

import argparse
import json
import os
import sys
import time
import warnings

import torch
import torch.distributed as torch_dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from dataio.det import DET_DATASETS, build_det_datasets, det_collate
from lora import freeze_bn_stats, load_adapters, merge_and_unload
from methods import apply_method
from models import PRESETS as ALL_PRESETS
from models import create_model, load_pretrained
from models.det.detector import build_cascade_mask_rcnn
from tasks.atomic import atomic_save_safetensors, atomic_write_text, write_jsonl
from tasks.task_file import save_task
from training.cli import (
    check_common_args,
    parse_model_cfg,
    strip_leading_dashdash,
    user_errors,
)
from training.controls import (
    add_control_args,
    apply_model_controls,
    check_control_args,
    control_settings,
    control_state,
    grad_norm_stats,
    make_record,
    make_scaler_and_ema,
    resume_controls,
)
from training.det_eval import coco_evaluate, to_coco_results
from training.distributed import (
    all_reduce_sum,
    cleanup_distributed,
    epoch_seed,
    seed_everything,
    setup_distributed,
    shard_loader,
    train_loader_for,
)
from training.precision import DTYPES
from training.report import progress
from training.run_dir import (
    open_run,
    release_out_dir,
    resume_run,
    save_checkpoint,
    save_random_base,
    stop_after,
    stop_if_not_finite,
)
from training.schedule import step_lr_factor
from training.steps import grad_sync, micro_batches, optimizer_step

PRESETS = {k: v for k, v in ALL_PRESETS.items() if v[0].startswith("ef")}  # EfficientFormer backbones only
MODELS = ("efl1", "efl3", "efl7", *PRESETS)
METHODS = ("frozen", "attn", "full", "lora", "petah")  # PETAH Table 6; frozen = methods.py's "linear"
NUM_CLASSES = {"coco": 80, "synthetic": 3}  # object classes (the detector adds background)
# settings a --resume must share with the checkpoint (checked before its weights are loaded)
RESUME_KEYS = ("model", "model_cfg", "weights", "method", "r", "rc", "alpha", "train_biases", "train_norms",
              "fpn_channels", "fc_dim", "mask_channels", "rpn_batch", "roi_batch", "data", "data_root", "img_size",
              "max_size", "synthetic_train", "synthetic_val", "epochs", "lr_steps", "warmup_iters", "batch_size", "lr",
              "weight_decay", "seed", "clip_grad", "ema", "final_model", "train_ann", "val_ann", "train_images",
              "val_images")

# -----------------------------------------------------------------------------
# configuration: every option, with its default, is in --help

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
g = parser.add_argument_group("model and method")
g.add_argument("--model", default="efl7", choices=MODELS,
               help="backbone (default efl7); " + "; ".join(f"{k} = {b} with {c}" for k, (b, c) in PRESETS.items()))
g.add_argument("--model-cfg", default="{}", metavar="JSON",
               help="extra keyword arguments for models.create_model, overriding a preset's")
g.add_argument("--weights", default=None, metavar="PATH",
               help="pretrained backbone checkpoint (timm / snap layouts; the attention biases are resized to the "
                    "--img-size grid). Without it the backbone is random: only a smoke test")
g.add_argument("--method", default="petah", choices=METHODS,
               help="what trains in the backbone (the detection head always trains): frozen (nothing), attn, full, "
                    "lora (LoRA ATTN), petah (LoRA ATTN + conv-LoRA); default petah")
g.add_argument("--r", type=int, default=8, help="LoRA rank of the attention layers (lora, petah); default 8")
g.add_argument("--rc", type=int, default=None, help="conv-LoRA rank of petah; default 1 (PETAH-1)")
g.add_argument("--alpha", type=float, default=None, help="LoRA alpha; default alpha = rank (scale 1)")
g.add_argument("--train-biases", action="store_true", help="also train every bias of the backbone")
g.add_argument("--train-norms", action="store_true", help="also train every norm layer of the backbone")
g = parser.add_argument_group("detection head (mmdetection cascade_mask_rcnn_r50_fpn_1x defaults)")
g.add_argument("--fpn-channels", type=int, default=256, help="FPN width; default 256")
g.add_argument("--fc-dim", type=int, default=1024, help="width of the box heads' two fc layers; default 1024")
g.add_argument("--mask-channels", type=int, default=256, help="width of the FCN mask heads; default 256")
g.add_argument("--rpn-batch", type=int, default=256, help="anchors sampled per image for the RPN loss; default 256")
g.add_argument("--roi-batch", type=int, default=512, help="RoIs sampled per image and stage; default 512")

g = parser.add_argument_group("data")
g.add_argument("--data", default="synthetic", choices=DET_DATASETS, help="dataset; synthetic needs no files")
g.add_argument("--data-root", default="data/coco",
               help="COCO root: train2017/, val2017/, annotations/instances_{train,val}2017.json; default data/coco")
for split in ("train", "val"):
    g.add_argument(f"--{split}-ann", default=None, metavar="FILE",
                   help=f"--data coco: the {split} annotation file (COCO JSON) of a COCO-format set with its own "
                        f"names; default DATA_ROOT/annotations/instances_{split}2017.json")
    g.add_argument(f"--{split}-images", default=None, metavar="DIR",
                   help=f"--data coco: the folder of the {split} images; default DATA_ROOT/{split}2017")
g.add_argument("--img-size", type=int, default=None,
               help="shorter image side after resizing (the ratio kept; default 800 for coco, 128 for synthetic)")
g.add_argument("--max-size", type=int, default=None,
               help="cap of the longer side (default 1333 for coco; none for synthetic)")
g.add_argument("--synthetic-train", type=int, default=256, help="--data synthetic: training images; default 256")
g.add_argument("--synthetic-val", type=int, default=64, help="--data synthetic: validation images; default 64")
g.add_argument("--eval-every", type=int, default=1, metavar="N",
               help="evaluate on val every N epochs (and after the last); default 1")
g.add_argument("--workers", type=int, default=4, help="DataLoader worker processes per rank; default 4")

g = parser.add_argument_group("optimisation (AdamW; linear warmup, then LR x 0.1 at each --lr-steps epoch)")
g.add_argument("--epochs", type=int, default=12, help="default 12")
g.add_argument("--lr-steps", type=int, nargs="*", default=[8, 11], help="epochs after which LR x 0.1; default 8 11")
g.add_argument("--warmup-iters", type=int, default=500, help="linear warmup steps from 0.001 x LR; default 500")
g.add_argument("--batch-size", type=int, default=16, help="GLOBAL batch size, split over the processes; default 16")
g.add_argument("--lr", type=float, default=1e-4, help="default 1e-4")
g.add_argument("--weight-decay", type=float, default=0.05,
               help="AdamW weight decay, on matrices and kernels only (not on biases, norms, scales); default 0.05")
g.add_argument("--seed", type=int, default=0, help="default 0")

g = parser.add_argument_group("system and output")
g.add_argument("--out", default="runs/det", help="output directory; default runs/det")
g.add_argument("--resume", action="store_true", help="continue from the last completed epoch in OUT/ckpt")
g.add_argument("--count-only", action="store_true",
               help="print one JSON line (backbone #Params and the FPN / RPN / RoI head counts) and exit")
g.add_argument("--device", default=None, choices=("cpu", "cuda"), help="default: cuda when available")
g.add_argument("--final-model", default="last", choices=("last", "ema"),
               help="the model the task file and merged.safetensors keep: the last step's (default) or the EMA of "
                    "--ema")
g.add_argument("--eval-only", default=None, metavar="FILE",
               help="train nothing: load FILE (a task file OUT/adapters.safetensors, or a checkpoint's "
                    "OUT/ckpt/epoch_N.safetensors) into the detector the other flags build (the same --model, "
                    "--method, head sizes, --weights and --seed as its run), score it with COCOeval on the "
                    "validation split and write the metrics to OUT/eval.json")
g.add_argument("--stop-after-epoch", type=int, default=None,
               help="testing: exit once this epoch's checkpoint is written, as if the run had been killed")
g.add_argument("--inject-nan-step", type=int, default=None,
               help="testing: make the loss NaN at this optimizer step, to exercise the NaN guard")
add_control_args(parser)  # --amp, --accum-steps, --clip-grad, --grad-ckpt, --compile, --channels-last, --ema
args = parser.parse_args(strip_leading_dashdash(sys.argv[1:]))  # a stray leading "--" (torchrun ... -- --flags)
check_common_args(parser, args)  # ranges of the shared flags, --weights exists

# -----------------------------------------------------------------------------
# processes: torchrun sets RANK / LOCAL_RANK / WORLD_SIZE; NCCL on GPUs, gloo on CPUs

with user_errors(parser):  # --device cuda without CUDA
    dist = setup_distributed(args.device)
master = dist.master
check_control_args(parser, args, dist)  # ranges; --amp's default (bf16 on CUDA, off on the CPU) and support


def log(*a):
    if master:
        print(*a, flush=True)


builder, preset_cfg = PRESETS.get(args.model, (args.model, {}))
if args.rc is not None and args.method != "petah":
    if master:
        warnings.warn(f"--rc {args.rc} is ignored: conv-LoRA belongs to --method petah (got --method {args.method})",
                      stacklevel=1)
rc = 1 if args.rc is None else args.rc
img_size = args.img_size if args.img_size is not None else (800 if args.data == "coco" else 128)
max_size = args.max_size if args.max_size is not None else (1333 if args.data == "coco" else None)
if img_size < 32:
    parser.error(f"--img-size {img_size} is too small: the backbone downsamples by 32 (P5 is 1/32 of the input, "
                 f"P6 1/64); use at least 32 (COCO: 800)")
if max_size is not None and max_size < img_size:
    parser.error(f"--max-size {max_size} must be >= --img-size {img_size} (the longer side is capped at --max-size)")
if args.batch_size % dist.world_size:
    parser.error(f"--batch-size {args.batch_size} must be divisible by the number of processes ({dist.world_size})")
model_cfg = parse_model_cfg(parser, preset_cfg, args.model_cfg)
# --out: a writable directory, locked for this run; a finished run there is refused without --resume; leftovers
# of a killed run (temporaries, stale epoch files) are removed and counted. And a loud warning without --weights.
if not args.eval_only:
    open_run(parser, args, dist, log)

# -----------------------------------------------------------------------------
# model: EfficientFormer (+ adapters of --method) -> GroupNorm + FPN -> RPN -> 3-stage cascade with mask heads


def build_detector(num_classes: int) -> tuple[nn.Module, dict, set]:
    """The detector of --model / --method for `num_classes` object classes: (model, counts, base state_dict keys)."""
    torch.manual_seed(args.seed)  # identical initialisation on every rank and in a resumed run
    # built for 224 x 224, the size of the released checkpoints: the attention-bias tables keep their trained 7 x 7
    # grid (and key layout), and every batch's token grid (H/32 x W/32 of the padded batch) resamples them
    body = create_model(builder, num_classes=0, img_size=224, **model_cfg)
    if args.weights:
        with user_errors(parser):  # a damaged file, a layout that does not fit --model
            load_pretrained(body, args.weights, strict=True, verbose=master and not args.count_only)
    if not args.eval_only:
        save_random_base(parser, args, body, master=master)  # no --weights: OUT/base.safetensors (the backbone)
    body.norm = nn.Identity()  # forward_pyramid never reaches the final norm: no dead trainable params
    apply_method(body, args.model, "linear" if args.method == "frozen" else args.method, r=args.r, rc=rc,
                 alpha=args.alpha, train_biases=args.train_biases, train_norms=args.train_norms, head_names=())
    torch.manual_seed(args.seed + 1)  # the same detection-head initialisation whatever the method drew above
    det = build_cascade_mask_rcnn(body, num_classes=num_classes + 1, fpn_channels=args.fpn_channels,
                                  fc_dim=args.fc_dim, mask_channels=args.mask_channels,
                                  rpn_batch_size_per_image=args.rpn_batch, roi_batch_size_per_image=args.roi_batch,
                                  mean=body.data_cfg["mean"], std=body.data_cfg["std"])
    adapter_keys = {f"{name}.{n}" for name, m in det.named_modules() for n in getattr(m, "adapter_names", ())}
    base = set(det.state_dict()) - adapter_keys  # the merged export has exactly these keys (adapters folded away)

    def n_params(prefix: str, trainable_only: bool = False) -> int:
        return sum(p.numel() for n, p in det.named_parameters() if n.startswith(prefix)
                   and (p.requires_grad or not trainable_only))

    counts = dict(model=args.model, method=args.method,
                  adapter_params=n_params("backbone.body.", trainable_only=True),  # the paper's #Params column
                  fpn_params=n_params("backbone.norms.") + n_params("backbone.fpn."),
                  rpn_params=n_params("rpn."), roi_heads_params=n_params("roi_heads."),
                  backbone_params=n_params("backbone.body."), total_params=n_params(""))
    counts["head_params"] = counts["fpn_params"] + counts["rpn_params"] + counts["roi_heads_params"]
    counts["trainable_params"] = n_params("", trainable_only=True)
    return det, counts, base


if args.count_only:
    try:
        model, counts, _ = build_detector(NUM_CLASSES[args.data])
    except (TypeError, ValueError) as e:
        parser.error(f"cannot build --model {args.model} with {model_cfg}: {e}")
    if master:
        print(json.dumps(counts), flush=True)
    cleanup_distributed(dist)
    sys.exit(0)

if dist.ddp and not master:
    torch_dist.barrier()  # rank 0 reads the annotation files first
with user_errors(parser):  # a missing COCO root (the message names the layout), an annotation file that does not parse
    train_ds, val_ds, classes = build_det_datasets(args.data, args.data_root, img_size=img_size, max_size=max_size,
                                                   synthetic_train=args.synthetic_train,
                                                   synthetic_val=args.synthetic_val, seed=args.seed,
                                                   train_ann=args.train_ann, val_ann=args.val_ann,
                                                   train_images=args.train_images, val_images=args.val_images)
if dist.ddp and master:
    torch_dist.barrier()
for split, ds in (("train", train_ds), ("val", val_ds)):
    s = ds.stats
    log(f"{split}: {len(ds)} images of {s['images']}; {s['boxes']} boxes: {s['clipped']} clipped to their image, "
        f"{s['dropped']} dropped (under 1 px wide or high); {s['crowd']} crowd regions (not training targets)"
        + (f"; {s['skipped_images']} images without a target skipped" if split == "train" else
           "; images without objects kept (scored by COCOeval)"))
try:
    model, counts, base_keys = build_detector(len(classes))
except (TypeError, ValueError) as e:
    parser.error(f"cannot build --model {args.model} with --img-size {img_size} and {model_cfg}: {e}")
log(f"{args.model} / {args.method}: {counts['trainable_params']:,} trainable of {counts['total_params']:,} parameters: "
    f"backbone #Params {counts['adapter_params']:,} (of {counts['backbone_params']:,}), head: FPN "
    f"{counts['fpn_params']:,} + RPN {counts['rpn_params']:,} + RoI heads {counts['roi_heads_params']:,}")
model.to(dist.device)
apply_model_controls(parser, args, model)  # --grad-ckpt (the EfficientFormer's blocks), --channels-last
# --amp: the backbone + FPN under autocast; anchors, boxes, RoI sampling and the losses stay float32
model.backbone.amp_dtype = DTYPES.get(args.amp)
if args.compile:  # in place (the state_dict keys stay); the RPN and RoI heads have data-dependent shapes
    model.backbone.compile(backend=args.compile)

# -----------------------------------------------------------------------------
# optimizer: AdamW over the trainable parameters, weight decay on matrices / kernels only

decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
optimizer = torch.optim.AdamW([dict(params=decay, weight_decay=args.weight_decay),
                               dict(params=no_decay, weight_decay=0.0)], lr=args.lr)
params = decay + no_decay  # the trained tensors (--clip-grad)

# -----------------------------------------------------------------------------
# loaders: DistributedSampler (also on one process, the same shuffle), drop_last: the same steps whatever the
# number of processes

per_rank_batch = args.batch_size // dist.world_size
train_loader = train_loader_for(train_ds, batch_size=per_rank_batch, dist=dist, seed=args.seed, workers=args.workers,
                                collate_fn=det_collate)
train_sampler = train_loader.sampler
eval_loader = shard_loader(val_ds, batch_size=per_rank_batch, dist=dist, workers=args.workers,
                           collate_fn=det_collate)  # every rank a disjoint share, each image once
steps_per_epoch = len(train_loader)
if steps_per_epoch == 0:
    parser.error(f"the training set ({len(train_ds)} images) is smaller than one --batch-size ({args.batch_size})")
total_steps = args.epochs * steps_per_epoch


def lr_at(step: int) -> float:
    """mmdetection's 1x schedule: x0.1 after each --lr-steps epoch; linear warmup from 0.001 x LR."""
    return args.lr * step_lr_factor(step, steps_per_epoch=steps_per_epoch, milestones=args.lr_steps,
                                    warmup_steps=args.warmup_iters)


# -----------------------------------------------------------------------------
# resume: trainable weights + optimizer state of the last completed epoch (the LR follows from the step)

ckpt_dir = os.path.join(args.out, "ckpt")
start_epoch, history = 0, []
if args.resume:
    # the settings that decide the result must be the checkpoint's (checked before its weights are loaded)
    state = resume_run(parser, ckpt_dir, model, optimizer, settings={k: getattr(args, k) for k in RESUME_KEYS},
                       master=master, log=log)
    if state is not None:
        start_epoch, history = state["epoch"], json.loads(state["history"])
# the fp16 loss scaler and the EMA of --ema (made after the resume: without a saved average it starts there); the
# run record (versions, GPU, git commit) goes into args.json, the checkpoints and the task file
scaler, ema = make_scaler_and_ema(args, model, dist.device)
record = make_record(dist)
if args.resume:
    resume_controls(state, scaler, ema, record, log)

raw_model = model  # adapters, checkpoints and the merge work on the plain module
if dist.ddp:
    model = DDP(model, device_ids=[dist.local_rank] if dist.device.type == "cuda" else None)
micro_text = f" in {args.accum_steps} micro-batches" if args.accum_steps > 1 else ""
log(f"{dist.world_size} process(es) on {dist.device}, --amp {args.amp}: {per_rank_batch} images per process and "
    f"step{micro_text}, {steps_per_epoch} steps per epoch, {total_steps} in all")
if master and not args.eval_only:
    with user_errors(parser):
        atomic_write_text(json.dumps(dict(vars(args), run_record=record), indent=1),
                          os.path.join(args.out, "args.json"))


def to_device(targets: list[dict]) -> list[dict]:
    return [{k: v.to(dist.device, non_blocking=True) if torch.is_tensor(v) else v for k, v in t.items()}
            for t in targets]


@torch.no_grad()
def evaluate(net: nn.Module) -> dict[str, float]:
    """COCOeval (bbox + segm) of `net` on the whole val set: each rank detects its share, rank 0 scores."""
    net.eval()
    results = []
    for images, targets in progress(eval_loader, desc="eval", enabled=master):
        outs = net([im.to(dist.device) for im in images],
                   original_sizes=[tuple(t["orig_size"].tolist()) for t in targets])
        results += to_coco_results(outs, [t["image_id"] for t in targets], val_ds.label_to_cat)
    if dist.ddp:
        gathered = [None] * dist.world_size
        torch_dist.all_gather_object(gathered, results)
        results = [r for part in gathered for r in part]
    metrics = [coco_evaluate(val_ds.coco, results) if master else None]
    if dist.ddp:
        torch_dist.broadcast_object_list(metrics, 0)
    return metrics[0]


def metrics_text(m: dict) -> str:
    return (f"box AP {100 * m['bbox_AP']:.1f} / AP50 {100 * m['bbox_AP50']:.1f}, "
            f"mask AP {100 * m['segm_AP']:.1f} / AP50 {100 * m['segm_AP50']:.1f}")


# -----------------------------------------------------------------------------
# --eval-only: a task file or a checkpoint scored with COCOeval on val; nothing trains

if args.eval_only:
    with user_errors(parser):  # a missing file, adapters of another model / method / head / base
        load_adapters(raw_model, args.eval_only)
    result = dict(file=args.eval_only, model=args.model, method=args.method, data=args.data, split="val",
                  count=len(val_ds), **evaluate(raw_model))
    if master:
        with user_errors(parser):
            os.makedirs(args.out, exist_ok=True)
            atomic_write_text(json.dumps(result, indent=1), os.path.join(args.out, "eval.json"))
        print(json.dumps(result), flush=True)
    cleanup_distributed(dist)
    sys.exit(0)

# -----------------------------------------------------------------------------
# training

step = start_epoch * steps_per_epoch
final_metrics = None
for epoch in range(start_epoch, args.epochs):
    seed_everything(epoch_seed(args.seed, epoch, dist.rank))  # this epoch's flips and RoI / anchor sampling
    train_sampler.set_epoch(epoch)
    model.train()
    freeze_bn_stats(raw_model)  # BatchNorms with frozen params keep the pretrained running statistics
    t0, sums, seen, grad_norms = time.time(), {}, 0, []
    if dist.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dist.device)  # this epoch's peak, evaluation included
    pbar = progress(train_loader, desc=f"epoch {epoch + 1}/{args.epochs}", enabled=master)
    for images, targets in pbar:
        lr = lr_at(step)
        for group in optimizer.param_groups:
            group["lr"] = lr
        # --accum-steps K: K forward / backward passes, each micro-batch's losses / K; DDP all-reduces the summed
        # gradients in the last backward only (grad_sync). The RPN / RoI samples are drawn per micro-batch
        optimizer.zero_grad(set_to_none=True)
        loss, losses = 0.0, {}
        for j, (ims, tgs) in enumerate(micro_batches((images, targets), args.accum_steps)):
            with grad_sync(model, last=j == args.accum_steps - 1):
                micro = model([im.to(dist.device, non_blocking=True) for im in ims], to_device(tgs))
                micro_loss = sum(micro.values()) / args.accum_steps  # RPN + the 3 stages' box, class, mask losses
                if step == args.inject_nan_step:
                    micro_loss = micro_loss * float("nan")
                scaler.scale(micro_loss).backward()  # fp16: the loss times the scale, so small gradients survive
            loss = loss + micro_loss.detach()
            losses = {k: losses.get(k, 0.0) + v.detach() / args.accum_steps for k, v in micro.items()}
        # a NaN/inf loss on any rank stops every rank before the update; the last checkpoint stays as it is
        stop_if_not_finite(loss, step=step, epoch=epoch, history=history, ckpt_dir=ckpt_dir, dist=dist, log=log,
                           fix="Lower --lr (or try --clip-grad)")
        grad_norms.append(optimizer_step(optimizer, scaler, params, clip_grad=args.clip_grad))  # unscale, clip, step
        step += 1
        if ema is not None:
            ema.update(raw_model, step)
        seen += len(images)
        for k, v in [("loss", loss), *losses.items()]:
            sums[k] = sums.get(k, 0.0) + v.item() * len(images)
        if master:
            pbar.set_postfix(loss=f"{loss.item():.3f}", lr=f"{lr:.2e}",
                             img_s=f"{seen * dist.world_size / (time.time() - t0):.1f}")
    pbar.close()
    train_time = time.time() - t0
    totals = all_reduce_sum([seen] + list(sums.values()), dist)
    train_losses = {k: v / totals[0] for k, v in zip(sums, totals[1:])}
    if dist.ddp:  # rank 0's buffers (trained BatchNorms' statistics) everywhere
        for b in raw_model.buffers():
            torch_dist.broadcast(b, 0)
    if (epoch + 1) % args.eval_every == 0 or epoch + 1 == args.epochs:
        metrics = evaluate(raw_model)
        final_metrics = metrics if epoch + 1 == args.epochs else None
        text = metrics_text(metrics)
    else:
        metrics, text = {}, f"not evaluated (--eval-every {args.eval_every})"
    history.append(dict(epoch=epoch + 1, step=step, lr=lr, train_loss=train_losses["loss"],
                        losses={k: v for k, v in train_losses.items() if k != "loss"}, **metrics,
                        img_per_s=round(totals[0] / train_time, 2), time_s=round(time.time() - t0, 2)))
    if ema is not None and metrics:  # the EMA's weights scored on the same images, beside the raw model's
        with ema.swapped_into(raw_model):
            history[-1].update({f"ema_{k}": v for k, v in evaluate(raw_model).items()})
        text += f"; EMA box AP {100 * history[-1]['ema_bbox_AP']:.1f}"
    history[-1].update(grad_norm_stats(grad_norms, args.clip_grad, dist.device))
    log(f"epoch {epoch + 1}: train loss {train_losses['loss']:.4f}, {text}, {totals[0] / train_time:.1f} img/s")
    if master:
        with user_errors(parser):  # disk full, read-only file system: the message says so (and what to do)
            save_checkpoint(ckpt_dir, raw_model, epoch=epoch + 1,
                            state=dict(optimizer=optimizer.state_dict(), step=step, history=json.dumps(history),
                                       args=json.dumps(vars(args)), **control_state(scaler, ema, record)),
                            metadata=dict(model=args.model, method=args.method, num_classes=len(classes)))
            write_jsonl(history, os.path.join(args.out, "log.jsonl"))
    if args.stop_after_epoch is not None and epoch + 1 == args.stop_after_epoch and epoch + 1 < args.epochs:
        stop_after(epoch + 1, dist, log)

# -----------------------------------------------------------------------------
# task file, then merge the adapters into the weights, check the merged detector scores as the adapted one, export

if args.final_model == "ema":  # the EMA's values become the model's: the task file, the merge, the export
    ema.copy_into(raw_model)
    final_metrics = None
metrics = final_metrics if final_metrics is not None else evaluate(raw_model)
if master:  # the task itself: adapters + the detection head (+ trained norms / biases / BN statistics) + how to use it
    with user_errors(parser):
        save_task(raw_model, os.path.join(args.out, "adapters.safetensors"), meta=dict(
            task_type="det", model=args.model, model_cfg=model_cfg, method=args.method, r=args.r, rc=rc,
            alpha=args.alpha,
            train_norms=args.train_norms, train_biases=args.train_biases, num_classes=len(classes),
            class_names=list(classes), label_to_cat=list(val_ds.label_to_cat), img_size=img_size, max_size=max_size,
            fpn_channels=args.fpn_channels, fc_dim=args.fc_dim, mask_channels=args.mask_channels, data=args.data,
            mean=list(raw_model.transform.image_mean), std=list(raw_model.transform.image_std), **metrics,
            final_model=args.final_model, training=control_settings(args), run_record=record))
if args.channels_last:  # the merge and the export in the usual layout
    raw_model.to(memory_format=torch.contiguous_format)
merged = merge_and_unload(raw_model)  # in place: W0 + dW in every adapted layer, plain nn.Linear / nn.Conv2d
merged_metrics = evaluate(merged)
diff = max(abs(metrics[k] - merged_metrics[k]) for k in metrics)
if diff > 0:
    warnings.warn(f"the merged detector's COCO metrics differ from the adapted one's by up to {diff:.2e}: rounding "
                  f"at a score / NMS tie, or a merge bug", stacklevel=1)
export = merged.state_dict()
if set(export) != base_keys:
    raise RuntimeError(f"the merged model's keys differ from the base model's: {sorted(set(export) ^ base_keys)[:5]}")
summary = dict(summary=True, **counts, epochs=args.epochs, steps=step, **metrics,
               **{f"merged_{k}": v for k, v in merged_metrics.items()}, merged_max_abs_diff=diff)
if master:
    with user_errors(parser):  # disk full / read-only: a clear message
        atomic_save_safetensors(export, os.path.join(args.out, "merged.safetensors"), metadata=dict(
            model=args.model, model_cfg=json.dumps(model_cfg), num_classes=str(len(classes)),
            fpn_channels=str(args.fpn_channels), fc_dim=str(args.fc_dim), mask_channels=str(args.mask_channels),
            img_size=str(img_size), label_to_cat=json.dumps(list(val_ds.label_to_cat))))
log(f"done: adapted {metrics_text(metrics)}; merged {metrics_text(merged_metrics)} (max |diff| {diff:.1e}); "
    f"merged detector: {os.path.join(args.out, 'merged.safetensors')}")
if master:
    with user_errors(parser):
        write_jsonl(history + [summary], os.path.join(args.out, "log.jsonl"))
    print(json.dumps(summary), flush=True)
    release_out_dir(args.out)
cleanup_distributed(dist)
