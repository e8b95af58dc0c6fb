r"""
Fine-tune a segmentation model with the recipes of the two papers (the RECIPES table below):

  PETRAS (--model sam_vitb)          prompt-free SAM ViT-B, adapted end to end with LoRA or (IA)^3 on the image
                                     encoder AND the mask decoder, norms and biases trained too, BCE + Dice, cosine
                                     LR with warmup, flips + RandAugment, the average of the top-3 checkpoints.
  PETAH  (--model efl1|efl3|efl7)    EfficientFormer stage maps (strides 4/8/16/32) into a Semantic FPN
                                     (models/ef_fpn.py), the backbone adapted with a method of methods.py (linear =
                                     "Frozen", full, attn, lora, petah, ...), AdamW 2e-4, poly LR by iterations, CE.

Evaluation protocols (data_seg.py): --data folder / synthetic score the PETRAS way, on a square canvas (longer
side resized to --eval-size, padded with ignore); --data ade20k scores as mmsegmentation does (what the paper's
45.0 mIoU means): the image resized keeping its ratio to fit (2048, 512), the logits upsampled to the ORIGINAL
image size, mIoU over the 150 classes summed over the set; the last iteration's model is the result.

Single process (one GPU, or the CPU):
    python train_seg.py --model sam_vitb --weights sam_vit_b_01ec64.pth --method lora --learn-interp \
        --data folder --data-root ~/data/ucc --img-size 1024 --epochs 3 --batch-size 4 --out runs/petras
    python train_seg.py --model efl7 --weights efficientformer_l7.pth --method petah --rc 2 \
        --data ade20k --data-root ~/data --iters 40000 --batch-size 32 --out runs/ade_petah2
One node with 8 GPUs (the global --batch-size is split over the processes; `--` ends torchrun's own options):
    torchrun --nproc_per_node 8 train_seg.py -- --model efl7 --weights efficientformer_l7.pth --method petah \
        --rc 2 --data ade20k --data-root ~/data --out runs/ade_petah2
A method's parameter count, as in the paper's #Params column (no data, no training):
    python train_seg.py --model sam_vitb --method lora --count-only
Masks for a folder of images, or a finished run's checkpoint evaluated again: predict_seg.py.
CPU demos (tiny random models on the built-in synthetic data, 64 training and 16 validation images; 8 s of CPU
time each with OMP_NUM_THREADS=1; foreground IoU of the top-3 average 0.728 (SAM) and 0.746 (EfficientFormer),
measured with torch 2.14 on a Linux x86 CPU: the random models make the numbers depend on the torch build):
    OMP_NUM_THREADS=1 python train_seg.py --model sam_tiny --method lora --learn-interp --data synthetic \
        --img-size 64 --epochs 4 --batch-size 4 --lr 1e-2 --workers 0 --out runs/demo_sam
    OMP_NUM_THREADS=1 python train_seg.py --model ef_tiny --head fpn --method petah --data synthetic \
        --img-size 64 --fpn-channels 32 --fpn-head-channels 32 --epochs 4 --batch-size 4 --lr 1e-2 --workers 0 \
        --out runs/demo_ef

A run stopped at any moment continues from its last completed epoch with the same command plus --resume.
Training controls, the same in the three training scripts (training/controls.py): --amp {bf16,fp16,off},
--accum-steps K, --clip-grad NORM, --grad-ckpt, --compile [BACKEND], --channels-last, --ema DECAY (--final-model
ema); the run record (torch / CUDA / GPU / git versions) goes into args.json, the checkpoints and the task file.
One run at a time writes into an --out (OUT/.lock); a finished run there is only continued with --resume.
In --out: args.json, log.jsonl (one line per evaluation, then a summary line), summary.csv (epoch, step,
train_loss, eval_miou, eval_iou_fg, eval_pixel_acc, lr), curves.png (when matplotlib is installed), tb/
(--tensorboard), ckpt/ (adapter-only safetensors and training state of the last completed epoch), topk/ (the k
best evaluations' adapters, --final-model average), vis/ (PNG grids: image | truth | prediction),
final.safetensors (adapters of the final model), adapters.safetensors (the task file of tasks/task_file.py),
merged.safetensors (adapters folded into the weights, the checkpoint's own key layout).
"""

import argparse
import copy
import io
import json
import math
import os
import sys
import time
import warnings

import torch
import torch.distributed as torch_dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP
from torchvision.utils import draw_segmentation_masks, make_grid, save_image

from dataio import seg as data_seg
from lora import freeze_bn_stats, merge_and_unload, read_safetensors
from methods import METHODS as EF_METHODS
from methods import SAM_METHODS, apply_method, apply_sam_method, count_parameters
from models import PRESETS as ALL_PRESETS
from models import create_model, ef_semantic_fpn, load_pretrained
from tasks.atomic import (
    atomic_save_adapters,
    atomic_save_safetensors,
    atomic_write,
    atomic_write_text,
    write_csv,
    write_jsonl,
)
from tasks.deploy import Segment
from tasks.interop import merged_metadata
from tasks.task_file import save_task
from training.cli import (
    batches,
    check_common_args,
    parse_model_cfg,
    strip_leading_dashdash,
    user_errors,
)
from training.controls import (
    add_control_args,
    apply_model_controls,
    check_accum_steps,
    check_control_args,
    control_settings,
    control_state,
    grad_norm_stats,
    make_record,
    make_scaler_and_ema,
    resume_controls,
    to_input,
)
from training.distributed import (
    all_reduce_sum,
    cleanup_distributed,
    epoch_seed,
    seed_everything,
    setup_distributed,
    shard_loader,
    train_loader_for,
)
from training.precision import autocast as amp_autocast
from training.report import open_tensorboard, plot_curves, progress
from training.run_dir import (
    open_run,
    release_out_dir,
    resume_run,
    save_checkpoint,
    save_random_base,
    stop_after,
    stop_if_not_finite,
)
from training.schedule import cosine_lr_factor, poly_lr_factor
from training.seg_metrics import evaluate, metrics, seg_loss
from training.steps import grad_sync, micro_batches, optimizer_step

