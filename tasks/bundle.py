"""A deployment bundle: ONE base on disk and many small tasks that run on it in ONNX Runtime.

PETAH's deployment story is one shipped backbone plus a small file per task. A merged model per task ships the
backbone again each time; a bundle ships it once:

    DIR/manifest.json        what is in the bundle (below); replaced atomically, last, after every file is in place
    DIR/base.data            the base's tensors, raw little-endian bytes back to back (ONNX external data)
    DIR/base.onnx            the base model's graph; every initializer points into base.data
    DIR/task-NAME.HASH.onnx  one per task: the task's graph. Every initializer equal to a base tensor points into
                             base.data (ONNX external data: location / offset / length); the task's own tensors
                             (adapters, head, trained norms) are stored inside the file

A task's graph computes its adapted layers unmerged: W0 + (alpha / r) B A (conv-LoRA likewise, (IA)^3 as W0 * l)
from the base's W0 and the task's A, B, l (`merge_in_graph`). The exporter's constant folding is off, so W0 stays
the base's tensor; onnxruntime folds the merge once when it loads the session, so the task then runs the base's
graph. HASH (8 hex digits of the file's sha256) makes a replaced task a new file: the manifest names the old file
or the new one, never a half-replaced one.

manifest.json:
    format "petah-bundle", version 1, runtime "onnx"
    base:  model, model_cfg, img_size, fingerprint (lora.base_fingerprint of the base model), graph, data,
           files {name: {bytes, sha256}}
    tasks: {NAME: {task_type (cls / seg), head (cls / fpn / sam), graph, files {name: {bytes, sha256}}, input,
           output, num_classes, class_names, img_size, preprocess {...}, source (the task file's sha256)}}
    preprocess, classification (as predict_cls.py): resize the shorter side to floor(img_size / crop_pct) with
        `interpolation`, centre crop img_size, scale to [0, 1], (x - mean) / std;
    segmentation (as predict_seg.py): resize the longer side to `size` (bilinear, antialiased), pad bottom / right
        with zeros to size x size after normalising; the logits of the image's part are resized back (bilinear).

    check_name, read_manifest, verify_files (tasks/manifest.py, torch-free)         reading a bundle, safely
    add_tasks(folder, manifest, base_net=..., base=..., tasks=[...], runtime="onnx" | "pte")   writing one
    merge_in_graph(model), onnx_graph(net, example)                                  a task's graph
    write_base(folder, proto) / base_index(folder, manifest) / share_base(proto, index)   the shared external data
"""

import hashlib
import json
import math
import os

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from tasks.manifest import (  # noqa: F401  (the reading side, torch-free for run_bundle.py; re-exported)
    BASE_DATA,
    BASE_GRAPH,
    FORMAT,
    MANIFEST,
    VERSION,
    BundleError,
    check_name,
    file_entry,
    read_manifest,
    sha256_file,
    verify_files,
)

SEG_MEAN, SEG_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # train_seg.py's normalisation (both recipes)
ALIGN, PAGE = 64, 4096  # tensor offsets in base.data: 64 bytes (SIMD loads); 4096 (a page, mmap-able) from 64 KiB up
# tensors under 1 KiB stay inside each graph: shape inference must read the small ones that feed shapes (a Range's
# limits, a Reshape's target), and sharing them would save nothing
SHARED_MIN_BYTES = 1024


# -----------------------------------------------------------------------------
# a task's graph: the adapted layers merged inside it, from the base's tensors


