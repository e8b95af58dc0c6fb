"""LoRALinear and the model-level helpers of lora.py: exact merges, training, adapter files, errors."""

import copy
import json
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from rounding import abs_terms, assert_rounding, rel_err

import lora
from conv_lora import LoRAConv2d
from ia3 import IA3Conv2d, IA3Linear
from lora import LoRALinear, add_lora, mark_trainable, qkv_rows

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny ops: see conftest.py


def randomise_adapters(model: nn.Module, std: float = 0.5) -> None:
    # With B = 0 a merged-vs-unmerged comparison proves nothing: give B (and a) real values.
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("lora_B"):
                p.copy_(torch.randn(p.shape, generator=g) * std)
            if name.endswith("lora_interp"):
                p.fill_(0.7)


class TinyAttn(nn.Module):
    """A fused-qkv attention block + MLP + head, small enough for CPU tests."""

    def __init__(self, dim: int = 16, heads: int = 2):
        super().__init__()
        self.heads = heads
        self.norm = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.fc1 = nn.Linear(dim, 2 * dim)
        self.fc2 = nn.Linear(2 * dim, dim)
        self.head = nn.Linear(dim, 5)

    def forward(self, x):  # (B, N, C) -> (B, 5)
        B, N, C = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(B, N, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
        x = x + self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, N, C))
        x = x + self.fc2(F.gelu(self.fc1(x)))
        return self.head(x.mean(1))


# ---- LoRALinear numerics ----------------------------------------------------------------------------------

def test_init_equals_base_and_shapes():
    torch.manual_seed(0)
    base = nn.Linear(12, 20)
    layer = LoRALinear.from_module(base, r=4, alpha=8)
    assert layer.weight is base.weight and layer.bias is base.bias  # re-used, not copied
    assert layer.lora_A.shape == (4, 12) and layer.lora_B.shape == (20, 4)
    assert torch.count_nonzero(layer.lora_B) == 0 and torch.count_nonzero(layer.lora_A) > 0
    assert layer.scaling == 2.0
    x = torch.randn(3, 12)
    assert torch.equal(layer(x), base(x))