# tiny presets (models.PRESETS) for tests and the CPU demo: segmentation models only
PRESETS = {k: v for k, v in ALL_PRESETS.items() if k in ("sam_tiny", "ef_tiny")}
MODELS = ("sam_vitb", "efl1", "efl3", "efl7", *PRESETS)

# The two recipes: what an option left unset becomes. A flag given on the command line always wins.
RECIPES = {
    "petras": dict(method="lora", img_size=1024, batch_size=4, lr=3e-4, weight_decay=1e-2, schedule="cosine",
                   warmup_epochs=0.5, epochs=3, iters=None, randaug=True, scale_range=(1.0, 1.0)),
    "petah": dict(method="petah", img_size=512, batch_size=32, lr=2e-4, weight_decay=1e-4, schedule="poly",
                  warmup_epochs=0.0, epochs=None, iters=40000, randaug=False, scale_range=(0.5, 2.0)),
}
# settings that define the model's structure; stored in the task file and every checkpoint (predict_seg.py
# rebuilds the model from them)
MODEL_KEYS = ("model", "model_cfg", "head", "method", "r", "rc", "alpha", "learn_interp", "train_biases",
              "train_norms", "num_classes", "img_size", "fpn_channels", "fpn_head_channels")
# settings a --resume must share with the checkpoint
RESUME_KEYS = MODEL_KEYS + ("weights", "data", "data_root", "synthetic_train", "synthetic_val", "randaug",
                            "scale_range", "train_on_val", "epochs", "iters", "schedule", "warmup_epochs",
                            "batch_size", "lr", "weight_decay", "loss", "top_k", "final_model", "seed", "clip_grad",
                            "ema")

# -----------------------------------------------------------------------------
# configuration: every option, with its default, is in --help

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
g = parser.add_argument_group("model and method")
g.add_argument("--model", default="sam_vitb", choices=MODELS,
               help="sam_vitb: PETRAS recipe (default); efl1/efl3/efl7: PETAH recipe (EfficientFormer + Semantic "
                    "FPN); " + "; ".join(f"{k} = {b} with {c}" for k, (b, c) in PRESETS.items()))
g.add_argument("--model-cfg", default="{}", metavar="JSON",
               help="extra keyword arguments for models.create_model, overriding a preset's, e.g. "
                    "'{\"encoder_depth\": 4}'")
g.add_argument("--head", default=None, choices=("fpn",), help="EfficientFormer only: the segmentation head (fpn)")
g.add_argument("--weights", default=None, metavar="PATH",
               help="pretrained checkpoint: Meta's sam_vit_b_01ec64.pth, or timm / snap EfficientFormer; position "
                    "and attention-bias tables are resized to --img-size. Without it the model is random: only a "
                    "smoke test")
g.add_argument("--method", default=None,
               help=f"SAM: {', '.join(SAM_METHODS)} (default lora); EfficientFormer: {', '.join(EF_METHODS)} "
                    f"(default petah; linear = frozen backbone, the paper's 'Frozen' row)")
g.add_argument("--r", type=int, default=8, help="LoRA rank of the linear layers; default 8")
g.add_argument("--rc", type=int, default=None, help="conv-LoRA rank of petah on EfficientFormer; default 1 (PETAH-1)")
g.add_argument("--alpha", type=float, default=None, help="LoRA alpha; default alpha = rank (scale 1)")
g.add_argument("--learn-interp", action="store_true",
               help="PETRAS learned interpolation y = a W0 x + (1 - a) dW x in every LoRA layer")
g.add_argument("--train-biases", action=argparse.BooleanOptionalAction, default=None,
               help="train every bias; default on for SAM lora / ia3 (PETRAS), off otherwise")
g.add_argument("--train-norms", action=argparse.BooleanOptionalAction, default=None,
               help="train every norm layer; default on for SAM lora / ia3 (PETRAS), off otherwise")
g.add_argument("--num-classes", type=int, default=None,
               help="classes including background; default the dataset's (--count-only: 2 for SAM, 150 for "
                    "EfficientFormer). 2 = binary (SAM: one logit map, BCE + Dice); N > 2 adds SAM mask tokens")
g.add_argument("--fpn-channels", type=int, default=256, help="Semantic FPN width; default 256")
g.add_argument("--fpn-head-channels", type=int, default=128, help="Semantic FPN per-level head width; default 128")

g = parser.add_argument_group("data")
g.add_argument("--data", default="synthetic", choices=data_seg.SEG_DATASETS,
               help="synthetic needs no files (default); folder: img/{train,valid} + ann/{train,valid} (or "
                    "images/ + masks/); ade20k: ADEChallengeData2016, scored with mmsegmentation's protocol")
g.add_argument("--data-root", default="data", help="directory holding the dataset; default ./data")
g.add_argument("--img-size", type=int, default=None,
               help="training crop side; default 1024 for SAM, 512 for EfficientFormer (tables are resized)")
g.add_argument("--randaug", action=argparse.BooleanOptionalAction, default=None,
               help="joint RandAugment on training images (geometric ops move the mask too); default on for SAM")
