"""LoRA for linear layers, with PETRAS' learnable interpolation, and the model-level helpers.

LoRA (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models"; PETAH eq. 1) freezes a
pretrained weight W0 (d_out, d_in) and learns a low-rank update dW = B A, B (d_out, r), A (r, d_in):

    y = W0 x + b + (alpha / r) * B A dropout(x)                                    (LoRA)

A starts Kaiming-uniform and B at zero, so dW = 0 and the adapted layer equals the base one at step 0.
After training, W' = W0 + (alpha / r) B A is a plain weight again: inference costs one matmul.

PETRAS (SAM ViT-B for aerial vegetation segmentation) adds a trainable scalar a that interpolates
between the frozen path and the update:

    y = a * W0 x + b + (1 - a) * (alpha / r) * B A x                               (PETRAS)

a starts at 1 (output = base), and the layer still merges: W' = a W0 + (1 - a) (alpha / r) B A.

This file imports only torch and the standard library and can be copied alone into another project.
What is in it:
    LoRALinear          an nn.Linear with lora_A / lora_B beside weight / bias (checkpoint keys unchanged)
    qkv_rows            output rows of q / k / v inside a fused qkv projection (contiguous or per head)
    runs_to_rows        the rows of an adapter_config() (stored as [start, stop) runs) as a list
    add_lora            put adapters on the modules whose names match patterns
    mark_trainable      adapters (+ biases / norms / named modules) trainable, everything else frozen
    merge_adapters / unmerge_adapters / merge_and_unload / freeze_bn_stats / param_counts
    save_adapters / load_adapters / adapter_state_dict / base_fingerprint   adapter-only safetensors files
    write_safetensors / read_safetensors   the safetensors format with torch alone
The helpers are duck-typed on a small protocol (`adapter_names`, `merge`, `unmerge`, `to_base`,
`adapter_config`), so they also handle LoRAConv2d (conv_lora.py) and IA3Linear / IA3Conv2d (ia3.py). In all
three files the merge step is `merged_weight(mask)`: the weight with the update folded in, which merge() puts
in place and to_base() puts into a plain layer.
"""

import contextlib
import hashlib
import json
import math
import os
import re

import torch
import torch.nn as nn
import torch.nn.functional as F


