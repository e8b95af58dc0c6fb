"""LoRAConv2d (PETAH eq. 2) over a grid of conv options, both forward paths, merging, training, peft parity, fold_bn."""

import copy
import itertools

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from rounding import assert_rounding, rel_err

from conv_lora import LoRAConv2d, fold_bn

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny ops: see conftest.py


def conv_like(layer: nn.Conv2d, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    """The layer's own conv (stride, padding, padding_mode, dilation, groups) with the kernel w and bias b."""
    plain = nn.Conv2d(layer.in_channels, layer.out_channels, layer.kernel_size, layer.stride, layer.padding,
                      layer.dilation, layer.groups, b is not None, layer.padding_mode, device="meta")
    return torch.func.functional_call(plain, {"weight": w} if b is None else {"weight": w, "bias": b}, (x,))


def abs_terms(layer: LoRAConv2d, x: torch.Tensor, g: torch.Tensor | None = None) -> dict:
    """float64 sum of |products| behind every output element and, with an output gradient g, behind every
    gradient element of <y, g> (w.r.t. lora_A, lora_B, the input, lora_interp): eq. 2 on |x|, |W0|, |b|, |A|, |B|,
    |g|, with a and (1 - a) as two separate non-negative weights, since the lora_interp gradient
    conv(x, W0) - conv(x, dW) adds both terms' magnitudes."""
    d = lambda t: t.detach().double().abs()  # noqa: E731
    a = float(layer.lora_interp.detach()) if layer.learn_interp else 1.0
    c0, c1 = (torch.tensor(v, dtype=torch.float64, requires_grad=True) for v in (abs(a), abs(1 - a) if
                                                                                  layer.learn_interp else 1.0))
    A, B, xa = d(layer.lora_A).requires_grad_(), d(layer.lora_B).requires_grad_(), d(x).requires_grad_()
    w = c0 * d(layer.weight) + c1 * (B @ A).reshape(layer.weight.shape) * abs(layer.scaling)
    y = conv_like(layer, xa, w, None if layer.bias is None else d(layer.bias))
    if g is None:
        return dict(y=y.detach())
    gA, gB, gx, g0, g1 = torch.autograd.grad((y * d(g)).sum(), [A, B, xa, c0, c1])
    out = dict(y=y.detach(), lora_A=gA, lora_B=gB, x=gx)
    if layer.learn_interp:
        out["lora_interp"] = g0 + g1
    return out


def out_terms(layer: LoRAConv2d) -> int:
    """Length of the sums behind one output element: c_in / groups * kh * kw products in the conv, r in the
    low-rank path (or in B @ A), and a few additions and scalings (bias, a and 1 - a, alpha / r)."""
    return layer.in_channels // layer.groups * layer.kernel_size[0] * layer.kernel_size[1] + layer.r + 4


def randomise(layer: nn.Module, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g) * 0.5)
        if getattr(layer, "lora_interp", None) is not None:
            layer.lora_interp.fill_(0.6)


# kernel x stride x padding x dilation; "same" is not defined for strided convs in PyTorch
GRID = [(k, s, p, d) for k, s, p, d in itertools.product([1, 3, 5, 7], [1, 2], [0, 1, "same", "reflect"], [1, 2])
        if not (p == "same" and s == 2)]


