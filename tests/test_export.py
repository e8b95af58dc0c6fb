"""export.py: a task merged into its base and exported (ONNX checked with onnxruntime, a torch.export .pt2 reloaded)
computes what the unmerged adapted model computes, at batch sizes the export never saw; the ONNX graph of a task is
the base model's graph (same op types and counts); every model family the training scripts write; what bad input
gets (a clear message, exit 2, no traceback, nothing at --out).

The task files are made here as the training scripts make them (methods.apply_method / apply_sam_method on the
base, tasks.task_file.save_task), with every trained tensor randomised: with B = 0 a merge check proves nothing.
Successful exports run in this process (runpy, no interpreter start); bad input runs as real processes.
"""

import json
import os
import runpy
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from safetensors.torch import save_file

from methods import apply_method, apply_sam_method
from models import ef_semantic_fpn
from tasks.deploy import build_model, exportable, onnx_op_counts
from tasks.task_file import save_task

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = str(ROOT / "export.py")
ENV = dict(os.environ, OMP_NUM_THREADS="1")
S = 64  # input side of every tiny model here


def random_bn_stats(model):
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.2)
                m.running_var.uniform_(0.5, 2.0)


def make_task(folder: Path, kind: str, name: str, method: str, num_classes: int, seed: int = 0, size: int = S):
    """Write base.safetensors (random weights, random BN statistics) and task.safetensors (adapters and head of
    `method`, every trained tensor random) as train_cls.py / train_seg.py do; return (base, task, adapted model)."""
    torch.manual_seed(seed)
    base = build_model(name, head="sam" if kind == "sam" else "cls", img_size=size,
                       num_classes=num_classes if kind == "sam" else 1000)
    random_bn_stats(base)
    base_file = folder / f"{kind}_base.safetensors"
    save_file(base.state_dict(), str(base_file))
    if kind == "cls":
        model = build_model(name, head="cls", num_classes=num_classes, img_size=size, weights=str(base_file))
        apply_method(model, name, method, r=4, rc=2, learn_interp=True)
    elif kind == "fpn":  # train_seg.py: backbone from the checkpoint, adapted, then the new Semantic FPN head
        model = build_model(name, head="cls", num_classes=0, img_size=size, weights=str(base_file))
        apply_method(model, name, method, r=4, rc=2, head_names=())
        model = ef_semantic_fpn(model, num_classes=num_classes, channels=32, head_channels=16)
    else:
        model = build_model(name, head="sam", num_classes=num_classes, img_size=size, weights=str(base_file))
        apply_sam_method(model, method, num_classes=num_classes, r=4, learn_interp=method == "lora")
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.requires_grad:
                p.normal_(0, 0.1) if n.endswith(("lora_B", "ia3_l")) else p.add_(0.1 * torch.randn_like(p))
    random_bn_stats(model.decode_head if kind == "fpn" else nn.Identity())  # the new head's BNs train
    task_file = folder / f"{kind}_task.safetensors"
    save_task(model, task_file, meta=dict(task_type="cls" if kind == "cls" else "seg", model=name, method=method,
                                          num_classes=num_classes, img_size=size, model_cfg={}))
    return base_file, task_file, model.eval()


def run_export(argv: list[str], capsys) -> dict:
    """export.py in this process; returns its final JSON line."""
    old = sys.argv
    sys.argv = [SCRIPT, *argv, "--repeats", "0"]  # no timing
    try:
        runpy.run_path(SCRIPT, run_name="__main__")
    finally:
        sys.argv = old
    out = capsys.readouterr().out
    return json.loads(out.strip().splitlines()[-1])


def reference(model, kind, x):
    with torch.no_grad():
        return exportable(model, kind)(x)