class LoRALinear(nn.Linear):
    """nn.Linear plus a low-rank update: y = W0 x + b + (alpha / r) B A dropout(x).

    The layer keeps `weight` and `bias` where a checkpoint has them and adds `lora_A` (r, in_features)
    and `lora_B` (len(rows) or out_features, r) beside them, so a base checkpoint loads unchanged.

    Args:
        in_features, out_features, bias: as nn.Linear.
        r: rank of the update, 0 < r <= min(in_features, len(rows) or out_features).
        alpha: scale numerator; the update is multiplied by alpha / r. None means alpha = r (scale 1).
        dropout: dropout on the input of the low-rank path only.
        learn_interp: PETRAS' trainable scalar `lora_interp` (init 1.0):
            y = a W0 x + b + (1 - a) (alpha / r) B A x. With `rows`, a acts on those rows only.
        rows: output rows the update touches (LongTensor or list), e.g. `qkv_rows(...)` for q and v of
            a fused qkv. None adapts every row.
        device, dtype: as nn.Linear.
    """

    adapter_names = ("lora_A", "lora_B")  # the instance adds "lora_interp" when learn_interp=True

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, r: int,
                 alpha: float | None = None, dropout: float = 0.0, learn_interp: bool = False,
                 rows=None, device=None, dtype=None):
        super().__init__(in_features, out_features, bias, device=device, dtype=dtype)
        rows = None if rows is None else _as_rows(rows, out_features)
        _check_rank(r, in_features, out_features if rows is None else rows.numel())
        self.r = r
        self.alpha = float(r if alpha is None else alpha)
        self.scaling = self.alpha / r
        self.dropout_p = float(dropout)
        self.learn_interp = bool(learn_interp)
        if self.learn_interp:
            self.adapter_names = ("lora_A", "lora_B", "lora_interp")
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        # rows is configuration, not a weight: a non-persistent buffer, so it follows .to(device) but
        # never appears in state_dict (it is saved in the adapter file's metadata instead).
        self.register_buffer("lora_rows", rows, persistent=False)
        # While merged, weight holds W' and the original W0 waits here (restored bit for bit by unmerge).
        self.register_buffer("weight_orig", None, persistent=False)
        self.register_buffer("merge_mask", None, persistent=False)
        self.merged = False
        self.reset_adapter(device=device, dtype=dtype)

    @classmethod
    def from_module(cls, layer: nn.Linear, **cfg) -> "LoRALinear":
        """Adapter around an existing nn.Linear, re-using (not copying) its weight and bias Parameters."""
        # Built on the "meta" device (shapes only, no memory), then handed the layer's own Parameters.
        new = cls(layer.in_features, layer.out_features, bias=layer.bias is not None, device="meta",
                  dtype=layer.weight.dtype, **cfg)
        new.weight, new.bias = layer.weight, layer.bias
        new.reset_adapter(device=layer.weight.device, dtype=layer.weight.dtype)
        new.train(layer.training)
        return new

    def reset_adapter(self, device=None, dtype=None) -> None:
        """(Re)create the adapter: A Kaiming-uniform, B zeros (so dW = 0), interpolation a = 1."""
        if self.merged:
            raise RuntimeError("reset_adapter() on a merged layer: call unmerge() first")
        out_r = self.out_features if self.lora_rows is None else self.lora_rows.numel()
        self.lora_A = nn.Parameter(torch.empty(self.r, self.in_features, device=device, dtype=dtype))
        self.lora_B = nn.Parameter(torch.zeros(out_r, self.r, device=device, dtype=dtype))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # the same init nn.Linear gives its weight
        if self.learn_interp:
            self.lora_interp = nn.Parameter(torch.ones((), device=device, dtype=dtype))
        if self.lora_rows is not None and device is not None and torch.device(device).type != "meta":
            self.lora_rows = self.lora_rows.to(device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., in) -> (..., out)
        if self.merged:  # W' already holds the update: exactly one matmul
            return F.linear(x, self.weight, self.bias)
        z = F.linear(self.lora_dropout(x), self.lora_A)      # (..., r)
        if self.scaling != 1.0:  # scale the rank-r activations, not the (..., out) update: out / r times less work
            z = z * self.scaling
        delta = F.linear(z, self.lora_B)                     # (..., out) or (..., len(rows))
        if not self.learn_interp:
            y = F.linear(x, self.weight, self.bias)          # (..., out)
            return y + delta if self.lora_rows is None else y.index_add(-1, self.lora_rows, delta)
        a = self.lora_interp
        y = F.linear(x, self.weight)                          # (..., out), W0 x without bias
        if self.lora_rows is None:
            y = a * y + (1 - a) * delta
        else:  # scale the adapted rows by a, leave the others exactly W0 x
            in_rows = torch.zeros(self.out_features, device=y.device, dtype=y.dtype).index_fill(0, self.lora_rows, 1.0)
            y = (y * (1 + (a - 1) * in_rows)).index_add(-1, self.lora_rows, (1 - a) * delta)  # (..., out)
        return y if self.bias is None else y + self.bias

    # ---- merging ---------------------------------------------------------------------------------------
    @torch.no_grad()
    def merged_weight(self, mask: torch.Tensor | None = None) -> torch.Tensor:
        """W' = W0 + (alpha / r) B A (or the interpolated form), summed in fp32, cast to W0's dtype.

        mask (same shape as weight, True = keep) gives the mask-preserving merge (W0 + dW) * mask.
        """
        w0 = self.weight_orig if self.merged else self.weight        # (out, in)
        # Accumulate in fp32 (fp64 for fp64 weights) even for bf16 / fp16 weights: one rounding at the end.
        w = w0.to(torch.promote_types(w0.dtype, torch.float32), copy=True)  # a copy: never aliases W0
        dw = (self.lora_B.to(w.dtype) @ self.lora_A.to(w.dtype)) * self.scaling  # (out or len(rows), in)
        rows = slice(None) if self.lora_rows is None else self.lora_rows
        if self.learn_interp:
            a = self.lora_interp.to(w.dtype)
            w[rows] = a * w[rows] + (1 - a) * dw
        else:
            w[rows] += dw
        if mask is not None:
            if mask.shape != w.shape:
                raise ValueError(f"merge mask has shape {tuple(mask.shape)}, weight has {tuple(w.shape)}")
            w *= mask.to(device=w.device, dtype=w.dtype)
        return w.to(w0.dtype)

    @torch.no_grad()
    def merge(self, mask: torch.Tensor | None = None) -> None:
        """Fold the update into `weight` (one matmul afterwards). A second merge() does nothing."""
        if self.merged:
            return
        merged = self.merged_weight(mask)
        self.weight_orig = self.weight.data  # keep the very tensor, so unmerge() is bit-exact
        self.merge_mask = mask
        self.weight.data = merged            # same Parameter object: optimizers / hooks stay attached
        self.merged = True
        # autocast keeps its low-precision copy of a trainable weight for the whole `with` block, keyed by the
        # tensor: without this, forwards later in the block would still use the weight as it was.
        torch.clear_autocast_cache()

    @torch.no_grad()
    def unmerge(self) -> None:
        """Put the original weight back (bit for bit: it is the kept tensor, not W' - dW)."""
        if not self.merged:
            return
        self.weight.data = self.weight_orig
        self.weight_orig, self.merge_mask = None, None
        self.merged = False
        torch.clear_autocast_cache()  # as in merge()

    def to_base(self, mask: torch.Tensor | None = None) -> nn.Linear:
        """A new plain nn.Linear carrying the merged weight (this layer is left unchanged)."""
        base = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device="meta")
        base.weight = nn.Parameter(self.merged_weight(mask), requires_grad=self.weight.requires_grad)
        if self.bias is not None:
            base.bias = nn.Parameter(self.bias.detach().clone(), requires_grad=self.bias.requires_grad)
        base.train(self.training)
        return base

    def adapter_config(self) -> dict:
        return dict(type="lora", r=self.r, alpha=self.alpha, dropout=self.dropout_p,
                    learn_interp=self.learn_interp,
                    rows=None if self.lora_rows is None else _row_runs(self.lora_rows.tolist()),
                    in_features=self.in_features, out_features=self.out_features)

    # While merged, state_dict() stores the ORIGINAL weight, so saving and re-loading (into a merged or
    # an unmerged layer) never applies the update twice.
    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.merged:
            destination[prefix + "weight"] = self.weight_orig

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        merged, mask = self.merged, self.merge_mask
        self.unmerge()  # load W0, A, B into the unmerged layer, then merge the loaded values again
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        if merged:
            self.merge(mask)

    def extra_repr(self) -> str:
        rows = "" if self.lora_rows is None else f", rows={self.lora_rows.numel()}"
        interp = ", learn_interp=True" if self.learn_interp else ""
        return f"{super().extra_repr()}, r={self.r}, alpha={self.alpha:g}{rows}{interp}, merged={self.merged}"


