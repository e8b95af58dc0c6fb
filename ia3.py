"""(IA)^3: learned rescaling vectors (Liu et al. 2022, "Few-Shot Parameter-Efficient Fine-Tuning is
Better and Cheaper than In-Context Learning"), one of the two adapters PETRAS evaluates on SAM ViT-B.

(IA)^3 ("Infused Adapter by Inhibiting and Amplifying Inner Activations") learns a vector l, initialised
to ones, that rescales an activation element-wise. On a linear layer y = W x + b there are two places:

    mode="out":  y = l * (W x + b)      l (d_out,)  rescales outputs, e.g. keys and values of attention
    mode="in":   y = W (l * x) + b      l (d_in,)   rescales inputs, e.g. the MLP's intermediate activation
                                                    as seen by fc2 (= the paper's l_ff * gamma(W1 x))

Both are exact weight edits, so merge() folds them away (merged_weight() and merged_bias()):

    out:  W' = diag(l) W,  b' = l * b          in:  W' = W diag(l),  b' = b

For a fused qkv (timm ViT, SAM) mode="out" with `rows` scales only the k and v rows. Convolutions work
the same way per channel (IA3Conv2d, any kernel size): out-channel scaling multiplies kernel rows; in-
channel scaling multiplies kernel columns (every padding mode scales along, so the merge stays exact).

This file imports only torch and can be copied alone into another project. lora.py's model helpers
(mark_trainable, merge_and_unload, save_adapters, ...) handle these layers too; add_ia3 injects them.
"""

import re

import torch
import torch.nn as nn
import torch.nn.functional as F


def _row_runs(rows: list[int]) -> list[list[int]]:
    """Rows as [start, stop) runs of consecutive rows, in their order: range(768, 2304) -> [[768, 2304]].
    adapter_config() stores rows so, which keeps the adapter file's JSON header small (the same helper as
    lora.py's, copied so that this file stands alone; header sizes: see BENCHMARKS.md, "Other findings")."""
    runs = []
    for i in rows:
        if runs and runs[-1][1] == i:
            runs[-1][1] = i + 1
        else:
            runs.append([i, i + 1])
    return runs


