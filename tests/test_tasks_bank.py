"""tasks/bank.py: the task bank (select / mixed batches / unload); bad input leaves the bank as it was."""
import copy
import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn as nn
from nets import GroupedNet, perturb
from rounding import rel_err

from conv_lora import LoRAConv2d
from ia3 import add_ia3
from lora import add_lora, mark_trainable, merge_and_unload
from methods import apply_method
from models import create_model
from tasks.bank import TaskBank, _Switch
from tasks.task_file import read_task, save_task

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def ef_task(base, path, method, num_classes, **kw):
    """Train-like task on a copy of `base`: write its task file, return its merged model."""
    m = copy.deepcopy(base)
    m.reset_classifier(num_classes)
    apply_method(m, "ef_tiny", method, **kw)
    perturb(m)
    save_task(m, path, meta=dict(task_type="cls", model="ef_tiny", method=method, num_classes=num_classes))
    return merge_and_unload(m).eval()


def snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def same_state(model, snap) -> bool:
    sd = model.state_dict()
    return set(sd) == set(snap) and all(torch.equal(sd[k], snap[k]) and sd[k].dtype == snap[k].dtype for k in sd)


@pytest.fixture(scope="module")
def ef(tmp_path_factory):
    """ef_tiny base + four tasks of different methods, ranks, trained tensors and head sizes, in fp32."""
    d = tmp_path_factory.mktemp("ef")
    torch.manual_seed(0)
    base = create_model("ef_tiny", num_classes=3, img_size=64).eval()
    merged = {
        "petah": ef_task(base, d / "petah.safetensors", "petah", 7, rc=2, train_norms=True),
        "ia3": ef_task(base, d / "ia3.safetensors", "ia3", 5),
        "interp": ef_task(base, d / "interp.safetensors", "lora", 3, learn_interp=True, train_biases=True, alpha=4.0),
        "mlp": ef_task(base, d / "mlp.safetensors", "lora_mlp", 11, r=4),
    }
    return base, d, merged


def test_mixed_batch_equals_merged_models(ef):
    """Each sample of one mixed forward == its task's merged model, within fp32 rounding of the unmerged path."""
    base, d, merged = ef
    bank = TaskBank(copy.deepcopy(base))
    for n in merged:
        bank.add(n, d / f"{n}.safetensors")
    torch.manual_seed(1)
    x = torch.randn(10, 3, 64, 64)
    tasks = ["petah", "ia3", "interp", None, "mlp", "ia3", "petah", "interp", "mlp", "petah"]
    with torch.no_grad():
        out = bank(x, tasks)
        refs = {n: m(x) for n, m in merged.items()} | {None: base(x)}
    for i, t in enumerate(tasks):
        assert out[i].shape == refs[t][i].shape  # each head its own width (7, 5, 3, 11; the base's 3)
        assert rel_err(out[i], refs[t][i]) <= 1e-5, (i, t)
    # selecting one task runs its merged layers: the very numbers of the merged model
    for n in merged:
        bank.select(n)
        with torch.no_grad():
            assert torch.equal(bank(x), refs[n])


def test_mixed_batch_float64_exact(ef):
    """The routing itself adds no error: in float64 every sample equals its merged model to 1e-10."""
    base, d, _ = ef
    b64 = copy.deepcopy(base).double()
    merged = {"petah": ef_task(b64, d / "p64.safetensors", "petah", 6, rc=2, train_norms=True, learn_interp=True),
              "ia3": ef_task(b64, d / "i64.safetensors", "ia3", 4, train_biases=True)}
    bank = TaskBank(b64)
    bank.add("petah", d / "p64.safetensors")
    bank.add("ia3", d / "i64.safetensors")
    x = torch.randn(5, 3, 64, 64, dtype=torch.float64)
    tasks = ["ia3", "petah", "ia3", "petah", "petah"]
    with torch.no_grad():
        out = bank(x, tasks)
        refs = {n: m(x) for n, m in merged.items()}
    for i, t in enumerate(tasks):
        assert rel_err(out[i], refs[t][i]) <= 1e-10