class InGraphMerge(nn.Module):
    """forward(x) = the layer run with its merged weight, computed from W0 and the adapter inside the graph.

    The arithmetic is the layers' merged_weight (and (IA)^3's merged_bias) without their dtype casts (an fp32
    model needs none, and onnxruntime cannot constant-fold the CastLike nodes a cast exports to).

    Args:
        layer: a LoRALinear / LoRAConv2d or an IA3Linear / IA3Conv2d, unmerged.
    """

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.layer = layer

    def weights(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        layer = self.layer
        w0, b = layer.weight, layer.bias
        if hasattr(layer, "ia3_l"):  # (IA)^3: kernel rows (and bias) times l, or kernel columns times l
            if layer.mode == "out":
                s = layer._out_scale()  # (d_out,)
                return w0 * s.view(-1, *[1] * (w0.dim() - 1)), None if b is None else b * s
            return w0 * layer._in_scale(layer.ia3_l), b
        dw = (layer.lora_B @ layer.lora_A) * layer.scaling  # (out or len(rows), fan_in)
        rows = getattr(layer, "lora_rows", None)
        if rows is None:  # every row: W0 + dW, or a W0 + (1 - a) dW
            dw = dw.view(w0.shape)
            if not layer.learn_interp:
                return w0 + dw, b
            return layer.lora_interp * w0 + (1 - layer.lora_interp) * dw, b
        if not layer.learn_interp:  # the rows of a fused qkv: W0 with dW added to them
            return w0.index_add(0, rows, dw), b
        a = layer.lora_interp
        return w0.index_copy(0, rows, a * w0.index_select(0, rows) + (1 - a) * dw), b

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w, b = self.weights()
        if isinstance(self.layer, nn.Linear):
            return F.linear(x, w, b)  # (..., in) -> (..., out)
        return self.layer._conv_forward(x, w, b)  # (B, c_in, H, W) -> (B, c_out, H', W')


def merge_in_graph(model: nn.Module) -> nn.Module:
    """Wrap every adapter layer of `model` (in place) in InGraphMerge; returns model."""
    for parent in list(model.modules()):
        for cname, child in list(parent.named_children()):
            if hasattr(child, "adapter_names") and hasattr(child, "adapter_config") and not child.merged:
                setattr(parent, cname, InGraphMerge(child))
    return model


def onnx_graph(net: nn.Module, example: torch.Tensor, *, opset: int | None = None):
    """The onnx.ModelProto of `net` (dynamic batch, input "image", output "logits"), its initializers `net`'s own
    tensors. The exporter's optimizer is off: its constant folding would merge W0 + B A into a new tensor (and fold
    BatchNorms into convs), so the initializers would no longer be the base's; onnxruntime does that folding when
    it loads the graph. Each CastLike (what a Python scalar in the model exports to) becomes the Cast it means:
    onnxruntime has no kernel to fold a CastLike, so it would run every call and keep what follows unfolded (onnx-
    script's folder would do this, but it also transposes the Linear weights into new tensors). The exporter's
    per-node debug records (source lines, FX nodes) are dropped: they would be most of a small task's bytes."""
    import contextlib
    import io

    import onnx
    from onnx import helper
    from onnxscript import ir
    from torch.nn.attention import SDPBackend, sdpa_kernel
    batch = torch.export.Dim("batch", min=1, max=4096)
    chatter = io.StringIO()
    try:
        with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), contextlib.redirect_stdout(chatter):
            program = torch.onnx.export(net, (example,), None, dynamo=True, optimize=False,
                                        dynamic_shapes=({0: batch},), input_names=["image"], output_names=["logits"],
                                        opset_version=opset)
    except Exception:
        print(chatter.getvalue())
        raise
    proto = onnx.shape_inference.infer_shapes(ir.to_proto(program.model))  # the types of every value
    g = proto.graph
    types = {v.name: v.type.tensor_type.elem_type for v in list(g.value_info) + list(g.input) + list(g.output)}
    types.update({t.name: t.data_type for t in g.initializer})
    for n in g.node:
        del n.metadata_props[:]
        if n.op_type == "CastLike" and types.get(n.input[1]):
            cast = helper.make_node("Cast", [n.input[0]], list(n.output), name=n.name, to=types[n.input[1]])
            n.CopyFrom(cast)
    for v in list(proto.graph.value_info) + list(proto.graph.input) + list(proto.graph.output):
        del v.metadata_props[:]
    for t in proto.graph.initializer:
        del t.metadata_props[:]
    return proto


# -----------------------------------------------------------------------------
# the shared external data


def _key(arr: np.ndarray) -> str:
    return f"{arr.dtype.str}|{arr.shape}|{hashlib.sha256(arr.tobytes()).hexdigest()}"


def _external(t, location: str, offset: int, length: int) -> None:
    from onnx import TensorProto
    t.ClearField("raw_data")
    for f in ("float_data", "int32_data", "int64_data", "double_data", "uint64_data", "string_data"):
        t.ClearField(f)
    del t.external_data[:]
    for k, v in (("location", location), ("offset", str(offset)), ("length", str(length))):
        entry = t.external_data.add()
        entry.key, entry.value = k, v
    t.data_location = TensorProto.EXTERNAL