class _IA3Base:
    """What IA3Linear and IA3Conv2d share: the vector, merge / unmerge, state_dict handling.

    Subclasses define `_in_dim`, `_out_dim`, `_base_forward(x, weight, bias)` and `_in_scale(l)`
    (the (c_out, c_in/g, ...) factor that input scaling multiplies into the weight).
    """

    adapter_names = ("ia3_l",)

    def _init_ia3(self, mode: str, rows, device, dtype) -> None:
        if mode not in ("out", "in"):
            raise ValueError(f"(IA)^3 mode must be 'out' (scale outputs) or 'in' (scale inputs), got {mode!r}")
        if rows is not None:
            if mode != "out":
                raise ValueError("(IA)^3 rows selects output rows: use it with mode='out' only")
            rows = torch.as_tensor(rows, dtype=torch.long).flatten()
            if rows.numel() == 0 or rows.min() < 0 or rows.max() >= self._out_dim:
                raise ValueError(f"(IA)^3 rows must be non-empty and lie in [0, {self._out_dim})")
            if rows.unique().numel() != rows.numel():
                raise ValueError("(IA)^3 rows contains duplicates")
        self.mode = mode
        self.register_buffer("ia3_rows", rows, persistent=False)  # configuration: kept in adapter metadata
        self.register_buffer("weight_orig", None, persistent=False)
        self.register_buffer("bias_orig", None, persistent=False)
        self.register_buffer("merge_mask", None, persistent=False)
        self.merged = False
        self.reset_adapter(device=device, dtype=dtype)

    def reset_adapter(self, device=None, dtype=None) -> None:
        """(Re)create l = ones: the adapted layer equals the base one."""
        if self.merged:
            raise RuntimeError("reset_adapter() on a merged layer: call unmerge() first")
        n = self._in_dim if self.mode == "in" else (self._out_dim if self.ia3_rows is None else self.ia3_rows.numel())
        self.ia3_l = nn.Parameter(torch.ones(n, device=device, dtype=dtype))
        if self.ia3_rows is not None and device is not None and torch.device(device).type != "meta":
            self.ia3_rows = self.ia3_rows.to(device)

    def _out_scale(self) -> torch.Tensor:
        # (d_out,) factor on the outputs: l on the chosen rows, 1 elsewhere
        if self.ia3_rows is None:
            return self.ia3_l
        ones = torch.ones(self._out_dim, device=self.ia3_l.device, dtype=self.ia3_l.dtype)
        return ones.index_copy(0, self.ia3_rows, self.ia3_l)

    @torch.no_grad()
    def merged_weight(self, mask: torch.Tensor | None = None) -> torch.Tensor:
        """W' with l folded in (rows scaled for mode="out", columns for "in"), computed in fp32 (fp64 for fp64)
        and cast to W0's dtype; mask (same shape as weight, True = keep) gives W' * mask."""
        w0 = self.weight_orig if self.merged else self.weight
        acc = torch.promote_types(w0.dtype, torch.float32)
        w = w0.to(acc)
        if self.mode == "out":
            s = self._out_scale().to(acc)                       # (d_out,)
            w = w * s.view(-1, *[1] * (w.dim() - 1))            # W' = diag(l) W: scale kernel rows
        else:
            w = w * self._in_scale(self.ia3_l.to(acc))          # W' = W diag(l): scale kernel columns
        if mask is not None:
            if mask.shape != w.shape:
                raise ValueError(f"merge mask has shape {tuple(mask.shape)}, weight has {tuple(w.shape)}")
            w = w * mask.to(device=w.device, dtype=w.dtype)
        return w.to(w0.dtype)

    @torch.no_grad()
    def merged_bias(self) -> torch.Tensor | None:
        """b' = l * b for mode="out" (computed as merged_weight is), b unchanged for "in"; None without a bias."""
        b0 = self.bias_orig if self.merged else self.bias
        if b0 is None:
            return None
        if self.mode == "in":
            return b0.detach().clone()
        acc = torch.promote_types(b0.dtype, torch.float32)
        return (b0.to(acc) * self._out_scale().to(acc)).to(b0.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:  # one F.linear / F.conv2d
            return self._base_forward(x, self.weight, self.bias)
        if self.mode == "in":
            shape = (-1,) if isinstance(self, nn.Linear) else (-1, 1, 1)   # (..., d_in) or (B, C, H, W)
            return self._base_forward(x * self.ia3_l.view(shape), self.weight, self.bias)
        y = self._base_forward(x, self.weight, self.bias)
        s = self._out_scale()
        return y * (s if isinstance(self, nn.Linear) else s.view(-1, 1, 1))

    @torch.no_grad()
    def merge(self, mask: torch.Tensor | None = None) -> None:
        """Fold l into weight (and bias for mode='out'). A second merge() does nothing."""
        if self.merged:
            return
        w, b = self.merged_weight(mask), self.merged_bias()
        self.weight_orig, self.merge_mask = self.weight.data, mask  # the very tensors: exact unmerge
        self.weight.data = w
        if self.bias is not None:
            self.bias_orig = self.bias.data
            self.bias.data = b
        self.merged = True
        # autocast keeps its low-precision copy of a trainable weight for the whole `with` block, keyed by the
        # tensor: without this, forwards later in the block would still use the weight as it was.
        torch.clear_autocast_cache()

    @torch.no_grad()
    def unmerge(self) -> None:
        if not self.merged:
            return
        self.weight.data = self.weight_orig
        if self.bias is not None:
            self.bias.data = self.bias_orig
        self.weight_orig = self.bias_orig = self.merge_mask = None
        self.merged = False
        torch.clear_autocast_cache()  # as in merge()

    def adapter_config(self) -> dict:
        rows = None if self.ia3_rows is None else _row_runs(self.ia3_rows.tolist())
        return dict(type="ia3", mode=self.mode, rows=rows,
                    layer=type(self).__name__, in_dim=self._in_dim, out_dim=self._out_dim)

    # While merged, state_dict() stores the ORIGINAL weight and bias: loading never scales twice.
    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.merged:
            destination[prefix + "weight"] = self.weight_orig
            if self.bias is not None:
                destination[prefix + "bias"] = self.bias_orig

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        merged, mask = self.merged, self.merge_mask
        self.unmerge()
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        if merged:
            self.merge(mask)

    def extra_repr(self) -> str:
        rows = "" if self.ia3_rows is None else f", rows={self.ia3_rows.numel()}"
        return f"{super().extra_repr()}, ia3_mode={self.mode}{rows}, merged={self.merged}"


class IA3Linear(_IA3Base, nn.Linear):
    """nn.Linear with an (IA)^3 vector: mode="out" y = l * (W x + b), mode="in" y = W (l * x) + b.

    Args:
        in_features, out_features, bias: as nn.Linear.
        mode: "out" (l has out_features or len(rows) entries) or "in" (l has in_features entries).
        rows: with mode="out", the output rows to scale (e.g. k and v of a fused qkv); None = all.
        device, dtype: as nn.Linear.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, mode: str = "out",
                 rows=None, device=None, dtype=None):
        nn.Linear.__init__(self, in_features, out_features, bias, device=device, dtype=dtype)
        self._in_dim, self._out_dim = in_features, out_features
        self._init_ia3(mode, rows, device, dtype)

    @classmethod
    def from_module(cls, layer: nn.Linear, **cfg) -> "IA3Linear":
        """Adapter around an existing nn.Linear, re-using its weight and bias Parameters."""
        new = cls(layer.in_features, layer.out_features, bias=layer.bias is not None, device="meta",
                  dtype=layer.weight.dtype, **cfg)
        new.weight, new.bias = layer.weight, layer.bias
        new.reset_adapter(device=layer.weight.device, dtype=layer.weight.dtype)
        new.train(layer.training)
        return new

    def _base_forward(self, x, weight, bias):  # (..., in) -> (..., out)
        return F.linear(x, weight, bias)

    def _in_scale(self, l):  # W (out, in) * l[None, :]
        return l.view(1, -1)

    def to_base(self, mask: torch.Tensor | None = None) -> nn.Linear:
        """A new plain nn.Linear with l folded in (this layer is left unchanged)."""
        base = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device="meta")
        base.weight = nn.Parameter(self.merged_weight(mask), requires_grad=self.weight.requires_grad)
        if self.bias is not None:
            base.bias = nn.Parameter(self.merged_bias(), requires_grad=self.bias.requires_grad)
        base.train(self.training)
        return base


class IA3Conv2d(_IA3Base, nn.Conv2d):
    """nn.Conv2d with an (IA)^3 vector over channels: mode="out" scales output channels (and bias),
    mode="in" scales input channels. Any kernel size, stride, padding mode, dilation and groups.

    Args:
        in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias, padding_mode:
            as nn.Conv2d.
        mode: "out" or "in", as IA3Linear.
        rows: with mode="out", the output channels to scale; None = all.
        device, dtype: as nn.Conv2d.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0, dilation=1,
                 groups: int = 1, bias: bool = True, padding_mode: str = "zeros", *, mode: str = "out",
                 rows=None, device=None, dtype=None):
        nn.Conv2d.__init__(self, in_channels, out_channels, kernel_size, stride, padding, dilation, groups,
                           bias, padding_mode, device=device, dtype=dtype)
        self._in_dim, self._out_dim = in_channels, out_channels
        self._init_ia3(mode, rows, device, dtype)

    @classmethod
    def from_module(cls, layer: nn.Conv2d, **cfg) -> "IA3Conv2d":
        """Adapter around an existing nn.Conv2d, re-using its weight and bias Parameters."""
        new = cls(layer.in_channels, layer.out_channels, layer.kernel_size, stride=layer.stride,
                  padding=layer.padding, dilation=layer.dilation, groups=layer.groups,
                  bias=layer.bias is not None, padding_mode=layer.padding_mode, device="meta",
                  dtype=layer.weight.dtype, **cfg)
        new.weight, new.bias = layer.weight, layer.bias
        new.reset_adapter(device=layer.weight.device, dtype=layer.weight.dtype)
        new.train(layer.training)
        return new

    def _base_forward(self, x, weight, bias):  # (B, c_in, H, W) -> (B, c_out, H', W')
        return self._conv_forward(x, weight, bias)

    def _in_scale(self, l):
        # Kernel (c_out, c_in/g, kh, kw): output channel o of group i reads input channels
        # i*c_in/g ... (i+1)*c_in/g - 1, so its column j is scaled by l[i*c_in/g + j].
        g, cin_g, cout_g = self.groups, self.in_channels // self.groups, self.out_channels // self.groups
        return l.view(g, 1, cin_g).expand(g, cout_g, cin_g).reshape(self.out_channels, cin_g, 1, 1)

    def to_base(self, mask: torch.Tensor | None = None) -> nn.Conv2d:
        """A new plain nn.Conv2d with l folded in (this layer is left unchanged)."""
        base = nn.Conv2d(self.in_channels, self.out_channels, self.kernel_size, self.stride, self.padding,
                         self.dilation, self.groups, self.bias is not None, self.padding_mode, device="meta")
        base.weight = nn.Parameter(self.merged_weight(mask), requires_grad=self.weight.requires_grad)
        if self.bias is not None:
            base.bias = nn.Parameter(self.merged_bias(), requires_grad=self.bias.requires_grad)
        base.train(self.training)
        return base


