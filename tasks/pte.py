"""ExecuTorch: a network lowered with the XNNPACK partitioner into a `.pte` program, run by ExecuTorch's runtime,
and many tasks sharing ONE base weights file (ExecuTorch's program / data separation, a `.ptd` file).

    require_executorch()                 ValueError naming `pip install executorch` when the package is missing
    export_pte(net, example, path, *, batch_sizes=(1, 2), quantize=None, calibration=None, data_path=None)
                                         one program; every batch from 1 to max(batch_sizes) runs. data_path: the
                                         delegated constants go into that .ptd file instead of the .pte
    run_pte(path, x, *, data_path=None) -> numpy array     load + run once (load_pte(...) keeps a loaded method)
    export_pte_base(base, example, pte_path, *, data_path, batch_sizes=(1, 2))
                                         the base model (BatchNorms folded) -> base .pte + the shared base .ptd
    export_pte_task(net, example, pte_path, *, base, base_data_path, batch_sizes=(1, 2), merge_up_to=50_000)
                                         a task: `net` is the task's UNMERGED adapted model on `base`; its .pte
                                         holds the graph and what the task owns, and reads every tensor it shares
                                         with the base from base_data_path, which it never writes
    deployable(net, *, merge_up_to=0)    the copy export_pte_task lowers: BatchNorms folded, adapters kept
                                         as LowRank layers (base layer + A + B, all constants), the small ones merged
    edge_ready(exported_program)         ep.run_decompositions({}): the ATen-dialect program Core ML / ExecuTorch take
    ptd_keys(path)                       the names of the tensors a .ptd file holds

All writers are atomic (tasks/atomic.py) and write nothing when lowering fails. `net` takes a normalised
(B, 3, S, S) image and returns one tensor ((B, K) logits or (B, K, S, S) maps); `example` is one such input.

The batch: torch.export gives the input a dynamic batch Dim(min=1, max=max(batch_sizes)); ExecuTorch plans its
memory for the maximum, so a larger batch needs a larger batch_sizes at export. executorch 1.5.1's Edge-dialect
argument validator (exir/verification/arg_validator.py) evaluates len() of the first output of an op returning
Tensor[] (EfficientFormer's attention splits q, k, v with split_with_sizes), which pins the symbolic batch to the
example's value: the whole program became static at the traced batch and only the input stayed resizable
("Attempted to resize a static tensor. Expected shape (2, ...), but received (1, ...)"). Lowering with
EdgeCompileConfig(_check_ir_validity=False) skips that validator; the program then runs at every batch in range,
and the callers check the numbers against PyTorch at batch 1 and at a larger batch.

The shared base: XNNPACK names each constant it serialises by the sha256 of its bytes (after its own layout
changes), and stores it in the .pte or, when the constant's node is tagged, in the external file of that tag.
export_pte_base tags every delegated constant of the base; export_pte_task tags a task's constant only when it
equals, bit for bit, a tensor of the (BatchNorm-folded) base, so the task program names exactly the base file's
entries and its .pte keeps the rest: the low-rank factors, the head, the tensors it trained. For the names to
match, the task's graph must feed the base tensors unchanged to the same ops: deployable() turns each LoRA /
conv-LoRA layer into LowRank, the base layer beside two small maps (A, then B: y = base(x) + B (A x)), folds
each BatchNorm into the frozen conv before it (W0' = s W0, the very arithmetic of tasks.deploy.fold_all_bn on the
base) and scales B by the same s, so that conv(x, W0') + s B (A x) = BN(conv(x, W0) + B A x). Other adapters on
a conv with a BatchNorm after it (e.g. (IA)^3) are merged into that conv: the task then owns it. ExecuTorch's
Python runtime takes ONE data file per program, so a task's own tensors stay in its .pte.

int8 (quantize="int8"): XNNPACK's PT2E flow (XNNPACKQuantizer, symmetric, weights per channel, activations per
tensor, calibrated on `calibration`: an iterable of (B, 3, S, S) batches), then lowered as above; per-task merged
models (export_pte), not a shared base.

Without torch: no. The executorch wheel's runtime (executorch.extension.pybindings._C) links libtorch and
libtorch_python, its Python wrapper (portable_lib.py) imports torch first, and the compiled module, even loaded
directly with torch blocked, takes torch.Tensor inputs only ("Unsupported python type <class 'numpy.ndarray'>").
A device that must not carry torch runs the .pte with ExecuTorch's C++ runtime (or its Android / iOS bindings).
"""