# ---- the rank check and the rows of a fused qkv (used by LoRALinear above) ---------------------------------

def _check_rank(r, fan_in: int, fan_out: int) -> None:
    # The update B A has rank <= min(fan_in, fan_out); a larger r only adds parameters that cannot help.
    if isinstance(r, bool) or not isinstance(r, int):
        raise TypeError(f"LoRA rank r must be an int, got {r!r} ({type(r).__name__})")
    if r <= 0 or r > min(fan_in, fan_out):
        raise ValueError(
            f"LoRA rank r={r} is out of range for a layer with fan_in={fan_in}, fan_out={fan_out}: "
            f"use 0 < r <= {min(fan_in, fan_out)} (a rank above min(fan_in, fan_out) cannot add capacity)"
        )


def _as_rows(rows, out_features: int) -> torch.Tensor:
    # `rows` selects the output rows (features) an update touches, e.g. q and v inside a fused qkv.
    rows = torch.as_tensor(rows, dtype=torch.long).flatten().cpu()
    if rows.numel() == 0:
        raise ValueError("rows is empty: pass the output rows the adapter should touch, or rows=None for all")
    if rows.min() < 0 or rows.max() >= out_features:
        raise ValueError(f"rows must lie in [0, {out_features}), got min {rows.min()} and max {rows.max()}")
    if rows.unique().numel() != rows.numel():
        raise ValueError("rows contains duplicates: each output row may be adapted once")
    return rows


def _row_runs(rows: list[int]) -> list[list[int]]:
    """Rows as [start, stop) runs of consecutive rows, in their order: [0, 1, 4, 5, 6, 7] -> [[0, 2], [4, 8]].
    adapter_config() stores rows so, which keeps the adapter file's JSON header small."""
    runs = []
    for i in rows:
        if runs and runs[-1][1] == i:
            runs[-1][1] = i + 1
        else:
            runs.append([i, i + 1])
    return runs