def test_forward_is_the_lora_equation():
    torch.manual_seed(0)
    layer = LoRALinear(10, 6, r=3, alpha=6.0).double()
    randomise_adapters(layer)
    x = torch.randn(4, 10, dtype=torch.double)
    expected = x @ layer.weight.T + layer.bias + 2.0 * x @ (layer.lora_B @ layer.lora_A).T
    assert torch.allclose(layer(x), expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("learn_interp", [False, True])
@pytest.mark.parametrize("rows", [None, "qv_contiguous", "qv_per_head"])
def test_merged_equals_unmerged_fp32(bias, learn_interp, rows):
    torch.manual_seed(0)
    rows = {None: None, "qv_contiguous": qkv_rows(16, 16, 16, 4, ("q", "v")),
            "qv_per_head": qkv_rows(16, 16, 16, 4, ("q", "v"), layout="per_head")}[rows]
    layer = LoRALinear(32, 48, bias=bias, r=4, alpha=8, learn_interp=learn_interp, rows=rows)
    randomise_adapters(layer)
    x = torch.randn(2, 7, 32)
    y = layer(x)
    terms, n = abs_terms(layer, x), 2 * (32 + 4 + 4)  # two fp32 results; fan-in + r + bias, scaling, a, 1 - a
    layer.merge()
    assert layer.merged
    assert_rounding(layer(x), y, terms, n)
    assert_rounding(layer.to_base()(x), y, terms, n)
    # the merged weight is the equation's: rows outside `rows` keep W0 exactly
    layer.unmerge()
    w = layer.merged_weight()
    dw = torch.zeros(48, 32)
    dw[slice(None) if rows is None else rows] = 2.0 * layer.lora_B.detach() @ layer.lora_A.detach()
    a = 0.7 if learn_interp else 1.0
    in_rows = torch.zeros(48, 1, dtype=torch.bool)
    in_rows[slice(None) if rows is None else rows] = True
    expected = torch.where(in_rows, a * layer.weight + (1 - a) * dw if learn_interp else layer.weight + dw,
                           layer.weight)
    dw_terms = torch.zeros(48, 32)
    dw_terms[slice(None) if rows is None else rows] = 2.0 * layer.lora_B.detach().abs() @ layer.lora_A.detach().abs()
    w0_terms = layer.weight.detach().abs()
    w_terms = a * w0_terms + (1 - a) * dw_terms if learn_interp else w0_terms + dw_terms
    assert_rounding(w, expected, w_terms, 2 * (4 + 3))  # r products, then the scaling, a, the addition
    if rows is not None:
        assert torch.equal(w[~in_rows.squeeze(1)], layer.weight[~in_rows.squeeze(1)])


def test_merge_bf16_accumulates_in_fp32():
    """Documented bf16 behaviour: merge() sums W0 + s B A in fp32 and rounds once, so every merged
    weight is the correctly rounded bf16 value of the exact (fp64) sum; merging with bf16 arithmetic
    rounds two or three times and misses it for some weights. Outputs: merged bf16 vs fp64 reference
    within 5e-3 relative error, merged vs unmerged bf16 within 1e-2 (bf16 has 8 significant bits)."""
    torch.manual_seed(0)
    layer = LoRALinear(256, 256, r=8, alpha=16, dtype=torch.bfloat16)
    with torch.no_grad():
        layer.lora_B.normal_(0, 0.01)
    w0, A, B, s = layer.weight, layer.lora_A, layer.lora_B, layer.scaling
    exact = w0.double() + s * (B.double() @ A.double())
    ours = layer.merged_weight()
    naive = w0 + (B @ A) * s  # merging in bf16
    correctly_rounded = exact.to(torch.bfloat16)
    ours_hits = (ours == correctly_rounded).float().mean().item()
    naive_hits = (naive == correctly_rounded).float().mean().item()
    assert ours.dtype == torch.bfloat16
    assert ours_hits >= 0.999 and naive_hits < ours_hits
    assert (ours.double() - exact).abs().mean() <= (naive.double() - exact).abs().mean()

    x = torch.randn(64, 256, dtype=torch.bfloat16)
    reference = x.double() @ exact.T + layer.bias.double()
    y_unmerged = layer(x)
    layer.merge()
    y_merged = layer(x)
    assert rel_err(y_merged, reference) <= 5e-3
    assert rel_err(y_merged, y_unmerged) <= 1e-2


def test_unmerge_bit_exact_and_merge_twice_is_noop():
    torch.manual_seed(0)
    layer = LoRALinear(24, 24, r=4, learn_interp=True)
    randomise_adapters(layer)
    w0 = layer.weight.detach().clone()
    param = layer.weight
    layer.merge()
    w_once = layer.weight.detach().clone()
    assert not torch.equal(w_once, w0)
    layer.merge()
    assert torch.equal(layer.weight, w_once)  # second merge added nothing
    layer.unmerge()
    assert layer.weight is param and torch.equal(layer.weight, w0)  # bit for bit, same Parameter
    layer.unmerge()
    assert torch.equal(layer.weight, w0)


def test_merged_forward_is_one_linear_call(monkeypatch):
    layer = LoRALinear(8, 8, r=2)
    layer.merge()
    calls = []
    real = F.linear
    monkeypatch.setattr(F, "linear", lambda *a, **k: calls.append(1) or real(*a, **k))
    layer(torch.randn(2, 8))
    assert len(calls) == 1


def test_state_dict_never_applies_update_twice():
    torch.manual_seed(0)
    model = TinyAttn().double()
    add_lora(model, {"qkv": dict(r=4, rows=qkv_rows(16, 16, 16, 2)), "proj|fc1|fc2": 4})
    randomise_adapters(model)
    x = torch.randn(2, 5, 16, dtype=torch.double)
    y = model(x)
    w0 = model.qkv.weight.detach().clone()
    lora.merge_adapters(model)
    sd = copy.deepcopy(model.state_dict())
    assert torch.equal(sd["qkv.weight"], w0)  # the ORIGINAL weight is what gets saved
    # into an unmerged twin: same outputs, so the update is applied exactly once
    twin = TinyAttn().double()
    add_lora(twin, {"qkv": dict(r=4, rows=qkv_rows(16, 16, 16, 2)), "proj|fc1|fc2": 4})
    twin.load_state_dict(sd)
    assert rel_err(twin(x), y) <= 1e-10  # float64 (see tests/rounding.py)
    # into the merged model itself (load while merged): still once
    model.load_state_dict(sd)
    assert model.qkv.merged and rel_err(model(x), y) <= 1e-10
    lora.unmerge_adapters(model)
    assert torch.equal(model.qkv.weight, w0)


def test_rows_saved_as_runs_roundtrip(tmp_path):
    """LoRA on q and v of a per-head qkv: the file header stores the rows as [start, stop) runs, and they load back
    into the same rows."""
    rows = qkv_rows(4, 4, 8, 2, ("q", "v"), layout="per_head")  # [0, 1, 4, ..., 9, 12, ..., 15] (test below)
    model = make_adapted(targets="proj")
    add_lora(model, {"qkv": dict(r=2, rows=qkv_rows(16, 16, 16, 2, ("q", "v"), layout="per_head"))})
    assert LoRALinear(8, 16, r=2, rows=rows).adapter_config()["rows"] == [[0, 2], [4, 10], [12, 16]]
    randomise_adapters(model)
    path = tmp_path / "a.safetensors"
    lora.save_adapters(model, path)
    # per head of 24 rows [q 8 | k 8 | v 8]: q and v are the runs 0-8, 16-32 (v of head 0 meets q of head 1), 40-48
    assert json.loads(lora.read_safetensors(path)[1]["adapters"])["qkv"]["rows"] == [[0, 8], [16, 32], [40, 48]]
    twin = make_adapted(targets="proj")
    add_lora(twin, {"qkv": dict(r=2, rows=qkv_rows(16, 16, 16, 2, ("q", "v"), layout="per_head"))})
    lora.load_adapters(twin, path)
    x = torch.randn(2, 5, 16)
    assert torch.equal(twin.qkv.lora_rows, model.qkv.lora_rows) and torch.equal(twin(x), model(x))
    # runs_to_rows reads them back (what multitask / deploy rebuild adapters from), and an older file's plain list
    assert lora.runs_to_rows([[0, 2], [4, 10], [12, 16]]) == rows.tolist()
    assert lora.runs_to_rows(rows.tolist()) == rows.tolist() and lora.runs_to_rows(None) is None


def test_qkv_rows_layouts():
    # contiguous [q | k | v], 4 wide each
    assert qkv_rows(4, 4, 4, 2, ("q", "v")).tolist() == [0, 1, 2, 3, 8, 9, 10, 11]
    assert qkv_rows(4, 4, 4, 2, ("k", "v")).tolist() == [4, 5, 6, 7, 8, 9, 10, 11]
    # per head [q_h k_h v_h], 2 heads with q, k 2 wide and v 4 wide per head: head block of 8
    assert qkv_rows(4, 4, 8, 2, ("q", "v"), layout="per_head").tolist() == [0, 1, 4, 5, 6, 7, 8, 9, 12, 13, 14, 15]
    with pytest.raises(ValueError, match="parts"):
        qkv_rows(4, 4, 4, 2, ("x",))
    with pytest.raises(ValueError, match="layout"):
        qkv_rows(4, 4, 4, 2, layout="interleaved")
    with pytest.raises(ValueError, match="divisible"):
        qkv_rows(4, 4, 5, 2, layout="per_head")


@pytest.mark.parametrize("layout", ["contiguous", "per_head"])
def test_rows_lora_equals_lora_on_separate_q_and_v(layout):
    """LoRA on the q and v rows of a fused qkv == LoRA on separate q and v layers (SAMed's setup)."""
    torch.manual_seed(0)
    dim, heads, hd = 12, 3, 4
    fused = LoRALinear(dim, 3 * dim, r=2, rows=qkv_rows(dim, dim, dim, heads, ("q", "v"), layout=layout))
    randomise_adapters(fused)
    x = torch.randn(5, dim)
    y = fused(x)
    if layout == "contiguous":
        q_rows, k_rows, v_rows = torch.arange(0, 12), torch.arange(12, 24), torch.arange(24, 36)
    else:  # per head blocks [q_h k_h v_h] of 12 rows
        q_rows = torch.cat([torch.arange(h * 12, h * 12 + 4) for h in range(heads)])
        k_rows, v_rows = q_rows + hd, q_rows + 2 * hd
    # the q / v parts of lora_B, in the order fused.lora_rows lists them
    pos = {int(r): i for i, r in enumerate(fused.lora_rows)}
    for rows, adapted in ((q_rows, True), (k_rows, False), (v_rows, True)):
        W, b = fused.weight[rows], fused.bias[rows]
        expected = x @ W.T + b
        if adapted:
            B = fused.lora_B[[pos[int(r)] for r in rows]]
            expected = expected + x @ (B @ fused.lora_A).T
        assert_rounding(y[:, rows], expected, abs_terms(fused, x)[:, rows], 2 * (dim + 2 + 3))  # fan-in + r + 3


# ---- training -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("learn_interp", [False, True])
def test_training_changes_only_adapters_and_chosen_extras(learn_interp):
    torch.manual_seed(0)
    model = TinyAttn()
    before = copy.deepcopy(model.state_dict())
    add_lora(model, {r"qkv|proj": 4}, learn_interp=learn_interp)
    trainable, total = mark_trainable(model, modules=("head",))
    adapter = {n: p for n, p in model.named_parameters() if ".lora_" in n}
    n_adapter = 4 * (16 + 48) + 4 * (16 + 16) + (2 if learn_interp else 0)  # r (d_in + d_out) per layer
    assert sum(p.numel() for p in adapter.values()) == n_adapter
    assert trainable == n_adapter + 16 * 5 + 5  # + head weight and bias
    assert total == sum(p.numel() for p in model.parameters())
    randomise_adapters(model, std=0.1)  # non-zero B, so A receives a gradient from the first step
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    x, target = torch.randn(4, 5, 16), torch.randint(0, 5, (4,))
    for _ in range(3):
        opt.zero_grad()
        F.cross_entropy(model(x), target).backward()
        for n, p in model.named_parameters():
            if p.requires_grad:
                assert p.grad is not None, n
            else:
                assert p.grad is None, n
        opt.step()
    for n, p in model.named_parameters():
        changed = not torch.equal(p, start[n])
        assert changed == (n in adapter or n.startswith("head.")), n
    # the frozen base is untouched: its keys hold exactly the values they had before add_lora
    sd = model.state_dict()
    assert all(torch.equal(sd[k], v) for k, v in before.items() if not k.startswith("head."))


def test_mark_trainable_biases_norms_and_counts():
    model = TinyAttn()
    add_lora(model, {"qkv": 2})
    trainable, total = mark_trainable(model, biases=True, norms=True)
    expected = {"qkv.lora_A", "qkv.lora_B", "norm.weight", "norm.bias", "qkv.bias", "proj.bias", "fc1.bias",
                "fc2.bias", "head.bias"}
    assert {n for n, p in model.named_parameters() if p.requires_grad} == expected
    assert trainable == sum(p.numel() for n, p in model.named_parameters() if n in expected)
    assert lora.param_counts(model)["adapter_tensors"] == 2 * (16 + 48)
    with pytest.raises(ValueError, match="no parameter lives under module 'classifier'"):
        mark_trainable(model, modules=("classifier",))


def test_freeze_bn_stats_keeps_running_statistics():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4))
    add_lora(model, {"0|2": 1}, layers={nn.Conv2d: LoRAConv2d})
    mark_trainable(model, modules=("3",))  # BN "3" trains, BN "1" is frozen
    model.train()
    assert lora.freeze_bn_stats(model) == 1
    mean1, mean3 = model[1].running_mean.clone(), model[3].running_mean.clone()
    model(torch.randn(2, 3, 8, 8))
    assert torch.equal(model[1].running_mean, mean1) and not model[1].training
    assert not torch.equal(model[3].running_mean, mean3) and model[3].training


