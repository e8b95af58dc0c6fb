r"""
Fine-tune a classification backbone with one of the methods of the PETAH paper (see methods.py):
linear probing, full / attention fine-tuning, LoRA, LoRA ATTN+MLP, PETAH (LoRA + conv-LoRA), (IA)^3.

Single process (one GPU, or the CPU):
    python train_cls.py --model efl7 --weights efficientformer_l7.pth --method petah --r 8 --rc 2 \
        --data cub --data-root ~/data --out runs/cub_petah2
One node with 8 GPUs (the global --batch-size is split over the processes; the "--" stops torchrun from reading
the script's flags as its own: it takes --r for an abbreviation of its --rdzv-*/--role/--run-path):
    torchrun --nproc_per_node 8 -- train_cls.py --model efl7 --weights efficientformer_l7.pth --method petah \
        --r 8 --rc 2 --data cub --data-root ~/data --out runs/cub_petah2
A method's parameter count, as in the paper's #Params column (no data, no training):
    python train_cls.py --model efl7 --method petah --rc 2 --count-only
CPU demo: a tiny EfficientFormer (ef_tiny, random backbone) adapted with PETAH on the built-in synthetic data
(10 classes of shape x texture x colour, chance = 10%); 35-65 s of CPU time, top-1 about 45-55% after 6 epochs
(51.0% measured with one thread, torch 2.14, an x86 CPU; with a random backbone the number follows the rounding
of the torch build and thread count) (OMP_NUM_THREADS=1: tiny ops are faster on one thread, much faster on a
busy machine):
    OMP_NUM_THREADS=1 python train_cls.py --model ef_tiny --method petah --rc 4 --train-norms --data synthetic \
        --img-size 64 --epochs 6 --batch-size 32 --lr 0.005 --adapter-lr-factor 2 --warmup-epochs 1 --workers 0 \
        --out runs/demo
(--train-norms: the random backbone's BatchNorms then normalise with batch statistics; a pretrained backbone
does not need it.) The same on two CPU processes (gloo): torchrun --nproc_per_node 2 -- train_cls.py <same flags>

A run stopped at any moment continues from its last completed epoch with the same command plus --resume.
Training controls, the same in the three training scripts (training/controls.py): --amp {bf16,fp16,off},
--accum-steps K, --clip-grad NORM, --grad-ckpt, --compile [BACKEND], --channels-last, --ema DECAY (--final-model
ema); the run record (torch / CUDA / GPU / git versions) goes into args.json, the checkpoints and the task file.
Score a finished run's task file without training: the same flags plus --eval-only OUT/adapters.safetensors.
One run at a time writes into an --out (OUT/.lock); a finished run there is only continued with --resume.
In --out: args.json, log.jsonl (one line per epoch, then a summary line), summary.csv (epoch, train_loss,
eval_loss, eval_top1, eval_top5, lr: timm's columns, top-k in %), curves.png (when matplotlib is installed),
tb/ (--tensorboard), ckpt/ (adapter-only safetensors and training state of the last completed epoch),
adapters.safetensors (the task: adapters + head + whatever else trained, with the metadata to use it on the base
model, see tasks/task_file.py), merged.safetensors (adapters folded into the weights, the checkpoint's own key layout;
+ merged_masked.safetensors and masks.safetensors for sparse backbones).
"""

import argparse
import copy
import json
import os
import sys
import time
import warnings

import torch
import torch.distributed as torch_dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader

from data import DATASETS, build_datasets, split_changes, split_record
from lora import freeze_bn_stats, load_adapters, merge_and_unload
from methods import METHODS, apply_method
from methods.sparse import (
    MaskKeeper,
    apply_masks,
    count_nonzero,
    load_masks,
    magnitude_prune,
)
from models import PRESETS as ALL_PRESETS
from models import create_model, load_pretrained
from tasks.atomic import (
    atomic_save_safetensors,
    atomic_write_text,
    write_csv,
    write_jsonl,
)
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
from training.schedule import cosine_lr_factor
from training.steps import grad_sync, micro_batches, optimizer_step

# tiny presets (models.PRESETS) for tests and the CPU demo: classification backbones only
PRESETS = {k: v for k, v in ALL_PRESETS.items() if v[0] != "sam_vitb"}
MODELS = ("efl1", "efl3", "efl7", "vits", "vitb", *PRESETS)
# settings a --resume must share with the checkpoint (checked before its adapters are loaded)
RESUME_KEYS = ("model", "model_cfg", "weights", "method", "r", "rc", "alpha", "learn_interp", "train_biases",
              "train_norms", "dropout", "sparsity", "mask", "data", "data_root", "skip_corrupt", "synthetic_classes",
              "synthetic_train", "synthetic_val", "img_size", "randaug", "epochs", "warmup_epochs", "batch_size", "lr",
              "adapter_lr_factor", "backbone_lr_factor", "weight_decay", "seed", "clip_grad", "ema", "final_model",
              "val_split", "classes")

