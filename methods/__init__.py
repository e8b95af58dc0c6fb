"""
Which layers each fine-tuning method of the PETAH / PETRAS papers adapts or trains, per model family.

One concern: a method name -> a freezing policy. The adapter layers themselves live in lora.py,
conv_lora.py and ia3.py; this file only decides WHERE they go and WHAT is trainable.

  method     what is trained besides the new task head (PETAH section 4, Table 3)
  --------   ----------------------------------------------------------------------------------
  linear     nothing: linear probing on the frozen backbone
  full       every parameter
  attn       every parameter of every attention module (EF: the Meta3D token mixers, incl. their
             attention_biases; ViT: blocks.i.attn)
  lora       LoRA rank r on qkv and proj of every attention module ("LoRA ATTN")
  lora_mlp   LoRA ATTN + LoRA rank r on fc1/fc2 of every transformer MLP ("LoRA ATTN+MLP")
  petah      LoRA ATTN rank r + conv-LoRA rank rc on every convolution: the stem, the 1x1 fc1/fc2 of
             every Meta4D block and the stride-2 downsamples. No other linear layer is touched.
             (ViT has no convolutional stages: petah == lora there; the patch embedding stays frozen.)
  ia3        (IA)^3: learned scaling of keys and values (k/v rows of the fused qkv output) and of the
             MLP's intermediate activation (input scaling of fc2; in EF both Meta3D and Meta4D MLPs)

#Params, one meaning: `adapter_params` = every trainable parameter outside the task head, the paper's #Params
column (for LoRA / PETAH / (IA)^3 the adapters; for ATTN FT the attention weights; for PETRAS also the norms
and biases it trains). `count_parameters` computes it; the paper's exact numbers are PAPER_PARAMS below, the
one copy in the repository (tests, bench/ and the README table read it).
A LoRA'd linear layer adds r * (d_in + d_out) parameters, a conv-LoRA'd conv rc * (c_out +
c_in/groups * kh * kw): with r=8 this gives exactly the paper's column, e.g. EF L7 PETAH-2 = 262,144
(attention) + 2 * 94,395 (convolutions) = 450,934.

Layer names are the checkpoint keys (timm layout). A new model family = one more entry in LAYERS
(and, when its classes differ, FAMILIES); the method logic below stays as it is.
"""

import re

from torch import nn

from conv_lora import LoRAConv2d
from ia3 import IA3Conv2d, IA3Linear, add_ia3
from lora import LoRALinear, add_lora, mark_trainable, qkv_rows

METHODS = ("linear", "full", "attn", "lora", "lora_mlp", "petah", "ia3")

# The #Params column of the PETAH paper's tables (its exact values: trainable parameters outside the task head,
# 224-px models), keyed (model, method, r, rc): LoRA rank r on the attention (+ MLP) linears, conv-LoRA rank rc
# (PETAH-1 / PETAH-2 are rc = 1 / 2; rc is 1 where no conv is adapted). apply_method(...)["adapter_params"]
# equals every entry (tests/test_paper_params.py; the policy itself: tests/test_methods.py).
PAPER_PARAMS = {
    ("efl7", "lora", 8, 1): 262_144, ("efl7", "lora", 16, 1): 524_288, ("efl7", "lora_mlp", 8, 1): 753_664,
    ("efl7", "petah", 8, 1): 356_539, ("efl7", "petah", 8, 2): 450_934, ("efl7", "attn", 8, 1): 15_750_208,
    ("efl3", "lora", 8, 1): 114_688, ("efl3", "petah", 8, 1): 176_987, ("efl3", "petah", 8, 2): 239_286,
    ("efl3", "attn", 8, 1): 5_252_640,
    ("efl1", "lora", 8, 1): 27_648, ("efl1", "petah", 8, 1): 62_283, ("efl1", "petah", 8, 2): 96_918,
    ("vitb", "lora", 8, 1): 442_368, ("vitb", "attn", 8, 1): 28_348_416,
    ("vits", "lora", 8, 1): 221_184, ("vits", "attn", 8, 1): 7_096_320,
}
PAPER_MODEL_NAMES = {"efl7": "EfficientFormer L7", "efl3": "EfficientFormer L3", "efl1": "EfficientFormer L1",
                     "vitb": "ViT-B/16", "vits": "ViT-S/16"}


def paper_params_table() -> str:
    """The README's parameter-count table (markdown), rendered from PAPER_PARAMS."""
    columns = [("LoRA ATTN r=8", "lora", 1), ("PETAH-1", "petah", 1), ("PETAH-2", "petah", 2), ("ATTN FT", "attn", 1)]
    rows = [["model"] + [c[0] for c in columns]]
    for model, label in PAPER_MODEL_NAMES.items():
        counts = [PAPER_PARAMS.get((model, method, 8, rc)) for _, method, rc in columns]
        rows.append([label] + ["" if c is None else f"{c:,}" for c in counts])
    lines = ["|" + "".join(f" {cell} |" if cell else " |" for cell in row) for row in rows]
    return "\n".join(lines[:1] + ["|" + "---|" * (len(columns) + 1)] + lines[1:])