def runs_to_rows(runs) -> list[int] | None:
    """The inverse of _row_runs, for the "rows" of an adapter_config(): [[0, 2], [4, 8]] -> [0, 1, 4, 5, 6, 7].
    Files written before rows were stored as runs hold the plain list of rows: returned as it is. None stays None."""
    if runs is None:
        return None
    return [i for a, b in runs for i in range(a, b)] if runs and isinstance(runs[0], list) else list(runs)


def qkv_rows(dim_q: int, dim_k: int, dim_v: int, num_heads: int, parts=("q", "v"),
             layout: str = "contiguous") -> torch.Tensor:
    """Output rows of the chosen parts of a fused qkv projection.

    Args:
        dim_q, dim_k, dim_v: total width of q, k and v over all heads (ViT-B: 768, 768, 768;
            EfficientFormer Meta3D: 8*32, 8*32, 8*128).
        num_heads: number of heads (only used by the per-head layout).
        parts: which of "q", "k", "v" to return (SAMed adapts q and v; (IA)^3 scales k and v).
        layout: "contiguous" for [q | k | v] (timm ViT, SAM), "per_head" for
            [q_0 k_0 v_0 | q_1 k_1 v_1 | ...] (EfficientFormer reshapes qkv to (B, N, heads, dq+dk+dv)).
    Returns:
        a sorted LongTensor of row indices into qkv.weight (dim_q + dim_k + dim_v, in).
    """
    sizes = {"q": dim_q, "k": dim_k, "v": dim_v}
    if isinstance(parts, str):
        parts = tuple(parts)
    bad = [p for p in parts if p not in sizes]
    if bad or not parts:
        raise ValueError(f"parts must be a non-empty subset of ('q', 'k', 'v'), got {parts!r}")
    if layout == "contiguous":
        starts = {"q": 0, "k": dim_q, "v": dim_q + dim_k}
        rows = [torch.arange(starts[p], starts[p] + sizes[p]) for p in ("q", "k", "v") if p in parts]
    elif layout == "per_head":
        if any(d % num_heads for d in sizes.values()):
            raise ValueError(f"per_head layout needs dim_q, dim_k, dim_v divisible by num_heads={num_heads}, "
                             f"got {dim_q}, {dim_k}, {dim_v}")
        hq, hk, hv = dim_q // num_heads, dim_k // num_heads, dim_v // num_heads
        per_head = hq + hk + hv  # one head's block [q_h k_h v_h]
        offsets = {"q": (0, hq), "k": (hq, hk), "v": (hq + hk, hv)}
        rows = [torch.arange(h * per_head + offsets[p][0], h * per_head + offsets[p][0] + offsets[p][1])
                for h in range(num_heads) for p in ("q", "k", "v") if p in parts]
    else:
        raise ValueError(f"layout must be 'contiguous' or 'per_head', got {layout!r}")
    return torch.cat(rows).sort().values


# ---- model-level helpers (duck-typed on the adapter protocol) ------------------------------------------

_NORM_TYPES = (nn.LayerNorm, nn.GroupNorm, nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)
_BN_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)


def _is_adapter(m: nn.Module) -> bool:
    return hasattr(m, "adapter_names") and callable(getattr(m, "to_base", None))


def _adapters(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(name, m) for name, m in model.named_modules() if _is_adapter(m)]


def _is_norm(m: nn.Module) -> bool:
    name = type(m).__name__
    return isinstance(m, _NORM_TYPES) or name.endswith("Norm") or name.endswith("Norm2d")


def _pattern_str(pattern) -> str:
    return f"'{pattern}'" if isinstance(pattern, str) else getattr(pattern, "__name__", repr(pattern))


def _matcher(pattern):
    if isinstance(pattern, str):
        try:
            regex = re.compile(pattern)
        except re.error as e:
            raise ValueError(f"pattern {pattern!r} is not a valid regular expression: {e}") from None
        return lambda name, module: regex.fullmatch(name) is not None
    if callable(pattern):
        return lambda name, module: bool(pattern(name, module))
    raise TypeError(f"a target pattern must be a regex string or a callable (name, module) -> bool, got {pattern!r}")


def _replace_modules(model: nn.Module, old_to_new: dict) -> None:
    # Swap modules wherever they sit (a module shared under two names is replaced under both).
    for name, module in list(model.named_modules(remove_duplicate=False)):
        if name and id(module) in old_to_new:
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name), child, old_to_new[id(module)])


