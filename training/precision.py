"""Mixed precision of the training scripts (--amp {bf16,fp16,off}).

    bf16  the forward passes run under torch.autocast(dtype=torch.bfloat16): matmuls and convolutions in bf16,
          reductions and the losses in float32; bf16 has float32's exponent range, so gradients need no scaling
    fp16  autocast with float16, whose range ends at 65504 and whose smallest normal number is 6e-5: small
          gradients underflow to zero. torch.amp.GradScaler multiplies the loss by a scale S before the backward
          (so the gradients are S times larger), divides the gradients by S before clipping and the optimizer
          step, skips a step whose gradients hold inf / NaN and halves S then, and doubles S after 2000 steps
          without one. S and that counter are training state: saved in the checkpoint, resumed.
    off   float32 throughout

The parameters, the optimizer state, the task file, the merged and the exported models stay float32 in every
mode: autocast casts inside the forward pass only. conv-LoRA (conv_lora.py) takes its factored path under
autocast, so W0 + dW is never rounded to 16 bits as one kernel.
"""
from contextlib import nullcontext

import torch

AMP_CHOICES = ("bf16", "fp16", "off")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def default_amp(device: torch.device) -> str:
    """--amp's default: bf16 on CUDA, off on the CPU (CPU autocast is slower than float32 for most layers)."""
    return "bf16" if torch.device(device).type == "cuda" else "off"


def check_amp(amp: str, device: torch.device) -> str | None:
    """None when this torch can run --amp `amp` on `device`, else what is wrong and the fix (for parser.error)."""
    device = torch.device(device)
    if amp == "off":
        return None
    if amp == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        return (f"--amp bf16: this GPU ({torch.cuda.get_device_name(device)}) has no bfloat16 support; "
                f"use --amp fp16 (with its GradScaler) or --amp off")
    try:
        with torch.autocast(device.type, dtype=DTYPES[amp]):
            torch.ones(2, 2, device=device) @ torch.ones(2, 2, device=device)
    except (RuntimeError, AssertionError) as e:  # older torch: "CPU Autocast only supports dtype of torch.bfloat16"
        return (f"--amp {amp}: this torch ({torch.__version__}) has no {amp} autocast on {device.type} "
                f"({str(e).splitlines()[0]}); use --amp off" + (" or --amp bf16" if amp == "fp16" else ""))
    return None


def autocast(amp: str, device: torch.device):
    """The context of the forward passes: torch.autocast for bf16 / fp16, nothing for off."""
    if amp == "off":
        return nullcontext()
    return torch.autocast(torch.device(device).type, dtype=DTYPES[amp])


def grad_scaler(amp: str, device: torch.device) -> torch.amp.GradScaler:
    """The loss scaler: active for fp16 only. Disabled, its scale / unscale_ / step / update are plain pass-throughs
    (scale returns the loss, step calls optimizer.step()), so one training loop serves every mode."""
    return torch.amp.GradScaler(torch.device(device).type, enabled=amp == "fp16")


def load_scaler_state(scaler: torch.amp.GradScaler, state: dict | None, log) -> None:
    """Resume the scaler from a checkpoint's "scaler" entry. A checkpoint of a run without fp16 (or older than the
    flag) has none to give: an fp16 run then starts at the initial scale, and says so."""
    if not scaler.is_enabled():
        return
    if state:
        scaler.load_state_dict(state)
    else:
        log("note: the checkpoint holds no GradScaler state (it was not an --amp fp16 run): the loss scale starts "
            f"again at {scaler.get_scale():g}")
