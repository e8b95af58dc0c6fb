"""Load released checkpoints into the models of this package, strictly.

`load_pretrained(model, path)` reads a `.pth`/`.pt`/`.bin`/`.ckpt`/`.pth.tar` (torch.load, weights_only=True)
or `.safetensors` file, peels `model` / `state_dict` wrappers (training checkpoints: timm's `*.pth.tar`,
facebookresearch's `{'model': ...}`; `ema=True` takes their EMA weights) and a DDP `module.` / torch.compile
`_orig_mod.` prefix, hands the state_dict to the model family's `checkpoint_filter_fn` (next to the model, as
in timm: renames a foreign layout, resizes position tables to the model's input size), skips a classifier head
made for another number of classes, and fails with the full list of missing / unexpected / mis-shaped keys.

    family           layouts accepted                                   checkpoint_filter_fn renames with
    EfficientFormer  timm `efficientformer_l*.snap_dist_in1k`           -
                     snap-research `efficientformer_l*_300d.pth`        efficientformer.snap_to_timm
    ViT / DeiT III   timm `vit_*.augreg_*`, `deit3_*.fb_*`              - (a file of the other variant is
                     facebookresearch `deit_3_*.pth` (gamma_1/gamma_2)  vit.deit3_fb_to_timm   refused, naming
                                                                                             the flag)
    SAM              Meta `sam_vit_b_01ec64.pth`                        -
                     Hugging Face `facebook/sam-vit-base`               sam.hf_to_meta
"""
import argparse
import json
import pickle
from collections.abc import Mapping
from pathlib import Path

import torch
import torch.nn as nn

from . import efficientformer, vit

TORCH_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt", ".pth.tar")  # .pth.tar: timm's training checkpoints
WRAPPER_KEYS = ("model", "state_dict", "model_state_dict", "module")
EMA_KEYS = ("state_dict_ema", "model_ema")  # timm's train.py, facebookresearch DeiT's main.py
PREFIXES = ("module.", "_orig_mod.")  # DistributedDataParallel, torch.compile


