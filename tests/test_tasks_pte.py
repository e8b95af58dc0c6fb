"""tasks/pte.py: a task lowered with XNNPACK runs in ExecuTorch's runtime at batch 1 and at a larger batch and
equals PyTorch; many tasks share one base .ptd that adding a task never rewrites, each task equal to its merged
model; int8 runs and stays within its quantisation error; a .ptd of another base is refused.

The base checkpoint and the task files are written to disk and read back the way export.py reads them
(tasks.deploy.build_model + add_task_adapters + lora.load_adapters). Every lowering costs tens of seconds on a
busy CPU, so the module lowers five programs in all, each on ef_tiny (or a smaller net) at 64 x 64. The merged
task in one .pte (export_pte through export.py --format pte) runs at batch 1 and 2 in tests/test_export.py.

fp32 tolerance: XNNPACK's kernels sum the same products in another order than PyTorch's (and the shared-base
task computes W0 x + s B (A x) where PyTorch's merged model computes (W0 + s B A) x). Either way each output is
a chain of dot products of length <= ~600 (ef_tiny's widest: 3 x 3 x 64 inputs of a conv, 192 of an MLP), each
off by at most n eps (Higham's gamma_n, tests/rounding.py) of its |terms|, ~4e-5 for n = 600 in the worst case
and ~sqrt(n) eps ~ 3e-6 typically; 1e-5 of the output scale (max |logit|) holds the typical error with room and
is ~1e4 times below what one wrong tensor changes.
"""

import copy
import hashlib
import os
import sys

import numpy as np
import pytest
import torch
import torch.nn as nn
from safetensors.torch import save_file

from conv_lora import LoRAConv2d
from lora import add_lora, load_adapters, merge_and_unload
from methods import apply_method
from tasks.deploy import add_task_adapters, build_model
from tasks.task_file import read_task, save_task

try:
    from tasks.pte import require_executorch
    require_executorch()
except ValueError as e:
    pytest.skip(f"{e} (CI installs it from requirements-dev.txt)", allow_module_level=True)

from tasks.pte import (  # noqa: E402
    edge_ready,
    export_pte,
    export_pte_base,
    export_pte_task,
    ptd_keys,
    run_pte,
)

pytestmark = pytest.mark.usefixtures("one_thread")

S = 64  # input side
FP32_TOL = 1e-5  # of the output scale, see the module docstring


def sha256(path) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def within(out: np.ndarray, ref: torch.Tensor, tol: float = FP32_TOL) -> tuple[float, float]:
    ref = ref.detach().numpy()
    assert out.shape == ref.shape
    diff, scale = float(np.abs(out - ref).max()), float(np.abs(ref).max())
    assert diff <= tol * scale, (diff, scale)
    return diff, scale


def load_task(base_file, task_file, num_classes: int) -> nn.Module:
    """The adapted, unmerged model, as export.py builds it from the base checkpoint and the task file."""
    model = build_model("ef_tiny", head="cls", num_classes=num_classes, img_size=S, weights=str(base_file))
    add_task_adapters(model, read_task(task_file).adapters)
    load_adapters(model, str(task_file))
    return model.eval()


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """base.safetensors (random weights and BatchNorm statistics) and two PETAH task files (conv-LoRA rank 2 on
    every conv, LoRA rank 4 on the attention linears, new heads of 5 and 7 classes, every trained tensor random)."""
    d = tmp_path_factory.mktemp("pte")
    torch.manual_seed(0)
    base = build_model("ef_tiny", head="cls", num_classes=1000, img_size=S)
    with torch.no_grad():
        for m in base.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.2)
                m.running_var.uniform_(0.5, 2.0)
    save_file(base.state_dict(), str(d / "base.safetensors"))
    for name, k in (("a", 5), ("b", 7)):
        model = build_model("ef_tiny", head="cls", num_classes=k, img_size=S, weights=str(d / "base.safetensors"))
        apply_method(model, "ef_tiny", "petah", r=4, rc=2)
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad:  # B != 0: with the zero init every comparison below would prove nothing
                    p.add_(torch.randn_like(p) * 0.1)
        save_task(model, d / f"{name}.safetensors",
                  meta=dict(task_type="cls", model="ef_tiny", method="petah", num_classes=k, img_size=S))
    x = {1: torch.randn(1, 3, S, S), 3: torch.randn(3, 3, S, S)}
    return d, x