g.add_argument("--train-on-val", action="store_true",
               help="train on train + val (PETRAS' final run); the test split, where one exists, stays held out")
g.add_argument("--scale-range", type=float, nargs=2, default=None, metavar=("LO", "HI"),
               help="training: random scale, of the shorter side relative to --img-size (folder, synthetic) or of "
                    "the (4 x, 1 x) --img-size scale (ade20k); default 0.5 2.0 for EfficientFormer, 1 1 for SAM")
g.add_argument("--eval-mode", default="whole", choices=("whole", "slide"),
               help="whole (default): the model on the whole image (SAM: resized to its input); slide: "
                    "--img-size windows every --eval-stride pixels, logits averaged")
g.add_argument("--eval-size", type=int, default=None,
               help="folder / synthetic: the evaluation canvas (longer side resized to it, padded to a square); "
                    "ade20k: the scale (4 x, 1 x) the image must fit; default --img-size")
g.add_argument("--eval-stride", type=int, default=None,
               help="--eval-mode slide: window stride; default 2/3 of --img-size (341 at 512)")
g.add_argument("--synthetic-train", type=int, default=32,
               help="--data synthetic: training images per class (binary: 2 x this many images); default 32")
g.add_argument("--synthetic-val", type=int, default=8,
               help="--data synthetic: validation (and test) images per class; default 8")
g.add_argument("--eval-every", type=int, default=1, metavar="N",
               help="evaluate on the validation split (and checkpoint) every N epochs and after the last; default 1")
g.add_argument("--workers", type=int, default=4, help="DataLoader worker processes per rank; default 4")

g = parser.add_argument_group("optimisation (AdamW; no weight decay on biases, norms, scales)")
g.add_argument("--epochs", type=int, default=None, help="training epochs; default 3 for SAM (PETRAS)")
g.add_argument("--iters", type=int, default=None,
               help="training length in optimizer steps instead of epochs; default 40000 for EfficientFormer")
g.add_argument("--schedule", default=None, choices=("cosine", "poly"),
               help="LR schedule by steps; default cosine for SAM, poly (power 0.9) for EfficientFormer")
g.add_argument("--warmup-epochs", type=float, default=None,
               help="linear LR warmup; default 0.5 for SAM, 0 for EfficientFormer")
g.add_argument("--batch-size", type=int, default=None,
               help="GLOBAL batch size, split over the processes; default 4 for SAM, 32 for EfficientFormer")
g.add_argument("--lr", type=float, default=None, help="AdamW LR; default 3e-4 for SAM, 2e-4 for EfficientFormer")
g.add_argument("--weight-decay", type=float, default=None,
               help="AdamW weight decay on matrices and kernels; default 1e-2 for SAM, 1e-4 for EfficientFormer")
g.add_argument("--loss", default=None, choices=("bce_dice", "ce_dice", "ce"),
               help="default bce_dice for binary SAM, ce_dice for N-class SAM, ce for EfficientFormer")
g.add_argument("--final-model", default=None, choices=("average", "last", "ema"),
               help="the reported model: average = the mean of the --top-k best evaluations' adapters (PETRAS; "
                    "the default for folder / synthetic), last = the last step's (mmsegmentation; default for "
                    "ade20k), ema = the moving average of --ema")
g.add_argument("--top-k", type=int, default=3,
               help="--final-model average: how many best evaluations (foreground IoU, or mIoU for N classes) to "
                    "average; 1 = the best single checkpoint; default 3")
g.add_argument("--seed", type=int, default=0,
               help="seed of the initialisation and of every epoch's data order and augmentation; default 0")

g = parser.add_argument_group("system and output")
g.add_argument("--out", default="runs/seg", help="output directory; default runs/seg")
g.add_argument("--resume", action="store_true", help="continue from the last completed epoch in OUT/ckpt")
g.add_argument("--count-only", action="store_true",
               help="print one JSON line (model, method, adapter_params = the paper's #Params, head_params, "
                    "total_params, num_classes) and exit")
g.add_argument("--device", default=None, choices=("cpu", "cuda"), help="default: cuda when available")
g.add_argument("--vis-images", type=int, default=4, help="validation images in each PNG grid (0: none); default 4")
g.add_argument("--tensorboard", action="store_true",
               help="also write the per-evaluation scalars of summary.csv for TensorBoard into OUT/tb (needs the "
                    "tensorboard package)")
g.add_argument("--stop-after-epoch", type=int, default=None,
               help="testing: exit once this epoch's checkpoint is written, as if the run had been killed")
g.add_argument("--inject-nan-step", type=int, default=None,
               help="testing: make the loss NaN at this optimizer step, to exercise the NaN guard")
add_control_args(parser)  # --amp, --accum-steps, --clip-grad, --grad-ckpt, --compile, --channels-last, --ema
args = parser.parse_args(strip_leading_dashdash(sys.argv[1:]))  # a stray leading "--" (torchrun ... -- --flags)

# -----------------------------------------------------------------------------
# processes: torchrun sets RANK / LOCAL_RANK / WORLD_SIZE; NCCL on GPUs, gloo on CPUs

with user_errors(parser):  # --device cuda without CUDA
    dist = setup_distributed(args.device)
master = dist.master  # rank 0 logs, writes the files; every rank trains and evaluates its share
check_control_args(parser, args, dist)  # ranges; --amp's default (bf16 on CUDA, off on the CPU) and support


def log(*a):
    if master:
        print(*a, flush=True)


