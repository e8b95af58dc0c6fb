"""Convolutional LoRA (PETAH eq. 2), and folding a BatchNorm into a (merged) convolution.

PETAH (Parameter Efficient Task Adaptation for Hybrid Transformers) adapts every convolution of a
hybrid backbone with a low-rank update. A conv kernel W0 (c_out, c_in/g, kh, kw) is seen as the matrix
W0 (c_out, c_in/g * kh * kw); LoRA factors its update like a linear layer's (eq. 1), and the product is
reshaped back into a kernel:

    A (r, c_in/g * kh * kw),  B (c_out, r),  dW = (B @ A).view(c_out, c_in/g, kh, kw)
    y = conv(x, W0) + b + (alpha / r) * conv(x, dW)                                    (PETAH eq. 2)

It costs r * (c_out + c_in/g * kh * kw) parameters, the count the paper's #Params column uses.

The factored path never forms dW: conv(x, B A) factors into two cheap convolutions: A, viewed as r kernels of
shape (c_in/g, kh, kw), is a kh x kw conv with r output channels (the base conv's stride, padding,
padding_mode, dilation); B is then a 1x1 conv from r channels to c_out. With groups g, every group
sees the same A (the flattened-matrix formulation shares A's columns across groups), so A is tiled g
times into a grouped conv with g*r channels, and B's rows of group i read that group's r channels.

That is not always the cheaper way: the other is to form the kernel W0 + (alpha / r) B A (a tiny matmul)
and run ONE conv. path="auto" (the default) takes, per layer, the path with less extra work over the frozen
conv (LoRAConv2d.kernel_path_is_cheaper holds the cost model): the one-conv path on convs with few channels,
as in the stem and the first stage of a hybrid network, the two-conv path elsewhere. Both paths compute the
same function and the same gradients (tests/test_conv_lora.py). The factored path is kept wherever the
kernel path would not be the same function: with dropout on the low-rank input (dropout > 0), and under
autocast (W0 + dW rounded to bf16 / fp16 before the conv would lose most of a small dW).

After training, merge() adds dW into the kernel: inference is one conv, as fast as the base layer.
PETRAS' learnable interpolation y = a conv(x, W0) + b + (1 - a) (alpha / r) conv(x, dW) is optional.

This file imports only torch and can be copied alone into another project (lora.py's model helpers
handle LoRAConv2d too: add_lora(model, targets, layers={nn.Linear: LoRALinear, nn.Conv2d: LoRAConv2d})).
"""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


def _check_rank(r, fan_in: int, fan_out: int) -> None:
    if isinstance(r, bool) or not isinstance(r, int):
        raise TypeError(f"conv LoRA rank r must be an int, got {r!r} ({type(r).__name__})")
    if r <= 0 or r > min(fan_in, fan_out):
        raise ValueError(
            f"conv LoRA rank r={r} is out of range for a conv with fan_in=c_in/groups*kh*kw={fan_in}, "
            f"fan_out=c_out={fan_out}: use 0 < r <= {min(fan_in, fan_out)}"
        )


PATHS = ("auto", "factored", "kernel")