# -----------------------------------------------------------------------------
# configuration: every option, with its default, is in --help

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
g = parser.add_argument_group("model and method")
g.add_argument("--model", default="efl7", choices=MODELS,
               help="backbone (default efl7); " + "; ".join(f"{k} = {b} with {c}" for k, (b, c) in PRESETS.items()))
g.add_argument("--model-cfg", default="{}", metavar="JSON",
               help="extra keyword arguments for models.create_model, overriding a preset's, e.g. "
                    "'{\"depths\": [1, 1, 2, 2]}', or '{\"variant\": \"augreg\"}' for the augreg ViT layout")
g.add_argument("--weights", default=None, metavar="PATH",
               help="pretrained backbone checkpoint (timm / snap / facebookresearch layouts). Without it the "
                    "backbone is random: only a smoke test")
g.add_argument("--method", default="petah", choices=METHODS, help="what is trained (methods.py); default petah")
g.add_argument("--r", type=int, default=8, help="LoRA rank of the linear layers (lora, lora_mlp, petah); default 8")
g.add_argument("--rc", type=int, default=None, help="conv-LoRA rank of petah on EfficientFormer; default 1 (PETAH-1)")
g.add_argument("--alpha", type=float, default=None, help="LoRA alpha; default alpha = rank (scale 1)")
g.add_argument("--learn-interp", action="store_true",
               help="PETRAS learned interpolation y = a W0 x + (1 - a) dW x in every LoRA layer")
g.add_argument("--train-biases", action="store_true", help="also train every bias of the backbone")
g.add_argument("--train-norms", action="store_true",
               help="also train every norm layer (trained BatchNorms then update their running stats)")
g.add_argument("--dropout", type=float, default=0.0, help="dropout before the classification head; default 0")
g.add_argument("--sparsity", type=float, default=None,
               help="magnitude-prune the loaded backbone (global) to this fraction of zeros, e.g. 0.9")
g.add_argument("--mask", default=None, metavar="FILE", help="apply a saved sparsity mask (sparse.save_masks)")

g = parser.add_argument_group("data")
g.add_argument("--data", default="synthetic", choices=DATASETS, help="dataset; synthetic needs no files (default)")
g.add_argument("--data-root", default="data", help="directory holding the dataset; default ./data")
g.add_argument("--val-split", type=float, default=None, metavar="FRACTION",
               help="--data folder: hold out this fraction of every class (stratified, seeded by --seed) as the "
                    "validation split, for a root of class folders without train/val/ (or a train/ alone); the "
                    "split is written to OUT/split.json, and --resume refuses a folder that no longer gives it")
g.add_argument("--classes", default=None, metavar="FILE",
               help="--data folder: class names for the class folders, a JSON map {\"folder\": \"name\"} or a "
                    "classes.txt of 'FOLDER NAME' lines (ROOT/classes.json or ROOT/classes.txt is used by itself "
                    "when present); for names a folder cannot hold, e.g. Fashion-MNIST's T-shirt/top")
g.add_argument("--download", action="store_true", help="download the dataset where the source still exists")
g.add_argument("--img-size", type=int, default=224, help="input side (a multiple of 32 for EF); default 224")
g.add_argument("--randaug", action="store_true", help="RandAugment on the training images")
g.add_argument("--skip-corrupt", action="store_true",
               help="skip (and count) unreadable images instead of stopping at the first one")
g.add_argument("--synthetic-classes", type=int, default=10, help="--data synthetic: classes; default 10")
g.add_argument("--synthetic-train", type=int, default=200,
               help="--data synthetic: training images per class; default 200")
g.add_argument("--synthetic-val", type=int, default=50,
               help="--data synthetic: validation images per class; default 50")
g.add_argument("--eval-every", type=int, default=1, metavar="N",
               help="evaluate on the validation split every N epochs (and after the last); default 1")
g.add_argument("--workers", type=int, default=4, help="DataLoader worker processes per rank; default 4")

g = parser.add_argument_group("optimisation (AdamW, linear warmup then cosine decay to 0, per step)")
g.add_argument("--epochs", type=int, default=200, help="default 200 (the paper: 100 for Food101)")
g.add_argument("--warmup-epochs", type=float, default=None,
               help="linear LR warmup; default 2, at most half of --epochs (must be < --epochs)")
g.add_argument("--batch-size", type=int, default=128, help="GLOBAL batch size, split over the processes; default 128")
g.add_argument("--lr", type=float, default=0.005, help="base LR, the head's; default 0.005")
g.add_argument("--adapter-lr-factor", type=float, default=1.0,
               help="LR multiplier of the adapters (and of trained norms / biases) of the PEFT methods; default 1")