# -----------------------------------------------------------------------------
# recipe defaults and argument checks (argparse already rejected unknown models and datasets)

builder, preset_cfg = PRESETS.get(args.model, (args.model, {}))
is_sam = builder == "sam_vitb"
for k, v in RECIPES["petras" if is_sam else "petah"].items():
    if getattr(args, k) is None and not (k in ("epochs", "iters") and (args.epochs, args.iters) != (None, None)):
        setattr(args, k, v)
if args.method not in (SAM_METHODS if is_sam else EF_METHODS):
    parser.error(f"--method {args.method} is not a method for {args.model}; choose one of "
                 f"{', '.join(SAM_METHODS if is_sam else EF_METHODS)}")
if is_sam and args.head is not None:
    parser.error("--head is for EfficientFormer; SAM segments with its own mask decoder")
args.head = None if is_sam else (args.head or "fpn")
if args.rc is not None and (is_sam or args.method != "petah") and master:
    warnings.warn(f"--rc {args.rc} is ignored: conv-LoRA belongs to --method petah on EfficientFormer only")
args.rc = 1 if args.rc is None else args.rc
# (ia3 with --learn-interp is refused by check_common_args below: no warning first)
if args.learn_interp and args.method not in ("lora", "lora_mlp", "petah", "ia3") and master:
    warnings.warn(f"--learn-interp is ignored: --method {args.method} has no LoRA layers")
peft_sam = is_sam and args.method in ("lora", "ia3")  # PETRAS trains norms and biases with the adapters
args.train_biases = peft_sam if args.train_biases is None else args.train_biases
args.train_norms = peft_sam if args.train_norms is None else args.train_norms
args.final_model = args.final_model or ("last" if args.data == "ade20k" else "average")
args.eval_size = args.img_size if args.eval_size is None else args.eval_size
check_common_args(parser, args)  # ranges of the shared flags, --warmup-epochs < --epochs, --weights exists
for name in ("eval_size", "eval_stride", "fpn_channels", "fpn_head_channels", "iters"):
    if getattr(args, name) is not None and getattr(args, name) < 1:
        parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
if args.epochs is not None and args.iters is not None:
    parser.error("give the training length as --epochs or as --iters, not both")
if not 0 < args.scale_range[0] <= args.scale_range[1]:
    parser.error(f"--scale-range {args.scale_range[0]:g} {args.scale_range[1]:g} must satisfy 0 < LO <= HI "
                 f"(e.g. 0.5 2.0)")
if args.num_classes is not None and args.num_classes < 2:
    parser.error(f"--num-classes {args.num_classes}: count the background too (2 = binary)")
if args.batch_size % dist.world_size:
    parser.error(f"--batch-size {args.batch_size} must be divisible by the number of processes ({dist.world_size})")
check_accum_steps(parser, args, dist)  # --accum-steps divides each process' batch
model_cfg = parse_model_cfg(parser, preset_cfg, args.model_cfg, example='{"encoder_depth": 4}')
stride = model_cfg.get("patch_size", 16) if is_sam else 32
if args.img_size % stride:
    parser.error(f"--img-size {args.img_size} must be a multiple of {stride} for {args.model} (e.g. 512)")
# --out: a writable directory, locked for this run; a finished run there is refused without --resume; leftovers
# of a killed run (temporaries, stale epoch files) are removed and counted. And a loud warning without --weights.
open_run(parser, args, dist, log, what="model")

# -----------------------------------------------------------------------------
# data (the number of classes sizes the head). Both recipes normalise with ImageNet's mean / std (SAM's pixel
# mean / std divided by 255 are the same numbers).

mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
train_ds = val_ds = test_ds = None
if args.count_only:
    num_classes = args.num_classes or (2 if is_sam else 150)
else:
    data_kw = dict(mean=mean, std=std, randaug=args.randaug, scale_range=tuple(args.scale_range),
                   num_classes=args.num_classes, train_on_val=args.train_on_val,
                   synthetic_cfg=dict(train_per_class=args.synthetic_train, val_per_class=args.synthetic_val,
                                      test_per_class=args.synthetic_val))
    try:
        train_ds, val_ds, test_ds, num_classes = data_seg.build_seg_datasets(
            args.data, args.data_root, img_size=args.img_size, **data_kw)
        if args.eval_size != args.img_size:  # the same splits, evaluated at another size
            _, val_ds, test_ds, _ = data_seg.build_seg_datasets(args.data, args.data_root, img_size=args.eval_size,
                                                                **data_kw)
    except (FileNotFoundError, ValueError) as e:
        parser.error(str(e))
args.num_classes = num_classes
loss_kind = args.loss or (("bce_dice" if num_classes == 2 else "ce_dice") if is_sam else "ce")
if (loss_kind == "bce_dice") != (is_sam and num_classes == 2):
    parser.error(f"--loss {loss_kind} does not fit {num_classes} classes on {args.model}: bce_dice is for binary "
                 f"SAM (one logit map), ce / ce_dice for K logit maps")

# -----------------------------------------------------------------------------
# model: pretrained weights, then the adapters / freezing of --method; the base keys are what the merged export
# must hold again

torch.manual_seed(args.seed)  # identical initialisation on every rank (DDP also broadcasts it)
try:
    if is_sam:
        model = create_model(builder, img_size=args.img_size, num_classes=1 if num_classes <= 2 else num_classes,
                             **model_cfg)
    else:
        model = create_model(builder, num_classes=0, img_size=args.img_size, **model_cfg)  # the backbone
except (TypeError, ValueError) as e:  # unknown --model-cfg keys
    parser.error(f"cannot build --model {args.model} with --img-size {args.img_size} and {model_cfg}: {e}")