# ---- reference implementation: peft --------------------------------------------------------------------

def test_matches_peft_lora_linear():
    peft = pytest.importorskip("peft")

    class Tiny(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(20, 12)

        def forward(self, x):
            return self.lin(x)

    torch.manual_seed(0)
    base = Tiny()
    ours = copy.deepcopy(base)
    add_lora(ours, {"lin": dict(r=4, alpha=12)})
    randomise_adapters(ours)
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=4, lora_alpha=12, target_modules=["lin"]))
    sd = {k: v for k, v in theirs.state_dict().items() if "lora_" in k}
    a_key, b_key = [k for k in sd if "lora_A" in k][0], [k for k in sd if "lora_B" in k][0]
    with torch.no_grad():  # same A and B in both
        dict(theirs.named_parameters())[a_key].copy_(ours.lin.lora_A)
        dict(theirs.named_parameters())[b_key].copy_(ours.lin.lora_B)
    x = torch.randn(3, 20)
    assert_rounding(ours(x), theirs(x), abs_terms(ours, x), 2 * (20 + 4 + 3))
    assert rel_err(ours(x), base(x)) > 1e-2  # the update is not trivially zero


# ---- a model nobody here wrote ---------------------------------------------------------------------------

def test_torchvision_resnet18_adapt_train_merge_unload():
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None, num_classes=10)
    keys = list(model.state_dict())
    names = add_lora(model, {lambda n, m: isinstance(m, nn.Conv2d): 1, "fc": 4},
                     layers={nn.Linear: LoRALinear, nn.Conv2d: LoRAConv2d})
    assert len(names) == 21  # 20 convs (17 + 3 downsample) and fc
    mark_trainable(model)
    counts = lora.param_counts(model)
    assert counts["trainable"] == counts["adapter_tensors"] == sum(
        m.r * (m.out_channels + m.in_channels // m.groups * m.kernel_size[0] * m.kernel_size[1])
        for m in model.modules() if isinstance(m, LoRAConv2d)) + 4 * (512 + 10)
    model.train()
    lora.freeze_bn_stats(model)
    x = torch.randn(2, 3, 32, 32)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    for _ in range(2):  # two steps: the first moves B off zero, the second moves A too
        opt.zero_grad()
        F.cross_entropy(model(x), torch.tensor([1, 2])).backward()
        opt.step()
    assert all(torch.count_nonzero(m.lora_B) > 0 for m in model.modules() if hasattr(m, "lora_B"))
    model.eval().double()  # the merge check in float64 (see tests/rounding.py)
    x = x.double()
    with torch.no_grad():
        y = model(x)
        lora.merge_and_unload(model)
        assert list(model.state_dict()) == keys
        assert not any(hasattr(m, "adapter_names") for m in model.modules())
        assert rel_err(model(x), y) <= 1e-10


def test_base_checkpoint_loads_into_adapted_model_without_renaming():
    torch.manual_seed(0)
    base = TinyAttn()
    sd = base.state_dict()
    adapted = TinyAttn()
    add_lora(adapted, {"qkv|proj": 2})
    result = adapted.load_state_dict(sd, strict=False)
    assert result.unexpected_keys == []
    assert sorted(result.missing_keys) == ["proj.lora_A", "proj.lora_B", "qkv.lora_A", "qkv.lora_B"]
    x = torch.randn(2, 3, 16)
    assert torch.equal(adapted(x), base(x))


def test_shared_module_is_adapted_under_every_name():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(4, 4)
            self.b = self.a

    m = Tied()
    add_lora(m, {"a": 2})
    assert isinstance(m.b, LoRALinear) and m.a is m.b


# ---- adapter files ---------------------------------------------------------------------------------------

def make_adapted(seed: int = 0, r: int = 4, targets=r"qkv|proj") -> TinyAttn:
    torch.manual_seed(seed)
    model = TinyAttn()
    add_lora(model, {targets: r})
    mark_trainable(model, modules=("head",))
    return model


def test_save_load_adapters_roundtrip(tmp_path):
    model = make_adapted()
    randomise_adapters(model)
    with torch.no_grad():
        model.head.weight.mul_(3)  # a trained head travels with the adapters
    path = tmp_path / "adapters.safetensors"
    lora.save_adapters(model, path, metadata={"epoch": 7, "dataset": "synthetic"})
    fresh = make_adapted()
    x = torch.randn(2, 5, 16)
    assert rel_err(fresh(x), model(x)) > 1e-3
    assert lora.load_adapters(fresh, path) == {"epoch": 7, "dataset": "synthetic"}
    assert torch.equal(fresh(x), model(x))
    # the file holds the adapters and the head, nothing of the frozen base
    tensors, meta = lora.read_safetensors(path)
    assert sorted(tensors) == ["head.bias", "head.weight", "proj.lora_A", "proj.lora_B", "qkv.lora_A", "qkv.lora_B"]
    assert json.loads(meta["trainable"]) == ["head.weight", "head.bias"]
    assert json.loads(meta["adapters"])["qkv"]["r"] == 4


def test_adapter_file_is_standard_safetensors(tmp_path):
    from safetensors.torch import load_file, save_file

    model = make_adapted()
    randomise_adapters(model)
    path = tmp_path / "a.safetensors"
    lora.save_adapters(model, path)
    theirs = load_file(str(path))
    ours = lora.adapter_state_dict(model)
    assert theirs.keys() == ours.keys() and all(torch.equal(theirs[k], ours[k]) for k in ours)
    # and our reader reads files written by the safetensors library, every dtype we map
    tensors = {"f32": torch.randn(3, 4), "bf16": torch.randn(5).bfloat16(), "f16": torch.randn(2, 2).half(),
               "i64": torch.arange(7), "bool": torch.rand(4, 4) > 0.5, "scalar": torch.tensor(1.5),
               "f64": torch.randn(3, dtype=torch.double), "u8": torch.arange(9, dtype=torch.uint8)}
    save_file(tensors, str(tmp_path / "b.safetensors"), metadata={"k": "v"})
    back, meta = lora.read_safetensors(tmp_path / "b.safetensors")
    assert meta == {"k": "v"}
    assert all(back[k].dtype == v.dtype and torch.equal(back[k], v) for k, v in tensors.items())


def test_load_adapters_lists_every_mismatch(tmp_path):
    model = make_adapted()
    path = tmp_path / "a.safetensors"
    lora.save_adapters(model, path)
    other = make_adapted(seed=1, r=2, targets=r"qkv|fc1")  # other base, rank and targets
    with pytest.raises(ValueError) as err:
        lora.load_adapters(other, path)
    msg = str(err.value)
    assert "in the file but not in the model: ['proj']" in msg
    assert "in the model but not in the file: ['fc1']" in msg
    assert "qkv: r is 4 in the file but 2 in the model" in msg
    assert "tensor qkv.lora_A has shape (4, 16) in the file but (2, 16) in the model" in msg
    assert "tensor proj.lora_A in the file has no place in the model" in msg
    assert "fingerprint" in msg
    # same adapters, other base weights: only the fingerprint complains, and it can be waived
    other_base = make_adapted(seed=1)
    with pytest.raises(ValueError, match="fingerprint"):
        lora.load_adapters(other_base, path)
    lora.load_adapters(other_base, path, check_fingerprint=False)


def test_fingerprint_covers_only_the_frozen_base():
    model = make_adapted()
    exclude = set(lora.adapter_state_dict(model))
    fp = lora.base_fingerprint(model, exclude=exclude)
    torch.manual_seed(0)
    assert lora.base_fingerprint(TinyAttn(), exclude=exclude) == fp  # the un-adapted base hashes the same
    randomise_adapters(model)
    lora.merge_adapters(model)
    assert lora.base_fingerprint(model, exclude=exclude) == fp  # adapters / merging do not change it
    with torch.no_grad():
        model.fc1.weight[0, 0] += 1e-3
    assert lora.base_fingerprint(model, exclude=exclude) != fp


# ---- bad input -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("r", [0, -1, 13])
def test_rank_out_of_range(r):
    with pytest.raises(ValueError, match=r"0 < r <= 12"):
        LoRALinear(12, 20, r=r)


def test_rank_must_be_int():
    with pytest.raises(TypeError, match="int"):
        LoRALinear(12, 20, r=2.0)


def test_rank_checked_against_rows():
    with pytest.raises(ValueError, match="0 < r <= 4"):
        LoRALinear(12, 20, r=8, rows=[0, 1, 2, 3])


def test_add_lora_errors_name_the_problem():
    model = TinyAttn()
    with pytest.raises(ValueError, match=r"pattern 'attn\\.qkv' matches no module .*'qkv'"):
        add_lora(model, {r"attn\.qkv": 8})
    with pytest.raises(TypeError, match=r"matched 'norm' of type LayerNorm"):
        add_lora(model, {"norm|qkv": 8})
    with pytest.raises(ValueError, match=r"module 'proj'.*0 < r <= 16"):
        add_lora(model, {"proj": 32})
    with pytest.raises(ValueError, match="matched by both"):
        add_lora(model, {"qkv": 2, "q.*": 2})
    with pytest.raises(ValueError, match="rows contains duplicates"):
        add_lora(model, {"qkv": dict(r=2, rows=[1, 1])})
    assert not any(isinstance(m, LoRALinear) for m in model.modules())  # failed calls changed nothing
    add_lora(model, {"qkv": 2})
    with pytest.raises(ValueError, match="already is an adapter"):
        add_lora(model, {"qkv": 2})


def test_multihead_attention_out_proj_is_refused():
    # nn.MultiheadAttention reads out_proj.weight directly, so an adapter there would be bypassed.
    model = nn.Sequential(nn.MultiheadAttention(8, 2))
    with pytest.raises(TypeError, match="MultiheadAttention"):
        add_lora(model, {r"0\.out_proj": 2}, layers={nn.Linear: LoRALinear,
                                                     type(model[0].out_proj): LoRALinear})


def test_load_adapters_rejects_files_without_metadata(tmp_path):
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(2)}, str(tmp_path / "x.safetensors"))
    with pytest.raises(ValueError, match="save_adapters"):
        lora.load_adapters(make_adapted(), tmp_path / "x.safetensors")
    with pytest.raises(FileNotFoundError):
        lora.load_adapters(make_adapted(), tmp_path / "missing.safetensors")