def write_base(folder: str, proto, write) -> dict:
    """Put every initializer of the base graph `proto` into `folder`/base.data (via write(path, chunks)), point
    the initializers there; returns the index {tensor key: (offset, length)} that share_base uses."""
    from onnx import numpy_helper
    index, chunks, offset = {}, [], 0
    for t in proto.graph.initializer:
        arr = numpy_helper.to_array(t)
        if arr.nbytes < SHARED_MIN_BYTES:
            continue
        key = _key(arr)
        if key not in index:  # equal tensors (e.g. BatchNorm statistics at their defaults) stored once
            data = np.ascontiguousarray(arr).astype(arr.dtype.newbyteorder("<"), copy=False).tobytes()
            align = PAGE if len(data) >= 65536 else ALIGN
            pad = -offset % align
            chunks += [b"\0" * pad, data]
            offset += pad
            index[key] = (offset, len(data))
            offset += len(data)
        _external(t, BASE_DATA, *index[key])
    write(os.path.join(folder, BASE_DATA), chunks)
    return index


def base_index(folder: str, manifest: dict) -> dict:
    """The index {tensor key: (offset, length)} of an existing bundle's base.data, read through base.onnx."""
    import onnx
    from onnx import helper
    proto = onnx.load(os.path.join(folder, manifest["base"]["graph"]), load_external_data=False)
    data = np.memmap(os.path.join(folder, manifest["base"]["data"]), dtype=np.uint8, mode="r")
    index = {}
    for t in proto.graph.initializer:
        if t.data_location != onnx.TensorProto.EXTERNAL:
            continue
        info = {e.key: e.value for e in t.external_data}
        off, length = int(info["offset"]), int(info["length"])
        arr = np.frombuffer(data[off:off + length], dtype=helper.tensor_dtype_to_np_dtype(t.data_type))
        index[_key(arr.reshape(tuple(t.dims)))] = (off, length)
    return index


def share_base(proto, index: dict) -> tuple[int, int]:
    """Point every initializer of a task graph equal to a base tensor into base.data (in place).
    Returns (bytes shared with the base, bytes the task keeps)."""
    from onnx import numpy_helper
    shared = own = 0
    for t in proto.graph.initializer:
        arr = numpy_helper.to_array(t)
        hit = index.get(_key(arr)) if arr.nbytes >= SHARED_MIN_BYTES else None
        if hit is not None:
            _external(t, BASE_DATA, *hit)
            shared += hit[1]
        else:
            own += arr.nbytes
    return shared, own


def preprocess_cls(meta: dict, data_cfg: dict, img_size: int) -> dict:
    """predict_cls.py's evaluation transform as data: the task's values, else the model's data_cfg."""
    crop_pct = float(meta.get("crop_pct") or data_cfg["crop_pct"])
    return dict(resize="shorter_side", resize_to=math.floor(img_size / crop_pct), crop=img_size, crop_pct=crop_pct,
                interpolation=meta.get("interpolation") or data_cfg["interpolation"],
                mean=list(meta.get("mean") or data_cfg["mean"]), std=list(meta.get("std") or data_cfg["std"]))


def preprocess_seg(meta: dict, img_size: int) -> dict:
    """predict_seg.py's canvas for --images (folder / synthetic protocol)."""
    size = int(meta.get("eval_size") or img_size)
    return dict(resize="longer_side_pad", size=size, interpolation="bilinear", mean=list(SEG_MEAN),
                std=list(SEG_STD))


# -----------------------------------------------------------------------------
# writing: a new bundle, or tasks added to one


def _write_chunks(path: str, chunks) -> None:
    from tasks.atomic import atomic_write
    atomic_write(path, lambda f: [f.write(c) for c in chunks])


def _check_graph(path: str, reference: nn.Module, inputs: dict, *, threads: int = 1) -> dict:
    """Run the graph file `path` in onnxruntime on each input and compare with `reference` (PyTorch).
    Returns {batch: (max abs diff, max |reference|)}."""
    import onnxruntime as ort
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    session = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
    result = {}
    for B, x in inputs.items():
        with torch.no_grad():
            want = reference(x).numpy()
        got = session.run(None, {"image": x.numpy()})[0]
        if got.shape != want.shape:
            raise BundleError(f"{os.path.basename(path)} returns {got.shape} for batch {B}, PyTorch {want.shape}")
        result[B] = (float(np.abs(got - want).max()), float(np.abs(want).max()))
    return result