if args.weights:
    with user_errors(parser):  # a damaged file, a layout that does not fit --model
        load_pretrained(model, args.weights, strict=True, verbose=master and not args.count_only)
save_random_base(parser, args, model, master=master)  # no --weights: OUT/base.safetensors (SAM, or the backbone)
if is_sam:
    base_keys = set(model.state_dict())
    counts = apply_sam_method(model, args.method, num_classes=num_classes, r=args.r, alpha=args.alpha,
                              learn_interp=args.learn_interp, train_biases=args.train_biases,
                              train_norms=args.train_norms)
else:
    model.norm = nn.Identity()  # forward_pyramid never reaches the final norm: no dead trainable params
    base_keys = {f"backbone.{k}" for k in model.state_dict()}
    apply_method(model, args.model, args.method, r=args.r, rc=args.rc, alpha=args.alpha,
                 train_biases=args.train_biases, train_norms=args.train_norms, learn_interp=args.learn_interp,
                 head_names=())
    model = ef_semantic_fpn(model, num_classes=num_classes, channels=args.fpn_channels,
                            head_channels=args.fpn_head_channels)  # the new head trains in every method
    base_keys |= {f"decode_head.{k}" for k in model.decode_head.state_dict()}
    counts = count_parameters(model, head_names=("decode_head",))
if args.count_only:
    if master:
        print(json.dumps(dict(model=args.model, method=args.method, adapter_params=counts["adapter_params"],
                              head_params=counts["head_params"], total_params=counts["total_params"],
                              num_classes=num_classes)), flush=True)
    cleanup_distributed(dist)
    sys.exit(0)
log(f"{args.model} / {args.method}: {counts['trainable_params']:,} trainable of {counts['total_params']:,} "
    f"parameters (#Params {counts['adapter_params']:,} + head {counts['head_params']:,})")
model.to(dist.device)
apply_model_controls(parser, args, model)  # --grad-ckpt, --channels-last
model_args = {k: getattr(args, k) for k in MODEL_KEYS}
# predict_seg.py rebuilds the model from these (the seed: the random base of a run without --weights)
adapter_meta = dict(model_args=json.dumps(model_args), seed=args.seed, data=args.data, eval_size=args.eval_size)

# -----------------------------------------------------------------------------
# optimizer: AdamW over the trainable params only; no weight decay on vectors (biases, norms, scales)

decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
param_groups = [pg for pg in (dict(params=decay, weight_decay=args.weight_decay),
                              dict(params=no_decay, weight_decay=0.0)) if pg["params"]]
optimizer = torch.optim.AdamW(param_groups, lr=args.lr, betas=(0.9, 0.999), fused=dist.device.type == "cuda")
params = decay + no_decay  # the trained tensors (--clip-grad)
log(f"AdamW over {sum(p.numel() for pg in param_groups for p in pg['params']):,} params "
    f"({len(decay)} matrices with weight decay {args.weight_decay}, {len(no_decay)} vectors without)")

# -----------------------------------------------------------------------------
# loaders. DistributedSampler also on one process (the same shuffle), drop_last on both sampler and loader:
# len(train) // batch-size steps per epoch whatever the number of processes. Evaluation: every rank scores
# every world_size-th image, lists of (image, mask) pairs (ADE20K's images differ in size).

per_rank_batch = args.batch_size // dist.world_size
train_loader = train_loader_for(train_ds, batch_size=per_rank_batch, dist=dist, seed=args.seed, workers=args.workers)
train_sampler = train_loader.sampler


def eval_loader_for(ds):
    return shard_loader(ds, batch_size=per_rank_batch, dist=dist, workers=args.workers, collate_fn=list)


eval_loader = eval_loader_for(val_ds)
steps_per_epoch = len(train_loader)
if steps_per_epoch == 0:
    parser.error(f"the training set ({len(train_ds)} images) is smaller than one --batch-size ({args.batch_size})")
total_steps = args.iters or args.epochs * steps_per_epoch
epochs = math.ceil(total_steps / steps_per_epoch)
warmup_steps = round(args.warmup_epochs * steps_per_epoch)


lr_factor = cosine_lr_factor if args.schedule == "cosine" else poly_lr_factor

# -----------------------------------------------------------------------------
# resume: adapters + optimizer state of the last completed epoch (the LR follows from the step)

ckpt_dir, topk_dir, vis_dir = (os.path.join(args.out, d) for d in ("ckpt", "topk", "vis"))
if master:
    with user_errors(parser):
        for d in (ckpt_dir, topk_dir, vis_dir):
            os.makedirs(d, exist_ok=True)
start_epoch, history, topk = 0, [], []  # topk: [dict(epoch, score, file)], best first
if args.resume:
    # the settings that decide the result must be the checkpoint's (checked before its adapters are loaded);
    # a damaged file is named, with the epoch that can still be resumed
    state = resume_run(parser, ckpt_dir, model, optimizer, settings={k: getattr(args, k) for k in RESUME_KEYS},
                       master=master, log=log)
    if state is not None:
        start_epoch, history, topk = state["epoch"], json.loads(state["history"]), json.loads(state["topk"])
# the fp16 loss scaler and the EMA of --ema (made after the resume: without a saved average it starts there); the
# run record (versions, GPU, git commit) goes into args.json, the checkpoints and the task file
scaler, ema = make_scaler_and_ema(args, model, dist.device)
record = make_record(dist)
if args.resume:
    resume_controls(state, scaler, ema, record, log)