def test_tasks_share_one_base_ptd(files):
    """Base .pte + base .ptd, then two tasks: each task .pte reads the base tensors from base.ptd (the .ptd is not
    rewritten: same sha256, same mtime), holds a small fraction of the base's bytes, and equals its merged
    PyTorch model at batch 1 and 3; the base program equals the base model."""
    d, x = files
    base = build_model("ef_tiny", head="cls", num_classes=1000, img_size=S, weights=str(d / "base.safetensors"))
    ptd = d / "base.ptd"
    export_pte_base(base, x[3], d / "base.pte", data_path=ptd, batch_sizes=(1, 3))
    with torch.no_grad():
        within(run_pte(d / "base.pte", x[3], data_path=ptd), base(x[3]))
    digest, mtime = sha256(ptd), os.stat(ptd).st_mtime_ns
    shared = {}
    # b: the adapted layers of <= 1200 weight elements (the stem's second conv, stage 1's MLP convs) merged
    for name, k, merge_up_to in (("a", 5, 0), ("b", 7, 1200)):
        adapted = load_task(d / "base.safetensors", d / f"{name}.safetensors", k)
        merged = merge_and_unload(copy.deepcopy(adapted)).eval()
        info = export_pte_task(adapted, x[3], d / f"{name}.pte", base=base, base_data_path=ptd, batch_sizes=(1, 3),
                               merge_up_to=merge_up_to)
        shared[name] = info["shared"]
        assert sha256(ptd) == digest and os.stat(ptd).st_mtime_ns == mtime  # the shared file untouched
        # the task's program: its graph, its factors and head; the weights stay in base.ptd (ef_tiny is so small
        # that its graph is a good part of it; EfficientFormer-L1 in BENCHMARKS.md: 1.8%)
        assert os.path.getsize(d / f"{name}.pte") < 0.4 * os.path.getsize(ptd)
        with torch.no_grad():
            for B in (1, 3):
                within(run_pte(d / f"{name}.pte", x[B], data_path=ptd), merged(x[B]))
    assert shared["a"] >= len(ptd_keys(ptd)) - 4  # all but the base's heads (head, head_dist: W and b)
    assert shared["b"] < shared["a"]  # b owns its merged small layers


class ConvNet(nn.Module):
    """conv -> BatchNorm -> ReLU -> linear: the smallest net with a foldable pair (conv/norm, as EfficientFormer)."""

    def __init__(self):
        super().__init__()
        self.conv, self.norm, self.head = nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.Linear(16, 4)

    def forward(self, x):  # (B, 3, H, W) -> (B, 4)
        return self.head(torch.relu(self.norm(self.conv(x))).mean((2, 3)))


def test_ptd_of_another_base_is_refused(tmp_path):
    """A task exported against a .ptd written from another base: ValueError naming the fix, no .pte written."""
    torch.manual_seed(0)
    base, other = ConvNet().eval(), ConvNet().eval()
    x = torch.randn(2, 3, 16, 16)
    export_pte_base(other, x, tmp_path / "other.pte", data_path=tmp_path / "other.ptd")
    task = copy.deepcopy(base)
    add_lora(task, {"conv": dict(r=2)}, layers={nn.Conv2d: LoRAConv2d})
    with pytest.raises(ValueError, match="another base"):
        export_pte_task(task, x, tmp_path / "t.pte", base=base, base_data_path=tmp_path / "other.ptd", merge_up_to=0)
    assert not (tmp_path / "t.pte").exists() and not [f for f in os.listdir(tmp_path) if ".tmp." in f]


def test_int8_runs_within_its_quantisation_error(files):
    """XNNPACK PT2E int8, calibrated on 8 images: runs at batch 1 and 3; the logits move (it is quantised: more
    than fp32 rounding) but by at most 10% (relative L2). Each int8 tensor rounds to a step of max|a| / 127: a
    relative rms error of (max / rms) / (127 sqrt(12)) ~ 1% for activations whose peak is ~4 times their rms;
    ~10 quantised layers in sequence with independent errors give ~sqrt(10) x 1% ~ 3%."""
    d, x = files
    merged = merge_and_unload(load_task(d / "base.safetensors", d / "a.safetensors", 5)).eval()
    torch.manual_seed(1)
    calibration = [torch.randn(4, 3, S, S) for _ in range(2)]
    export_pte(merged, x[3], d / "a_int8.pte", batch_sizes=(1, 3), quantize="int8", calibration=calibration)
    with torch.no_grad():
        for B in (1, 3):
            out, ref = run_pte(d / "a_int8.pte", x[B]), merged(x[B]).numpy()
            drift = np.linalg.norm(out - ref) / np.linalg.norm(ref)
            assert 1e-4 < drift < 0.1, drift


def test_edge_ready_is_aten_dialect():
    """edge_ready turns torch.export's training-dialect program (what coremltools refuses) into the ATen dialect,
    computing the same."""
    torch.manual_seed(0)
    net = ConvNet().eval()
    x = torch.randn(2, 3, 16, 16)
    ep = torch.export.export(net, (x,))
    ready = edge_ready(ep)
    assert ep.dialect == "TRAINING" and ready.dialect == "ATEN"
    assert torch.equal(ready.module()(x), net(x))


def test_missing_executorch_names_the_install(monkeypatch):
    from tasks import pte
    monkeypatch.setitem(sys.modules, "executorch.exir", None)  # import executorch.exir raises ImportError
    with pytest.raises(ValueError, match="pip install executorch"):
        pte.require_executorch()
    with pytest.raises(ValueError, match="pip install executorch"):
        pte.export_pte(ConvNet(), torch.randn(2, 3, 8, 8), "unused.pte")