import hashlib
import os
import warnings

import torch
import torch.nn as nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from conv_lora import LoRAConv2d, fold_bn
from lora import LoRALinear
from tasks.atomic import atomic_write
from tasks.deploy import BN_PAIRS, fold_all_bn

INSTALL = "pip install executorch"
BASE_TAG = "base"  # the tag (and the serialiser's file stem) of the constants a task shares with the base


def require_executorch() -> None:
    """ValueError naming the install line when executorch (its exporter and its runtime) cannot be imported."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "experimental API" warnings of the runtime module
            import executorch.exir  # noqa: F401
            import executorch.runtime  # noqa: F401
    except ImportError as e:
        raise ValueError(f"the ExecuTorch format needs the optional package executorch ({e}): {INSTALL}") from None


def edge_ready(exported_program: torch.export.ExportedProgram) -> torch.export.ExportedProgram:
    """The ATen-dialect form of a torch.export program (run_decompositions with an empty table: the training ops
    become their inference forms, nothing else is decomposed), the dialect coremltools.convert and ExecuTorch's
    to_edge take as they are."""
    return exported_program.run_decompositions({})


# -----------------------------------------------------------------------------
# export and lowering


def _batch(example: torch.Tensor, batch_sizes) -> tuple[torch.Tensor, dict | None]:
    """The traced input and its dynamic_shapes. torch.export specialises a dimension it sees at size 1, so a
    dynamic batch is traced at 2 (or the largest allowed, if smaller)."""
    top = max(batch_sizes)
    if min(batch_sizes) < 1:
        raise ValueError(f"batch_sizes must be >= 1, got {tuple(batch_sizes)}")
    if top == 1:
        return example[:1], None  # a static batch of 1
    b = min(max(example.shape[0], 2), top)
    x = example.repeat((b + example.shape[0] - 1) // example.shape[0], 1, 1, 1)[:b]
    return x, ({0: torch.export.Dim("batch", min=1, max=top)},)


def _export(net: nn.Module, x: torch.Tensor, dynamic) -> torch.export.ExportedProgram:
    # SDPA's math form while tracing, as tasks/deploy.py exports (the flash kernel's strides differ)
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH):
        return torch.export.export(net, (x,), dynamic_shapes=dynamic)


def _quantize(gm: torch.fx.GraphModule, calibration, top: int) -> torch.fx.GraphModule:
    """XNNPACK PT2E int8: symmetric, per-channel weights, per-tensor activations from the calibration batches."""
    from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import (
        XNNPACKQuantizer,
        get_symmetric_quantization_config,
    )
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    if calibration is None:
        raise ValueError("quantize='int8' needs calibration images (an iterable of (B, 3, S, S) batches)")
    quantizer = XNNPACKQuantizer().set_global(get_symmetric_quantization_config(is_per_channel=True))
    prepared = prepare_pt2e(gm, quantizer)
    seen = 0
    with torch.no_grad():
        for batch in calibration:
            for chunk in torch.as_tensor(batch, dtype=torch.float32).split(top):  # the graph takes <= top
                prepared(chunk)
                seen += 1
    if seen == 0:
        raise ValueError("quantize='int8': the calibration set is empty")
    return convert_pt2e(prepared)


def _tag_constants(gm: torch.fx.GraphModule, tag_of) -> None:
    """Tag each constant (get_attr) node of an unlifted graph with tag_of(tensor) (None: the .pte keeps it); the
    XNNPACK serialiser reads meta["custom"]["delegate_constant_tag"]."""
    for node in gm.graph.nodes:
        if node.op != "get_attr":
            continue
        value = gm
        for part in node.target.split("."):
            value = getattr(value, part)
        tag = tag_of(value) if isinstance(value, torch.Tensor) else None
        if tag is not None:
            node.meta.setdefault("custom", {})["delegate_constant_tag"] = tag


def _lower(net: nn.Module, example: torch.Tensor, *, batch_sizes, quantize=None, calibration=None, tag_of=None):
    """torch.export -> (int8) -> tagged constants -> XNNPACK lowering -> the ExecuTorch program manager."""
    require_executorch()
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import EdgeCompileConfig, ExecutorchBackendConfig, to_edge_transform_and_lower

    if quantize not in (None, "int8"):
        raise ValueError(f"quantize={quantize!r}: only 'int8' (XNNPACK PT2E) or None")
    x, dynamic = _batch(example, batch_sizes)
    ep = _export(net.eval(), x, dynamic)
    if quantize or tag_of:
        gm = ep.module()  # unlifted: the constants are get_attr nodes, where PT2E and the tags act
        if quantize:
            gm = _quantize(gm, calibration, max(batch_sizes))
        if tag_of:
            _tag_constants(gm, tag_of)
        ep = _export(gm, x, dynamic)
    # _check_ir_validity=False: the validator would pin the dynamic batch (the module docstring says why)
    edge = to_edge_transform_and_lower(ep, partitioner=[XnnpackPartitioner()],
                                       compile_config=EdgeCompileConfig(_check_ir_validity=False))
    return edge.to_executorch(ExecutorchBackendConfig(extract_delegate_segments=True))


def _data_files(program) -> dict:
    """{tag: the serialised .ptd (a Cord)} of a lowered program. executorch 1.5.1's program manager offers only
    write_tensor_data_to_file(dir), which writes "<tag>.ptd" in place (not atomically), hence the attribute."""
    program.buffer  # serialises the program and its data files
    return dict(program._tensor_data or {})


def _write_program(program, path) -> None:
    atomic_write(str(path), lambda f: f.write(program.buffer))


def export_pte(net: nn.Module, example: torch.Tensor, path, *, batch_sizes=(1, 2), quantize: str | None = None,
               calibration=None, data_path=None) -> None:
    """Lower `net` with XNNPACK and write the .pte to `path` (atomically).

    Args:
        net: the network to export (eval mode; a merged task or a base model).
        example: an input (B, 3, S, S); its values only trace.
        batch_sizes: the program runs every batch from 1 to max(batch_sizes) (its memory is planned for the
            maximum); (1,) exports a static batch of 1.
        quantize: None (fp32) or "int8" (XNNPACK PT2E, calibrated on `calibration`).
        calibration: an iterable of (B, 3, S, S) batches (quantize="int8" only).
        data_path: if given, every delegated constant goes into this .ptd file (program / data separation) and
            the .pte keeps the graph; run it with run_pte(path, x, data_path=data_path).
    """
    tag_of = (lambda t: BASE_TAG) if data_path else None
    program = _lower(net, example, batch_sizes=batch_sizes, quantize=quantize, calibration=calibration,
                     tag_of=tag_of)
    if data_path:
        data = _data_files(program).get(BASE_TAG)
        if data is None:
            raise ValueError("no constant of this network was delegated to XNNPACK: nothing to put in a .ptd")
        atomic_write(str(data_path), data.write_to_file)
    _write_program(program, path)


# -----------------------------------------------------------------------------
# the runtime


def load_pte(path, *, data_path=None):
    """ExecuTorch's runtime: the program's forward method, loaded once; call .execute((x,)) -> [outputs]."""
    require_executorch()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from executorch.runtime import Runtime
    program = Runtime.get().load_program(str(path), data_path=None if data_path is None else str(data_path))
    return program.load_method("forward")


def run_pte(path, x, *, data_path=None):
    """Run the .pte at `path` (with its .ptd `data_path`, if any) on x ((B, 3, S, S), a torch tensor or a numpy
    array) with ExecuTorch's runtime; returns the first output as a numpy array."""
    method = load_pte(path, data_path=data_path)
    x = torch.as_tensor(x, dtype=torch.float32).contiguous()
    return method.execute((x,))[0].numpy()