def add_lora(model: nn.Module, targets: dict, *, layers: dict | None = None, **defaults) -> list[str]:
    """Replace the modules whose names match `targets` by adapters, in place.

    Args:
        model: any nn.Module (its own name "" is never matched: wrap a bare layer in a module).
        targets: {pattern: rank} or {pattern: dict(r=..., alpha=..., dropout=..., learn_interp=...,
            rows=...)}; a pattern is a regex (re.fullmatch on the qualified module name, e.g.
            r"blocks\\.\\d+\\.attn\\.(qkv|proj)") or a callable (name, module) -> bool.
        layers: base layer type -> adapter class, default {nn.Linear: LoRALinear}. Pass
            {nn.Linear: LoRALinear, nn.Conv2d: LoRAConv2d} to adapt convolutions too. Types match
            exactly (a subclass with its own forward is not silently replaced).
        **defaults: keyword arguments for every adapter (per-pattern values win).
    Returns:
        the names of the adapted modules, in model order.
    Nothing is changed unless every pattern matches and every adapter can be built.
    """
    layers = {nn.Linear: LoRALinear} if layers is None else dict(layers)
    if not targets:
        raise ValueError("add_lora: targets is empty; pass e.g. {r'.*attn\\.qkv': 8}")
    modules = dict(model.named_modules())
    plan = {}  # module name -> (pattern, kwargs)
    for pattern, cfg in targets.items():
        if isinstance(cfg, int) and not isinstance(cfg, bool):
            cfg = {"r": cfg}
        elif not isinstance(cfg, dict):
            raise TypeError(f"add_lora: target {_pattern_str(pattern)} maps to {cfg!r}; use a rank (int) or a dict")
        match = _matcher(pattern)
        hits = [name for name, m in modules.items() if name and match(name, m)]
        if not hits:
            examples = [n for n, m in modules.items() if type(m) in layers][:8] or list(modules)[1:9]
            raise ValueError(f"add_lora: pattern {_pattern_str(pattern)} matches no module (regex patterns are "
                             f"re.fullmatch-ed against names such as {examples})")
        for name in hits:
            if name in plan:
                raise ValueError(f"add_lora: module '{name}' is matched by both {_pattern_str(plan[name][0])} "
                                 f"and {_pattern_str(pattern)}; make the patterns disjoint")
            plan[name] = (pattern, {**defaults, **cfg})
    adapters = {}
    for name, (pattern, cfg) in plan.items():
        m = modules[name]
        if _is_adapter(m):
            raise ValueError(f"add_lora: module '{name}' already is an adapter ({type(m).__name__}); "
                             "call merge_and_unload() first or drop it from the targets")
        if type(m) not in layers:
            raise TypeError(f"add_lora: pattern {_pattern_str(pattern)} matched '{name}' of type "
                            f"{type(m).__name__}, which has no adapter; narrow the pattern or add the type to "
                            f"layers= (known: {[t.__name__ for t in layers]})")
        parent = modules[name.rpartition(".")[0]]
        if isinstance(parent, nn.MultiheadAttention):
            raise TypeError(f"add_lora: '{name}' belongs to nn.MultiheadAttention, whose forward reads "
                            "its weights directly and would bypass the adapter; adapt another layer")
        try:
            adapters[id(m)] = layers[type(m)].from_module(m, **cfg)
        except (ValueError, TypeError) as e:
            raise type(e)(f"add_lora: module '{name}' (pattern {_pattern_str(pattern)}): {e}") from None
    _replace_modules(model, adapters)
    return [name for name in modules if name in plan]


def mark_trainable(model: nn.Module, *, biases: bool = False, norms: bool = False,
                   modules=()) -> tuple[int, int]:
    """Freeze everything, then make trainable: adapter params, and by choice biases / norms / modules.

    Args:
        biases: every parameter named `bias` (BitFit-style).
        norms: every parameter of LayerNorm / BatchNorm / GroupNorm and of any module whose class name
            ends with "Norm" or "Norm2d" (e.g. LayerNorm2d).
        modules: module-name prefixes whose parameters train too, e.g. ("head", "head_dist").
    Returns:
        (trainable, total) parameter counts.
    """
    if isinstance(modules, str):
        modules = (modules,)
    for p in model.parameters():
        p.requires_grad_(False)
    for m in model.modules():
        if _is_adapter(m):
            for n in m.adapter_names:
                getattr(m, n).requires_grad_(True)
        if norms and _is_norm(m):
            for p in m.parameters(recurse=False):
                p.requires_grad_(True)
    named = list(model.named_parameters())
    if biases:
        for name, p in named:
            if name.rpartition(".")[2] == "bias":
                p.requires_grad_(True)
    for prefix in modules:
        hits = [p for name, p in named if name == prefix or name.startswith(prefix + ".")]
        if not hits:
            raise ValueError(f"mark_trainable: no parameter lives under module '{prefix}'; "
                             f"top-level modules are {[n for n, _ in model.named_children()]}")
        for p in hits:
            p.requires_grad_(True)
    counts = param_counts(model)
    return counts["trainable"], counts["total"]