@pytest.fixture(scope="module")
def tasks(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tasks")
    return {"cls": make_task(folder, "cls", "ef_tiny", "petah", 10),
            "fpn": make_task(folder, "fpn", "ef_tiny", "petah", 5, seed=1),  # another base than cls's
            # SAM at 80: 10 x 10 tokens in windows of 4, so the padded-window path is in the graph
            "sam": make_task(folder, "sam", "sam_tiny", "ia3", 4, size=80)}


def test_onnx_task_equals_adapted_model_and_has_the_base_graph(tasks, tmp_path, capsys):
    import onnxruntime as ort
    base, task, adapted = tasks["cls"]
    out = tmp_path / "task.onnx"
    res = run_export(["--weights", str(base), "--task", str(task), "--fold-bn", "--format", "onnx",
                      "--out", str(out)], capsys)
    assert res["max_abs_diff"] <= 1e-4 and res["head"] == "cls"
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    for B in (1, 3):  # 3: a batch size the export never saw (dynamic batch dimension)
        x = torch.randn(B, 3, S, S)
        y = torch.from_numpy(session.run(None, {"image": x.numpy()})[0])
        assert y.shape == (B, 10)
        # merged + BN-folded + onnxruntime vs the unmerged adapted model: fp32 reassociation only
        assert (y - reference(adapted, "cls", x)).abs().max().item() <= 1e-4
    # the exported task IS the base graph: the same ONNX op types and counts as the base model alone
    base_out = tmp_path / "base.onnx"
    run_export(["--model", "ef_tiny", "--weights", str(base), "--num-classes", "10", "--img-size", str(S),
                "--fold-bn", "--format", "onnx", "--out", str(base_out)], capsys)
    assert onnx_op_counts(out) == onnx_op_counts(base_out)
    assert "BatchNormalization" not in onnx_op_counts(out)
    assert sorted(os.listdir(tmp_path)) == ["base.onnx", "task.onnx"]  # no temporary file left behind


def test_pt2_sam_task_equals_adapted_model(tasks, tmp_path, capsys):
    kind = "sam"  # (EF + FPN: test_merged_model_exports_from_its_metadata)
    base, task, adapted = tasks[kind]
    out = tmp_path / f"{kind}.pt2"
    res = run_export(["--weights", str(base), "--task", str(task), "--format", "pt2", "--out", str(out)], capsys)
    assert res["max_abs_diff"] <= 1e-5 and res["head"] == kind
    program = torch.export.load(str(out)).module()
    x = torch.randn(3, 3, 80, 80)
    with torch.no_grad():
        y = program(x)
    expected = reference(adapted, kind, x)
    assert y.shape == expected.shape == (3, 4, 80, 80)  # 4 classes: one logit map each
    assert (y - expected).abs().max().item() <= 1e-5


def test_merged_model_exports_from_its_metadata(tasks, tmp_path, capsys):
    """--weights merged.safetensors alone: model, classes and size come from the metadata (models/interop.py)."""
    import copy

    from lora import merge_and_unload
    from tasks.interop import merged_metadata
    _, _, adapted = tasks["fpn"]
    merged = merge_and_unload(copy.deepcopy(adapted))
    path = tmp_path / "merged.safetensors"
    save_file(merged.state_dict(), str(path), metadata=merged_metadata(merged, model_name="ef_tiny", num_classes=5,
                                                                       img_size=S))
    out = tmp_path / "m.pt2"
    res = run_export(["--weights", str(path), "--fold-bn", "--format", "pt2", "--out", str(out)], capsys)
    assert res["model"] == "ef_tiny" and res["head"] == "fpn" and res["img_size"] == S and res["max_abs_diff"] <= 1e-5
    x = torch.randn(1, 3, S, S)
    with torch.no_grad():  # merged, BN-folded, exported vs the unmerged adapted model: fp32 reassociation only
        assert (torch.export.load(str(out)).module()(x) - reference(adapted, "fpn", x)).abs().max().item() <= 1e-4


def test_failed_export_leaves_nothing(tasks, tmp_path, capsys, monkeypatch):
    base, task, _ = tasks["cls"]

    def broken_save(program, f, **kw):  # a partial file, then a crash
        Path(f).write_bytes(b"partial")
        raise RuntimeError("disk gone")
    monkeypatch.setattr(torch.export, "save", broken_save)
    with pytest.raises(RuntimeError, match="disk gone"):
        run_export(["--weights", str(base), "--task", str(task), "--format", "pt2", "--out", str(tmp_path / "t.pt2")],
                   capsys)
    assert os.listdir(tmp_path) == []


def test_a_wrong_merge_is_caught(tasks, tmp_path, capsys, monkeypatch):
    """The exported file is checked against the unmerged adapted model too: a merge that drops the update (here
    forced) exits with an error and writes nothing."""
    from conv_lora import LoRAConv2d
    from lora import LoRALinear
    base, task, _ = tasks["cls"]
    for cls in (LoRALinear, LoRAConv2d):
        monkeypatch.setattr(cls, "merged_weight", lambda self, mask=None: self.weight.detach().clone())
    with pytest.raises(SystemExit, match="merge bug"):
        run_export(["--weights", str(base), "--task", str(task), "--format", "pt2", "--out", str(tmp_path / "t.pt2")],
                   capsys)
    assert os.listdir(tmp_path) == []


def cli(*argv, env=None):
    return subprocess.run([sys.executable, SCRIPT, *argv], cwd=ROOT, capture_output=True, text=True, env=env or ENV)


def test_bad_input_as_a_process(tasks, tmp_path):
    """The real command line: exit status 2, the message, no traceback, nothing written."""
    base, task, _ = tasks["cls"]
    fpn_base, _, _ = tasks["fpn"]
    shim = tmp_path / "shim" / "onnxruntime"  # an environment without onnxruntime
    shim.mkdir(parents=True)
    (shim / "__init__.py").write_text("raise ImportError('No module named onnxruntime')\n")
    out = str(tmp_path / "x.onnx")
    for argv, env, phrase in [
            (["--weights", str(fpn_base), "--task", str(task), "--format", "pt2", "--out", out[:-4] + "pt2"], None,
             "trained on another base"),
            (["--weights", str(base), "--task", str(task), "--format", "onnx", "--out", out],
             dict(ENV, PYTHONPATH=str(shim.parent)), "pip install onnx onnxruntime onnxscript")]:
        r = cli(*argv, env=env)
        assert r.returncode == 2 and phrase in r.stderr and "Traceback" not in r.stderr, (argv, r.stderr[-2000:])
    assert sorted(os.listdir(tmp_path)) == ["shim"]


def test_bad_input(tasks, tmp_path, capsys):
    """The other mistakes, in this process: parser.error (SystemExit 2) with a message naming the fix."""
    base, task, _ = tasks["cls"]
    ef_task = ["--weights", str(base), "--task", str(task)]
    out = str(tmp_path / "x.onnx")
    for argv, phrase in [
            ([*ef_task, "--format", "tflite", "--out", out], "use --format onnx"),
            ([*ef_task, "--format", "onnx", "--img-size", "100", "--out", out], "multiples of 32"),
            ([*ef_task, "--format", "onnx", "--out", str(tmp_path / "no" / "x.onnx")], "does not exist"),
            ([*ef_task, "--format", "onnx", "--out", str(tmp_path)], "is a directory"),
            (["--weights", str(task), "--format", "onnx", "--out", out], "pass it as --task"),
            ([*ef_task, "--model", "vit_tiny", "--format", "onnx", "--out", out], "was made with --model ef_tiny")]:
        with pytest.raises(SystemExit) as e:
            run_export(argv, capsys)
        err = capsys.readouterr().err
        assert e.value.code == 2 and phrase in err, (argv, err[-2000:])
    assert os.listdir(tmp_path) == []


def test_bad_input_issue23(tasks, tmp_path, capsys):
    """Issue 23's export.py cases: each a clear parser error (exit 2) and nothing written."""
    base, task, _ = tasks["cls"]
    ef_task = ["--weights", str(base), "--task", str(task)]
    for argv, phrases in [
            ([*ef_task, "--format", "onnx", "--opset", "99", "--out", str(tmp_path / "x.onnx")], ["--opset 99", "18"]),
            ([*ef_task, "--format", "onnx", "--opset", "1", "--out", str(tmp_path / "x.onnx")], ["--opset 1", "18"]),
            ([*ef_task, "--format", "onnx", "--img-size", "0", "--out", str(tmp_path / "x.onnx")],
             ["--img-size 0", "positive"]),
            ([*ef_task, "--format", "onnx", "--img-size", "-32", "--out", str(tmp_path / "x.onnx")],
             ["--img-size -32"]),
            ([*ef_task, "--format", "onnx", "--out", str(tmp_path / "x.pt2")], ["does not end in .onnx", "x.onnx"]),
            ([*ef_task, "--format", "pt2", "--out", str(tmp_path / "x.onnx")], ["does not end in .pt2"]),
            ([*ef_task, "--format", "pt2", "--opset", "18", "--out", str(tmp_path / "x.pt2")], ["--opset is an ONNX"]),
            ([*ef_task, "--format", "onnx"], ["--out"]),
            ([*ef_task, "--format", "onnx", "--replace", "--out", str(tmp_path / "x.onnx")], ["--replace"])]:
        with pytest.raises(SystemExit) as e:
            run_export(argv, capsys)
        err = capsys.readouterr().err
        assert e.value.code == 2 and all(p in err for p in phrases), (argv, err[-2000:])
    assert os.listdir(tmp_path) == []


def test_repeats_zero_says_latency_not_measured(tasks, tmp_path, capsys):
    base, task, _ = tasks["cls"]
    old = sys.argv
    sys.argv = [SCRIPT, "--weights", str(base), "--task", str(task), "--format", "pt2", "--out",
                str(tmp_path / "t.pt2"), "--repeats", "0"]
    try:
        runpy.run_path(SCRIPT, run_name="__main__")
    finally:
        sys.argv = old
    out = capsys.readouterr().out
    assert "latency: not measured (--repeats 0)" in out and "ms_exported" not in out


def test_pt2_is_the_core_aten_program(tasks, tmp_path, capsys):
    """The saved .pt2 is edge-ready: dialect ATEN (torch.export's own is TRAINING, which coremltools refuses) and
    every op a core ATen operator, and it still computes the adapted model."""
    base, task, adapted = tasks["cls"]
    out = tmp_path / "t.pt2"
    run_export(["--weights", str(base), "--task", str(task), "--format", "pt2", "--out", str(out)], capsys)
    program = torch.export.load(str(out))
    assert program.dialect == "ATEN"
    ops = {n.target for n in program.graph.nodes if n.op == "call_function"}
    aten = [op for op in ops if isinstance(op, torch._ops.OpOverload)]
    # the rest: Python's operator functions on the symbolic batch size (getitem, mul, ...), no tensor op
    assert all(getattr(op, "__module__", None) == "_operator" for op in ops if op not in aten), ops
    not_core = [op for op in aten if torch.Tag.core not in op.tags]
    assert aten and not not_core, not_core
    x = torch.randn(3, 3, S, S)
    with torch.no_grad():
        assert (program.module()(x) - reference(adapted, "cls", x)).abs().max().item() <= 1e-4


def test_random_base_of_a_run_without_weights(tasks, tmp_path, capsys):
    """A run without --weights saves OUT/base.safetensors (metadata: model, seed, note): export.py takes it as
    --weights (not as a merged model), and finds it beside the task file when --weights is omitted."""
    import shutil

    from safetensors.torch import load_file
    base, task, adapted = tasks["cls"]
    run = tmp_path / "run"
    run.mkdir()
    save_file(load_file(str(base)), str(run / "base.safetensors"),
              metadata=dict(model="ef_tiny", seed="0", note="random base of a run without --weights"))
    shutil.copy(task, run / "adapters.safetensors")
    for argv in (["--weights", str(run / "base.safetensors")], []):
        out = tmp_path / f"t{len(argv)}.pt2"
        res = run_export([*argv, "--task", str(run / "adapters.safetensors"), "--format", "pt2", "--out", str(out)],
                         capsys)
        assert res["max_abs_diff_vs_unmerged"] <= 1e-4
        x = torch.randn(2, 3, S, S)
        with torch.no_grad():
            assert (torch.export.load(str(out)).module()(x) - reference(adapted, "cls", x)).abs().max() <= 1e-4
    old = sys.argv
    sys.argv = [SCRIPT, "--task", str(run / "adapters.safetensors"), "--format", "pt2", "--out",
                str(tmp_path / "t.pt2"), "--repeats", "0"]
    try:
        runpy.run_path(SCRIPT, run_name="__main__")
    finally:
        sys.argv = old
    assert f"no --weights: using {run / 'base.safetensors'}" in capsys.readouterr().out


def test_pte_task_runs_in_executorch_at_batch_1_and_2(tasks, tmp_path, capsys):
    """--format pte: the merged task lowered once (traced at batch 2, a dynamic batch up to 2) runs in ExecuTorch's
    runtime at batch 1 and 2 (the failure this fixes: a program pinned to its traced batch) and equals PyTorch."""
    pytest.importorskip("executorch")
    from tasks.pte import run_pte
    base, task, adapted = tasks["cls"]
    out = tmp_path / "t.pte"
    res = run_export(["--weights", str(base), "--task", str(task), "--format", "pte", "--out", str(out)], capsys)
    assert res["format"] == "pte" and res["max_abs_diff"] <= 1e-4
    for B in (1, 2):
        x = torch.randn(B, 3, S, S)
        y = torch.from_numpy(run_pte(out, x if B == 1 else x.numpy()))  # a numpy input works as a torch one
        assert y.shape == (B, 10) and (y - reference(adapted, "cls", x)).abs().max().item() <= 1e-4
    assert sorted(os.listdir(tmp_path)) == ["t.pte"]  # no temporary file left


def test_int8_quantized_task(tasks, tmp_path, capsys):
    """--quantize int8: a QDQ model calibrated on --calib's images; its drift from the fp32 export is printed and
    recorded, it runs at batch 1 and 3, and it is smaller than the fp32 file. Bad combinations are refused."""
    import numpy as np
    import onnxruntime as ort
    from PIL import Image
    base, task, adapted = tasks["cls"]
    calib = tmp_path / "calib"
    calib.mkdir()
    rng = np.random.default_rng(0)
    for i in range(12):
        Image.fromarray(rng.integers(0, 256, (70 + i, 80, 3), dtype=np.uint8)).save(calib / f"{i}.png")
    out, fp32 = tmp_path / "q.onnx", tmp_path / "f.onnx"
    res = run_export(["--weights", str(base), "--task", str(task), "--format", "onnx", "--out", str(out),
                      "--quantize", "int8", "--calib", str(calib)], capsys)
    run_export(["--weights", str(base), "--task", str(task), "--format", "onnx", "--out", str(fp32)], capsys)
    assert res["quantize"] == "int8" and res["calib_images"] == 12 and 0 < res["int8_rel_drift"] < 1
    ops = onnx_op_counts(out)
    assert ops["QuantizeLinear"] > 0 and ops["DequantizeLinear"] > 0
    assert os.path.getsize(out) < 0.6 * os.path.getsize(fp32)  # int8 weights: a quarter of the bytes, + graph
    q = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    for B in (1, 3):
        y = q.run(None, {"image": torch.randn(B, 3, S, S).numpy()})[0]
        assert y.shape == (B, 10) and np.isfinite(y).all()
    for argv, phrase in [(["--format", "pt2", "--out", str(tmp_path / "x.pt2"), "--quantize", "int8"], "--quantize"),
                         (["--format", "onnx", "--out", str(tmp_path / "x.onnx"), "--calib", str(calib)],
                          "--calib belongs to --quantize"),
                         (["--format", "onnx", "--out", str(tmp_path / "x.onnx"), "--quantize", "int8", "--calib",
                           str(tmp_path / "none")], "not a folder"),
                         (["--format", "onnx", "--out", str(tmp_path / "x.onnx"), "--quantize", "int8"],
                          "pass --calib DIR")]:  # the task records no synthetic data: no default images
        with pytest.raises(SystemExit) as e:
            run_export(["--weights", str(base), "--task", str(task), *argv], capsys)
        err = capsys.readouterr().err
        assert e.value.code == 2 and phrase in err, (argv, err[-1500:])
    assert sorted(os.listdir(tmp_path)) == ["calib", "f.onnx", "q.onnx"]