# -----------------------------------------------------------------------------
# many tasks on one base: the base .ptd, and a task's .pte reading it


class LowRank(nn.Module):
    """The deployed form of an adapted layer: y = m * base(x) + up(down(x)), every tensor a stored constant.

    `base` is the frozen layer itself (its W0 and b unchanged, or BatchNorm-folded exactly as the base model's),
    `down` the rank-r map A (a conv with the layer's kernel, stride, padding and groups, or a linear), `up` the
    map B with the scale (alpha / r), the folded BatchNorm's scale and the interpolation (1 - a) inside, plus
    the bias (1 - m) b that an interpolated layer needs; m (None, or a scalar / per-channel vector) is PETRAS'
    interpolation a. No tensor is computed from another at run time: XNNPACK delegates only ops whose weights
    are constants (a kernel formed by view / repeat of a parameter would fall back to the portable kernels).

    Args:
        base: nn.Linear or nn.Conv2d holding the base tensors.
        down, up: the low-rank maps (same kind as base).
        m: None or the scale of base(x) (a 0-d tensor or one value per output channel).
    """

    def __init__(self, *, base: nn.Module, down: nn.Module, up: nn.Module, m: torch.Tensor | None = None) -> None:
        super().__init__()
        self.base, self.down, self.up = base, down, up
        self.register_buffer("m", m)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, H, W) or (..., in) -> the base layer's output
        y = self.base(x)
        if self.m is not None:
            y = y * (self.m.view(-1, 1, 1) if y.dim() == 4 and self.m.dim() else self.m)
        return y + self.up(self.down(x))