g.add_argument("--backbone-lr-factor", type=float, default=1.0,
               help="LR multiplier of the backbone for full / attn; default 1")
g.add_argument("--weight-decay", type=float, default=0.0,
               help="AdamW weight decay, on matrices and kernels only (not on biases, norms, scales); default 0")
g.add_argument("--seed", type=int, default=0, help="default 0")

g = parser.add_argument_group("system and output")
g.add_argument("--out", default="runs/cls", help="output directory; default runs/cls")
g.add_argument("--resume", action="store_true", help="continue from the last completed epoch in OUT/ckpt")
g.add_argument("--count-only", action="store_true",
               help="print one JSON line (model, method, adapter_params, head_params, total_params, nonzero_params) "
                    "and exit")
g.add_argument("--num-classes", type=int, default=None,
               help="--count-only: head size, instead of building the dataset to find it")
g.add_argument("--device", default=None, choices=("cpu", "cuda"), help="default: cuda when available")
g.add_argument("--tensorboard", action="store_true",
               help="also write the per-epoch scalars of summary.csv for TensorBoard into OUT/tb (needs the "
                    "tensorboard package)")
g.add_argument("--final-model", default="last", choices=("last", "ema"),
               help="the model the task file and merged.safetensors keep: the last step's (default) or the EMA of "
                    "--ema")
g.add_argument("--eval-only", default=None, metavar="FILE",
               help="train nothing: load FILE (a task file OUT/adapters.safetensors, or a checkpoint's "
                    "OUT/ckpt/epoch_N.safetensors) into the model the other flags build (the same --model, --method, "
                    "ranks, --weights and --seed as its run), score it on the validation split (and the test split "
                    "where the dataset has one) and write the metrics to OUT/eval.json")
g.add_argument("--stop-after-epoch", type=int, default=None,
               help="testing: exit once this epoch's checkpoint is written, as if the run had been killed")
g.add_argument("--inject-nan-step", type=int, default=None,
               help="testing: make the loss NaN at this optimizer step, to exercise the NaN guard")
add_control_args(parser)  # --amp, --accum-steps, --clip-grad, --grad-ckpt, --compile, --channels-last, --ema
args = parser.parse_args(strip_leading_dashdash(sys.argv[1:]))  # a stray leading "--" (torchrun ... -- --flags)
if args.warmup_epochs is None:
    args.warmup_epochs = min(2.0, args.epochs / 2)
check_common_args(parser, args)  # ranges of the shared flags, --warmup-epochs < --epochs, --weights / --mask exist

# -----------------------------------------------------------------------------
# processes: torchrun sets RANK / LOCAL_RANK / WORLD_SIZE; NCCL on GPUs, gloo on CPUs

with user_errors(parser):  # --device cuda without CUDA
    dist = setup_distributed(args.device)
master = dist.master  # rank 0 logs, writes the files; every rank trains and evaluates its share
check_control_args(parser, args, dist)  # ranges; --amp's default (bf16 on CUDA, off on the CPU) and support


def log(*a):
    if master:
        print(*a, flush=True)


# argparse already rejects unknown models, methods and datasets (listing the choices)
builder, preset_cfg = PRESETS.get(args.model, (args.model, {}))
family = "efficientformer" if builder.startswith("ef") else "vit"
if args.rc is not None and (family != "efficientformer" or args.method != "petah"):
    if master:
        warnings.warn(f"--rc {args.rc} is ignored: conv-LoRA belongs to --method petah on EfficientFormer only "
                      f"(got --model {args.model} --method {args.method})", stacklevel=1)
rc = 1 if args.rc is None else args.rc
if family == "vit" and args.method == "petah" and not args.count_only:
    log("note: a ViT has no convolutional stages: --method petah on it is LoRA ATTN (the patch embedding stays frozen)")
if args.sparsity is not None and args.mask is not None:
    parser.error("--sparsity and --mask exclude each other: prune by magnitude OR load a mask")
if args.batch_size % dist.world_size:
    parser.error(f"--batch-size {args.batch_size} must be divisible by the number of processes ({dist.world_size})")
model_cfg = parse_model_cfg(parser, preset_cfg, args.model_cfg)
# --out: a writable directory, locked for this run; a finished run there is refused without --resume; leftovers
# of a killed run (temporaries, stale epoch files) are removed and counted. And a loud warning without --weights.
if not args.eval_only:
    open_run(parser, args, dist, log)

# -----------------------------------------------------------------------------
# model and data. The head is sized once the dataset has told the number of classes.

torch.manual_seed(args.seed)
try:
    model = create_model(builder, num_classes=1, img_size=args.img_size, **model_cfg)