# ---- each adapter file stands alone on torch ------------------------------------------------------------------------

ROOT = Path(__file__).resolve().parents[1]
ADAPTER_FILES = ("lora.py", "conv_lora.py", "ia3.py")
# What each file runs after being copied alone into an empty directory: a layer built, adapted, merged.
STANDALONE_USE = {
    "lora": "m = nn.Sequential(nn.Linear(4, 6)); lora.add_lora(m, {'0': 2}); m[0].lora_B.data.normal_(); "
            "x = torch.randn(3, 4); y = m(x); lora.merge_and_unload(m); assert (m(x) - y).abs().max() < 1e-5; "
            "lora.write_safetensors({'w': m[0].weight}, 'f.safetensors'); "
            "assert torch.equal(lora.read_safetensors('f.safetensors')[0]['w'], m[0].weight)",
    "conv_lora": "c = conv_lora.LoRAConv2d(3, 4, 3, r=2); c.lora_B.data.normal_(); x = torch.randn(1, 3, 5, 5); "
                 "assert (c.to_base()(x) - c(x)).abs().max() < 1e-5",
    "ia3": "m = nn.Sequential(nn.Linear(4, 6)); ia3.add_ia3(m, {'0': 'out'}); m[0].ia3_l.data.normal_(); "
           "x = torch.randn(3, 4); assert (m[0].to_base()(x) - m(x)).abs().max() < 1e-5",
}