def _new_bundle(folder: str, base_net: nn.Module, base: dict, example: torch.Tensor, *, opset, log) -> tuple:
    """The base's files of a new bundle (base.data, base.onnx); returns (manifest without tasks, index)."""
    import onnx

    from tasks.atomic import atomic_write
    proto = onnx_graph(base_net, example, opset=opset)
    index = write_base(folder, proto, _write_chunks)
    atomic_write(os.path.join(folder, BASE_GRAPH), lambda f: f.write(proto.SerializeToString()))
    onnx.checker.check_model(os.path.join(folder, BASE_GRAPH))
    files = {n: file_entry(os.path.join(folder, n)) for n in (BASE_GRAPH, BASE_DATA)}
    log(f"base: {BASE_DATA} {files[BASE_DATA]['bytes'] / 2**20:.2f} MB ({len(index)} tensors), {BASE_GRAPH} "
        f"{files[BASE_GRAPH]['bytes'] / 2**20:.3f} MB")
    manifest = dict(format=FORMAT, version=VERSION, runtime="onnx",
                    base=dict(base, graph=BASE_GRAPH, data=BASE_DATA, files=files), tasks={})
    return manifest, index


def open_for_adding(folder: str, base: dict, names, *, replace: bool, runtime: str = "onnx") -> dict | None:
    """Before anything is built: the existing bundle's manifest (checked: its files, its base, the names), or None
    for a new bundle (`folder` absent or empty). BundleError for every refusal; nothing is written."""
    for n in names:
        check_name(n)
    if not os.path.exists(folder) or (os.path.isdir(folder) and not os.listdir(folder)):
        return None
    if not os.path.isdir(folder):
        raise BundleError(f"--bundle {folder} is a file, not a folder; choose a new folder for the bundle")
    manifest = read_manifest(folder)
    verify_files(folder, manifest)
    if manifest.get("runtime") != runtime:
        raise BundleError(f"bundle {folder} is a {manifest.get('runtime')} bundle; add {manifest.get('runtime')} "
                          f"tasks to it (--format {manifest.get('runtime')}) or make a new bundle")
    have = manifest["base"]
    if have["fingerprint"] != base["fingerprint"]:
        raise BundleError(f"bundle {folder} holds another base (fingerprint {have['fingerprint'][:16]}, --weights "
                          f"gives {base['fingerprint'][:16]}): pass the base checkpoint the bundle was made from")
    for k in ("model", "model_cfg", "img_size"):
        if have[k] != base[k]:
            raise BundleError(f"bundle {folder} holds a base with {k} {have[k]!r}, these tasks {base[k]!r}; a bundle "
                              f"holds tasks of one base model at one input size")
    taken = [n for n in names if n in manifest["tasks"]]
    if taken and not replace:
        raise BundleError(f"bundle {folder} already holds task(s) {', '.join(taken)}; pass --replace to replace "
                          f"them, or choose other names")
    return manifest


PTE_GRAPH, PTE_DATA = "base.pte", "base.ptd"


def _make_base(runtime: str, folder: str, base_net: nn.Module, base: dict, example, *, opset, log) -> tuple:
    """A new bundle's base files; returns (manifest without tasks, what the tasks need: the ONNX index or None)."""
    if runtime == "onnx":
        return _new_bundle(folder, base_net, base, example, opset=opset, log=log)
    from tasks.pte import export_pte_base
    export_pte_base(base_net, example, os.path.join(folder, PTE_GRAPH), data_path=os.path.join(folder, PTE_DATA),
                    batch_sizes=(1, 3))
    files = {n: file_entry(os.path.join(folder, n)) for n in (PTE_GRAPH, PTE_DATA)}
    log(f"base: {PTE_DATA} {files[PTE_DATA]['bytes'] / 2**20:.2f} MB, {PTE_GRAPH} "
        f"{files[PTE_GRAPH]['bytes'] / 2**20:.3f} MB")
    return dict(format=FORMAT, version=VERSION, runtime="pte",
                base=dict(base, graph=PTE_GRAPH, data=PTE_DATA, files=files), tasks={}), None