def test_grouped_and_depthwise_convs(tmp_path):
    torch.manual_seed(0)
    base = GroupedNet().eval()
    with torch.no_grad():  # non-trivial base BatchNorm statistics
        base.bn2.running_mean.normal_()
        base.bn2.running_var.uniform_(0.5, 2)
    m1 = copy.deepcopy(base)
    m1.head = nn.Linear(12, 9)
    add_lora(m1, {r"conv1|grouped|depthwise": dict(r=2, learn_interp=True)}, layers={nn.Conv2d: LoRAConv2d})
    mark_trainable(m1, norms=True, modules=("head",))
    perturb(m1)
    save_task(m1, tmp_path / "lora.safetensors", meta=dict(task_type="cls", model="grouped", method="lora"))
    m2 = copy.deepcopy(base)
    add_ia3(m2, {"grouped": "in", "depthwise": "out", "conv1": dict(mode="out", rows=[0, 2, 5])})
    mark_trainable(m2, biases=True, modules=("head",))
    perturb(m2)
    save_task(m2, tmp_path / "ia3.safetensors", meta=dict(task_type="cls", model="grouped", method="ia3"))
    m3 = copy.deepcopy(base)  # no head of its own: the base's 4-class head
    add_lora(m3, {"depthwise": 3}, layers={nn.Conv2d: LoRAConv2d})
    mark_trainable(m3)
    perturb(m3)
    save_task(m3, tmp_path / "nohead.safetensors", meta=dict(task_type="cls", model="grouped", method="lora"))
    refs = {"lora": merge_and_unload(m1).eval(), "ia3": merge_and_unload(m2).eval(),
            "nohead": merge_and_unload(m3).eval()}
    bank = TaskBank(copy.deepcopy(base))
    for n in refs:
        bank.add(n, tmp_path / f"{n}.safetensors")
    x = torch.randn(7, 3, 16, 16)
    tasks = ["ia3", "lora", "lora", "nohead", "ia3", "ia3", "lora"]
    with torch.no_grad():
        out = bank(x, tasks)
        r = {n: m(x) for n, m in refs.items()}
    for i, t in enumerate(tasks):
        assert out[i].shape == r[t][i].shape and rel_err(out[i], r[t][i]) <= 1e-5
    assert out[1].shape == (9,) and out[0].shape == (4,) and out[3].shape == (4,)


def test_select_switch_and_base_restore(ef):
    """A -> B -> A gives A's outputs bit for bit; back to the base restores every parameter and buffer (BatchNorm
    statistics included) after tasks that trained norms; unload gives the very original modules back."""
    base, d, merged = ef
    model = copy.deepcopy(base)
    snap, originals = snapshot(model), dict(model.named_modules())
    bank = TaskBank(model)
    for n in merged:
        bank.add(n, d / f"{n}.safetensors")
    assert same_state(model, snap)  # loading changes no base tensor, and adds no state_dict key
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        bank.select("petah")
        a1 = bank(x)
        bank.select("ia3")
        b = bank(x)
        bank.select("petah")
        a2 = bank(x)
        bank.select(None)
        y0 = bank(x)
        ref0 = base(x)
    assert torch.equal(a1, a2) and not torch.equal(a1[:, :5], b)
    assert torch.equal(y0, ref0) and same_state(model, snap)
    # loading shares the backbone: every adapted layer's variant uses the base weight's storage
    sw = model.get_submodule("stem.conv1")
    assert isinstance(sw, _Switch)
    assert sw.variants["petah"].weight.data_ptr() == originals["stem.conv1"].weight.data_ptr()
    bank.remove("petah")
    assert isinstance(model.stem.conv1, _Switch)  # "interp" trained the stem's biases
    bank.remove("interp")  # the last task changing the stem: its original modules come back
    assert model.stem.conv1 is originals["stem.conv1"] and model.stem.norm1 is originals["stem.norm1"]
    assert bank.names == ["ia3", "mlp"]
    out = bank.unload()
    assert out is model and same_state(model, snap) and not bank.names
    assert not any(isinstance(m, _Switch) for m in model.modules())
    assert all(m is originals[n] for n, m in model.named_modules())  # the plain base modules themselves