def param_counts(model: nn.Module) -> dict:
    """Parameter counts: trainable, total, and adapter_tensors (the adapters' own tensors alone: lora_A, lora_B,
    the PETRAS interpolation). Not the paper's #Params, which also counts whatever else trains outside the task
    head (methods.count_parameters' `adapter_params`)."""
    adapter_tensors = sum(getattr(m, n).numel() for _, m in _adapters(model) for n in m.adapter_names)
    params = list(model.parameters())
    return dict(trainable=sum(p.numel() for p in params if p.requires_grad),
                total=sum(p.numel() for p in params), adapter_tensors=adapter_tensors)


def freeze_bn_stats(model: nn.Module) -> int:
    """Put BatchNorms whose affine params are frozen in eval mode (call after model.train()).

    Their running statistics then stay the base model's. Returns how many were switched.
    """
    n = 0
    for m in model.modules():
        if isinstance(m, _BN_TYPES) and not any(p.requires_grad for p in m.parameters(recurse=False)):
            m.eval()
            n += 1
    return n


def merge_adapters(model: nn.Module, masks: dict | None = None) -> None:
    """merge() every adapter; masks {"<module>.weight": bool Tensor} give mask-preserving merges."""
    masks = masks or {}
    for name, m in _adapters(model):
        m.merge(masks.get(f"{name}.weight"))


def unmerge_adapters(model: nn.Module) -> None:
    for _, m in _adapters(model):
        m.unmerge()


def merge_and_unload(model: nn.Module, masks: dict | None = None) -> nn.Module:
    """Replace every adapter by its plain merged layer, in place; the state_dict then has exactly the
    base model's keys. masks {"<module>.weight": bool Tensor} give (W0 + dW) * mask. Returns model."""
    masks = masks or {}
    if _is_adapter(model):
        return model.to_base(masks.get("weight"))
    _replace_modules(model, {id(m): m.to_base(masks.get(f"{name}.weight")) for name, m in _adapters(model)})
    return model


# ---- adapter-only checkpoints ----------------------------------------------------------------------------

def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """What a fine-tune changed: adapter params, every other trainable param (head, norms, biases) and
    the running statistics of BatchNorms whose params train. Keys are the model's state_dict keys."""
    keep = set()
    for name, m in model.named_modules():
        prefix = f"{name}." if name else ""
        if _is_adapter(m):
            keep.update(prefix + n for n in m.adapter_names)
        if isinstance(m, _BN_TYPES) and any(p.requires_grad for p in m.parameters(recurse=False)):
            keep.update(prefix + n for n, b in m.named_buffers(recurse=False) if b is not None)
    keep.update(name for name, p in model.named_parameters() if p.requires_grad)
    return {k: v.detach() for k, v in model.state_dict().items() if k in keep}


def _tensor_bytes(t: torch.Tensor) -> bytearray:
    # The raw bytes of a tensor, with torch alone: view them as uint8 and copy into a bytearray that a
    # uint8 tensor shares (torch.frombuffer), in the machine's byte order.
    t = t.detach().cpu().contiguous().reshape(-1)
    buf = bytearray(t.numel() * t.element_size())
    if buf:
        torch.frombuffer(buf, dtype=torch.uint8).copy_(t.view(torch.uint8))
    return buf


