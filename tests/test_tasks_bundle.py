"""tasks/bundle.py through `export.py --bundle`: one shared base, small task graphs on it.

Proved here, on bundles export.py writes (real processes):
- every task type that exports (classification with PETAH + learned interpolation and with (IA)^3, EF + Semantic
  FPN, SAM prompt-free with LoRA on qkv rows) run by onnxruntime on the shared base equals the task's merged
  PyTorch model, rebuilt here, within 1e-4 of the output scale at batch 1 and 4;
- every initializer of a task graph that equals a base tensor points into base.data (none is duplicated), and the
  manifest's bytes / sha256 are the files';
- adding a task later leaves the base files byte-identical;
- bad input: a folder that is not a bundle, a file changed after bundling, names with '/' or '..', a task of
  another base (nothing written, the bundle still valid), a taken name without --replace, onnxruntime missing.
"""

import hashlib
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from bundle_fixtures import ENV, ROOT, S, export, make_base, make_task, merged_reference
from onnx import numpy_helper
from safetensors.torch import load_file

from tasks.manifest import BundleError, check_name, read_manifest, verify_files
from tasks.task_file import read_task

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def ef(tmp_path_factory):
    """An EfficientFormer bundle: cls task "a" and fpn task "seg" in one call, then cls task "b" ((IA)^3) added."""
    d = tmp_path_factory.mktemp("ef")
    base = make_base(d / "base.safetensors")
    files = dict(a=make_task(d / "a.safetensors", base, "cls", "petah", learn_interp=True),
                 seg=make_task(d / "seg.safetensors", base, "fpn", "petah", num_classes=3),
                 b=make_task(d / "b.safetensors", base, "cls", "ia3", seed=2, num_classes=4))
    bundle = d / "bundle"
    export("--bundle", bundle, "--weights", base, "--task", f"a={files['a']}", "--task", f"seg={files['seg']}",
           "--format", "onnx")
    before = {n: (bundle / n).read_bytes() for n in ("base.onnx", "base.data")}
    out = export("--bundle", bundle, "--weights", base, "--task", f"b={files['b']}", "--format", "onnx")
    return dict(dir=d, base=base, files=files, bundle=bundle, base_before=before, out=out)


@pytest.fixture(scope="module")
def sam(tmp_path_factory):
    d = tmp_path_factory.mktemp("sam")
    base = make_base(d / "base.safetensors", "sam_tiny")
    task = make_task(d / "t.safetensors", base, "sam", "lora", name="sam_tiny", num_classes=2, learn_interp=True)
    export("--bundle", d / "bundle", "--weights", base, "--task", f"sam={task}", "--format", "onnx")
    return dict(dir=d, base=base, files={"sam": task}, bundle=d / "bundle")