# -----------------------------------------------------------------------------
# wrap: DDP registers only the parameters with requires_grad; Segment routes its forward to model.segment (SAM's
# prompt-free path) while the model itself, with its checkpoint key names, is what gets saved


raw_model = model  # adapters, checkpoints, evaluation and the merge work on the plain module
train_model = Segment(model=model)
if args.compile:  # training only: evaluation slides windows of changing sizes over the plain model
    train_model = torch.compile(train_model, backend=args.compile)
if dist.ddp:
    train_model = DDP(train_model, device_ids=[dist.local_rank] if dist.device.type == "cuda" else None)
autocast = amp_autocast(args.amp, dist.device)  # --amp: bf16 / fp16 autocast, or nothing
eval_kw = dict(num_classes=num_classes, dist=dist, mode=args.eval_mode, stride=args.eval_stride, amp=autocast)
micro_text = f" in {args.accum_steps} micro-batches" if args.accum_steps > 1 else ""
log(f"{dist.world_size} process(es) on {dist.device}, --amp {args.amp}: {per_rank_batch} images per process and "
    f"step{micro_text}, {steps_per_epoch} steps per epoch, {total_steps} steps "
    f"({epochs} epochs), {args.schedule} LR {args.lr:g}, loss {loss_kind}, {num_classes} classes, final model: "
    f"{args.final_model}")
tb = open_tensorboard(parser, os.path.join(args.out, "tb")) if args.tensorboard and master else None
if master:
    with user_errors(parser):  # a disk that filled up since the start
        atomic_write_text(json.dumps(dict(vars(args), run_record=record), indent=1),
                          os.path.join(args.out, "args.json"))
CSV_COLUMNS = ["epoch", "step", "train_loss", "eval_miou", "eval_iou_fg", "eval_pixel_acc", "lr"]  # summary.csv


def csv_rows(history: list[dict]) -> list[dict]:
    """summary.csv's rows, one per evaluation (eval_iou_fg for binary tasks only)."""
    return [dict(epoch=r["epoch"], step=r["step"], train_loss=r["train_loss"], eval_miou=r["miou"],
                 eval_iou_fg=r.get("iou_fg"), eval_pixel_acc=r["pixel_acc"], lr=r["lr"]) for r in history]


def save_vis(samples: list, path: str) -> None:
    """PNG grid, one row per image: image | truth overlaid | prediction overlaid (torchvision's
    draw_segmentation_masks; class 0 of a binary task and ignored pixels are left uncoloured)."""
    g = torch.Generator().manual_seed(0)
    palette = [tuple(int(c) for c in torch.randint(40, 256, (3,), generator=g)) for _ in range(num_classes)]
    palette[min(1, num_classes - 1)] = (0, 255, 0)
    classes = [1] if num_classes == 2 else list(range(num_classes))
    side = 256  # every tile resized to 256 x 256 (eval images may differ in size)
    tiles = []
    for img, truth, pred in samples:
        rgb = (img * torch.tensor(std)[:, None, None] + torch.tensor(mean)[:, None, None]).clamp(0, 1)
        rgb = (F.interpolate(rgb[None], size=(side, side), mode="bilinear", align_corners=False)[0] * 255).byte()
        tiles.append(rgb)
        for lab in (truth, pred):
            lab = F.interpolate(lab[None, None].float(), size=(side, side), mode="nearest")[0, 0].long()
            present = [c for c in classes if (lab == c).any()]
            masks = torch.stack([lab == c for c in present]) if present else None  # (C, side, side) bool
            tiles.append(draw_segmentation_masks(rgb, masks, alpha=0.5, colors=[palette[c] for c in present])
                         if present else rgb)
    buf = io.BytesIO()
    save_image(make_grid([t.float() / 255 for t in tiles], nrow=3, padding=2, pad_value=1.0), buf, format="png")
    atomic_write(path, lambda f: f.write(buf.getvalue()))  # no half-written PNG; mode from the umask


def update_topk(topk: list, epoch: int, score: float) -> list:
    """Keep this evaluation's adapters in topk/ if it ranks among the --top-k best so far; delete the dropped."""
    topk = sorted(topk + [dict(epoch=epoch, score=score, file=f"epoch_{epoch:04d}.safetensors")],
                  key=lambda t: (-t["score"], t["epoch"]))
    for t in topk[args.top_k:]:
        if os.path.exists(os.path.join(topk_dir, t["file"])):
            os.remove(os.path.join(topk_dir, t["file"]))
    for t in topk[:args.top_k]:
        if t["epoch"] == epoch:
            atomic_save_adapters(raw_model, os.path.join(topk_dir, t["file"]),
                                 metadata=dict(adapter_meta, epoch=epoch, score=score))
    return topk[:args.top_k]


# -----------------------------------------------------------------------------
# training