except (TypeError, ValueError) as e:  # unknown --model-cfg keys, an --img-size the model cannot take
    parser.error(f"cannot build --model {args.model} with --img-size {args.img_size} and {model_cfg}: {e}")
model.head_drop = nn.Dropout(args.dropout)  # dropout before the head only (drop_rate would also hit the blocks)
data_cfg = model.data_cfg  # mean / std / crop of the backbone's checkpoint
train_ds = val_ds = test_ds = None
if args.count_only and args.num_classes is not None:
    num_classes = args.num_classes
else:
    if dist.ddp and not master:
        torch_dist.barrier()  # let rank 0 download / index first
    try:
        train_ds, val_ds, test_ds, num_classes = build_datasets(
            args.data, args.data_root, img_size=args.img_size, mean=data_cfg["mean"], std=data_cfg["std"],
            randaug=args.randaug, download=args.download and master, crop_pct=data_cfg["crop_pct"],
            interpolation=data_cfg["interpolation"], skip_corrupt=args.skip_corrupt, val_split=args.val_split,
            split_seed=args.seed, classes_file=args.classes,
            synthetic_cfg=dict(num_classes=args.synthetic_classes, train_per_class=args.synthetic_train,
                               val_per_class=args.synthetic_val, test_per_class=args.synthetic_val))
    except (OSError, ValueError, ImportError) as e:  # a missing layout, a failed download; cars needs scipy
        parser.error(str(e))
    if dist.ddp and master:
        torch_dist.barrier()
    if args.data == "synthetic":
        test_ds = None  # the synthetic test split is for other experiments; val is the eval set
model.reset_classifier(num_classes)
if args.weights:
    with user_errors(parser):  # a damaged file, a layout that does not fit --model
        load_pretrained(model, args.weights, strict=True, verbose=master and not args.count_only)

# sparse backbone: prune now, before the adapters wrap the weights (masks are keyed "<module>.weight")
masks = None
if args.sparsity is not None:
    masks = magnitude_prune(model, args.sparsity)
elif args.mask is not None:
    with user_errors(parser):
        masks = load_masks(args.mask)
        apply_masks(model, masks)
base_keys = set(model.state_dict())  # the merged export must have exactly these keys
if not args.eval_only:
    save_random_base(parser, args, model, master=master)  # no --weights: OUT/base.safetensors

with user_errors(parser):  # e.g. a rank larger than a layer allows
    info = apply_method(model, args.model, args.method, r=args.r, rc=rc, alpha=args.alpha,
                        train_biases=args.train_biases, train_norms=args.train_norms, learn_interp=args.learn_interp)
adapter_param_names = {n for m in model.modules() for n in getattr(m, "adapter_names", ())}
nonzero = sum(int(p.count_nonzero()) for n, p in model.named_parameters()
              if n.rpartition(".")[2] not in adapter_param_names)  # the base model's non-zeros (backbone + head)
counts = dict(model=args.model, method=args.method, adapter_params=info["adapter_params"],
              head_params=info["head_params"], total_params=info["total_params"], nonzero_params=nonzero)
if args.count_only:
    if master:
        print(json.dumps(counts), flush=True)
    cleanup_distributed(dist)
    sys.exit(0)
log(f"{args.model} / {args.method}: {info['trainable_params']:,} trainable of {info['total_params']:,} parameters "
    f"(#Params {info['adapter_params']:,} + head {info['head_params']:,}), {len(info['adapted_layers'])} layers "
    f"adapted, {nonzero:,} non-zero base parameters")
model.to(dist.device)
apply_model_controls(parser, args, model)  # --grad-ckpt, --channels-last
# full / attn on a sparse backbone train the kept weights only: the mask survives training
train_masks = None
if masks is not None and args.method in ("full", "attn"):
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    train_masks = {k: m.to(dist.device) for k, m in masks.items() if k in trainable}

# -----------------------------------------------------------------------------
# optimizer: AdamW over the trainable parameters only, one group per (LR factor, weight decay)

groups = {}
for name, p in model.named_parameters():
    if not p.requires_grad:
        continue
    if name.startswith(("head.", "head_dist.")):
        factor = 1.0
    elif args.method in ("full", "attn"):
        factor = args.backbone_lr_factor
    else:
        factor = args.adapter_lr_factor
    decay = args.weight_decay if p.ndim >= 2 else 0.0
    groups.setdefault((factor, decay), []).append(p)
optimizer = torch.optim.AdamW([dict(params=ps, lr_factor=f, weight_decay=wd) for (f, wd), ps in groups.items()],
                              lr=args.lr, fused=dist.device.type == "cuda")