class LoRAConv2d(nn.Conv2d):
    """nn.Conv2d plus a low-rank kernel update: y = conv(x, W0) + b + (alpha / r) conv(dropout(x), B A).

    `weight` and `bias` stay where a checkpoint has them; `lora_A` (r, c_in/groups*kh*kw) and
    `lora_B` (c_out, r) are added beside them.

    Args:
        in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias, padding_mode:
            as nn.Conv2d; all of them are honoured by the low-rank path ('same' padding, reflect /
            replicate / circular padding, dilation, groups up to depthwise).
        r: rank of the update, 0 < r <= min(c_in/groups*kh*kw, c_out).
        alpha: the update is multiplied by alpha / r; None means alpha = r (scale 1).
        dropout: dropout on the input of the low-rank path only.
        learn_interp: PETRAS' trainable scalar `lora_interp` (init 1.0):
            y = a conv(x, W0) + b + (1 - a) (alpha / r) conv(x, dW).
        path: how the unmerged forward computes the update: "factored" (two convs through A and B),
            "kernel" (one conv with W0 + dW), or "auto" (the cheaper of the two for this layer's
            shape, see kernel_path_is_cheaper; factored with dropout or under autocast).
        device, dtype: as nn.Conv2d.
    """

    adapter_names = ("lora_A", "lora_B")  # the instance adds "lora_interp" when learn_interp=True
    # The cost model's one machine-dependent constant (kernel_path_is_cheaper): multiply-adds per element of the
    # factored path's full-size memory traffic. Fitted to per-layer timings of bench/bench_conv_paths.py on a CPU;
    # see BENCHMARKS.md, "the cheaper of the two conv-LoRA forward paths per layer".
    TRAFFIC_MACS = 60

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0, dilation=1,
                 groups: int = 1, bias: bool = True, padding_mode: str = "zeros", *, r: int,
                 alpha: float | None = None, dropout: float = 0.0, learn_interp: bool = False,
                 path: str = "auto", device=None, dtype=None):
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias,
                         padding_mode, device=device, dtype=dtype)
        kh, kw = self.kernel_size
        self.fan_in = in_channels // groups * kh * kw  # columns of the flattened kernel
        _check_rank(r, self.fan_in, out_channels)
        self.r = r
        self.alpha = float(r if alpha is None else alpha)
        self.scaling = self.alpha / r
        self.dropout_p = float(dropout)
        self.learn_interp = bool(learn_interp)
        if self.learn_interp:
            self.adapter_names = ("lora_A", "lora_B", "lora_interp")
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        if path not in PATHS:
            raise ValueError(f"conv LoRA path must be one of {PATHS}, got {path!r}")
        if path == "kernel" and dropout > 0:
            raise ValueError("path='kernel' cannot apply dropout to the low-rank input (only the factored path has "
                             "one): use path='auto' or 'factored' with dropout > 0, or dropout=0")
        self.path = path
        # While merged, weight holds W' and the original W0 waits here (restored bit for bit by unmerge).
        self.register_buffer("weight_orig", None, persistent=False)
        self.register_buffer("merge_mask", None, persistent=False)
        self.merged = False
        self.reset_adapter(device=device, dtype=dtype)

    @classmethod
    def from_module(cls, layer: nn.Conv2d, **cfg) -> "LoRAConv2d":
        """Adapter around an existing nn.Conv2d, re-using (not copying) its weight and bias Parameters."""
        # Built on the "meta" device (shapes only, no memory), then handed the layer's own Parameters.
        new = cls(layer.in_channels, layer.out_channels, layer.kernel_size, stride=layer.stride,
                  padding=layer.padding, dilation=layer.dilation, groups=layer.groups,
                  bias=layer.bias is not None, padding_mode=layer.padding_mode, device="meta",
                  dtype=layer.weight.dtype, **cfg)
        new.weight, new.bias = layer.weight, layer.bias
        new.reset_adapter(device=layer.weight.device, dtype=layer.weight.dtype)
        new.train(layer.training)
        return new

    def reset_adapter(self, device=None, dtype=None) -> None:
        """(Re)create the adapter: A Kaiming-uniform, B zeros (so dW = 0), interpolation a = 1."""
        if self.merged:
            raise RuntimeError("reset_adapter() on a merged layer: call unmerge() first")
        self.lora_A = nn.Parameter(torch.empty(self.r, self.fan_in, device=device, dtype=dtype))
        self.lora_B = nn.Parameter(torch.zeros(self.out_channels, self.r, device=device, dtype=dtype))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        if self.learn_interp:
            self.lora_interp = nn.Parameter(torch.ones((), device=device, dtype=dtype))

    def delta_weight(self) -> torch.Tensor:
        """dW = (alpha / r) (B @ A) reshaped to the kernel's shape (c_out, c_in/g, kh, kw)."""
        return (self.lora_B @ self.lora_A).view(self.weight.shape) * self.scaling

    def lora_path(self, x: torch.Tensor) -> torch.Tensor:
        """(alpha / r) conv(x, B A) as two convs, without forming dW.  (B, c_in, H, W) -> (B, c_out, H', W')"""
        g, (kh, kw) = self.groups, self.kernel_size
        a_kernel = self.lora_A.view(self.r, self.in_channels // g, kh, kw)  # r kernels over one group's inputs
        a_kernel = a_kernel.repeat(g, 1, 1, 1)                             # (g*r, c_in/g, kh, kw): A shared by groups
        # nn.Conv2d's own helper applies this layer's stride / padding / padding_mode / dilation / groups.
        z = self._conv_forward(x, a_kernel, None)                          # (B, g*r, H', W')
        if self.scaling != 1.0:  # scale the r-channel map, not the c_out-channel output: c_out / r times less work
            z = z * self.scaling
        b_kernel = self.lora_B.view(self.out_channels, self.r, 1, 1)       # group i: rows of B read z's r channels
        return F.conv2d(z, b_kernel, groups=g)                             # (B, c_out, H', W')

    def kernel_path_is_cheaper(self) -> bool:
        """The cost model behind path="auto": is one conv with W0 + dW cheaper than the two low-rank convs?

        Extra multiply-adds (MACs) per output pixel and image, over what the frozen conv already costs:

            two-conv ("factored") path: 3 r (c_in kh kw + c_out)  (A conv and B conv, forward + 2 backward)
                                        + the memory-bound work on the full-size maps: the A conv's im2col of
                                        x (c_in kh kw per pixel, forward and backward), the c_out-channel update
                                        and its add, the second input gradient and its accumulation
            one-conv ("kernel") path:   c_out c_in kh kw / g      (the weight-gradient GEMM of the one conv,
                                        a well-shaped one; grad A and grad B are then two tiny matmuls)

        Counting the memory-bound work as TRAFFIC_MACS multiply-adds per element of (c_in kh kw + c_out), the
        factored path costs (3 r + TRAFFIC_MACS) (c_in kh kw + c_out): the kernel path wins where
        c_out c_in kh kw / g is smaller, i.e. on layers with few channels. The rule and its constant are
        checked against timings layer by layer by bench/bench_conv_paths.py (see BENCHMARKS.md, "the cheaper
        of the two conv-LoRA forward paths per layer").
        """
        kh, kw = self.kernel_size
        per_pixel = self.in_channels * kh * kw + self.out_channels          # full-size elements the A / B convs touch
        factored = (3 * self.r + self.TRAFFIC_MACS) * per_pixel
        kernel = self.out_channels * self.fan_in                            # weight-gradient GEMM: c_out c_in kh kw / g
        return kernel < factored

    def uses_kernel_path(self, x: torch.Tensor) -> bool:
        """The path this forward takes: `path` when set, else (path="auto") the cheaper one by the cost model,
        but the factored path wherever the kernel path would compute another function."""
        if self.path != "auto":
            return self.path == "kernel"
        if self.dropout_p > 0 or torch.is_autocast_enabled(x.device.type):
            return False  # the kernel path would be another function (no dropout) or lose dW (W0 + dW rounded)
        return self.kernel_path_is_cheaper()

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, c_in, H, W) -> (B, c_out, H', W')
        if self.merged:  # the kernel already holds the update: one conv
            return self._conv_forward(x, self.weight, self.bias)
        if self.uses_kernel_path(x):  # one conv with W0 + dW (a W0 + (1 - a) dW); autograd reaches A, B and a
            dw = self.delta_weight()                                          # (c_out, c_in/g, kh, kw)
            if not self.learn_interp:
                return self._conv_forward(x, self.weight + dw, self.bias)
            a = self.lora_interp
            return self._conv_forward(x, a * self.weight + (1 - a) * dw, self.bias)
        delta = self.lora_path(self.lora_dropout(x))
        if not self.learn_interp:
            return self._conv_forward(x, self.weight, self.bias) + delta
        a = self.lora_interp
        y = a * self._conv_forward(x, self.weight, None) + (1 - a) * delta
        return y if self.bias is None else y + self.bias.view(1, -1, 1, 1)

    # ---- merging ---------------------------------------------------------------------------------------
    @torch.no_grad()
    def merged_weight(self, mask: torch.Tensor | None = None) -> torch.Tensor:
        """W' = W0 + dW (or a W0 + (1 - a) dW), summed in fp32 and cast to W0's dtype; optional * mask."""
        w0 = self.weight_orig if self.merged else self.weight          # (c_out, c_in/g, kh, kw)
        w = w0.to(torch.promote_types(w0.dtype, torch.float32), copy=True)  # fp32 (or fp64) copy of W0
        dw = (self.lora_B.to(w.dtype) @ self.lora_A.to(w.dtype)).view(w.shape) * self.scaling
        if self.learn_interp:
            a = self.lora_interp.to(w.dtype)
            w = a * w + (1 - a) * dw
        else:
            w += dw
        if mask is not None:
            if mask.shape != w.shape:
                raise ValueError(f"merge mask has shape {tuple(mask.shape)}, weight has {tuple(w.shape)}")
            w *= mask.to(device=w.device, dtype=w.dtype)
        return w.to(w0.dtype)

    @torch.no_grad()
    def merge(self, mask: torch.Tensor | None = None) -> None:
        """Fold the update into `weight` (one conv afterwards). A second merge() does nothing."""
        if self.merged:
            return
        merged = self.merged_weight(mask)
        self.weight_orig = self.weight.data  # keep the very tensor, so unmerge() is bit-exact
        self.merge_mask = mask
        self.weight.data = merged
        self.merged = True
        # autocast keeps its low-precision copy of a trainable weight for the whole `with` block, keyed by the
        # tensor: without this, forwards later in the block would still use the weight as it was.
        torch.clear_autocast_cache()

    @torch.no_grad()
    def unmerge(self) -> None:
        """Put the original kernel back (bit for bit: it is the kept tensor)."""
        if not self.merged:
            return
        self.weight.data = self.weight_orig
        self.weight_orig, self.merge_mask = None, None
        self.merged = False
        torch.clear_autocast_cache()  # as in merge()

    def to_base(self, mask: torch.Tensor | None = None) -> nn.Conv2d:
        """A new plain nn.Conv2d carrying the merged kernel (this layer is left unchanged)."""
        base = nn.Conv2d(self.in_channels, self.out_channels, self.kernel_size, self.stride, self.padding,
                         self.dilation, self.groups, self.bias is not None, self.padding_mode, device="meta")
        base.weight = nn.Parameter(self.merged_weight(mask), requires_grad=self.weight.requires_grad)
        if self.bias is not None:
            base.bias = nn.Parameter(self.bias.detach().clone(), requires_grad=self.bias.requires_grad)
        base.train(self.training)
        return base

    def adapter_config(self) -> dict:
        return dict(type="conv_lora", r=self.r, alpha=self.alpha, dropout=self.dropout_p,
                    learn_interp=self.learn_interp, in_channels=self.in_channels,
                    out_channels=self.out_channels, kernel_size=list(self.kernel_size), groups=self.groups)

    # While merged, state_dict() stores the ORIGINAL kernel: save / load never applies the update twice.
    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.merged:
            destination[prefix + "weight"] = self.weight_orig

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        merged, mask = self.merged, self.merge_mask
        self.unmerge()
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        if merged:
            self.merge(mask)

    def extra_repr(self) -> str:
        interp = ", learn_interp=True" if self.learn_interp else ""
        return (f"{super().extra_repr()}, r={self.r}, alpha={self.alpha:g}{interp}, path={self.path}, "
                f"merged={self.merged}")