step = min(start_epoch * steps_per_epoch, total_steps)
for epoch in range(start_epoch, epochs):
    seed_everything(epoch_seed(args.seed, epoch, dist.rank))  # this epoch's augmentation and dropout
    train_sampler.set_epoch(epoch)  # this epoch's order
    train_model.train()
    freeze_bn_stats(raw_model)  # BatchNorms with frozen params keep the pretrained running statistics
    t0, loss_sum, seen, grad_norms = time.time(), 0.0, 0, []
    if dist.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dist.device)  # this epoch's peak, evaluation included
    n_steps = min(steps_per_epoch, total_steps - step)
    # a bar on a terminal; written to a file, a plain line every 30 s instead of carriage-return frames
    pbar = progress(train_loader, desc=f"epoch {epoch + 1}/{epochs}", enabled=master)
    for i, (x, y) in enumerate(batches(pbar, parser)):
        if i == n_steps:
            break
        lr = args.lr * lr_factor(step, total_steps=total_steps, warmup_steps=warmup_steps)
        for group in optimizer.param_groups:
            group["lr"] = lr
        x, y = to_input(x, args, dist.device), y.to(dist.device, non_blocking=True).long()
        # --accum-steps K: K forward / backward passes, each micro-batch's loss / K; DDP all-reduces the summed
        # gradients in the last backward only (grad_sync). The losses normalise per micro-batch (training/steps.py)
        optimizer.zero_grad(set_to_none=True)
        loss = 0.0
        for j, (xm, ym) in enumerate(micro_batches((x, y), args.accum_steps)):
            with grad_sync(train_model, last=j == args.accum_steps - 1):
                with autocast:
                    logits = train_model(xm)  # (B / K, K, H, W)
                micro_loss = seg_loss(logits.float(), ym, loss_kind) / args.accum_steps
                if step == args.inject_nan_step:
                    micro_loss = micro_loss * float("nan")
                scaler.scale(micro_loss).backward()  # fp16: the loss times the scale, so small gradients survive
            loss = loss + micro_loss.detach()
        # a NaN/inf loss on any rank stops every rank before the update; the last checkpoint stays as it is
        stop_if_not_finite(loss, step=step, epoch=epoch, history=history, ckpt_dir=ckpt_dir, dist=dist, log=log,
                           fix="Lower --lr (or try --clip-grad)")
        grad_norms.append(optimizer_step(optimizer, scaler, params, clip_grad=args.clip_grad))  # unscale, clip, step
        step += 1
        if ema is not None:
            ema.update(raw_model, step)
        loss_sum, seen = loss_sum + loss.item() * len(y), seen + len(y)
        pbar.set_postfix(loss=f"{loss.item():.4f}", lr=f"{lr:.2e}")
    pbar.close()
    train_time = time.time() - t0
    loss_sum, seen = all_reduce_sum([loss_sum, seen], dist)
    if dist.ddp:  # DDP sends rank 0's buffers (BatchNorm statistics) at each forward; the last step's update too
        for b in raw_model.buffers():
            torch_dist.broadcast(b, 0)
    if epoch == start_epoch and getattr(train_ds, "binary_255", False):
        log(f"  {train_ds.masks_with_255} training masks held 255, read as foreground (binary masks: 0 / 1 or 255)")
    last_epoch = epoch + 1 == epochs
    if (epoch + 1) % args.eval_every and not last_epoch:
        continue
    with user_errors(parser, quiet=not master):  # an unreadable image, a mask that does not fit its image
        cm, _, samples = evaluate(raw_model, eval_loader, vis=args.vis_images, **eval_kw)
    m = metrics(cm)
    score = m["iou_fg"] if num_classes == 2 else m["miou"]
    history.append(dict(epoch=epoch + 1, step=step, train_loss=loss_sum / max(seen, 1), **m, score=score, lr=lr,
                        img_per_s=seen / train_time, time_s=round(time.time() - t0, 2)))
    if ema is not None:  # the EMA's weights scored on the same images, beside the raw model's
        with ema.swapped_into(raw_model):
            with user_errors(parser, quiet=not master):
                ema_m = metrics(evaluate(raw_model, eval_loader, **eval_kw)[0])
        history[-1].update({f"ema_{k}": v for k, v in ema_m.items()},
                           ema_score=ema_m["iou_fg"] if num_classes == 2 else ema_m["miou"])
    history[-1].update(grad_norm_stats(grad_norms, args.clip_grad, dist.device))
    log(f"epoch {epoch + 1}: train loss {history[-1]['train_loss']:.4f}, "
        + (f"IoU fg {m['iou_fg']:.4f}, " if "iou_fg" in m else "") + f"mIoU {m['miou']:.4f}, "
        f"pixel acc {m['pixel_acc']:.4f}, {history[-1]['img_per_s']:.1f} img/s")
    if master:
        if samples:
            save_vis(samples, os.path.join(vis_dir, f"epoch_{epoch + 1:04d}.png"))
        with user_errors(parser):  # disk full, read-only file system: the message says so (and what to do)
            if args.final_model == "average":
                topk = update_topk(topk, epoch + 1, score)
            save_checkpoint(ckpt_dir, raw_model, epoch=epoch + 1,
                            state=dict(optimizer=optimizer.state_dict(), step=step, history=json.dumps(history),
                                       topk=json.dumps(topk), args=json.dumps(vars(args)),
                                       **control_state(scaler, ema, record)),
                            metadata=adapter_meta)
            write_jsonl(history, os.path.join(args.out, "log.jsonl"))
            write_csv(csv_rows(history), os.path.join(args.out, "summary.csv"), CSV_COLUMNS)
        if tb is not None:
            for k, v in csv_rows(history)[-1].items():
                if k not in ("epoch", "step") and v is not None:
                    tb.add_scalar(k, v, step)
            tb.flush()
    if dist.ddp:
        torch_dist.barrier()
    if args.stop_after_epoch is not None and epoch + 1 >= args.stop_after_epoch and not last_epoch:
        stop_after(epoch + 1, dist, log)

# -----------------------------------------------------------------------------
# the final model: the last step's adapters, or the average of the top-k evaluations' (top-1: the best one)