params = [p for group in optimizer.param_groups for p in group["params"]]  # the trained tensors (--clip-grad)
for group in optimizer.param_groups:
    log(f"  param group: LR factor {group['lr_factor']}, weight decay {group['weight_decay']}: "
        f"{sum(p.numel() for p in group['params']):,} parameters in {len(group['params'])} tensors")
# sparse full / attn: pruned weights get no gradient (so AdamW leaves them at zero) and are zeroed again after every
# optimizer.step() (so weight decay cannot revive them)
keeper = MaskKeeper(model, train_masks, optimizer=optimizer) if train_masks is not None else None

# -----------------------------------------------------------------------------
# loaders. DistributedSampler also on one process (the same shuffle), drop_last on both sampler and loader:
# len(train) // batch-size steps per epoch whatever the number of processes.

per_rank_batch = args.batch_size // dist.world_size
train_loader = train_loader_for(train_ds, batch_size=per_rank_batch, dist=dist, seed=args.seed, workers=args.workers)
train_sampler = train_loader.sampler


def eval_loader_for(ds):  # every rank evaluates every world_size-th image: each image exactly once
    return shard_loader(ds, batch_size=2 * per_rank_batch, dist=dist, workers=args.workers)


eval_loader = eval_loader_for(val_ds)
steps_per_epoch = len(train_loader)
if steps_per_epoch == 0:
    parser.error(f"the training set ({len(train_ds)} images) is smaller than one --batch-size ({args.batch_size})")
total_steps = args.epochs * steps_per_epoch
warmup_steps = round(args.warmup_epochs * steps_per_epoch)

# -----------------------------------------------------------------------------
# resume: adapters + optimizer state of the last completed epoch (the LR follows from the step)

ckpt_dir = os.path.join(args.out, "ckpt")
start_epoch, history = 0, []  # history: one record per completed epoch (log.jsonl is written from it)
# the split a --val-split run started with (OUT/split.json; for --eval-only the one beside the task file)
split_file = (os.path.join(args.out, "split.json") if args.resume else
              os.path.join(os.path.dirname(os.path.abspath(args.eval_only)), "split.json") if args.eval_only else None)
if args.val_split is not None and split_file and os.path.isfile(split_file):
    # the images held out must be the ones held out at the start: a folder changed since would make the seeded
    # split draw another val set, some of whose images the run has trained on
    flag = "--resume" if args.resume else "--eval-only"
    try:
        with open(split_file) as f:
            saved_split = json.load(f)
    except (OSError, ValueError) as e:
        parser.error(f"{flag}: cannot read {split_file} ({e}), the split the run started with; restore it, or start "
                     f"a new run in another --out")
    change = split_changes(saved_split, split_record(train_ds, val_ds, root=args.data_root, val_split=args.val_split,
                                                     seed=args.seed))
    if change:
        parser.error(f"{flag}: {args.data_root} no longer gives the split the run started with ({split_file}): "
                     f"{change}. Restore the folder as it was" + (", or start a new run in another --out" if
                                                                   args.resume else ""))
if args.resume:
    # the settings that decide the result must be the checkpoint's (checked before its adapters are loaded);
    # a damaged file is named, with the epoch that can still be resumed
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

# -----------------------------------------------------------------------------
# wrap: torch.compile, then DDP (which registers only the parameters with requires_grad)

raw_model = model  # adapters, checkpoints and the merge work on the plain module
if args.compile:
    model = torch.compile(model, backend=args.compile)
eval_model = model  # evaluation skips DDP: the ranks evaluate different numbers of batches
if dist.ddp:
    model = DDP(model, device_ids=[dist.local_rank] if dist.device.type == "cuda" else None)
autocast = amp_autocast(args.amp, dist.device)  # --amp: bf16 / fp16 autocast, or nothing
micro = per_rank_batch // args.accum_steps
log(f"{dist.world_size} process(es) on {dist.device}, --amp {args.amp}: {per_rank_batch} images per process and "
    f"step" + (f" in {args.accum_steps} micro-batches of {micro}" if args.accum_steps > 1 else "")
    + f", {steps_per_epoch} steps per epoch, {total_steps} in all")
tb = open_tensorboard(parser, os.path.join(args.out, "tb")) if args.tensorboard and master else None
if master:
    with user_errors(parser):  # a disk that filled up since the start
        if not args.eval_only:
            atomic_write_text(json.dumps(dict(vars(args), run_record=record), indent=1),
                              os.path.join(args.out, "args.json"))
            if args.val_split is not None:  # the held-out images, so the split can be reproduced or audited
                atomic_write_text(json.dumps(split_record(train_ds, val_ds, root=args.data_root,
                                                          val_split=args.val_split, seed=args.seed), indent=1),
                                  os.path.join(args.out, "split.json"))