def _make_task(runtime: str, folder: str, t: dict, tmp: str, index, base_net, example, *, opset) -> tuple:
    """Write task t's graph to tmp; returns (what it shares with the base, in words; bytes it keeps)."""
    from tasks.atomic import atomic_write
    if runtime == "onnx":
        proto = onnx_graph(t["net"], example, opset=opset)
        shared, own = share_base(proto, index)
        atomic_write(tmp, lambda f: f.write(proto.SerializeToString()))
        return f"{shared / 2**20:.2f} MB", own
    from tasks.pte import export_pte_task
    info = export_pte_task(t["unmerged"], example, tmp, base=base_net, base_data_path=os.path.join(folder, PTE_DATA),
                           batch_sizes=(1, 3))
    return f"{info['shared']} tensors", info["own_bytes"]


def _check(runtime: str, folder: str, tmp: str, reference: nn.Module, inputs: dict) -> dict:
    if runtime == "onnx":
        return _check_graph(tmp, reference, inputs)
    from tasks.pte import run_pte
    result = {}
    for B, x in inputs.items():
        with torch.no_grad():
            want = reference(x).numpy()
        got = run_pte(tmp, x, data_path=os.path.join(folder, PTE_DATA))
        if got.shape != want.shape:
            raise BundleError(f"{os.path.basename(tmp)} returns {got.shape} for batch {B}, PyTorch {want.shape}")
        result[B] = (float(np.abs(got - want).max()), float(np.abs(want).max()))
    return result


def add_tasks(folder: str, manifest: dict | None, *, base_net: nn.Module, base: dict, tasks: list[dict],
              runtime: str = "onnx", opset: int | None = None, seed: int = 0, log=print) -> dict:
    """Create the bundle (manifest None: `folder` new or empty) or add to it; returns the new manifest.

    Args:
        base_net: the base model (exportable form), for the base files (new bundles; pte: also each task's).
        base: the manifest's base description: model, model_cfg, img_size, fingerprint.
        tasks: one dict per task: name, net (merge_in_graph'ed, exportable; onnx), unmerged (the adapted model,
            exportable; pte), reference (the merged PyTorch model, exportable), entry (its manifest fields:
            task_type, head, num_classes, class_names, preprocess, ...).
        runtime: "onnx" (onnxruntime, base.data + base.onnx) or "pte" (ExecuTorch with XNNPACK, tasks/pte.py:
            base.ptd + base.pte, each task a .pte reading base.ptd).
        opset: ONNX opset (None: the exporter's).
    Each task is run by the runtime at batch 1 and 3 and compared with its merged PyTorch model (max abs
    difference <= 1e-4 of the output's scale) before anything is moved into place. On any failure nothing of
    this call is left behind (a new bundle's folder included) and an existing bundle is unchanged."""
    from tasks.atomic import atomic_write_text
    S = base["img_size"]
    gen = torch.Generator().manual_seed(seed)
    inputs = {B: torch.randn(B, 3, S, S, generator=gen) for B in (1, 3)}
    created, new = not os.path.exists(folder), manifest is None
    temps, written, old_files, renames = [], [], [], []
    try:
        if new:
            os.makedirs(folder, exist_ok=True)
            written += [os.path.join(folder, n) for n in ((BASE_DATA, BASE_GRAPH) if runtime == "onnx"
                                                            else (PTE_DATA, PTE_GRAPH))]
            manifest, index = _make_base(runtime, folder, base_net, base, inputs[3][:2], opset=opset, log=log)
        else:
            index = base_index(folder, manifest) if runtime == "onnx" else None
        manifest = json.loads(json.dumps(manifest))  # a copy: the caller's stays the old bundle's
        for t in tasks:
            tmp = os.path.join(folder, f".task-{t['name']}.tmp.{os.getpid()}.{runtime}")
            temps.append(tmp)
            shared, own = _make_task(runtime, folder, t, tmp, index, base_net, inputs[3][:2], opset=opset)
            checks = _check(runtime, folder, tmp, t["reference"], inputs)
            scale = max(s for _, s in checks.values())
            worst = max(d for d, _ in checks.values())
            log(f"task {t['name']}: " + ", ".join(f"batch {B} max |{runtime} - merged PyTorch| {d:.2e}"
                                                  for B, (d, _) in checks.items())
                + f" (allowed {1e-4 * scale:.1e} = 1e-4 of the output scale {scale:.3g}); own {own / 2**20:.3f} "
                  f"MB, shared with the base {shared}")
            if worst > 1e-4 * scale:
                raise BundleError(f"task {t['name']}: {runtime} on the shared base differs from the merged PyTorch "
                                  f"model by {worst:.2e} > 1e-4 x {scale:.3g}; nothing written")
            entry = file_entry(tmp)
            fname = f"task-{t['name']}.{entry['sha256'][:8]}.{runtime}"
            renames.append((tmp, os.path.join(folder, fname)))
            if t["name"] in manifest["tasks"]:
                old_files += [f for f in manifest["tasks"][t["name"]]["files"] if f != fname]
            manifest["tasks"][t["name"]] = dict(t["entry"], graph=fname, files={fname: entry}, input="image",
                                                output="logits", max_abs_diff=worst, own_bytes=own)
        for tmp, final in renames:
            if os.path.exists(final):  # the same name is the same sha256 prefix: this very graph is there already
                os.remove(tmp)
                continue
            os.replace(tmp, final)
            written.append(final)
        atomic_write_text(json.dumps(manifest, indent=1) + "\n", os.path.join(folder, MANIFEST))
    except BaseException:
        for p in temps + written:  # written: this call's new files only
            if os.path.exists(p):
                os.remove(p)
        if created and os.path.isdir(folder) and not os.listdir(folder):
            os.rmdir(folder)
        raise
    for f in old_files:  # the manifest no longer names them
        if os.path.exists(os.path.join(folder, f)):
            os.remove(os.path.join(folder, f))
    return manifest