def base_fingerprint(model: nn.Module, exclude=frozenset()) -> str:
    """sha256 over the names, dtypes, shapes and bytes of the state_dict entries not in `exclude`.

    save_adapters excludes what it saves, so the hash covers the frozen base the adapters were trained
    on (stored weights are the original ones even while merged).
    """
    h = hashlib.sha256()
    for k, t in model.state_dict().items():
        if k in exclude:
            continue
        h.update(f"{k}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(_tensor_bytes(t))
    return h.hexdigest()


# safetensors (https://github.com/huggingface/safetensors) is a tiny format: an 8-byte little-endian
# header length N, N bytes of JSON {name: {dtype, shape, data_offsets: [begin, end]}, "__metadata__":
# {str: str}}, then the raw little-endian tensor bytes. Writing it by hand keeps this file torch-only.
_ST_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
              torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
              torch.uint8: "U8", torch.bool: "BOOL"}


def write_safetensors(tensors: dict, path, metadata: dict[str, str] | None = None) -> None:
    """Write tensors (+ str metadata) as safetensors to `path` or to an open binary file object.
    A path is opened like any file (mode 0666 minus the umask), unlike safetensors.torch.save_file (0600)."""
    if torch.tensor([1], dtype=torch.int16).view(torch.uint8)[0] != 1:
        raise RuntimeError("the safetensors writer assumes a little-endian machine")
    header, blobs, offset = {"__metadata__": dict(metadata or {})}, [], 0
    for k, t in tensors.items():
        if t.dtype not in _ST_DTYPES:
            raise TypeError(f"cannot store {k} of dtype {t.dtype} in safetensors")
        b = _tensor_bytes(t)
        header[k] = {"dtype": _ST_DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + len(b)]}
        blobs.append(b)
        offset += len(b)
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * (-len(h) % 8)  # pad the header so the data starts 8-byte aligned
    with (open(path, "wb") if not hasattr(path, "write") else contextlib.nullcontext(path)) as f:
        for chunk in (len(h).to_bytes(8, "little"), h, *blobs):
            f.write(chunk)