if args.final_model == "average":
    if dist.ddp:
        obj = [topk]
        torch_dist.broadcast_object_list(obj, src=0)
        topk = obj[0]
    dicts = [read_safetensors(os.path.join(topk_dir, t["file"]))[0] for t in topk]
    # float64 mean of each tensor (the LoRA factors A and B each averaged: checkpoint averaging), integer tensors
    # (BatchNorm's num_batches_tracked) from the best
    average = {k: torch.stack([d[k].double() for d in dicts]).mean(0).to(v.dtype) if v.is_floating_point() else v
               for k, v in dicts[0].items()}
    unexpected = raw_model.load_state_dict(average, strict=False).unexpected_keys
    if unexpected:
        raise RuntimeError(f"top-k files hold tensors the model does not have: {unexpected[:5]}")
elif args.final_model == "ema":  # the EMA's values become the model's: the task file, the merge, the export
    ema.copy_into(raw_model)
if args.channels_last:  # the files, the merge and the export in the usual layout
    raw_model.to(memory_format=torch.contiguous_format)
if master:
    with user_errors(parser):  # disk full, read-only file system
        atomic_save_adapters(raw_model, os.path.join(args.out, "final.safetensors"), metadata=dict(
            adapter_meta, final_model=args.final_model, topk=[t["epoch"] for t in topk]))
        # the task itself (tasks/task_file.py): adapters + head + trained norms / biases / BN statistics + how to use it
        save_task(raw_model, os.path.join(args.out, "adapters.safetensors"), meta=dict(
            adapter_meta, task_type="seg", model=args.model, model_cfg=model_cfg, method=args.method, r=args.r,
            rc=args.rc, alpha=args.alpha, learn_interp=args.learn_interp, train_norms=args.train_norms,
            train_biases=args.train_biases, num_classes=num_classes, class_names=list(train_ds.classes),
            img_size=args.img_size, mean=list(mean), std=list(std), head=args.head, fpn_channels=args.fpn_channels,
            fpn_head_channels=args.fpn_head_channels, final_model=args.final_model,
            training=control_settings(args), run_record=record))

# -----------------------------------------------------------------------------
# merge the adapters into the weights, check the merged model predicts as the adapted one, export

merged = merge_and_unload(copy.deepcopy(raw_model))
with user_errors(parser, quiet=not master):
    cm, diff, _ = evaluate(raw_model, eval_loader, compare=merged, **eval_kw)
final_m = metrics(cm)
last_m = history[-1]
summary = dict(summary=True, model=args.model, method=args.method, adapter_params=counts["adapter_params"],
               head_params=counts["head_params"], total_params=counts["total_params"], epochs=epochs, steps=step,
               final_model=args.final_model, final_score=final_m["iou_fg"] if num_classes == 2 else final_m["miou"],
               last_score=last_m["score"], **{f"final_{k}": v for k, v in final_m.items()},
               merged_pixels_differ=int(diff["pixels_differ"]), merged_max_logit_diff=diff["max_logit_diff"])
if args.final_model == "average":
    summary.update(topk_epochs=[t["epoch"] for t in topk], best_epoch=topk[0]["epoch"], best_score=topk[0]["score"])
if diff["pixels_differ"]:
    warnings.warn(f"the merged model predicts {int(diff['pixels_differ'])} val pixels differently from the "
                  f"unmerged one (max logit difference {diff['max_logit_diff']:.2e}): ties, or a merge bug")
export = merged.state_dict()
if set(export) != base_keys:
    raise RuntimeError(f"merged model keys differ from the base model's: {sorted(set(export) ^ base_keys)[:5]}")
if master:
    # what the file loads into (models/interop.py), and this project's settings to rebuild it (model_args)
    meta = merged_metadata(merged, model_name=args.model, model_cfg=json.loads(args.model_cfg),
                           num_classes=num_classes, img_size=args.img_size, mean=list(mean), std=list(std),
                           model_args=json.dumps(model_args))
    with user_errors(parser):
        atomic_save_safetensors(export, os.path.join(args.out, "merged.safetensors"), metadata=meta)
    if meta["arch_loads"] != "true":
        log(f"note: merged.safetensors: {meta['arch_note']}")
if test_ds is not None:
    with user_errors(parser, quiet=not master):
        test_cm, _, _ = evaluate(raw_model, eval_loader_for(test_ds), **eval_kw)
    summary.update({f"test_{k}": v for k, v in metrics(test_cm).items()})
name = "IoU fg" if num_classes == 2 else "mIoU"
which = (f"the top-{len(topk)} average (epochs {summary['topk_epochs']}); best single checkpoint "
         f"{summary['best_score']:.4f} (epoch {summary['best_epoch']})" if args.final_model == "average"
         else "the EMA" if args.final_model == "ema" else "the last step's model")
log(f"done: {name} {summary['final_score']:.4f} of {which}, last evaluation {last_m['score']:.4f}; merged export "
    f"differs in {int(diff['pixels_differ'])} val pixels (max logit diff {diff['max_logit_diff']:.1e}), saved to "
    f"{os.path.join(args.out, 'merged.safetensors')}")
if master:
    with user_errors(parser):
        write_jsonl(history + [summary], os.path.join(args.out, "log.jsonl"))
        if plot_curves(csv_rows(history), os.path.join(args.out, "curves.png"), x="step",
                       panels=(("train_loss",), ("eval_miou", "eval_iou_fg"), ("lr",)), title=f"{args.model} "
                       f"{args.method} on {args.data}"):
            log(f"training curves: {os.path.join(args.out, 'curves.png')}")
    print(json.dumps(summary), flush=True)
    if tb is not None:
        tb.close()
    release_out_dir(args.out)
cleanup_distributed(dist)