def _bn_scale(bn: nn.BatchNorm2d | None, n: int) -> torch.Tensor:
    """s = gamma / sqrt(var + eps) in float64, the BatchNorm's per-channel scale (ones without a BatchNorm)."""
    if bn is None:
        return torch.ones(n, dtype=torch.float64)
    s = bn.running_var.double().add(bn.eps).rsqrt()
    return s * bn.weight.double() if bn.weight is not None else s


def _interp(layer, n: int, rows) -> tuple[torch.Tensor | None, torch.Tensor]:
    """(m, k): the scale of base(x) (None without interpolation) and the factor of the update, per output row."""
    if not layer.learn_interp:
        return None, torch.ones(n, dtype=torch.float64)
    a = layer.lora_interp.detach().double()
    m = torch.ones(n, dtype=torch.float64)
    m[rows] = a
    return m, 1 - m


@torch.no_grad()
def _deploy_lora_conv(conv: LoRAConv2d, bn: nn.BatchNorm2d | None) -> LowRank:
    """A conv-LoRA (and the BatchNorm after it, if any) as LowRank: BN(conv(x, W0) + dW x) with the BatchNorm
    folded into W0 exactly as fold_bn folds the base model's conv, and its scale s into B."""
    if conv.merged:
        raise ValueError("deployable() takes the unmerged adapted model; this conv-LoRA is merged")
    g, (kh, kw), c_out, r = conv.groups, conv.kernel_size, conv.out_channels, conv.r
    plain = nn.Conv2d(conv.in_channels, c_out, conv.kernel_size, conv.stride, conv.padding, conv.dilation, g,
                      conv.bias is not None, conv.padding_mode, device="meta")
    plain.weight, plain.bias = conv.weight, conv.bias
    base = fold_bn(plain, bn) if bn is not None else plain  # the same float64 arithmetic as on the base model
    m, k = _interp(conv, c_out, slice(None))
    dtype = conv.weight.dtype
    down = nn.Conv2d(conv.in_channels, g * r, conv.kernel_size, conv.stride, conv.padding, conv.dilation, g, False,
                     conv.padding_mode, dtype=dtype)
    down.weight.copy_(conv.lora_A.view(r, conv.in_channels // g, kh, kw).repeat(g, 1, 1, 1))  # A for every group
    up = nn.Conv2d(g * r, c_out, 1, groups=g, bias=m is not None and base.bias is not None, dtype=dtype)
    scale = _bn_scale(bn, c_out) * k * conv.scaling                             # (c_out,)
    up.weight.copy_((conv.lora_B.double() * scale[:, None]).view(c_out, r, 1, 1))
    if up.bias is not None:  # a * base(x) keeps a b of the bias: the update adds (1 - a) b
        up.bias.copy_((1 - m) * base.bias.double())
    return LowRank(base=base, down=down, up=up, m=None if m is None else m.to(dtype))


@torch.no_grad()
def _deploy_lora_linear(layer: nn.Module) -> LowRank:
    """A LoRA linear as LowRank; an update on some rows only (a fused qkv's q and v) is a B with zero rows."""
    if layer.merged:
        raise ValueError("deployable() takes the unmerged adapted model; this LoRA layer is merged")
    out, r = layer.out_features, layer.r
    rows = slice(None) if layer.lora_rows is None else layer.lora_rows
    base = nn.Linear(layer.in_features, out, layer.bias is not None, device="meta")
    base.weight, base.bias = layer.weight, layer.bias
    m, k = _interp(layer, out, rows)
    dtype = layer.weight.dtype
    down = nn.Linear(layer.in_features, r, bias=False, dtype=dtype)
    down.weight.copy_(layer.lora_A)
    up = nn.Linear(r, out, bias=m is not None and base.bias is not None, dtype=dtype)
    b_full = torch.zeros(out, r, dtype=torch.float64)
    b_full[rows] = layer.lora_B.double() * layer.scaling
    up.weight.copy_(b_full * k[:, None])
    if up.bias is not None:
        up.bias.copy_((1 - m) * base.bias.double())
    return LowRank(base=base, down=down, up=up, m=None if m is None else m.to(dtype))


def deployable(net: nn.Module, *, merge_up_to: int = 0) -> nn.Module:
    """A copy of the unmerged adapted model for export_pte_task: every LoRA / conv-LoRA layer a LowRank (its
    BatchNorm, if one follows, folded into the base conv and into B), every other conv -> BatchNorm pair folded
    (tasks.deploy.fold_all_bn, the base model's counterpart; other adapters there are merged first).

    merge_up_to: an adapted layer whose weight has at most this many elements is merged instead (the task then
    owns its merged weight). The low-rank path's cost is memory-bound work on the layer's input and output maps
    (a pass over each, an add), largest where the maps are large and the channels few: an EfficientFormer's
    stem and first stages, whose weights are the smallest. Merging those buys most of the time for few bytes."""
    import copy

    net = copy.deepcopy(net).eval()
    small = lambda layer: layer.weight.numel() <= merge_up_to
    for parent in list(net.modules()):
        for c, b in BN_PAIRS:
            conv, bn = getattr(parent, c, None), getattr(parent, b, None)
            if isinstance(conv, LoRAConv2d) and isinstance(bn, nn.BatchNorm2d) and not small(conv):
                setattr(parent, c, _deploy_lora_conv(conv, bn))
                setattr(parent, b, nn.Identity())
    fold_all_bn(net)  # merges the small conv-LoRAs (fold_bn merges an adapter first)
    for parent in list(net.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, (LoRAConv2d, LoRALinear)) and small(child):
                setattr(parent, name, child.to_base())
            elif isinstance(child, LoRAConv2d):
                setattr(parent, name, _deploy_lora_conv(child, None))
            elif isinstance(child, LoRALinear):
                setattr(parent, name, _deploy_lora_linear(child))
    return net


def _digest(t: torch.Tensor) -> tuple:
    t = t.detach().contiguous().cpu()
    return t.dtype, tuple(t.shape), hashlib.sha256(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"").digest()


def ptd_keys(path) -> set[str]:
    """The names of the tensors a .ptd file holds (XNNPACK names them by the sha256 of their bytes)."""
    require_executorch()
    from executorch.exir._serialize._cord import Cord
    from executorch.extension.flat_tensor.serialize.serialize import FlatTensorSerializer

    with open(path, "rb") as f:
        blob = f.read()
    try:
        return set(FlatTensorSerializer().deserialize(Cord(blob)).named_data)
    except Exception as e:  # the flatbuffer reader raises its own errors on a file of another format
        raise ValueError(f"{path} is not an ExecuTorch data file (.ptd): {e}") from None


def export_pte_base(base: nn.Module, example: torch.Tensor, pte_path, *, data_path, batch_sizes=(1, 2)) -> None:
    """The base model with its BatchNorms folded (tasks.deploy.fold_all_bn, on a copy): the .pte at pte_path and
    every delegated constant in data_path, the .ptd every task of this base reads. Writes both (atomically)."""
    import copy

    net = copy.deepcopy(base).eval()
    fold_all_bn(net)
    export_pte(net, example, pte_path, batch_sizes=batch_sizes, data_path=data_path)


def export_pte_task(net: nn.Module, example: torch.Tensor, pte_path, *, base: nn.Module, base_data_path,
                    batch_sizes=(1, 2), merge_up_to: int = 50_000) -> dict:
    """A task's .pte on the shared base .ptd (written by export_pte_base from `base`; never written here).

    Args:
        net: the task's adapted model, UNMERGED (adapters on the base layers, its head), in eval mode.
        example: an input (B, 3, S, S).
        pte_path: the task's .pte (written atomically, only when every shared tensor is in base_data_path).
        base: the base model the task was trained on (the one export_pte_base exported).
        base_data_path: the base .ptd.
        batch_sizes: as export_pte.
        merge_up_to: adapted layers with at most this many weight elements are merged (deployable()); the
            default merges an EfficientFormer's stem and first-stage convs (BENCHMARKS.md, "ExecuTorch"); 0 keeps
            every adapted layer on the shared base.
    Returns {"shared": tensors read from the base .ptd, "own_bytes": the .pte's size}.
    ValueError when the task needs a base tensor the .ptd lacks (a .ptd of another base).
    """
    import copy

    folded = copy.deepcopy(base).eval()
    fold_all_bn(folded)
    base_digests = {_digest(t) for t in folded.state_dict().values() if t.numel()}
    tag_of = lambda t: BASE_TAG if t.numel() and _digest(t) in base_digests else None
    program = _lower(deployable(net, merge_up_to=merge_up_to), example, batch_sizes=batch_sizes, tag_of=tag_of)
    shared = _data_files(program).get(BASE_TAG)
    needed = _blob_keys(bytes(shared)) if shared is not None else set()
    missing = needed - ptd_keys(base_data_path)
    if missing:
        raise ValueError(f"{base_data_path} lacks {len(missing)} of the {len(needed)} base tensors this task reads: "
                         f"it was exported from another base (or another version of it); export the base again "
                         f"with export_pte_base from the base the task was trained on")
    _write_program(program, pte_path)
    return {"shared": len(needed), "own_bytes": os.path.getsize(pte_path)}


def _blob_keys(blob: bytes) -> set[str]:
    from executorch.exir._serialize._cord import Cord
    from executorch.extension.flat_tensor.serialize.serialize import FlatTensorSerializer

    return set(FlatTensorSerializer().deserialize(Cord(blob)).named_data)