def add_ia3(model: nn.Module, targets: dict, *, layers: dict | None = None, **defaults) -> list[str]:
    """Replace the modules whose names match `targets` by (IA)^3 layers, in place.

    Args:
        targets: {pattern: "out" | "in" | dict(mode=..., rows=...)}; a pattern is a regex
            (re.fullmatch on the module name) or a callable (name, module) -> bool.
        layers: base type -> adapter class, default {nn.Linear: IA3Linear, nn.Conv2d: IA3Conv2d}.
        **defaults: keyword arguments for every adapter (per-pattern values win).
    Returns:
        the adapted module names. (A small copy of lora.add_lora's loop, so this file stands alone.)
    """
    layers = {nn.Linear: IA3Linear, nn.Conv2d: IA3Conv2d} if layers is None else dict(layers)
    if not targets:
        raise ValueError("add_ia3: targets is empty; pass e.g. {r'.*mlp\\.fc2': 'in'}")
    modules = dict(model.named_modules())
    plan = {}
    for pattern, cfg in targets.items():
        cfg = {"mode": cfg} if isinstance(cfg, str) else dict(cfg)
        if isinstance(pattern, str):
            regex = re.compile(pattern)
            hits = [n for n in modules if n and regex.fullmatch(n)]
        elif callable(pattern):
            hits = [n for n, m in modules.items() if n and pattern(n, m)]
        else:
            raise TypeError(f"add_ia3: a pattern must be a regex string or a callable, got {pattern!r}")
        if not hits:
            examples = [n for n, m in modules.items() if type(m) in layers][:8]
            raise ValueError(f"add_ia3: pattern {pattern!r} matches no module (names look like {examples})")
        for n in hits:
            if n in plan:
                raise ValueError(f"add_ia3: module '{n}' is matched by two patterns; make them disjoint")
            plan[n] = {**defaults, **cfg}
    new = {}
    for n, cfg in plan.items():
        m = modules[n]
        if type(m) not in layers:
            raise TypeError(f"add_ia3: '{n}' is a {type(m).__name__}, which has no (IA)^3 layer; narrow the "
                            f"pattern or add the type to layers= (known: {[t.__name__ for t in layers]})")
        try:
            new[id(m)] = layers[type(m)].from_module(m, **cfg)
        except (ValueError, TypeError) as e:
            raise type(e)(f"add_ia3: module '{n}': {e}") from None
    for name, module in list(model.named_modules(remove_duplicate=False)):
        if name and id(module) in new:
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, new[id(module)])
    return [n for n in modules if n in plan]
