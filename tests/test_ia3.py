"""(IA)^3 layers: the scaling equations, exact merges, fused-qkv rows, peft parity, lora.py helpers."""

import copy
import itertools
import json

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from rounding import abs_terms, assert_rounding, rel_err

import lora
from ia3 import IA3Conv2d, IA3Linear, add_ia3

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny ops: see conftest.py


def randomise(model: nn.Module, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("ia3_l"):
                p.copy_(1 + 0.5 * torch.randn(p.shape, generator=g))


class TinyBlock(nn.Module):
    def __init__(self, dim: int = 8):
        super().__init__()
        self.qkv = nn.Linear(dim, 3 * dim)
        self.fc1 = nn.Linear(dim, 4 * dim)
        self.fc2 = nn.Linear(4 * dim, dim)
        self.head = nn.Linear(dim, 3)

    def forward(self, x):  # (B, N, C) -> (B, 3)
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        x = x + F.scaled_dot_product_attention(q, k, v)
        x = x + self.fc2(F.gelu(self.fc1(x)))
        return self.head(x.mean(1))


def test_init_is_identity_and_reuses_parameters():
    torch.manual_seed(0)
    base = nn.Linear(6, 10)
    layer = IA3Linear.from_module(base, mode="out", rows=[0, 5, 9])
    assert layer.weight is base.weight and layer.bias is base.bias
    assert layer.ia3_l.shape == (3,) and torch.equal(layer.ia3_l, torch.ones(3))
    x = torch.randn(4, 6)
    assert torch.equal(layer(x), base(x))


def test_out_rows_scale_only_k_and_v_of_a_fused_qkv():
    torch.manual_seed(0)
    dim = 8
    kv_rows = torch.arange(dim, 3 * dim)  # contiguous [q | k | v]
    layer = IA3Linear(dim, 3 * dim, mode="out", rows=kv_rows)
    randomise(layer)
    x = torch.randn(5, dim)
    base = F.linear(x, layer.weight, layer.bias)
    y = layer(x)
    assert torch.equal(y[:, :dim], base[:, :dim])  # q untouched, exactly
    assert_rounding(y[:, dim:], base[:, dim:] * layer.ia3_l, abs_terms(layer, x)[:, dim:], 2 * (dim + 2))  # l (W x + b)


def test_in_mode_on_fc2_scales_the_mlp_activation():
    torch.manual_seed(0)
    fc1, fc2 = nn.Linear(8, 32), nn.Linear(32, 8)
    ia3_fc2 = IA3Linear.from_module(copy.deepcopy(fc2), mode="in")
    randomise(ia3_fc2)
    x = torch.randn(3, 8)
    h = F.gelu(fc1(x))
    assert_rounding(ia3_fc2(h), fc2(h * ia3_fc2.ia3_l), abs_terms(ia3_fc2, h), 2 * (32 + 2))  # l_ff * gamma(W1 x)


@pytest.mark.parametrize("mode,rows,bias", [("out", None, True), ("out", None, False), ("out", [1, 2, 7], True),
                                            ("in", None, True), ("in", None, False)])
def test_linear_merged_equals_unmerged(mode, rows, bias):
    torch.manual_seed(0)
    layer = IA3Linear(12, 9, bias=bias, mode=mode, rows=rows)
    randomise(layer)
    x = torch.randn(2, 4, 12)
    y = layer(x)
    terms, n = abs_terms(layer, x), 2 * (12 + 2)  # two fp32 results: fan-in, the bias, the scaling
    assert_rounding(layer.to_base()(x), y, terms, n)
    layer.merge()
    assert_rounding(layer(x), y, terms, n)


@pytest.mark.parametrize("mode", ["out", "in"])
def test_conv_merged_equals_unmerged_grid(mode):
    torch.manual_seed(0)
    x = torch.randn(2, 4, 9, 9)
    for (c_out, groups), k, padding_mode, bias in itertools.product(
            [(6, 1), (6, 2), (4, 4)], [1, 3], ["zeros", "reflect"], [True, False]):
        case = f"groups={groups} k={k} padding_mode={padding_mode} bias={bias}"
        base = nn.Conv2d(4, c_out, k, padding=k // 2, groups=groups, bias=bias, padding_mode=padding_mode)
        layer = IA3Conv2d.from_module(base, mode=mode)
        randomise(layer)
        y = layer(x)
        l = layer.ia3_l.view(1, -1, 1, 1)
        expected = base(x) * l if mode == "out" else base(x * l)  # the (IA)^3 equation
        terms, n = abs_terms(layer, x), 2 * (4 // groups * k * k + 2)  # two fp32 results: fan-in, bias, scaling
        assert_rounding(y, expected, terms, n, case)
        assert_rounding(layer.to_base()(x), y, terms, n, case)
        layer.merge()
        assert_rounding(layer(x), y, terms, n, case)


@pytest.mark.parametrize("mode,rows", [("out", None), ("out", [0, 4, 5]), ("in", None)])
def test_merged_weight_and_bias_are_the_written_out_edits(mode, rows):
    """out: W' = diag(l) W, b' = l * b (rows outside `rows` unchanged); in: W' = W diag(l), b' = b. One fp32
    product per entry, correctly rounded on both sides: equal bit for bit. The same before and after merge()."""
    torch.manual_seed(0)
    layer = IA3Linear(5, 7, mode=mode, rows=rows)
    randomise(layer)
    w, b, l = layer.weight.detach().clone(), layer.bias.detach().clone(), layer.ia3_l.detach()
    if mode == "in":
        want_w, want_b = w * l.view(1, -1), b
    else:
        s = torch.ones(7)
        s[rows if rows is not None else slice(None)] = l
        want_w, want_b = w * s.view(-1, 1), b * s
    for merged in (False, True):
        if merged:
            layer.merge()
        assert torch.equal(layer.merged_weight(), want_w) and torch.equal(layer.merged_bias(), want_b), merged
    mask = torch.rand(7, 5) > 0.5
    assert torch.equal(layer.merged_weight(mask), want_w * mask)


def test_merged_weight_is_the_merge_step_of_every_adapter():
    """One name for the merge step in lora.py, conv_lora.py and ia3.py: `merged_weight(mask)` is what to_base()
    carries and what merge() puts in place."""
    from conv_lora import LoRAConv2d
    from lora import LoRALinear
    torch.manual_seed(0)
    for layer in (LoRALinear(6, 4, r=2), LoRAConv2d(3, 4, 3, r=2), IA3Linear(6, 4), IA3Conv2d(3, 4, 3, mode="in")):
        with torch.no_grad():
            for n in layer.adapter_names:
                getattr(layer, n).normal_()
        want = layer.merged_weight()
        assert not torch.equal(want, layer.weight)  # the update is really folded in
        assert torch.equal(layer.to_base().weight, want)
        layer.merge()
        assert torch.equal(layer.weight, want), type(layer).__name__


def test_unmerge_bit_exact_merge_twice_and_state_dict_once():
    torch.manual_seed(0)
    layer = IA3Linear(8, 8, mode="out")
    randomise(layer)
    x = torch.randn(3, 8)
    y = layer(x)
    terms, n = abs_terms(layer, x), 2 * (8 + 2)
    w0, b0 = layer.weight.detach().clone(), layer.bias.detach().clone()
    layer.merge()
    w1, b1 = layer.weight.detach().clone(), layer.bias.detach().clone()
    assert not torch.equal(b1, b0)  # out-scaling folds into the bias too
    layer.merge()
    assert torch.equal(layer.weight, w1) and torch.equal(layer.bias, b1)
    sd = copy.deepcopy(layer.state_dict())
    assert torch.equal(sd["weight"], w0) and torch.equal(sd["bias"], b0)
    twin = IA3Linear(8, 8, mode="out")
    twin.load_state_dict(sd)
    assert_rounding(twin(x), y, terms, n)
    layer.load_state_dict(sd)
    assert layer.merged
    assert_rounding(layer(x), y, terms, n)
    layer.unmerge()
    assert torch.equal(layer.weight, w0) and torch.equal(layer.bias, b0)


def test_petras_setup_trains_saves_loads_and_unloads(tmp_path):
    """(IA)^3 on k, v and fc2 + norms / biases trainable, through lora.py's duck-typed helpers."""
    torch.manual_seed(0)
    model = TinyBlock()
    keys = list(model.state_dict())
    names = add_ia3(model, {"qkv": dict(mode="out", rows=list(range(8, 24))), "fc2": "in"})
    assert names == ["qkv", "fc2"]
    trainable, _ = lora.mark_trainable(model, biases=True, modules=("head",))
    assert trainable == 16 + 32 + (24 + 32 + 8 + 3) + 8 * 3  # l vectors + biases + head weight
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    x, t = torch.randn(4, 5, 8), torch.tensor([0, 1, 2, 0])
    for _ in range(3):
        opt.zero_grad()
        F.cross_entropy(model(x), t).backward()
        for n, p in model.named_parameters():
            assert (p.grad is not None) == p.requires_grad, n
        opt.step()
    for n, p in model.named_parameters():
        assert (not torch.equal(p, start[n])) == p.requires_grad, n
    path = tmp_path / "ia3.safetensors"
    lora.save_adapters(model, path)
    torch.manual_seed(0)
    fresh = TinyBlock()
    add_ia3(fresh, {"qkv": dict(mode="out", rows=list(range(8, 24))), "fc2": "in"})
    lora.load_adapters(fresh, path)
    assert torch.equal(fresh(x), model(x))
    model.double()  # the merge check in float64 (see tests/rounding.py)
    x = x.double()
    y = model(x)
    lora.merge_and_unload(model)
    assert list(model.state_dict()) == keys and rel_err(model(x), y) <= 1e-10


def test_rows_are_stored_as_runs_and_files_with_plain_row_lists_still_load(tmp_path, monkeypatch):
    """The file header keeps rows as [start, stop) runs in their order (k and v of a contiguous qkv: one run);
    a file written with the plain row list (older files) loads too, and other rows are still refused."""
    assert IA3Linear(4, 12, rows=[5, 6, 0, 9, 10, 11]).adapter_config()["rows"] == [[5, 7], [0, 1], [9, 12]]
    torch.manual_seed(0)
    model = TinyBlock()
    add_ia3(model, {"qkv": dict(mode="out", rows=list(range(8, 24))), "fc2": "in"})
    randomise(model)
    x = torch.randn(2, 5, 8)

    def fresh(rows=list(range(8, 24))):
        torch.manual_seed(0)
        m = TinyBlock()
        add_ia3(m, {"qkv": dict(mode="out", rows=rows), "fc2": "in"})
        return m

    path = tmp_path / "runs.safetensors"
    lora.save_adapters(model, path)
    configs = json.loads(lora.read_safetensors(path)[1]["adapters"])
    assert configs["qkv"]["rows"] == [[8, 24]] and configs["fc2"]["rows"] is None
    loaded = fresh()
    lora.load_adapters(loaded, path)
    assert torch.equal(loaded.qkv.ia3_rows, torch.arange(8, 24)) and torch.equal(loaded(x), model(x))
    with pytest.raises(ValueError, match=r"qkv: rows is \[\[8, 24\]\] in the file but \[\[0, 16\]\] in the model"):
        lora.load_adapters(fresh(list(range(16))), path)

    plain = IA3Linear.adapter_config  # as files were written before: rows as a list of every row
    monkeypatch.setattr(IA3Linear, "adapter_config",
                        lambda self: dict(plain(self), rows=None if self.ia3_rows is None else self.ia3_rows.tolist()))
    old = tmp_path / "plain.safetensors"
    lora.save_adapters(model, old)
    assert json.loads(lora.read_safetensors(old)[1]["adapters"])["qkv"]["rows"] == list(range(8, 24))
    monkeypatch.undo()
    loaded = fresh()
    lora.load_adapters(loaded, old)
    assert torch.equal(loaded(x), model(x))


def test_matches_peft_ia3():
    peft = pytest.importorskip("peft")

    class Tiny(nn.Module):
        def __init__(self):
            super().__init__()
            self.k = nn.Linear(6, 6)
            self.ff = nn.Linear(6, 6)
            self.conv = nn.Conv2d(6, 6, 1)

        def forward(self, x):  # (B, 6) -> (B, 6)
            h = self.ff(self.k(x))
            return self.conv(h[:, :, None, None])[:, :, 0, 0]

    torch.manual_seed(0)
    base = Tiny()
    ours = copy.deepcopy(base)
    add_ia3(ours, {"k|conv": "out", "ff": "in"})
    randomise(ours)
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.IA3Config(target_modules=["k", "ff", "conv"],
                                                                      feedforward_modules=["ff"]))
    params = dict(theirs.named_parameters())
    with torch.no_grad():
        for name in ("k", "ff", "conv"):
            key = next(k for k in params if f".{name}.ia3_l" in k)
            params[key].copy_(getattr(ours, name).ia3_l.view(params[key].shape))
    x = torch.randn(3, 6)
    # two chained layers and a conv: fan-ins 6 + 6 + 6, biases, scalings; the terms of the chain = the chain on
    # absolute values (no non-linearity in between)
    assert_rounding(ours(x), theirs(x), abs_terms(ours, x), 2 * (3 * 6 + 6))
    assert rel_err(ours(x), base(x)) > 1e-2


def test_errors():
    with pytest.raises(ValueError, match="mode must be 'out'"):
        IA3Linear(4, 4, mode="both")
    with pytest.raises(ValueError, match="mode='out' only"):
        IA3Linear(4, 4, mode="in", rows=[0])
    with pytest.raises(ValueError, match=r"lie in \[0, 4\)"):
        IA3Linear(4, 4, rows=[4])
    model = TinyBlock()
    with pytest.raises(ValueError, match="matches no module"):
        add_ia3(model, {r"attn\.qkv": "out"})
    with pytest.raises(TypeError, match="'0' is a TinyBlock, which has no"):
        add_ia3(nn.Sequential(model), {"0": "out"})