def session(bundle, manifest, name):
    return ort.InferenceSession(str(bundle / manifest["tasks"][name]["graph"]), providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("which,name", [("ef", "a"), ("ef", "b"), ("ef", "seg"), ("sam", "sam")])
def test_task_on_shared_base_equals_merged_pytorch(which, name, request):
    b = request.getfixturevalue(which)
    manifest = read_manifest(b["bundle"])
    net, head = merged_reference(b["files"][name], b["base"])
    sess = session(b["bundle"], manifest, name)
    gen = torch.Generator().manual_seed(7)
    for B in (1, 4):
        x = torch.randn(B, 3, S, S, generator=gen)
        with torch.no_grad():
            want = net(x).numpy()
        got = sess.run(None, {"image": x.numpy()})[0]
        assert got.shape == want.shape
        # fp32 sums in another order (W0 + dW folded by onnxruntime, its own kernels): ~1e-7 of the scale; a wrong
        # or missing adapter changes the outputs by O(scale)
        assert np.abs(got - want).max() <= 1e-4 * np.abs(want).max(), (B, np.abs(got - want).max())
    entry = manifest["tasks"][name]
    assert entry["head"] == head and entry["task_type"] == ("cls" if head == "cls" else "seg")


def base_tensors(bundle) -> set:
    """sha256 of every tensor in base.data, as the base graph addresses them."""
    proto = onnx.load(str(bundle / "base.onnx"), load_external_data=False)
    data = (bundle / "base.data").read_bytes()
    keys = set()
    for t in proto.graph.initializer:
        if t.data_location == onnx.TensorProto.EXTERNAL:
            info = {e.key: e.value for e in t.external_data}
            off, n = int(info["offset"]), int(info["length"])
            keys.add(hashlib.sha256(data[off:off + n]).hexdigest())
    return keys


@pytest.mark.parametrize("which", ["ef", "sam"])
def test_base_tensors_shared_not_copied_and_manifest_matches(which, request):
    b = request.getfixturevalue(which)
    bundle = b["bundle"]
    manifest = read_manifest(bundle)
    verify_files(bundle, manifest)  # bytes and sha256 of every file as recorded
    for f, e in manifest["base"]["files"].items():
        assert e == {"bytes": os.path.getsize(bundle / f),
                     "sha256": hashlib.sha256((bundle / f).read_bytes()).hexdigest()}
    in_base = base_tensors(bundle)
    base_keys = set(load_file(str(b["base"])))
    for name, entry in manifest["tasks"].items():
        proto = onnx.load(str(bundle / entry["graph"]), load_external_data=False)
        external = [t for t in proto.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
        assert external and all({e.key: e.value for e in t.external_data}["location"] == "base.data"
                                for t in external)
        trained = read_task(b["files"][name]).tensors
        kept = 0
        for t in proto.graph.initializer:  # what the task keeps: never a copy of a base tensor
            if t.data_location != onnx.TensorProto.EXTERNAL and len(t.raw_data) >= 1024:
                assert hashlib.sha256(numpy_helper.to_array(t).tobytes()).hexdigest() not in in_base, t.name
                key = t.name.replace(".layer.", ".").removeprefix("model.")  # the state_dict key it comes from
                assert key in trained or key not in base_keys, t.name  # a base parameter only if the task trained it
                kept += len(t.raw_data)
        assert kept > 0
        own = sum(e["bytes"] for e in entry["files"].values())
        assert own < sum(e["bytes"] for e in manifest["base"]["files"].values())


def test_adding_a_task_leaves_the_base_files_byte_identical(ef):
    manifest = read_manifest(ef["bundle"])
    assert sorted(manifest["tasks"]) == ["a", "b", "seg"]
    for n, data in ef["base_before"].items():
        assert (ef["bundle"] / n).read_bytes() == data
    assert manifest["tasks"]["a"]["class_names"] == ["ant", "bee", "cat", "dog", "eel"]
    p = manifest["tasks"]["a"]["preprocess"]
    assert p["resize_to"] == int(S / 0.95) and p["crop"] == S and p["interpolation"] == "bicubic"


def snapshot(folder):
    return {f: (folder / f).read_bytes() for f in sorted(os.listdir(folder))}


def assert_user_error(p, *words):
    assert p.returncode == 2, p.stdout[-2000:] + p.stderr[-2000:]
    assert "Traceback" not in p.stderr and "error:" in p.stderr
    for w in words:
        assert w in p.stderr, (w, p.stderr[-1500:])


def test_refusals_leave_the_bundle_as_it_was(ef, tmp_path):
    bundle, base, files = ef["bundle"], ef["base"], ef["files"]
    before = snapshot(bundle)
    other_base = make_base(tmp_path / "other.safetensors", seed=5)
    other_task = make_task(tmp_path / "o.safetensors", other_base, "cls", "lora")
    (tmp_path / "alone").mkdir()
    alone = shutil.copy(files["a"], tmp_path / "alone" / "a.safetensors")  # no base.safetensors beside it
    cases = [  # (argv, words the message must hold)
        (["--weights", base, "--task", f"o={other_task}"], ["another base", "fingerprint"]),
        (["--weights", other_base, "--task", f"a2={other_task}"], ["another base", "--weights"]),
        (["--weights", base, "--task", f"a={files['a']}"], ["already holds", "--replace"]),
        (["--weights", base, "--task", f"x/y={files['a']}"], ["not allowed", "'/'"]),
        (["--weights", base, "--task", f"..={files['a']}"], ["not allowed", "'..'"]),
        (["--weights", base, "--task", f"a..b={files['a']}"], ["not allowed"]),
        (["--weights", base, "--task", str(files["a"])], ["NAME=FILE"]),
        (["--task", f"z={alone}"], ["needs --weights"]),
    ]
    for i, (argv, words) in enumerate(cases):
        argv = ["--bundle", bundle, *argv, "--format", "onnx"]
        p = export(*argv, check=False, process=(i == 0))  # the first in a process of its own, as users run it
        assert_user_error(p, *words)
        assert snapshot(bundle) == before  # nothing written, nothing changed
    verify_files(bundle, read_manifest(bundle))  # still valid


def test_not_a_bundle_and_changed_files(ef, tmp_path):
    base, a = ef["base"], ef["files"]["a"]
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "notes.txt").write_text("hello")
    assert_user_error(export("--bundle", junk, "--weights", base, "--task", f"a={a}", "--format", "onnx",
                             check=False), "is not a bundle", "manifest.json")
    assert sorted(os.listdir(junk)) == ["notes.txt"]
    with pytest.raises(BundleError, match="not a bundle"):
        read_manifest(str(junk))
    for victim in ("base.data", "task"):
        copy = tmp_path / f"copy_{victim}"
        shutil.copytree(ef["bundle"], copy)
        manifest = read_manifest(copy)
        fname = "base.data" if victim == "base.data" else manifest["tasks"]["seg"]["graph"]
        data = bytearray((copy / fname).read_bytes())
        data[len(data) // 2] ^= 1
        (copy / fname).write_bytes(bytes(data))
        with pytest.raises(BundleError, match=f"{fname}.*sha256"):
            verify_files(str(copy), manifest)
        assert_user_error(export("--bundle", copy, "--weights", base, "--task", f"z={a}", "--format", "onnx",
                                check=False), fname, "sha256")
        p = subprocess.run([sys.executable, str(ROOT / "run_bundle.py"), "--bundle", str(copy), "--images",
                            str(tmp_path)], capture_output=True, text=True, env=ENV)
        assert_user_error(p, fname, "sha256")


def test_task_names():
    for ok in ("cub", "cars_v2", "a.b", "Food-101"):
        assert check_name(ok) == ok
    for bad in ("a/b", "..", "a..b", "../x", "", ".hidden", "x" * 65, "a b"):
        with pytest.raises(BundleError, match="not allowed"):
            check_name(bad)


def test_replace_swaps_the_task_file(ef, tmp_path):
    bundle = tmp_path / "b"
    shutil.copytree(ef["bundle"], bundle)
    old = read_manifest(bundle)["tasks"]["a"]["graph"]
    other = make_task(tmp_path / "a2.safetensors", ef["base"], "cls", "petah", seed=9)
    export("--bundle", bundle, "--weights", ef["base"], "--task", f"a={other}", "--format", "onnx", "--replace")
    manifest = read_manifest(bundle)
    assert manifest["tasks"]["a"]["graph"] != old and not (bundle / old).exists()
    assert manifest["tasks"]["a"]["source"]["sha256"] == hashlib.sha256(other.read_bytes()).hexdigest()
    verify_files(bundle, manifest)


def test_runtime_not_installed(ef, tmp_path):
    fake = tmp_path / "fake"
    (fake / "onnxruntime").mkdir(parents=True)
    (fake / "onnxruntime" / "__init__.py").write_text("raise ImportError('blocked', name='onnxruntime')\n")
    env = dict(ENV, PYTHONPATH=f"{fake}{os.pathsep}{ROOT}")
    p = subprocess.run([sys.executable, str(ROOT / "export.py"), "--bundle", str(tmp_path / "new"), "--weights",
                        str(ef["base"]), "--task", f"a={ef['files']['a']}", "--format", "onnx"],
                       capture_output=True, text=True, env=env, cwd=ROOT)
    assert_user_error(p, "onnxruntime", "pip install")
    assert not (tmp_path / "new").exists()
    p = subprocess.run([sys.executable, str(ROOT / "run_bundle.py"), "--bundle", str(ef["bundle"]), "--images",
                        str(tmp_path)], capture_output=True, text=True, env=env)
    assert_user_error(p, "onnxruntime", "pip install")


def test_manifest_is_json_with_the_format(ef):
    manifest = json.loads((ef["bundle"] / "manifest.json").read_text())
    assert manifest["format"] == "petah-bundle" and manifest["version"] == 1 and manifest["runtime"] == "onnx"
    assert set(manifest["base"]["files"]) == {"base.onnx", "base.data"}


def test_in_graph_merge_computes_the_merged_layer():
    """InGraphMerge (what a task graph computes: the merged weight from W0 and the adapter) equals each adapter
    layer's own merge, for every adapter form: LoRA on all rows / on qkv rows, with and without the learned
    interpolation; conv-LoRA (grouped conv too); (IA)^3 out (rows) and in, Linear and Conv2d."""
    import torch.nn as nn

    from conv_lora import LoRAConv2d
    from ia3 import IA3Conv2d, IA3Linear
    from lora import LoRALinear
    from tasks.bundle import InGraphMerge
    torch.manual_seed(0)
    lin, conv = nn.Linear(12, 18), nn.Conv2d(8, 6, 3, padding=1, groups=2)
    layers = [LoRALinear.from_module(lin, r=2, alpha=4), LoRALinear.from_module(lin, r=2, learn_interp=True),
              LoRALinear.from_module(lin, r=2, rows=list(range(6, 18))),
              LoRALinear.from_module(lin, r=2, rows=[0, 1, 2, 9], learn_interp=True),
              LoRAConv2d.from_module(conv, r=2, alpha=1), LoRAConv2d.from_module(conv, r=2, learn_interp=True),
              IA3Linear.from_module(lin, mode="out", rows=[3, 4, 5]), IA3Linear.from_module(lin, mode="in"),
              IA3Conv2d.from_module(conv, mode="out"), IA3Conv2d.from_module(conv, mode="in")]
    for layer in layers:
        with torch.no_grad():
            for n, p in layer.named_parameters():
                if n.startswith(("lora_", "ia3_")):
                    p.copy_(torch.randn_like(p) * 0.3 + (0.5 if n == "lora_interp" else 0))
        x = torch.randn(2, 12) if isinstance(layer, nn.Linear) else torch.randn(2, 8, 5, 5)
        with torch.no_grad():
            w, b = InGraphMerge(layer).weights()
            want_w = layer.merged_weight()
            want_b = layer.merged_bias() if hasattr(layer, "merged_bias") else layer.bias
            # the same fp32 products and sums as the layer's merge: equal to rounding
            assert torch.allclose(w, want_w, rtol=0, atol=1e-6), type(layer).__name__
            assert torch.allclose(b, want_b, rtol=0, atol=1e-6)
            y, ref = InGraphMerge(layer)(x), layer(x)  # and the unmerged layer's output
            assert (y - ref).abs().max() <= 1e-5 * max(1.0, ref.abs().max().item()), type(layer).__name__


@pytest.fixture(scope="module")
def pte(tmp_path_factory):
    pytest.importorskip("executorch")
    d = tmp_path_factory.mktemp("pte")
    base = make_base(d / "base.safetensors")
    task = make_task(d / "a.safetensors", base, "cls", "petah")
    export("--bundle", d / "bundle", "--weights", base, "--task", f"a={task}", "--format", "pte")
    return dict(dir=d, base=base, files={"a": task}, bundle=d / "bundle")


def test_pte_bundle_task_on_the_shared_ptd_equals_merged_pytorch(pte):
    """--format pte: base.pte + base.ptd, each task a .pte that reads the base's tensors from base.ptd
    (tasks/pte.py), run by ExecuTorch's runtime at batch 1 and 3 (the batches its memory is planned for)."""
    from tasks.pte import run_pte
    manifest = read_manifest(pte["bundle"])
    verify_files(pte["bundle"], manifest)
    assert manifest["runtime"] == "pte" and set(manifest["base"]["files"]) == {"base.pte", "base.ptd"}
    entry = manifest["tasks"]["a"]
    net, _ = merged_reference(pte["files"]["a"], pte["base"])
    for B in (1, 3):
        x = torch.randn(B, 3, S, S)
        with torch.no_grad():
            want = net(x).numpy()
        got = run_pte(pte["bundle"] / entry["graph"], x, data_path=pte["bundle"] / "base.ptd")
        assert got.shape == want.shape and np.abs(got - want).max() <= 1e-4 * np.abs(want).max()
    own = sum(e["bytes"] for e in entry["files"].values())
    assert own < manifest["base"]["files"]["base.ptd"]["bytes"]
    p = subprocess.run([sys.executable, str(ROOT / "run_bundle.py"), "--bundle", str(pte["bundle"]), "--images",
                        str(pte["dir"])], capture_output=True, text=True, env=ENV)
    assert_user_error(p, "'pte' bundle", "run_pte")