def test_resident_memory_is_the_task(ef):
    """A loaded task adds exactly its own tensors: no base tensor is copied."""
    base, d, _ = ef
    model = copy.deepcopy(base)
    base_ptrs = {t.data_ptr() for t in model.state_dict().values()}
    bank = TaskBank(model)
    task = bank.add("petah", d / "petah.safetensors")
    new = {}
    for v in bank.tasks["petah"].variants.values():
        for t in list(v.parameters()) + [b for b in v.buffers() if b is not None]:
            if t.data_ptr() not in base_ptrs:
                new[t.data_ptr()] = t.numel() * t.element_size()
    assert sum(new.values()) == task.nbytes()


def test_bad_input_leaves_bank_unchanged(ef, tmp_path):
    base, d, _ = ef
    model = copy.deepcopy(base)
    bank = TaskBank(model)
    bank.add("ia3", d / "ia3.safetensors")
    snap, types = snapshot(model), {n: type(m) for n, m in model.named_modules()}
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        before = bank(x, ["ia3", "ia3"])

    def unchanged():
        with torch.no_grad():
            after = bank(x, ["ia3", "ia3"])
        return (bank.names == ["ia3"] and same_state(model, snap) and bank.active is None
                and {n: type(m) for n, m in model.named_modules()} == types
                and all(torch.equal(a, b) for a, b in zip(before, after)))

    with pytest.raises(ValueError, match=r"unknown task 'cub'; loaded tasks: \['ia3'\]"):
        bank.select("cub")
    with pytest.raises(ValueError, match=r"unknown task\(s\) \['cub'\]; loaded tasks: \['ia3'\]"):
        bank(x, ["ia3", "cub"])
    with pytest.raises(ValueError, match="already loaded"):
        bank.add("ia3", d / "petah.safetensors")
    assert unchanged()
    # another base: both fingerprints named
    other = copy.deepcopy(base)
    with torch.no_grad():
        other.stages[0].blocks[0].mlp.fc1.weight[0, 0] += 1e-3
    other.reset_classifier(2)
    apply_method(other, "ef_tiny", "lora")
    save_task(other, tmp_path / "other.safetensors", meta=dict(task_type="cls", model="ef_tiny", method="lora"))
    with pytest.raises(ValueError, match="another base model") as e:
        bank.add("other", tmp_path / "other.safetensors")
    assert read_task(tmp_path / "other.safetensors").fingerprint[:16] in str(e.value)
    assert bank.fingerprint(read_task(tmp_path / "other.safetensors").tensors)[:16] in str(e.value)
    assert unchanged()
    # corrupt and truncated files, a full model instead of a task, a missing file
    raw = (d / "petah.safetensors").read_bytes()
    (tmp_path / "trunc.safetensors").write_bytes(raw[:len(raw) // 2])
    (tmp_path / "junk.safetensors").write_bytes(b"\x00" * 7 + b"not a file" * 50)
    from safetensors.torch import save_file
    save_file({k: v.contiguous() for k, v in base.state_dict().items()}, tmp_path / "merged.safetensors")
    for f, msg in (("trunc", "truncated or corrupt"), ("junk", "truncated or corrupt"), ("merged", "not a task file")):
        with pytest.raises(ValueError, match=msg):
            bank.add(f, tmp_path / f"{f}.safetensors")
        assert unchanged()
    with pytest.raises(FileNotFoundError):
        bank.add("none", tmp_path / "none.safetensors")
    # a layout that does not fit: a PETAH file of an EfficientFormer on a ViT
    vit = create_model("vit_tiny", num_classes=3, img_size=32).eval()
    vbank = TaskBank(vit)
    vsnap = snapshot(vit)
    with pytest.raises(ValueError, match=r"(?s)does not fit this model .*'stem\.conv1' does not exist"):
        vbank.add("petah", d / "petah.safetensors")
    assert not vbank.names and same_state(vit, vsnap) and not any(isinstance(m, _Switch) for m in vit.modules())
    # a layout that does not fit: a head of another input width is refused, as is a bad name
    with pytest.raises(ValueError, match="task name"):
        bank.add("a.b", d / "petah.safetensors")
    assert unchanged()


def test_mixed_refuses_what_it_cannot_route(ef, tmp_path):
    """`attn` trains attention_biases, which no switch routes per sample: select() works (and restores the base
    bit for bit), a mixed batch is refused naming the tensor."""
    base, d, _ = ef
    merged = ef_task(base, tmp_path / "attn.safetensors", "attn", 4)
    model = copy.deepcopy(base)
    snap = snapshot(model)
    bank = TaskBank(model)
    bank.add("attn", tmp_path / "attn.safetensors")
    bank.add("ia3", d / "ia3.safetensors")
    x = torch.randn(2, 3, 64, 64)
    with pytest.raises(ValueError, match=r"attn: \[.*attention_biases"):
        bank(x, ["attn", "ia3"])
    bank.select("attn")
    with torch.no_grad():
        assert torch.equal(bank(x), merged(x))
    with pytest.raises(ValueError, match="select"):  # the selected task's swapped tensors would leak into others
        bank(x, ["ia3", "ia3"])
    bank.select(None)
    assert same_state(model, snap)


def test_train_cls_writes_the_task(tmp_path):
    """train_cls.py writes OUT/adapters.safetensors; loaded into a bank on the same base checkpoint, the selected
    task predicts what OUT/merged.safetensors predicts."""
    from safetensors.torch import load_file, save_file
    torch.manual_seed(0)
    base = create_model("ef_tiny", num_classes=3, img_size=64)
    save_file({k: v.contiguous() for k, v in base.state_dict().items()}, tmp_path / "base.safetensors")
    out = tmp_path / "run"
    cmd = [sys.executable, "train_cls.py", "--model", "ef_tiny", "--method", "petah", "--rc", "2", "--train-norms",
           "--data", "synthetic", "--synthetic-classes", "4", "--synthetic-train", "4", "--synthetic-val", "2",
           "--img-size", "64", "--epochs", "1", "--batch-size", "8", "--workers", "0", "--lr", "0.05",
           "--weights", str(tmp_path / "base.safetensors"), "--out", str(out)]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-2000:]
    task = read_task(out / "adapters.safetensors")
    assert task.task_type == "cls" and task.meta["num_classes"] == 4 and task.meta["rc"] == 2
    assert task.meta["img_size"] == 64 and task.meta["model_cfg"]["embed_dims"] == [16, 24, 32, 48]
    assert len(task.meta["class_names"] or [None] * 4) == 4
    bank = TaskBank(base.eval())
    bank.add("synthetic", out / "adapters.safetensors")
    bank.select("synthetic")
    merged = create_model("ef_tiny", num_classes=4, img_size=64).eval()
    merged.load_state_dict(load_file(out / "merged.safetensors"))
    x = torch.randn(4, 3, 64, 64)
    with torch.no_grad():
        assert rel_err(bank(x), merged(x)) <= 1e-5
        assert json.loads(json.dumps(task.meta))["method"] == "petah"


class Folding(nn.Module):
    """Folds its batch before a layer (as windowed attention does): per-sample routing cannot work there."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.head = nn.Linear(8, 3)

    def forward(self, x):  # (B, 8)
        y = self.fc(x.reshape(-1, 4))  # (2B, 4)
        return self.head(y.reshape(-1, 8))


def test_mixed_refuses_a_folded_batch(tmp_path):
    torch.manual_seed(0)
    base = Folding().eval()
    m = copy.deepcopy(base)
    add_lora(m, {"fc": 2})
    mark_trainable(m, modules=("head",))
    perturb(m)
    save_task(m, tmp_path / "t.safetensors", meta=dict(task_type="cls", model="folding", method="lora"))
    bank = TaskBank(base)
    bank.add("t", tmp_path / "t.safetensors")
    x = torch.randn(3, 8)
    with pytest.raises(ValueError, match="layer 'fc' received 6 samples but the batch has 3"):
        bank(x, ["t", None, "t"])
    bank.select("t")  # one task at a time still works
    with torch.no_grad():
        assert rel_err(bank(x), merge_and_unload(m).eval()(x)) <= 1e-5