@torch.no_grad()
def evaluate(net: nn.Module, loader: DataLoader) -> tuple[int, int, torch.Tensor, dict]:
    """Top-1 over the whole eval set: (correct, count) summed over ranks, this rank's predictions, and
    dict(loss=mean cross-entropy, top5=fraction with the label among the 5 highest logits) over all ranks."""
    net.eval()
    correct, top5, loss, preds = 0, 0, 0.0, []
    for x, y in batches(loader, parser):
        with autocast:
            logits = net(to_input(x, args, dist.device)).float().cpu()  # (B, num_classes)
        p = logits.argmax(-1)  # (B,)
        correct += (p == y).sum().item()
        top5 += (logits.topk(min(5, logits.shape[1]), -1).indices == y[:, None]).any(-1).sum().item()
        loss += F.cross_entropy(logits, y, reduction="sum").item()
        preds.append(p)
    correct, count, top5, loss = all_reduce_sum([correct, sum(len(p) for p in preds), top5, loss], dist)
    return (int(correct), int(count), torch.cat(preds) if preds else torch.zeros(0, dtype=torch.long),
            dict(loss=loss / max(count, 1), top5=top5 / max(count, 1)))


def count_skipped() -> int:
    """Distinct unreadable images skipped so far (--skip-corrupt), over all ranks and worker processes."""
    bad = [ds.bad for ds in (train_ds, val_ds) if hasattr(ds, "bad")]  # shared-memory flags of data.ImageFiles
    if not bad:
        return 0
    bad = torch.cat(bad).to(dist.device, torch.float32)
    if dist.ddp:
        torch_dist.all_reduce(bad)
    return int((bad > 0).sum())


# -----------------------------------------------------------------------------
# --eval-only: a task file or a checkpoint scored with this script's protocol; nothing trains

if args.eval_only:
    with user_errors(parser):  # a missing file, adapters of another model / method / base
        load_adapters(raw_model, args.eval_only)
    correct, count, _, ev = evaluate(eval_model, eval_loader)
    result = dict(file=args.eval_only, model=args.model, method=args.method, data=args.data, split="val",
                  count=count, eval_acc=correct / count, eval_top5=ev["top5"], eval_loss=ev["loss"])
    if test_ds is not None:
        test_correct, test_count, _, _ = evaluate(eval_model, eval_loader_for(test_ds))
        result.update(test_acc=test_correct / test_count, test_count=test_count)
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
final_eval = None  # (correct, count, predictions, loss / top-5) of the last epoch, when this process ran it
CSV_COLUMNS = ["epoch", "train_loss", "eval_loss", "eval_top1", "eval_top5", "lr"]  # timm's summary.csv


def csv_rows(history: list[dict]) -> list[dict]:
    """summary.csv's rows: one per epoch, top-1 / top-5 in % as timm writes them (empty when not evaluated)."""
    pct = lambda v: None if v is None else 100 * v  # noqa: E731
    return [dict(epoch=r["epoch"], train_loss=r["train_loss"], eval_loss=r.get("eval_loss"),
                 eval_top1=pct(r["eval_acc"]), eval_top5=pct(r.get("eval_top5")), lr=r["lr"]) for r in history]