@pytest.mark.parametrize("file", ADAPTER_FILES)
def test_adapter_file_imports_only_torch_and_the_standard_library(file):
    import ast
    import sys
    tree = ast.parse((ROOT / file).read_text())
    names = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    names |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.level == 0}
    tops = {n.split(".")[0] for n in names}
    assert "torch" in tops and tops - {"torch"} <= set(sys.stdlib_module_names), sorted(tops)


@pytest.mark.parametrize("file", ADAPTER_FILES)
def test_adapter_file_runs_copied_alone(file, tmp_path):
    """Copied alone into an empty directory, with the project, safetensors, timm and peft made unimportable,
    the file imports and adapts, merges (and, lora.py, writes and reads a safetensors file)."""
    import shutil
    import subprocess
    import sys
    shutil.copy(ROOT / file, tmp_path / file)
    module = file[:-3]
    blocked = ["lora", "conv_lora", "ia3", "models", "methods", "data", "dataio", "tasks", "training",
               "safetensors", "timm", "peft", "torchvision", "segment_anything"]
    blocked.remove(module)
    code = (
        "import sys, importlib.abc\n"
        "class Block(importlib.abc.MetaPathFinder):\n"
        f"    def find_spec(self, name, path=None, target=None):\n"
        f"        if name.split('.')[0] in {blocked!r}: raise ImportError('blocked: ' + name)\n"
        "sys.meta_path.insert(0, Block())\n"
        f"sys.path.insert(0, {str(tmp_path)!r})\n"
        "import torch, torch.nn as nn\n"
        f"import {module}\n"
        f"{STANDALONE_USE[module]}\n"
        "print('ok')\n")
    # -I: isolated (no PYTHONPATH, no current directory on sys.path); the repository is not reachable
    out = subprocess.run([sys.executable, "-I", "-c", code], cwd=tmp_path, capture_output=True, text=True,
                         env={"OMP_NUM_THREADS": "1", "PATH": ""})
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]