def read_safetensors(path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Read any safetensors file into (CPU tensors, metadata) with torch alone.

    A file that is not safetensors, or is truncated or damaged, raises ValueError naming the file and what is
    wrong (empty, too short, a header length beyond the file, a header that is not JSON, tensor bytes past the
    end, a torch.save / zip file); a missing file raises FileNotFoundError.
    """
    size = os.path.getsize(path)  # FileNotFoundError names the path

    def bad(why):
        return ValueError(f"{path} is not a readable safetensors file: {why}")

    if size < 8:
        raise bad(f"{'it is empty (0 bytes)' if size == 0 else f'only {size} bytes'}; the file is damaged or was "
                  "not completely written")
    with open(path, "rb") as f:
        first = f.read(8)
        n = int.from_bytes(first, "little")
        if n > size - 8:
            # only now look for a zip (torch.save) / pickle signature: a valid header length such as 0x3e80 also
            # starts with the byte 0x80
            if first[:2] == b"PK" or first[:1] == b"\x80":
                raise bad("it is a torch.save / pickle file (.pt / .pth), not safetensors; adapters are read from "
                          "files written by save_adapters()")
            raise bad(f"its first 8 bytes give a header of {n:,} bytes but the file has {size:,}; it is truncated "
                      "or not safetensors")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise bad(f"its {n}-byte header is not JSON ({e}); the file is damaged") from None
        body = bytearray(f.read())
    if not isinstance(header, dict):
        raise bad("its header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    dtypes = {v: k for k, v in _ST_DTYPES.items()}
    tensors = {}
    for k, info in header.items():
        try:
            begin, end = (int(v) for v in info["data_offsets"])
            dtype, shape = dtypes[info["dtype"]], [int(d) for d in info["shape"]]
        except (KeyError, TypeError, ValueError):
            raise bad(f"the header entry of {k!r} is damaged or has an unknown dtype: {str(info)[:200]}") from None
        if not 0 <= begin <= end <= len(body):
            raise bad(f"tensor {k!r} needs bytes {begin:,}..{end:,} of the data but there are {len(body):,}: the file "
                      "is truncated")
        if math.prod(shape) * torch.empty(0, dtype=dtype).element_size() != end - begin:
            raise bad(f"tensor {k!r}: shape {shape} of {info['dtype']} does not fill its {end - begin} bytes")
        raw = torch.frombuffer(body, dtype=torch.uint8, count=end - begin, offset=begin) if end > begin \
            else torch.empty(0, dtype=torch.uint8)
        tensors[k] = raw.clone().view(dtype).reshape(shape)
    return tensors, metadata


def save_adapters(model: nn.Module, path, *, metadata: dict | None = None, allow_no_adapters: bool = False) -> None:
    """Save adapter_state_dict(model) as safetensors, with metadata: every adapter's config, the other
    trainable keys, the base fingerprint and `metadata` (any JSON-able dict, returned by load_adapters).
    `path`: a file name or an open binary file object.

    A model without adapter layers whose parameters all train (add_lora / mark_trainable never ran) is refused:
    the file would be a full copy of the model. allow_no_adapters=True saves whatever trains anyway (a full or a
    linear-probe fine-tune's checkpoint)."""
    if not allow_no_adapters and not _adapters(model) and all(p.requires_grad for p in model.parameters()):
        raise ValueError("save_adapters: the model has no adapter layers and nothing is frozen, so the file would "
                         "hold every parameter: add adapters first (add_lora / add_ia3, then mark_trainable), or "
                         "pass allow_no_adapters=True to save the trainable parameters of a full fine-tune")
    tensors = adapter_state_dict(model)
    configs = {name: m.adapter_config() for name, m in _adapters(model)}
    adapter_keys = {f"{name}.{n}" for name, m in _adapters(model) for n in m.adapter_names}
    try:
        user = json.dumps(metadata or {})
    except TypeError as e:
        raise TypeError(f"save_adapters: metadata must be JSON-serialisable: {e}") from None
    write_safetensors(tensors, path, {
        "format": "pt",
        "adapters": json.dumps(configs),
        "trainable": json.dumps([k for k in tensors if k not in adapter_keys]),
        "fingerprint": base_fingerprint(model, exclude=set(tensors)),
        "user": user,
    })


def _short(v):
    return f"[{len(v)} values]" if isinstance(v, list) and len(v) > 8 else v


def load_adapters(model: nn.Module, path, *, check_fingerprint: bool = True) -> dict:
    """Load a save_adapters() file into a model that already has the same adapters (add_lora first).

    Every mismatch is collected and reported at once: adapter modules missing or unexpected, config
    differences (type, rank, alpha, rows, ...), tensors with no place or another shape in the model,
    and a base fingerprint other than the one the adapters were trained on (check_fingerprint=False
    skips that check, for a deliberate transfer to another base). Returns the user metadata.
    """
    tensors, meta = read_safetensors(path)
    if "adapters" not in meta:
        raise ValueError(f"load_adapters: {path} has no adapter metadata; was it written by save_adapters()?")
    try:
        saved = json.loads(meta["adapters"])
    except json.JSONDecodeError as e:
        raise ValueError(f"load_adapters: {path}: the adapter metadata is damaged ({e})") from None
    have = {name: m.adapter_config() for name, m in _adapters(model)}
    problems = []
    if sorted(set(saved) - set(have)):
        problems.append(f"adapter modules in the file but not in the model: {sorted(set(saved) - set(have))}")
    if sorted(set(have) - set(saved)):
        problems.append(f"adapter modules in the model but not in the file: {sorted(set(have) - set(saved))}")
    for name in sorted(set(saved) & set(have)):
        rows = saved[name].get("rows")
        if rows and isinstance(rows[0], int):  # files written before rows were stored as runs
            saved[name]["rows"] = _row_runs(rows)
        for key in sorted(set(saved[name]) | set(have[name])):
            if key != "dropout" and saved[name].get(key) != have[name].get(key):
                problems.append(f"{name}: {key} is {_short(saved[name].get(key))} in the file but "
                                f"{_short(have[name].get(key))} in the model")
    state = model.state_dict()
    for k, t in tensors.items():
        if k not in state:
            problems.append(f"tensor {k} in the file has no place in the model")
        elif tuple(state[k].shape) != tuple(t.shape):
            problems.append(f"tensor {k} has shape {tuple(t.shape)} in the file but "
                            f"{tuple(state[k].shape)} in the model")
    if check_fingerprint and meta.get("fingerprint") != base_fingerprint(model, exclude=set(tensors)):
        problems.append("the base weights differ from those the adapters were trained on (fingerprint mismatch; "
                        "frozen BatchNorm running statistics count as base, see freeze_bn_stats); load the same "
                        "base checkpoint, or pass check_fingerprint=False for a deliberate transfer")
    if problems:
        raise ValueError(f"load_adapters: {path} does not fit this model:\n  - " + "\n  - ".join(problems))
    model.load_state_dict(tensors, strict=False)
    return json.loads(meta.get("user", "{}"))
