"""The training controls the three training scripts share, with the same names and meaning in each:

    --amp {bf16,fp16,off}   mixed precision (training/precision.py); default bf16 on CUDA, off on the CPU
    --accum-steps K         K micro-batches of --batch-size / K per optimizer step (training/steps.py)
    --clip-grad NORM        clip the global gradient norm of the trained tensors (after unscaling fp16)
    --grad-ckpt             activation checkpointing of the transformer / Meta blocks (models/grad_ckpt.py)
    --compile [BACKEND]     torch.compile the network (BACKEND: default inductor; aot_eager skips code generation)
    --channels-last         channels_last memory format for the convolutions (the same function)
    --ema DECAY             an EMA of the trained tensors (training/ema.py), evaluated beside the raw model

add_control_args puts them in --help, check_control_args checks them (argparse-style errors) and resolves
--amp's default, apply_model_controls applies --grad-ckpt / --channels-last to the model; control_state and
resume_controls carry the GradScaler, the EMA and the run record (training/record.py) through the checkpoint.

--resume may change --amp, --accum-steps, --grad-ckpt, --compile and --channels-last: they decide how a step is
computed (memory, speed, rounding), not what it computes, and a run resumed on other hardware may need other values.
--clip-grad and --ema change the result: the scripts keep them in their RESUME_KEYS.
"""
import math

import torch
from torch import nn

from models.grad_ckpt import set_grad_checkpointing
from training.ema import EMA
from training.precision import AMP_CHOICES, check_amp, default_amp, grad_scaler, load_scaler_state
from training.record import record_differences, run_record


def add_control_args(parser) -> None:
    """The group "training controls" of --help."""
    g = parser.add_argument_group("training controls (the same in train_cls.py, train_seg.py and train_det.py)")
    g.add_argument("--amp", default=None, choices=AMP_CHOICES,
                   help="mixed precision of the forward passes: bf16 (autocast), fp16 (autocast + a GradScaler whose "
                        "state is checkpointed) or off (float32); default bf16 on CUDA, off on the CPU. Weights, "
                        "optimizer, task file and merged model stay float32")
    g.add_argument("--accum-steps", type=int, default=1, metavar="K",
                   help="gradient accumulation: each optimizer step runs K forward / backward passes of "
                        "--batch-size / K images per process (--batch-size stays the global batch, so the LR "
                        "schedule does not change; under torchrun the gradients are all-reduced once per step). "
                        "Trained BatchNorms see micro-batches; default 1")
    g.add_argument("--clip-grad", type=float, default=None, metavar="NORM",
                   help="clip the global L2 norm of the trained tensors' gradients to NORM (after the fp16 loss "
                        "scale is divided out); log.jsonl then records the norm before clipping (grad_norm_mean, "
                        "grad_norm_max per epoch); default no clipping")
    g.add_argument("--grad-ckpt", action="store_true",
                   help="activation checkpointing: the transformer blocks (SAM's image encoder, ViT) and "
                        "EfficientFormer's Meta4D / Meta3D blocks keep only their input and run again in the "
                        "backward pass: less activation memory for one more forward; same gradients")
    g.add_argument("--compile", nargs="?", const="inductor", default=False, metavar="BACKEND",
                   help="torch.compile the network (train_det.py: the backbone and FPN, where the compute is; the "
                        "RPN and RoI heads have data-dependent shapes) with torch.compile's BACKEND, as timm's "
                        "--torchcompile takes it: inductor when none is named; aot_eager captures the graphs and "
                        "runs AOT autograd without generating code (to tell a capture problem from a code-generation "
                        "one, or to skip inductor's C++ builds on a CPU)")
    g.add_argument("--channels-last", action="store_true",
                   help="convolution weights and inputs in the channels_last memory format (faster convolutions "
                        "on GPUs with tensor cores; the same function, to float32 rounding)")
    g.add_argument("--ema", type=float, default=None, metavar="DECAY",
                   help="keep an exponential moving average of the trained tensors (timm ModelEmaV3's rule: e = "
                        "DECAY e + (1 - DECAY) w after each optimizer step, e = w after the first), evaluated beside "
                        "the raw model at every evaluation and checkpointed; e.g. 0.9998. --final-model ema makes it "
                        "the final model; default off")


def check_control_args(parser, args, dist) -> None:
    """parser.error for a control out of range or impossible here; sets args.amp to the mode used."""
    if args.accum_steps < 1:
        parser.error(f"--accum-steps {args.accum_steps} must be >= 1")
    if args.batch_size is not None:  # train_seg.py fills its recipe's default later, then calls check_accum_steps
        check_accum_steps(parser, args, dist)
    if args.clip_grad is not None and not args.clip_grad > 0:
        parser.error(f"--clip-grad {args.clip_grad} must be > 0 (a gradient norm)")
    if args.ema is not None and not 0 <= args.ema < 1:
        parser.error(f"--ema {args.ema} must be a decay in [0, 1), e.g. 0.9998")
    if getattr(args, "final_model", None) == "ema" and args.ema is None:
        parser.error("--final-model ema needs --ema DECAY (the average to keep)")
    if args.compile is not False:  # --compile "" too: named, and no backend
        check_compile_backend(parser, args.compile)
    args.amp = args.amp or default_amp(dist.device)
    problem = check_amp(args.amp, dist.device)
    if problem:
        parser.error(problem)