for epoch in range(start_epoch, args.epochs):
    seed_everything(epoch_seed(args.seed, epoch, dist.rank))  # this epoch's augmentation and dropout
    train_sampler.set_epoch(epoch)  # this epoch's order
    model.train()
    freeze_bn_stats(raw_model)  # BatchNorms with frozen params keep the pretrained running statistics
    t0, loss_sum, seen, grad_norms = time.time(), 0.0, 0, []
    if dist.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dist.device)  # this epoch's peak, evaluation included
    # a bar on a terminal; written to a file, a plain line every 30 s instead of carriage-return frames
    pbar = progress(train_loader, desc=f"epoch {epoch + 1}/{args.epochs}", enabled=master)
    for x, y in batches(pbar, parser):
        lr = args.lr * cosine_lr_factor(step, total_steps=total_steps, warmup_steps=warmup_steps)
        for group in optimizer.param_groups:
            group["lr"] = lr * group["lr_factor"]
        x, y = to_input(x, args, dist.device), y.to(dist.device, non_blocking=True)
        # --accum-steps K: K forward / backward passes, each micro-batch's mean loss / K, so the gradient is the
        # whole batch's mean; DDP all-reduces the summed gradients in the last backward only (grad_sync)
        optimizer.zero_grad(set_to_none=True)
        loss = 0.0
        for i, (xm, ym) in enumerate(micro_batches((x, y), args.accum_steps)):
            with grad_sync(model, last=i == args.accum_steps - 1):
                with autocast:
                    logits = model(xm)  # (B / K, num_classes)
                micro_loss = F.cross_entropy(logits.float(), ym) / args.accum_steps
                if step == args.inject_nan_step:
                    micro_loss = micro_loss * float("nan")
                scaler.scale(micro_loss).backward()  # fp16: the loss times the scale, so small gradients survive
            loss = loss + micro_loss.detach()
        # a NaN/inf loss on any rank stops every rank before the update; the last checkpoint stays as it is
        stop_if_not_finite(loss, step=step, epoch=epoch, history=history, ckpt_dir=ckpt_dir, dist=dist, log=log,
                           fix="Lower --lr or the LR factors (or try --clip-grad)")
        # unscale (fp16), --clip-grad, the AdamW step (masked weights: see MaskKeeper above), the loss scale's update
        grad_norms.append(optimizer_step(optimizer, scaler, params, clip_grad=args.clip_grad))
        step += 1
        if ema is not None:
            ema.update(raw_model, step)
        loss_sum, seen = loss_sum + loss.item() * len(y), seen + len(y)
        if master:
            pbar.set_postfix(loss=f"{loss.item():.4f}", lr=f"{lr:.2e}",
                             img_s=f"{seen * dist.world_size / (time.time() - t0):.0f}")
    pbar.close()
    train_time = time.time() - t0
    loss_sum, seen = all_reduce_sum([loss_sum, seen], dist)
    if dist.ddp:  # DDP sends rank 0's buffers (BatchNorm statistics) at each forward; the last step's update too
        for b in raw_model.buffers():
            torch_dist.broadcast(b, 0)
    if (epoch + 1) % args.eval_every == 0 or epoch + 1 == args.epochs:
        correct, count, preds, ev = evaluate(eval_model, eval_loader)
        final_eval = (correct, count, preds, ev) if epoch + 1 == args.epochs else None
        acc, acc_text = correct / count, f"top-1 {100 * correct / count:.2f}% ({correct}/{count})"
    else:
        acc, ev, acc_text = None, dict(loss=None, top5=None), f"not evaluated (--eval-every {args.eval_every})"
    history.append(dict(epoch=epoch + 1, step=step, train_loss=loss_sum / seen, eval_acc=acc, eval_loss=ev["loss"],
                        eval_top5=ev["top5"], lr=lr, img_per_s=round(seen / train_time, 1),
                        time_s=round(time.time() - t0, 2)))
    if ema is not None and acc is not None:  # the EMA's weights scored on the same images, beside the raw model's
        with ema.swapped_into(raw_model):
            ema_correct, _, _, ema_ev = evaluate(eval_model, eval_loader)
        history[-1].update(ema_eval_acc=ema_correct / count, ema_eval_loss=ema_ev["loss"], ema_eval_top5=ema_ev["top5"])
        acc_text += f", EMA top-1 {100 * ema_correct / count:.2f}%"
    history[-1].update(grad_norm_stats(grad_norms, args.clip_grad, dist.device))
    log(f"epoch {epoch + 1}: train loss {loss_sum / seen:.4f}, {acc_text}, {seen / train_time:.0f} img/s")
    if args.skip_corrupt:
        history[-1]["skipped_images"] = count_skipped()
        log(f"  {history[-1]['skipped_images']} unreadable image(s) skipped so far (--skip-corrupt)")
    if master:
        with user_errors(parser):  # disk full, read-only file system: the message says so (and what to do)
            save_checkpoint(ckpt_dir, raw_model, epoch=epoch + 1,
                            state=dict(optimizer=optimizer.state_dict(), step=step, history=json.dumps(history),
                                       args=json.dumps(vars(args)), **control_state(scaler, ema, record)),
                            metadata=dict(model=args.model, method=args.method, num_classes=num_classes))
            write_jsonl(history, os.path.join(args.out, "log.jsonl"))
            write_csv(csv_rows(history), os.path.join(args.out, "summary.csv"), CSV_COLUMNS)
        if tb is not None:
            for k, v in csv_rows(history)[-1].items():
                if k != "epoch" and v is not None:
                    tb.add_scalar(k, v, epoch + 1)
            tb.flush()
    if args.stop_after_epoch is not None and epoch + 1 == args.stop_after_epoch and epoch + 1 < args.epochs:
        stop_after(epoch + 1, dist, log)

# -----------------------------------------------------------------------------
# merge the adapters into the weights, check the merged model predicts as the adapted one, export

if args.final_model == "ema":  # the EMA's values become the model's: the task file, the merge, the export
    ema.copy_into(raw_model)
    final_eval = None