# model class name -> family key of LAYERS
FAMILIES = {"EfficientFormer": "efficientformer", "VisionTransformer": "vit"}

# Per family, regular expressions (re.fullmatch on qualified module names) for each group of layers a
# method may touch. The layer type is checked as well: in EfficientFormer `mlp.fc1` is a Linear in the
# Meta3D blocks but a 1x1 Conv2d in the Meta4D blocks, under the same name pattern.
LAYERS = {
    "efficientformer": dict(
        attn=r"stages\.\d+\.blocks\.\d+\.token_mixer",       # modules trained by `attn` (Meta3D ones have params)
        attn_linear=r"stages\.\d+\.blocks\.\d+\.token_mixer\.(qkv|proj)",
        mlp_linear=r"stages\.\d+\.blocks\.\d+\.mlp\.fc[12]",  # Linear: Meta3D MLP
        conv=r"stem\.conv[12]|stages\.\d+\.downsample\.conv|stages\.\d+\.blocks\.\d+\.mlp\.fc[12]",
        qkv=r"stages\.\d+\.blocks\.\d+\.token_mixer\.qkv",
        qkv_layout="per_head",                                 # (B, N, heads, q|k|v): [q_h k_h v_h] * heads
        mlp_fc2=r"stages\.\d+\.blocks\.\d+\.mlp\.fc2",         # Linear (Meta3D) and 1x1 Conv2d (Meta4D)
    ),
    "vit": dict(
        attn=r"blocks\.\d+\.attn",
        attn_linear=r"blocks\.\d+\.attn\.(qkv|proj)",
        mlp_linear=r"blocks\.\d+\.mlp\.fc[12]",
        conv=None,                                             # patch_embed.proj is never adapted
        qkv=r"blocks\.\d+\.attn\.qkv",
        qkv_layout="contiguous",                               # [q | k | v]
        mlp_fc2=r"blocks\.\d+\.mlp\.fc2",
    ),
}


def model_family(model: nn.Module) -> str:
    name = type(model).__name__
    if name not in FAMILIES:
        raise ValueError(f"methods knows no layer layout for {name}; known model classes: "
                         f"{sorted(FAMILIES)} (add the family to FAMILIES and LAYERS in methods/__init__.py)")
    return FAMILIES[name]


def find_layers(model: nn.Module, pattern: str | None, types: tuple[type, ...]) -> list[str]:
    """Qualified names of the modules that fullmatch `pattern` and are instances of `types`."""
    if pattern is None:
        return []
    regex = re.compile(pattern)
    return [n for n, m in model.named_modules() if regex.fullmatch(n) and isinstance(m, types)]


def _qkv_widths(attn: nn.Module) -> tuple[int, int, int, int]:
    """(dim_q, dim_k, dim_v, num_heads) of an attention module's fused qkv, widths summed over heads
    (EF: 8*32, 8*32, 8*128; ViT: dim, dim, dim)."""
    heads = attn.num_heads
    if hasattr(attn, "key_dim"):  # EfficientFormer: key_dim / val_dim per head
        return heads * attn.key_dim, heads * attn.key_dim, heads * attn.val_dim, heads
    dim = attn.qkv.out_features // 3
    return dim, dim, dim, heads