ADAPTED_LAYERS = {  # every adapter file's layers, each with an input
    "LoRALinear": lambda: (LoRALinear(16, 12, r=4), torch.randn(5, 16)),
    "LoRAConv2d": lambda: (LoRAConv2d(6, 8, 3, padding=1, r=2), torch.randn(2, 6, 7, 7)),
    "IA3Linear": lambda: (IA3Linear(16, 12), torch.randn(5, 16)),
    "IA3Conv2d-in": lambda: (IA3Conv2d(6, 8, 3, mode="in"), torch.randn(2, 6, 7, 7)),
}


@pytest.mark.parametrize("name", ADAPTED_LAYERS)
def test_merge_and_unmerge_take_effect_inside_autocast(name):
    """autocast keeps the low-precision copy of a trainable leaf weight for its whole `with` block, keyed by the
    tensor that merge() rewrites in place: a forward after merge() (or unmerge()) in the same block must not use
    the copy of the weight as it was. Each forward is compared bit for bit with the same layer state in a fresh
    block (same bf16 casts, same kernels); without clearing the cache the adapter's effect is lost or doubled."""
    torch.manual_seed(0)
    layer, x = ADAPTED_LAYERS[name]()
    with torch.no_grad():  # B != 0, l != 1: the update is not the identity
        for n, p in layer.named_parameters():
            if n in ("lora_B", "ia3_l"):
                p.copy_(torch.randn_like(p) + (n == "ia3_l"))
    layer.weight.requires_grad_(True)  # full fine-tuning's case; autocast caches only casts of trainable leaves
    with torch.autocast("cpu", dtype=torch.bfloat16):
        before = layer(x)
        layer.merge()
        merged = layer(x)
        layer.unmerge()
        unmerged = layer(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        layer.merge()
        merged_fresh = layer(x)
    layer.unmerge()
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the frozen layer alone: what a stale copy would give
        base = (nn.Linear if isinstance(layer, nn.Linear) else nn.Conv2d).forward(layer, x)
    assert (merged_fresh.float() - base.float()).abs().max() > 0.1 * base.float().abs().max()
    assert torch.equal(merged, merged_fresh)
    assert torch.equal(unmerged, before)