@torch.no_grad()
def fold_bn(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> nn.Conv2d:
    """A new conv equal to bn(conv(x)) in eval mode (running statistics), folded in float64.

    BN(y) = gamma (y - mean) / sqrt(var + eps) + beta is a per-channel affine map s y + t with
    s = gamma / sqrt(var + eps) and t = beta - s mean, so it folds into the conv before it:
        W_folded[o] = s[o] W[o],   b_folded[o] = s[o] (b[o] - mean[o]) + beta[o].
    A LoRAConv2d (or anything with to_base()) is merged first.
    """
    if hasattr(conv, "to_base"):
        conv = conv.to_base()
    if not isinstance(conv, nn.Conv2d) or not isinstance(bn, nn.modules.batchnorm._BatchNorm):
        raise TypeError(f"fold_bn expects (nn.Conv2d, BatchNorm), got ({type(conv).__name__}, {type(bn).__name__})")
    if bn.num_features != conv.out_channels:
        raise ValueError(f"fold_bn: BatchNorm has {bn.num_features} channels, the conv outputs {conv.out_channels}")
    if bn.running_mean is None:
        raise ValueError("fold_bn: the BatchNorm tracks no running statistics (track_running_stats=False), "
                         "so it has no fixed affine map to fold")
    dtype = conv.weight.dtype
    s = bn.running_var.double().add(bn.eps).rsqrt()                        # (c_out,)
    gamma = bn.weight.double() if bn.weight is not None else torch.ones_like(s)
    beta = bn.bias.double() if bn.bias is not None else torch.zeros_like(s)
    s = gamma * s
    b = conv.bias.double() if conv.bias is not None else torch.zeros_like(s)
    out = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                    conv.dilation, conv.groups, True, conv.padding_mode, device="meta")
    out.weight = nn.Parameter((conv.weight.double() * s.view(-1, 1, 1, 1)).to(dtype))
    out.bias = nn.Parameter((s * (b - bn.running_mean.double()) + beta).to(dtype))
    return out