correct, count, preds, _ = final_eval if final_eval is not None else evaluate(eval_model, eval_loader)
if master:  # the task itself: adapters + head + trained norms / biases / BN statistics + how to use them
    class_names = getattr(train_ds, "classes", None)
    with user_errors(parser):  # disk full, read-only file system: as train_seg.py / train_det.py
        save_task(raw_model, os.path.join(args.out, "adapters.safetensors"), meta=dict(
            task_type="cls", model=args.model, model_cfg=model_cfg, method=args.method, r=args.r, rc=rc,
            alpha=args.alpha,
            learn_interp=args.learn_interp, train_norms=args.train_norms, train_biases=args.train_biases,
            num_classes=num_classes, class_names=list(class_names) if class_names is not None else None,
            img_size=args.img_size, mean=list(data_cfg["mean"]), std=list(data_cfg["std"]),
            interpolation=data_cfg["interpolation"], crop_pct=data_cfg["crop_pct"], data=args.data,
            sparsity=args.sparsity, mask=args.mask, eval_acc=correct / count, final_model=args.final_model,
            training=control_settings(args), run_record=record))
if args.channels_last:  # the merge and the export in the usual layout
    raw_model.to(memory_format=torch.contiguous_format)
masked_model = copy.deepcopy(raw_model) if masks is not None else None
merged = merge_and_unload(raw_model)  # dense merge: W0 + dW in every adapted layer, plain nn.Linear / nn.Conv2d
merged_correct, _, merged_preds, _ = evaluate(merged, eval_loader)
n_diff = int(all_reduce_sum([(preds != merged_preds).sum().item()], dist)[0])
if merged_correct != correct:
    warnings.warn(f"merged top-1 {merged_correct / count:.4f} != unmerged {correct / count:.4f} ({n_diff} predictions"
                  f" differ): rounding at near-ties, or a merge bug")
export = merged.state_dict()
if set(export) != base_keys:
    raise RuntimeError(f"the merged model's keys differ from the base model's: {sorted(set(export) ^ base_keys)[:5]}")
summary = dict(summary=True, **counts, epochs=args.epochs, steps=step, eval_acc=correct / count,
               merged_acc=merged_correct / count, merged_pred_diff=n_diff, merged_nonzero=count_nonzero(export))
# the reference model it loads into (timm arch + kwargs), mean / std / interpolation: models/interop.py
meta = merged_metadata(merged, model_name=args.model, model_cfg=model_cfg, num_classes=num_classes,
                       img_size=args.img_size, method=args.method)
if master:
    with user_errors(parser):  # disk full / read-only: a clear message
        atomic_save_safetensors(export, os.path.join(args.out, "merged.safetensors"), metadata=meta)
    if meta["arch_loads"] != "true":
        log(f"note: merged.safetensors does not load into timm.create_model({meta['arch']!r}): {meta['arch_note']}")
if masked_model is not None:  # mask-preserving merge: (W0 + dW) * mask keeps the backbone exactly as sparse
    masked = merge_and_unload(masked_model, masks={k: m.to(dist.device) for k, m in masks.items()})
    masked_correct, _, _, _ = evaluate(masked, eval_loader)
    summary.update(masked_acc=masked_correct / count, masked_nonzero=count_nonzero(masked.state_dict()))
    if master:
        with user_errors(parser):
            atomic_save_safetensors(masked.state_dict(), os.path.join(args.out, "merged_masked.safetensors"),
                                    metadata=meta)
            atomic_save_safetensors({k: m.bool() for k, m in masks.items()},  # the file sparse.save_masks writes
                                    os.path.join(args.out, "masks.safetensors"),
                                    metadata={"format": "pt", "content": "sparsity masks, True = kept"})
    log(f"sparse export: the dense merge stores {summary['merged_nonzero']:,} non-zeros (top-1 "
        f"{100 * summary['merged_acc']:.2f}%), the mask-preserving merge {summary['masked_nonzero']:,} (top-1 "
        f"{100 * summary['masked_acc']:.2f}%)")
if test_ds is not None:  # datasets with a separate val split: the final model's test accuracy
    test_correct, test_count, _, _ = evaluate(merged, eval_loader_for(test_ds))
    summary["test_acc"] = test_correct / test_count
log(f"done: top-1 {100 * correct / count:.2f}% adapted, {100 * merged_correct / count:.2f}% merged ({n_diff} "
    f"predictions differ); merged model: {os.path.join(args.out, 'merged.safetensors')}")
if master:
    with user_errors(parser):
        write_jsonl(history + [summary], os.path.join(args.out, "log.jsonl"))
        if plot_curves(csv_rows(history), os.path.join(args.out, "curves.png"), title=f"{args.model} / {args.method}"):
            log(f"training curves: {os.path.join(args.out, 'curves.png')}")  # (matplotlib installed)
    if tb is not None:
        tb.close()
    print(json.dumps(summary), flush=True)
    release_out_dir(args.out)
cleanup_distributed(dist)