def plan_method(model: nn.Module, method: str, *, r: int = 8, rc: int = 1, alpha: float | None = None,
                learn_interp: bool = False) -> dict:
    """What `method` does to `model`, without changing it.

    Returns dict(lora={module name: LoRA kwargs}, ia3={module name: IA3 kwargs},
    train_modules=[module-name prefixes whose params are trained], train_all=bool).
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {METHODS}")
    layers = LAYERS[model_family(model)]
    lora_cfg = dict(r=r, alpha=alpha, learn_interp=learn_interp)
    plan = dict(lora={}, ia3={}, train_modules=[], train_all=False)

    if method == "full":
        plan["train_all"] = True
    elif method == "attn":
        plan["train_modules"] = [n for n in find_layers(model, layers["attn"], (nn.Module,))
                                 if any(True for _ in model.get_submodule(n).parameters())]
    elif method in ("lora", "lora_mlp", "petah"):
        for n in find_layers(model, layers["attn_linear"], (nn.Linear,)):
            plan["lora"][n] = dict(lora_cfg)
        if method == "lora_mlp":
            for n in find_layers(model, layers["mlp_linear"], (nn.Linear,)):
                plan["lora"][n] = dict(lora_cfg)
        if method == "petah":
            for n in find_layers(model, layers["conv"], (nn.Conv2d,)):
                plan["lora"][n] = dict(lora_cfg, r=rc)
    elif method == "ia3":
        for n in find_layers(model, layers["qkv"], (nn.Linear,)):
            dq, dk, dv, heads = _qkv_widths(model.get_submodule(n.rsplit(".", 1)[0]))
            rows = qkv_rows(dq, dk, dv, heads, parts=("k", "v"), layout=layers["qkv_layout"])
            plan["ia3"][n] = dict(mode="out", rows=rows)
        for n in find_layers(model, layers["mlp_fc2"], (nn.Linear, nn.Conv2d)):
            plan["ia3"][n] = dict(mode="in")
    return plan


def apply_method(model: nn.Module, model_name: str, method: str, *, r: int = 8, rc: int = 1,
                 alpha: float | None = None, train_biases: bool = False, train_norms: bool = False,
                 learn_interp: bool = False, head_names: tuple[str, ...] = ("head", "head_dist")) -> dict:
    """Insert the adapters of `method` into `model` (in place) and set requires_grad.

    Args:
        model: the backbone with its (new) task head; module names as in the checkpoint.
        model_name: reported back only (e.g. "efl7").
        method: one of METHODS.
        r: LoRA rank of the linear layers. rc: conv-LoRA rank (petah only).
        alpha: LoRA alpha (None -> alpha = r, i.e. scale 1).
        train_biases / train_norms: also train every bias / every norm layer (PETRAS trains both).
        learn_interp: PETRAS's learned interpolation y = a W0 x + (1 - a) dW x in every LoRA layer.
        head_names: top-level modules that form the task head; always trained, never counted as adapter.

    Returns dict(model, method, adapter_params, head_params, total_params, trainable_params,
    adapted_layers): adapter_params is every trainable parameter outside the head (the paper's #Params).
    """
    plan = plan_method(model, method, r=r, rc=rc, alpha=alpha, learn_interp=learn_interp)
    # one exact-name pattern per layer (re.fullmatch in add_lora / add_ia3)
    if plan["lora"]:
        add_lora(model, {re.escape(n): cfg for n, cfg in plan["lora"].items()},
                 layers={nn.Linear: LoRALinear, nn.Conv2d: LoRAConv2d})
    if plan["ia3"]:
        add_ia3(model, {re.escape(n): cfg for n, cfg in plan["ia3"].items()},
                layers={nn.Linear: IA3Linear, nn.Conv2d: IA3Conv2d})

    heads = tuple(h for h in head_names if any(n.startswith(h + ".") for n, _ in model.named_parameters()))
    if plan["train_all"]:
        for p in model.parameters():
            p.requires_grad_(True)
    else:
        mark_trainable(model, biases=train_biases, norms=train_norms, modules=heads + tuple(plan["train_modules"]))
    counts = count_parameters(model, head_names=heads)
    return dict(model=model_name, method=method, **counts, adapted_layers=sorted(plan["lora"]) + sorted(plan["ia3"]))


def count_parameters(model: nn.Module, *, head_names: tuple[str, ...] = ("head", "head_dist")) -> dict:
    """adapter_params: every trainable parameter outside the head (the paper's #Params); head_params: all
    params of the head modules; total_params: every parameter of the model (adapters included);
    trainable_params: all trainable (= adapter_params + the trainable part of the head)."""
    def in_head(name: str) -> bool:
        return any(name == h or name.startswith(h + ".") for h in head_names)

    adapter = head = total = trainable = 0
    for name, p in model.named_parameters():
        total += p.numel()
        trainable += p.numel() if p.requires_grad else 0
        if in_head(name):
            head += p.numel()
        elif p.requires_grad:
            adapter += p.numel()
    return dict(adapter_params=adapter, head_params=head, total_params=total, trainable_params=trainable)


# =============================================================================
# PETRAS on SAM.
#
# SAM does not fit the LAYERS table: its decoder has separate q/k/v projections, its "head" (mask tokens + the
# hypernetwork MLPs that turn them into mask weights) is nested inside the decoder, and parts of it are dead in
# prompt-free use. So it gets its own small policy:
#
#   method    what is trained (always: the head; never: the unused prompt parts)
#   -------   -----------------------------------------------------------------------------------------
#   lora      LoRA rank r on every attention projection and MLP linear of the image encoder
#             (attn.qkv, attn.proj, mlp.lin1, mlp.lin2) and of the mask decoder's two-way transformer
#             ({self_attn, cross_attn_*, final_attn_token_to_image}.{q,k,v,out}_proj, mlp.lin1/lin2),
#             + every norm and bias ("we finetune the adapters themselves as well as the normalization and
#             bias parameters"), optionally PETRAS' learned interpolation a
#   ia3       (IA)^3: k/v rows of the encoder's fused qkv and the decoder's k_proj/v_proj scaled at the
#             output, lin2 of every MLP scaled at the input; + norms and biases
#   full      every parameter the prompt-free forward uses
#   decoder   the whole mask decoder, frozen image encoder (the usual baseline PETRAS departs from)

SAM_METHODS = ("lora", "ia3", "full", "decoder")
SAM_LORA = (r"image_encoder\.blocks\.\d+\.(attn\.(qkv|proj)|mlp\.lin[12])"
            r"|mask_decoder\.transformer\.(layers\.\d+\.(self_attn|cross_attn_token_to_image|cross_attn_image_to_token)"
            r"|final_attn_token_to_image)\.(q|k|v|out)_proj"
            r"|mask_decoder\.transformer\.layers\.\d+\.mlp\.lin[12]")
SAM_IA3_QKV = r"image_encoder\.blocks\.\d+\.attn\.qkv"
SAM_IA3_KV = r"mask_decoder\.transformer\.(layers\.\d+\.\w+|final_attn_token_to_image)\.(k|v)_proj"
SAM_IA3_LIN2 = r"(image_encoder\.blocks|mask_decoder\.transformer\.layers)\.\d+\.mlp\.lin2"


def sam_head_and_unused(num_classes: int) -> tuple[list[str], list[str]]:
    """Module names of SAM's task head and of the parts prompt-free segmentation never uses.

    head: `mask_decoder.mask_tokens` and the hypernetwork MLPs `Sam.segment` reads (token 0 for a binary task,
    tokens 1..N for N > 2 classes, which start fresh), trained by every method like a classifier head.
    unused: point/box/mask-prompt embeddings, the IoU head and the other tokens' hypernetworks; always frozen,
    so every trainable parameter gets a gradient (DDP needs that) and the counts are what really trains.
    """
    used = [0] if num_classes <= 2 else list(range(1, num_classes + 1))
    n_tokens = 4 if num_classes <= 2 else num_classes + 1
    head = ["mask_decoder.mask_tokens"] + [f"mask_decoder.output_hypernetworks_mlps.{i}" for i in used]
    unused = ["prompt_encoder.point_embeddings", "prompt_encoder.not_a_point_embed", "prompt_encoder.mask_downscaling",
              "mask_decoder.iou_prediction_head"]
    unused += [f"mask_decoder.output_hypernetworks_mlps.{i}" for i in range(n_tokens) if i not in used]
    return head, unused


def apply_sam_method(model: nn.Module, method: str, *, num_classes: int = 2, r: int = 8, alpha: float | None = None,
                     learn_interp: bool = False, train_biases: bool = True, train_norms: bool = True) -> dict:
    """Insert the adapters of a PETRAS method into a SAM (models.sam.Sam, in place) and set requires_grad.

    Args:
        model: SAM built for `num_classes` (1 logit map for 2 classes, N maps for N > 2).
        method: one of SAM_METHODS.
        num_classes: classes including background (2 = binary).
        r, alpha, learn_interp: LoRA rank, alpha (None -> r) and PETRAS' interpolation (lora only).
        train_biases / train_norms: also train every bias / norm (lora, ia3; PETRAS trains both).

    Returns dict(method, adapter_params, head_params, total_params, trainable_params, adapted_layers), counted
    as count_parameters does (adapter_params: every trainable parameter outside the head).
    """
    if method not in SAM_METHODS:
        raise ValueError(f"unknown SAM method {method!r}; choose one of {SAM_METHODS}")
    head, unused = sam_head_and_unused(num_classes)
    adapted = []
    if method == "lora":
        adapted = add_lora(model, {SAM_LORA: dict(r=r, alpha=alpha, learn_interp=learn_interp)})
    elif method == "ia3":
        enc = model.image_encoder.blocks[0].attn
        dim = enc.qkv.in_features  # fused qkv laid out [q | k | v], each `dim` wide
        adapted = add_ia3(model, {SAM_IA3_QKV: dict(mode="out", rows=qkv_rows(dim, dim, dim, enc.num_heads,
                                                                                parts=("k", "v"))),
                                  SAM_IA3_KV: "out", SAM_IA3_LIN2: "in"})
    if method == "full":
        for p in model.parameters():
            p.requires_grad_(True)
    elif method == "decoder":
        mark_trainable(model, modules=("mask_decoder",))
    else:
        mark_trainable(model, biases=train_biases, norms=train_norms, modules=head)
    for name, p in model.named_parameters():
        if any(name.startswith(u + ".") for u in unused):
            p.requires_grad_(False)
    return dict(method=method, **count_parameters(model, head_names=tuple(head)), adapted_layers=sorted(adapted))