def read_checkpoint(path: str | Path, *, ema: bool = False) -> dict[str, torch.Tensor]:
    """Read a checkpoint file into a flat {key: tensor} dict on the CPU (wrappers and prefixes peeled off;
    `ema=True`: the EMA weights of a training checkpoint)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist (or is not a file)")
    name = path.name.lower()
    suffix = next((s for s in TORCH_SUFFIXES if name.endswith(s)), path.suffix.lower())
    if suffix == ".safetensors":
        from safetensors import safe_open
        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                metadata = f.metadata() or {}
                obj = {k: f.get_tensor(k) for k in f.keys()} if not _is_task_file(metadata) else None
        except Exception as e:  # safetensors raises its own error types for bad headers / short files
            raise ValueError(f"could not read {str(path)!r} as a safetensors file (expected a file written by "
                             f"safetensors' save_file; it may be truncated or of another type): {e}") from e
        if obj is None:
            raise ValueError(_task_file_message(str(path), metadata))
    elif suffix in TORCH_SUFFIXES:
        obj = _torch_load(path)
    else:
        raise ValueError(f"{str(path)!r}: unknown checkpoint type {suffix!r}; expected a torch.save file "
                         f"({', '.join(TORCH_SUFFIXES)}) or a .safetensors file")
    return unwrap_state_dict(obj, str(path), ema=ema)


def _is_task_file(metadata: dict) -> bool:
    # a task file (tasks.task_file.save_task) or an adapter file (lora.save_adapters): adapter configs + the
    # fingerprint of the base they were trained on, in the safetensors metadata
    return "adapters" in metadata and "fingerprint" in metadata


def _task_file_message(path: str, metadata: dict) -> str:
    """What a task file given as a model checkpoint is, and how to use one."""
    try:
        user = json.loads(metadata.get("user", "{}"))
    except json.JSONDecodeError:
        user = {}
    made = ", ".join(f"{k}={user[k]!r}" for k in ("model", "method") if isinstance(user, dict) and k in user)
    return (f"{path!r} is a task file (the adapters and head of a trained run{', ' + made if made else ''}: what "
            f"train_cls.py / train_seg.py / train_det.py write as OUT/adapters.safetensors), not a model "
            f"checkpoint. Load the base checkpoint the task was trained on (the scripts' --weights BASE) and use the "
            f"task file with predict_cls.py --weights BASE --tasks NAME={path}, predict_seg.py --weights BASE "
            f"--checkpoint {path} or export.py --weights BASE --task {path}; OUT/merged.safetensors is the full "
            f"model with the task folded in")


def _torch_load(path: Path):
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch.load raises RuntimeError, UnpicklingError, KeyError, EOFError... on bad files
        msg = str(e)
        if isinstance(e, pickle.UnpicklingError) and "argparse.Namespace" in msg:
            # training checkpoints often carry their run's argparse Namespace next to the weights: allow that
            # one plain-data class, refuse every other pickled object
            with torch.serialization.safe_globals([argparse.Namespace]):
                return torch.load(path, map_location="cpu", weights_only=True)
        if isinstance(e, pickle.UnpicklingError) and "Unsupported global" in msg:
            what = msg[msg.index("Unsupported global"):].split("\n")[0]
            raise ValueError(f"{str(path)!r} holds pickled objects that weights_only loading refuses ({what}); "
                             f"re-save only the state_dict: torch.save(model.state_dict(), path)") from e
        raise ValueError(f"could not read {str(path)!r} as a PyTorch checkpoint (expected a file written by "
                         f"torch.save; it may be truncated or of another type): {type(e).__name__}: "
                         f"{msg[:200]}") from e


def unwrap_state_dict(obj, where: str = "checkpoint", *, ema: bool = False) -> dict[str, torch.Tensor]:
    """Peel `{'model': ...}` / `{'state_dict': ...}` wrappers (or, with `ema`, take `state_dict_ema` /
    `model_ema`) and a `module.` / `_orig_mod.` key prefix."""
    if not isinstance(obj, Mapping):
        raise ValueError(f"{where}: expected a state_dict (a dict of tensors), got {type(obj).__name__}")
    if ema:
        found = [k for k in EMA_KEYS if isinstance(obj.get(k), Mapping)]
        if not found:
            raise ValueError(f"{where}: no EMA weights in this file (looked for {', '.join(EMA_KEYS)}; top-level "
                             f"keys: {', '.join(map(str, sorted(obj)[:10]))}); load it without ema")
        obj = obj[found[0]]
    while True:
        inner = [k for k in WRAPPER_KEYS if isinstance(obj.get(k), Mapping)]
        if not inner:
            break
        obj = obj[inner[0]]
    sd = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not sd:
        raise ValueError(f"{where}: no tensors found (top-level keys: {sorted(map(str, obj))[:10]}); expected a "
                         f"state_dict, possibly under 'model' or 'state_dict'")
    for prefix in PREFIXES:
        if all(k.startswith(prefix) for k in sd):
            sd = {k[len(prefix):]: v for k, v in sd.items()}
    return sd


def _is_sam(model: nn.Module) -> bool:
    return all(hasattr(model, n) for n in ("image_encoder", "prompt_encoder", "mask_decoder"))


def family_of(model: nn.Module):
    """(checkpoint_filter_fn, classifier-head key prefixes) of the model's family; (None, ()) for other modules
    (their checkpoints are loaded as they are)."""
    if isinstance(model, efficientformer.EfficientFormer):
        return efficientformer.checkpoint_filter_fn, ("head.", "head_dist.")
    if isinstance(model, vit.VisionTransformer):
        return vit.checkpoint_filter_fn, ("head.",)
    if _is_sam(model):
        from . import sam  # imported lazily: the SAM files are only needed for SAM
        return sam.checkpoint_filter_fn, ()  # the mask tokens are handled by sam.checkpoint_filter_fn
    return None, ()


def load_pretrained(model: nn.Module, path: str | Path | Mapping, *, strict: bool = True, ema: bool = False,
                    verbose: bool = True) -> dict:
    """Load a checkpoint (file path, or an in-memory state_dict) into `model`.

    Args:
        model: an EfficientFormer, VisionTransformer, Sam, or any other module of this package, with or
            without adapters injected (adapter tensors are not expected in the checkpoint and are left alone).
        path: checkpoint file (.pth/.pt/.bin/.ckpt/.pth.tar or .safetensors), or a state_dict.
        strict: raise a ValueError listing every missing, unexpected and mis-shaped key (after renaming,
            resizing and head skipping); with strict=False those are reported and the rest is loaded.
        ema: take the EMA weights of a training checkpoint (timm's `state_dict_ema`, DeiT's `model_ema`).
        verbose: print a one-line summary.

    Returns:
        dict(layout=str, skipped=[keys of a skipped head], resized=[keys resampled to the model's size],
             missing=[...], unexpected=[...], mismatched=[...]).
    """
    where = str(path) if not isinstance(path, Mapping) else "state_dict"
    sd = read_checkpoint(path, ema=ema) if not isinstance(path, Mapping) else unwrap_state_dict(path, where, ema=ema)

    # 1. foreign layouts -> our (timm / Meta) names, tables resized to the model's input size: the family's filter
    filter_fn, head_prefixes = family_of(model)
    layout, resized, skipped = "native", [], []
    if filter_fn is not None:
        try:
            sd, info = filter_fn(sd, model)
        except ValueError as e:
            raise ValueError(f"checkpoint {where!r}: {e}") from e
        layout, resized, skipped = info["layout"], info["resized"], info.get("skipped", [])

    own = model.state_dict()
    # 2. a head for another number of classes (or a model without a head): keep the model's own head
    if head_prefixes:
        ckpt_head = [k for k in sd if k.startswith(head_prefixes)]
        if any(k not in own or own[k].shape != sd[k].shape for k in ckpt_head):
            skipped = sorted(set(ckpt_head) | {k for k in own if k.startswith(head_prefixes)})
            sd = {k: v for k, v in sd.items() if not k.startswith(head_prefixes)}
        elif not ckpt_head:  # backbone-only checkpoint
            skipped = sorted(k for k in own if k.startswith(head_prefixes))

    # adapters subclass the layers they adapt (lora.py protocol): a base checkpoint fills weight/bias and
    # leaves the adapter's own tensors as they are
    adapter_keys = {f"{name}.{a}" if name else a for name, m in model.named_modules()
                    if hasattr(m, "adapter_names") for a in m.adapter_names}
    missing = sorted(k for k in own if k not in sd and k not in skipped and k not in adapter_keys)
    unexpected = sorted(k for k in sd if k not in own)
    mismatched = sorted(f"{k}: checkpoint {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}"
                        for k in sd if k in own and sd[k].shape != own[k].shape)
    if strict and (missing or unexpected or mismatched):
        lines = [f"checkpoint {where!r} ({layout} layout) does not match {type(model).__name__}:"]
        for name, keys in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", mismatched)):
            if keys:
                lines.append(f"  {len(keys)} {name} key(s): " + ", ".join(keys))
        lines.append(f"  (is it the right model size / family?{_layout_hint(sd, model)})")
        raise ValueError("\n".join(lines))
    sd = {k: v for k, v in sd.items() if k in own and sd[k].shape == own[k].shape}
    _check_finite(sd, where)
    model.load_state_dict(sd, strict=False)

    if verbose:
        msg = f"load_pretrained: {where} ({layout} layout): {len(sd)} tensors loaded"
        if resized:
            msg += f", resized to the model's input size: {', '.join(resized)}"
        if adapter_keys:
            msg += f", {len(adapter_keys)} adapter tensors left as they are"
        if skipped:
            msg += f"; head skipped (kept the model's fresh {', '.join(sorted({k.split('.')[0] for k in skipped}))})"
        if missing or unexpected or mismatched:
            msg += f"; NOT loaded: {len(missing)} missing, {len(unexpected)} unexpected, {len(mismatched)} mis-shaped"
        print(msg)
    return dict(layout=layout, skipped=skipped, resized=resized, missing=missing, unexpected=unexpected,
                mismatched=mismatched)


def _check_finite(sd: dict[str, torch.Tensor], where: str) -> None:
    """Refuse NaN / inf weights (a diverged run's checkpoint, a damaged file): loaded, they would make every output
    NaN while the load reported success."""
    bad = [k for k, v in sd.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise ValueError(f"checkpoint {where!r}: {len(bad)} of {len(sd)} tensors hold NaN or inf values (e.g. "
                         f"{', '.join(bad[:3])}): the file is damaged or was saved from a run whose loss diverged; "
                         f"use another checkpoint")


def _layout_hint(sd: dict[str, torch.Tensor], model: nn.Module) -> str:
    """A sentence naming a known layout that the checkpoint has and the model's family does not read."""
    from . import sam
    if sam.is_hf_layout(sd) and not _is_sam(model):
        return (" this is a Hugging Face transformers SAM checkpoint (vision_encoder.* keys): load it into "
                "create_model('sam_vitb');")
    if any(k.startswith(("image_encoder.", "mask_decoder.")) for k in sd) and not _is_sam(model):
        return " this is a SAM checkpoint (image_encoder.* keys): load it into create_model('sam_vitb');"
    return ""