@pytest.mark.parametrize("kernel,stride,padding,dilation", GRID)
def test_grid_factored_path_merge_and_exact_equation(kernel, stride, padding, dilation):
    """For groups 1 / 2 / depthwise and bias on / off:
    - the two-conv training path equals one conv with W0 + dW (PETAH eq. 2) in float64 (1e-10),
    - in fp32, merged outputs equal the unmerged ones within the rounding bound (two results, each within
      n eps |terms| of the exact one)."""
    torch.manual_seed(0)
    x = torch.randn(1, 4, 14, 14)
    pad, mode = ((kernel // 2) * dilation, "reflect") if padding == "reflect" else (padding, "zeros")
    for (c_out, groups), bias in itertools.product([(6, 1), (6, 2), (4, 4)], [True, False]):
        case = f"groups={groups} bias={bias}"
        base = nn.Conv2d(4, c_out, kernel, stride=stride, padding=pad, dilation=dilation, groups=groups,
                         bias=bias, padding_mode=mode)
        fan_in = 4 // groups * kernel * kernel
        layer = LoRAConv2d.from_module(base, r=min(2, fan_in), alpha=3.0, path="factored")
        randomise(layer)
        assert layer.lora_A.shape == (min(2, fan_in), fan_in) and layer.lora_B.shape == (c_out, min(2, fan_in))

        # exact equation in float64, against a plain nn.Conv2d holding W0 + dW (no factored path involved)
        layer64, ref = copy.deepcopy(layer).double(), copy.deepcopy(base).double()
        with torch.no_grad():
            dw = (layer64.lora_B @ layer64.lora_A).reshape(ref.weight.shape) * layer64.scaling
            ref.weight.add_(dw)
        x64 = x.double()
        assert torch.allclose(layer64(x64), ref(x64), rtol=0, atol=1e-10), case

        # fp32: merged vs unmerged
        y = layer(x)
        assert rel_err(y, base(x)) > 1e-3, case  # the update is not trivially zero
        terms, n = abs_terms(layer, x)["y"], out_terms(layer)
        layer.merge()
        assert_rounding(layer(x), y, terms, 2 * n, case)


def oracle(layer: LoRAConv2d, x: torch.Tensor) -> torch.Tensor:
    """PETAH eq. 2 written out, independent of both paths: the layer's own conv (same stride / padding /
    padding_mode / dilation / groups) called with the kernel W0 + (alpha / r) (B @ A) (or a W0 + (1 - a) dW)."""
    dw = (layer.lora_B @ layer.lora_A).reshape(layer.weight.shape) * (layer.alpha / layer.r)
    if layer.learn_interp:
        w = layer.lora_interp * layer.weight + (1 - layer.lora_interp) * dw
    else:
        w = layer.weight + dw
    return conv_like(layer, x, w, layer.bias)


def grads(layer: LoRAConv2d, x: torch.Tensor, fn, g: torch.Tensor) -> dict:
    """Output and gradients of <fn(layer, x), g> w.r.t. every adapter parameter and the input."""
    x = x.detach().requires_grad_(True)
    y = fn(layer, x)
    names = list(layer.adapter_names)
    out = torch.autograd.grad((y * g).sum(), [getattr(layer, n) for n in names] + [x])
    return dict(y=y.detach(), x=out[-1], **dict(zip(names, out[:-1])))


@pytest.mark.parametrize("kernel,stride,padding,dilation", GRID)
def test_grid_both_paths_equal_the_equation_outputs_and_gradients(kernel, stride, padding, dilation):
    """path="factored" (two convs) and path="kernel" (one conv with W0 + dW) against the written-out equation,
    in float64 to 1e-10: outputs and the gradients w.r.t. lora_A, lora_B (lora_interp) and the input, for
    groups 1 / 2 / depthwise, bias on / off, with and without PETRAS' interpolation. fp32: each path's output and
    gradients lie within n eps |terms| of the exact (float64) ones, n the summed length of every reduction a
    result goes through (pixels, the weight's elements, the conv fan-in and fan-out, r)."""
    torch.manual_seed(0)
    x = torch.randn(2, 4, 13, 13)
    pad, mode = ((kernel // 2) * dilation, "reflect") if padding == "reflect" else (padding, "zeros")
    for (c_out, groups), bias, interp in itertools.product([(6, 1), (6, 2), (4, 4)], [True, False], [False, True]):
        case = f"groups={groups} bias={bias} learn_interp={interp}"
        base = nn.Conv2d(4, c_out, kernel, stride=stride, padding=pad, dilation=dilation, groups=groups,
                         bias=bias, padding_mode=mode)
        r = min(2, 4 // groups * kernel * kernel)
        layers = {path: LoRAConv2d.from_module(copy.deepcopy(base), r=r, alpha=3.0, learn_interp=interp, path=path)
                  for path in ("factored", "kernel")}
        for layer in layers.values():
            layer.load_state_dict(layers["factored"].state_dict())  # the same A (random) and base weights
            randomise(layer)
            layer.weight.requires_grad_(False)
        g = torch.randn_like(base(x))
        for path, layer in layers.items():
            l64 = copy.deepcopy(layer).double()
            x64, g64 = x.double(), g.double()
            got, want = grads(l64, x64, LoRAConv2d.forward, g64), grads(l64, x64, oracle, g64)
            assert rel_err(want["y"], base.double()(x.double())) > 1e-3, case  # the update is not trivially zero
            for k in want:
                assert torch.allclose(got[k], want[k], rtol=0, atol=1e-10), f"{path} {k} {case}"
        # fp32. The longest chain: the weight gradient sums over the output pixels (B H' W'), the kernel path's
        # lora_interp gradient then over the weight's elements, the input gradient over c_out kh kw, the output
        # over c_in kh kw, plus r and a few scalings. (lora_interp's gradient is one scalar sum over every output
        # with heavy cancellation: its relative error is large, its error against |terms| is not.)
        kh, kw = base.kernel_size
        n = g[:, 0].numel() + base.weight.numel() + (4 + c_out) * kh * kw + r + 8
        terms = abs_terms(layers["factored"], x, g)
        for path, layer in layers.items():
            got = grads(layer, x, LoRAConv2d.forward, g)
            for k in got:
                assert_rounding(got[k], want[k], terms[k], n, f"fp32 {path} {k} {case}")


def count_convs(monkeypatch) -> list:
    calls = []
    real = F.conv2d
    monkeypatch.setattr(F, "conv2d", lambda *a, **k: calls.append(1) or real(*a, **k))
    return calls


def test_auto_path_follows_the_cost_rule(monkeypatch):
    """Extra MACs per output pixel: kernel path c_out * c_in/g * kh * kw (weight-gradient GEMM), factored path
    (3 r + TRAFFIC_MACS) * (c_in kh kw + c_out); auto runs the smaller, as one conv call or as three."""
    m = LoRAConv2d.TRAFFIC_MACS
    stem = LoRAConv2d(24, 48, 3, stride=2, padding=1, r=1)     # 48 * 216 = 10,368 < (3 + m) * 264
    wide = LoRAConv2d(448, 1792, 1, r=1)                       # 1792 * 448 = 802,816 > (3 + m) * 2240
    assert 48 * 216 < (3 + m) * (216 + 48) and stem.kernel_path_is_cheaper()
    assert 1792 * 448 > (3 + m) * (448 + 1792) and not wide.kernel_path_is_cheaper()
    calls = count_convs(monkeypatch)
    stem(torch.randn(1, 24, 8, 8))
    assert len(calls) == 1  # one conv with W0 + dW
    calls.clear()
    wide(torch.randn(1, 448, 2, 2))
    assert len(calls) == 3  # base conv, A conv, B conv


def test_auto_takes_the_factored_path_with_dropout_or_autocast(monkeypatch):
    """Dropout acts on the low-rank input only, which the kernel path does not have; under autocast W0 + dW would
    be rounded to bf16 before the conv. In both cases auto runs the factored path, and with dropout > 0 that is
    not the kernel path's function: the outputs differ in train mode."""
    torch.manual_seed(0)
    layer = LoRAConv2d(4, 6, 3, padding=1, r=2, dropout=0.5)
    randomise(layer)
    assert layer.kernel_path_is_cheaper()  # the shape alone would pick the kernel path
    x = torch.randn(2, 4, 9, 9)
    calls = count_convs(monkeypatch)
    y = layer(x)
    assert len(calls) == 3
    no_dropout = LoRAConv2d(4, 6, 3, padding=1, r=2, path="kernel")
    no_dropout.load_state_dict(layer.state_dict())
    assert rel_err(y, no_dropout(x)) > 1e-3  # dropout changed the low-rank path's input
    calls.clear()
    plain = LoRAConv2d(4, 6, 3, padding=1, r=2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        plain(x)
    assert len(calls) == 3
    calls.clear()
    plain(x)
    assert len(calls) == 1
    with pytest.raises(ValueError, match="path='kernel' cannot apply dropout"):
        LoRAConv2d(4, 6, 3, r=2, dropout=0.1, path="kernel")
    with pytest.raises(ValueError, match="path must be one of"):
        LoRAConv2d(4, 6, 3, r=2, path="merged")


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")
@pytest.mark.parametrize("padding_mode", ["zeros", "reflect", "replicate", "circular"])
@pytest.mark.parametrize("path", ["factored", "kernel"])
def test_even_kernels_same_padding_every_padding_mode(padding_mode, path):
    """'same' with an even kernel pads asymmetrically; both paths must pad exactly like the base."""
    torch.manual_seed(0)
    x = torch.randn(1, 4, 9, 9, dtype=torch.double)
    for k, d in itertools.product([2, 4], [1, 2]):
        base = nn.Conv2d(4, 6, k, padding="same", dilation=d, padding_mode=padding_mode).double()
        layer = LoRAConv2d.from_module(copy.deepcopy(base), r=2, path=path)
        randomise(layer)
        with torch.no_grad():
            base.weight.add_((layer.lora_B @ layer.lora_A).view(base.weight.shape) * layer.scaling)
        assert torch.allclose(layer(x), base(x), rtol=0, atol=1e-10), f"k={k} dilation={d}"


@pytest.mark.parametrize("c_in,c_out,k,groups,r", [(3, 24, 3, 1, 1), (48, 192, 1, 1, 2), (96, 96, 3, 96, 1),
                                                   (8, 16, 5, 2, 4)])
def test_parameter_count_is_the_papers(c_in, c_out, k, groups, r):
    layer = LoRAConv2d(c_in, c_out, k, groups=groups, r=r)
    count = sum(getattr(layer, n).numel() for n in layer.adapter_names)
    assert count == r * (c_out + c_in // groups * k * k)


def test_init_equals_base_and_reuses_parameters():
    torch.manual_seed(0)
    base = nn.Conv2d(4, 8, 3, padding=1, padding_mode="circular")
    layer = LoRAConv2d.from_module(base, r=2)
    assert layer.weight is base.weight and layer.bias is base.bias
    assert layer.padding_mode == "circular"
    x = torch.randn(1, 4, 7, 7)
    assert torch.equal(layer(x), base(x))


def test_learnable_interpolation_merges_exactly():
    torch.manual_seed(0)
    layer = LoRAConv2d(4, 6, 3, padding=1, groups=2, r=2, learn_interp=True)
    randomise(layer)
    x = torch.randn(2, 4, 9, 9)
    y = layer(x)
    w0, b = layer.weight.detach().clone(), layer.bias.detach()
    dw = (layer.lora_B @ layer.lora_A).detach().view(w0.shape)
    terms, n = abs_terms(layer, x)["y"], out_terms(layer)
    assert_rounding(y, F.conv2d(x.double(), (0.6 * w0 + 0.4 * dw).double(), b.double(), padding=1, groups=2),
                    terms, n, "unmerged vs the equation")
    layer.merge()
    assert_rounding(layer(x), y, terms, 2 * n, "merged vs unmerged")


def test_unmerge_bit_exact_merge_twice_and_state_dict_once():
    torch.manual_seed(0)
    layer = LoRAConv2d(4, 4, 3, padding=1, r=2)
    randomise(layer)
    x = torch.randn(1, 4, 6, 6)
    y = layer(x)
    terms, n = abs_terms(layer, x)["y"], 2 * out_terms(layer)  # two fp32 results, each within n eps |terms|
    w0 = layer.weight.detach().clone()
    layer.merge()
    w_once = layer.weight.detach().clone()
    layer.merge()
    assert torch.equal(layer.weight, w_once)
    sd = copy.deepcopy(layer.state_dict())
    assert torch.equal(sd["weight"], w0)
    twin = LoRAConv2d(4, 4, 3, padding=1, r=2)
    twin.load_state_dict(sd)
    assert_rounding(twin(x), y, terms, n, "reloaded")
    layer.load_state_dict(sd)  # loading into the merged layer re-merges the loaded values, once
    assert layer.merged
    assert_rounding(layer(x), y, terms, n, "reloaded into the merged layer")
    layer.unmerge()
    assert torch.equal(layer.weight, w0)


def test_merged_forward_is_one_conv(monkeypatch):
    layer = LoRAConv2d(4, 4, 3, r=1)
    layer.merge()
    calls = []
    real = F.conv2d
    monkeypatch.setattr(F, "conv2d", lambda *a, **k: calls.append(1) or real(*a, **k))
    layer(torch.randn(1, 4, 5, 5))
    assert len(calls) == 1


@pytest.mark.parametrize("learn_interp", [False, True])
@pytest.mark.parametrize("path,dropout", [("factored", 0.1), ("kernel", 0.0)])
def test_gradients_reach_every_adapter_param_and_no_frozen_one(learn_interp, path, dropout):
    torch.manual_seed(0)
    layer = LoRAConv2d(4, 6, 3, stride=2, padding=1, groups=2, r=2, dropout=dropout, learn_interp=learn_interp,
                       path=path)
    randomise(layer)
    layer.weight.requires_grad_(False)
    layer.bias.requires_grad_(False)
    layer(torch.randn(2, 4, 8, 8)).square().sum().backward()
    assert layer.weight.grad is None and layer.bias.grad is None
    for n in layer.adapter_names:
        g = getattr(layer, n).grad
        assert g is not None and torch.count_nonzero(g) > 0, n


@pytest.mark.parametrize("kernel,stride,padding", [(3, 1, 1), (3, 2, 1), (1, 1, 0), (5, 1, 2), (5, 2, 0)])
@pytest.mark.parametrize("path", ["factored", "kernel"])
def test_matches_peft_conv_lora(kernel, stride, padding, path):
    """peft's conv LoRA is the same factorisation (A: k x k conv to r channels, B: 1x1 conv), groups=1.
    No oracle for the rest of the grid: for groups > 1 peft uses another (unshared) A and does not merge,
    and peft 0.21's A conv drops the base conv's dilation (outputs of different sizes); our dilation and
    groups are checked above against a plain conv holding W0 + dW."""
    peft = pytest.importorskip("peft")

    class Tiny(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(4, 6, kernel, stride=stride, padding=padding)

        def forward(self, x):
            return self.conv(x)

    torch.manual_seed(0)
    base = Tiny()
    ours = LoRAConv2d.from_module(copy.deepcopy(base.conv), r=2, alpha=5, path=path)
    randomise(ours)
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=2, lora_alpha=5, target_modules=["conv"]))
    params = dict(theirs.named_parameters())
    a_key = next(k for k in params if "lora_A" in k)
    b_key = next(k for k in params if "lora_B" in k)
    with torch.no_grad():
        params[a_key].copy_(ours.lora_A.view(params[a_key].shape))  # (r, c_in*k*k) -> (r, c_in, k, k)
        params[b_key].copy_(ours.lora_B.view(params[b_key].shape))  # (c_out, r) -> (c_out, r, 1, 1)
    x = torch.randn(2, 4, 11, 11)
    assert_rounding(ours(x), theirs(x), abs_terms(ours, x)["y"], 2 * out_terms(ours), "ours vs peft")


@pytest.mark.parametrize("bias,affine", [(True, True), (False, True), (False, False)])
def test_fold_bn_after_merge(bias, affine):
    torch.manual_seed(0)
    conv = LoRAConv2d(4, 6, 3, stride=2, padding=1, bias=bias, r=2)
    randomise(conv)
    bn = nn.BatchNorm2d(6, affine=affine)
    with torch.no_grad():
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 2.0)
        if affine:
            bn.weight.normal_()
            bn.bias.normal_()
    bn.eval()
    x = torch.randn(2, 4, 10, 10)
    y = bn(conv(x))
    # bn(z) = s (z - mean) + beta with s = gamma / sqrt(var + eps): |terms| = |s| (conv terms + |mean|) + |beta|,
    # n = the conv's sums plus the few operations of the normalisation and of the folding (sqrt, divide, scale)
    s = (bn.weight if affine else 1.0) / torch.sqrt(bn.running_var + bn.eps)
    terms = (s.detach().double().abs().view(-1, 1, 1) * (abs_terms(conv, x)["y"] + bn.running_mean.double().abs()
                                                          .view(-1, 1, 1))
             + (bn.bias.detach().double().abs().view(-1, 1, 1) if affine else 0))
    n = 2 * (out_terms(conv) + 8)
    folded = fold_bn(conv, bn)  # merges the adapter first
    assert type(folded) is nn.Conv2d and folded.bias is not None
    assert_rounding(folded(x), y, terms, n, "folded")
    assert_rounding(fold_bn(conv.to_base(), bn)(x), y, terms, n, "merged, then folded")


def test_fold_bn_errors():
    conv = nn.Conv2d(4, 6, 3)
    with pytest.raises(ValueError, match="running statistics"):
        fold_bn(conv, nn.BatchNorm2d(6, track_running_stats=False))
    with pytest.raises(ValueError, match="8 channels"):
        fold_bn(conv, nn.BatchNorm2d(8))
    with pytest.raises(TypeError, match="LayerNorm"):
        fold_bn(conv, nn.LayerNorm(6))


def test_rank_errors():
    with pytest.raises(ValueError, match=r"fan_in=c_in/groups\*kh\*kw=9.*0 < r <= 9"):
        LoRAConv2d(16, 16, 3, groups=16, r=10)  # depthwise 3x3: A has 9 columns
    with pytest.raises(ValueError, match="0 < r <= 4"):
        LoRAConv2d(16, 4, 3, r=5)
    with pytest.raises(ValueError, match="r=0"):
        LoRAConv2d(4, 4, 1, r=0)