def check_compile_backend(parser, backend: str) -> None:
    """parser.error unless torch.compile knows the backend (its debug backends, aot_eager and eager, included)."""
    import torch._dynamo  # imported here: ~1 s, and only --compile needs it
    known = torch._dynamo.list_backends(exclude_tags=())
    if backend not in known:
        main = [b for b in ("inductor", "aot_eager", "eager", "cudagraphs") if b in known]
        parser.error(f"--compile {backend}: torch.compile has no such backend; choose one of {', '.join(main)} (all: "
                     f"torch._dynamo.list_backends(exclude_tags=())), or give --compile alone for inductor")


def check_accum_steps(parser, args, dist) -> None:
    """parser.error unless --accum-steps divides each process' share of --batch-size into equal micro-batches."""
    per_rank = args.batch_size // dist.world_size
    if per_rank % args.accum_steps:
        parser.error(f"--accum-steps {args.accum_steps} must divide the per-process batch ({per_rank} = --batch-size "
                     f"{args.batch_size} / {dist.world_size} process(es)) into equal micro-batches; choose a "
                     f"divisor of {per_rank}")


def apply_model_controls(parser, args, model: nn.Module) -> None:
    """--grad-ckpt and --channels-last on the model (before DDP / torch.compile wrap it)."""
    if args.grad_ckpt and set_grad_checkpointing(model) == 0:
        parser.error(f"--grad-ckpt: --model {args.model} has no blocks to checkpoint")
    if args.channels_last:
        model.to(memory_format=torch.channels_last)  # 4-d weights only; others are left as they are


def to_input(x: torch.Tensor, args, device: torch.device) -> torch.Tensor:
    """A batch of images on the device, channels_last with --channels-last."""
    x = x.to(device, non_blocking=True)
    return x.contiguous(memory_format=torch.channels_last) if args.channels_last and x.ndim == 4 else x


def make_scaler_and_ema(args, model: nn.Module, device: torch.device):
    """The GradScaler (active for --amp fp16) and the EMA (None without --ema) of a run."""
    return grad_scaler(args.amp, device), (EMA(model, args.ema) if args.ema is not None else None)


def control_state(scaler, ema, record: dict) -> dict:
    """The checkpoint entries of the controls: loss scale, EMA averages, the run record."""
    state = dict(scaler=scaler.state_dict(), run_record=record)
    if ema is not None:
        state["ema"] = ema.state_dict()
    return state


def resume_controls(state: dict | None, scaler, ema, record: dict, log) -> None:
    """--resume: the GradScaler's and the EMA's state from the checkpoint (an EMA the checkpoint lacks starts from the
    resumed model, and says so); a warning naming what differs from the checkpoint's run record."""
    if state is None:
        return
    load_scaler_state(scaler, state.get("scaler"), log)
    if ema is not None:
        if state.get("ema"):
            ema.load_state_dict(state["ema"])
        else:
            log("note: the checkpoint holds no EMA (its run had no --ema): the average starts from the resumed model")
    changed = record_differences(state.get("run_record"), record)
    if changed:
        log("WARNING: --resume on other software or hardware than the checkpoint's run (" + "; ".join(changed)
            + "): the numbers may differ from an uninterrupted run")


def make_record(dist) -> dict:
    return run_record(world_size=dist.world_size, device=dist.device)


def control_settings(args) -> dict:
    """The controls of a run as the task file's metadata records them ("training")."""
    return {k: getattr(args, k) for k in ("amp", "accum_steps", "clip_grad", "grad_ckpt", "compile", "channels_last",
                                          "ema")}


def grad_norm_stats(norms: list, clip_grad: float | None, device: torch.device) -> dict:
    """An epoch's log.jsonl entries of the controls: with --clip-grad the pre-clip gradient norms (mean and max over
    the steps whose norm is finite, how many steps were clipped, how many had inf / NaN gradients: fp16 overflows,
    steps the GradScaler skipped); on CUDA the epoch's peak of allocated memory."""
    out = {}
    if clip_grad is not None and norms:
        finite = [n for n in norms if math.isfinite(n)]
        out.update(grad_norm_mean=sum(finite) / len(finite) if finite else None,
                   grad_norm_max=max(finite, default=None),
                   clipped_steps=sum(n > clip_grad for n in finite), nonfinite_grad_steps=len(norms) - len(finite))
    if torch.device(device).type == "cuda":
        out["cuda_max_allocated_mb"] = round(torch.cuda.max_memory_allocated(device) / 2 ** 20, 1)
    return out