# -----------------------------------------------------------------------------
# the PyTorch side: a task file and its base checkpoint -> the networks a bundle is made from


def checkpoint_fingerprint(weights: str) -> str:
    """sha256 over the names, dtypes, shapes and bytes of a checkpoint's tensors (sorted by name): the bundle's
    base identity (the same tensors in another file are the same base)."""
    from lora import _tensor_bytes
    from models import read_checkpoint
    h = hashlib.sha256()
    state = read_checkpoint(weights)
    for k in sorted(state):
        t = state[k]
        h.update(f"{k}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(_tensor_bytes(t))
    return h.hexdigest()


def task_head(task) -> str:
    """cls / fpn / sam for a task file."""
    from tasks.deploy import head_of
    head = head_of(task.meta["model"], list(task.tensors))
    if task.meta.get("task_type", task.meta.get("kind")) == "seg" and head == "cls":
        head = "fpn"
    return head


def build_task(task, weights: str | None):
    """(the adapted model, unmerged, eval mode; its head) of a task file on the base checkpoint `weights`.
    ValueError if the task does not fit (another model) or was trained on another base (fingerprint)."""
    from lora import load_adapters
    from tasks.deploy import add_task_adapters, build_model, fpn_widths
    meta = task.meta
    head = task_head(task)
    num_classes = int(meta.get("num_classes") or 2)
    fpn = {}
    if head == "fpn":
        num_classes, fpn["fpn_channels"], fpn["fpn_head_channels"] = fpn_widths(task.tensors)
    model = build_model(meta["model"], head=head, num_classes=num_classes, img_size=int(meta["img_size"]),
                        model_cfg=meta.get("model_cfg") or {}, weights=weights, **fpn)
    add_task_adapters(model, task.adapters)
    load_adapters(model, task.path)
    return model.eval().requires_grad_(False), head


def build_base(name: str, *, head: str, model_cfg: dict, img_size: int, weights: str | None) -> nn.Module:
    """The base model of a bundle (base.onnx): the checkpoint's own head (a classifier's, SAM's binary decoder),
    none when the checkpoint has none (a backbone)."""
    from models import read_checkpoint
    from tasks.deploy import build_model
    num_classes = 2
    if head != "sam":
        state = read_checkpoint(weights) if weights else {}
        num_classes = state["head.weight"].shape[0] if "head.weight" in state else 0
    return build_model(name, head="sam" if head == "sam" else "cls", num_classes=num_classes, img_size=img_size,
                       model_cfg=model_cfg, weights=weights).requires_grad_(False)
