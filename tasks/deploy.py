"""Building a trained task for deployment: the pieces export.py and bench/bench_export.py share.

    build_model(name, head=..., num_classes=..., img_size=...)   the network as the training script built it
    head_of(name, keys), fpn_widths(state)                        what a task / merged file holds, from its tensors
    add_task_adapters(model, adapters)                            the task file's adapters, rebuilt from their configs
    fold_all_bn(model)                                            every conv -> BatchNorm pair folded into the conv
    export_onnx(net, x, path), export_pt2(net, x, path)           the two exporters, batch dimension dynamic
                                                                  (the .pt2: core ATen, edge-ready)
    exportable(model, head)                                       what the exporters trace: the model, or for SAM
    Segment(model=sam)                                            forward(x) = sam.segment(x) (the prompt-free path)
    onnx_op_counts(path), median_time(fn, x)                      the structural check and the latency numbers

Three heads (the network on the backbone) come out of the training scripts:
    cls   EfficientFormer / ViT classifier (train_cls.py)               (B, 3, S, S) -> (B, K) logits
    fpn   EfficientFormer + Semantic FPN (train_seg.py --model efl*)    (B, 3, S, S) -> (B, K, S, S) logits
    sam   SAM ViT-B, prompt-free (train_seg.py --model sam_vitb)        (B, 3, S, S) -> (B, K, S, S) logits
"""
import contextlib
import io
import json
import re
import statistics
import sys
import time
from collections import Counter

import torch
import torch.nn as nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from conv_lora import LoRAConv2d, fold_bn
from ia3 import add_ia3
from lora import LoRALinear, add_lora, runs_to_rows
from models import PRESETS, create_model, ef_semantic_fpn, load_pretrained

HEADS = ("cls", "fpn", "sam")


def builder_of(name: str) -> str:
    """The full-size builder behind a model name: 'ef_tiny' -> 'efl1', 'efl7' -> 'efl7'."""
    return PRESETS[name][0] if name in PRESETS else name


def head_of(name: str, keys) -> str:
    """The head, cls / fpn / sam, from the model name and the state_dict keys of a merged export (or a task's)."""
    if builder_of(name) == "sam_vitb":
        return "sam"
    return "fpn" if any(k.startswith("decode_head.") for k in keys) else "cls"


def build_model(name: str, *, head: str, num_classes: int, img_size: int, model_cfg: dict | None = None,
                fpn_channels: int = 256, fpn_head_channels: int = 128, weights: str | None = None,
                verbose: bool = False) -> nn.Module:
    """The network of a task, exactly as train_cls.py / train_seg.py build it (same modules, same state_dict
    keys), with the base checkpoint `weights` loaded the way they load it, in eval mode.

    Args:
        name: models.create_model name (efl7, vitb, sam_vitb, ef_tiny, ...).
        head: "cls" (classifier), "fpn" (Semantic FPN) or "sam" (SAM's mask decoder).
        num_classes: classes of the task (SAM's binary task: 2, one logit map).
        img_size: the trained input side.
        model_cfg: builder keywords (--model-cfg), on top of a preset's.
        fpn_channels, fpn_head_channels: the Semantic FPN widths (fpn only).
        weights: a base checkpoint for models.load_pretrained (strict; a head of another size is skipped).
        verbose: print load_pretrained's summary.
    """
    cfg = {**PRESETS.get(name, (name, {}))[1], **(model_cfg or {})}
    builder = builder_of(name)
    if head == "cls":
        model = create_model(builder, num_classes=num_classes, img_size=img_size, **cfg)
    elif head == "sam":
        model = create_model(builder, img_size=img_size, num_classes=1 if num_classes <= 2 else num_classes, **cfg)
    elif head == "fpn":
        model = create_model(builder, num_classes=0, img_size=img_size, **cfg)  # the backbone
    else:
        raise ValueError(f"unknown head {head!r}; one of {HEADS}")
    if weights:
        load_pretrained(model, weights, strict=True, verbose=verbose)
    if head == "fpn":  # the final norm is dropped after loading, as train_seg.py does
        model = ef_semantic_fpn(model, num_classes=num_classes, channels=fpn_channels, head_channels=fpn_head_channels)
    return model.eval()


def fpn_widths(state: dict) -> tuple[int, int, int]:
    """(num_classes, channels, head_channels) of a Semantic FPN, read from its tensors' shapes."""
    return (state["decode_head.conv_seg.weight"].shape[0], state["decode_head.lateral_convs.0.weight"].shape[0],
            state["decode_head.conv_seg.weight"].shape[1])


def add_task_adapters(model: nn.Module, adapters: dict) -> None:
    """Put the adapters a task file describes ({module name: adapter_config()}) on `model`, in place, with fresh
    values: lora.load_adapters then fills them (and checks every config, shape and the base fingerprint).
    Rebuilding from the stored configs, not from the method name, makes any file of lora.save_adapters /
    tasks.task_file.save_task usable, whichever script and method wrote it. ValueError for another model's task."""
    groups = {"lora": {}, "conv_lora": {}, "ia3": {}}
    for name, cfg in adapters.items():
        adapter_type = cfg.get("type")
        if adapter_type not in groups:
            raise ValueError(f"adapter {name}: unknown type {adapter_type!r} (lora, conv_lora or ia3)")
        if adapter_type == "ia3":
            groups[adapter_type][re.escape(name)] = dict(mode=cfg["mode"], rows=runs_to_rows(cfg.get("rows")))
        else:
            rows = {"rows": runs_to_rows(cfg.get("rows"))} if adapter_type == "lora" else {}
            groups[adapter_type][re.escape(name)] = dict(r=cfg["r"], alpha=cfg["alpha"],
                                                         learn_interp=cfg["learn_interp"], **rows)
    try:
        if groups["lora"]:
            add_lora(model, groups["lora"], layers={nn.Linear: LoRALinear})
        if groups["conv_lora"]:
            add_lora(model, groups["conv_lora"], layers={nn.Conv2d: LoRAConv2d})
        if groups["ia3"]:
            add_ia3(model, groups["ia3"])
    except (ValueError, TypeError) as e:
        raise ValueError(f"the task's adapters do not fit this model (a task of another model or size?): {e}") from None


# the conv -> BatchNorm pairs of this project's models, as (conv attribute, BN attribute) of one parent module:
# EfficientFormer's Stem (conv1/norm1, conv2/norm2), ConvMlp (fc1/norm1, fc2/norm2), Downsample (conv/norm),
# the Semantic FPN's ConvBNReLU (conv/bn). Each parent applies the BN directly to that conv's output.
BN_PAIRS = (("conv1", "norm1"), ("conv2", "norm2"), ("fc1", "norm1"), ("fc2", "norm2"), ("conv", "norm"),
            ("conv", "bn"))


def fold_all_bn(model: nn.Module) -> tuple[int, int]:
    """Fold every conv -> BatchNorm pair into the conv (conv_lora.fold_bn; the BN becomes nn.Identity), in place.
    Returns (folded, BatchNorms left): a deployed EfficientFormer / FPN has no BatchNorm left."""
    folded = 0
    for parent in list(model.modules()):
        for c, b in BN_PAIRS:
            conv, bn = getattr(parent, c, None), getattr(parent, b, None)
            if isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d):
                setattr(parent, c, fold_bn(conv, bn))
                setattr(parent, b, nn.Identity())
                folded += 1
    left = sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    return folded, left


class Segment(nn.Module):
    """forward(x) = model.segment(x): SAM's prompt-free path as the module's forward, for the exporters.

    Args:
        model: a models.sam.Sam.
    """

    def __init__(self, *, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.segment(x)  # (B, 3, S, S) -> (B, K, S, S)


def exportable(model: nn.Module, head: str) -> nn.Module:
    """The module whose forward(x) the exporters trace: the model, or Segment(model) for SAM."""
    return Segment(model=model).eval() if head == "sam" else model.eval()


def export_onnx(net: nn.Module, example: torch.Tensor, path, *, opset: int | None = None) -> None:
    """torch.onnx's exporter (dynamo) on `net`, batch dimension dynamic, input "image", output "logits", one file.

    `example` should have batch >= 2: torch.export specialises a dimension it sees at size 1. The exporter's
    progress lines are kept out of stdout (shown if it fails)."""
    batch = torch.export.Dim("batch", min=1, max=4096)
    chatter = io.StringIO()
    try:
        # SDPA's math form while tracing: the CPU flash kernel's output strides differ from the decomposed graph's,
        # which breaks a later reshape of the attention output (SAM's image encoder) in the ONNX lowering
        with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), contextlib.redirect_stdout(chatter):
            torch.onnx.export(net, (example,), str(path), dynamo=True, external_data=False,
                              dynamic_shapes=({0: batch},), input_names=["image"], output_names=["logits"],
                              opset_version=opset)
    except Exception:
        sys.stdout.write(chatter.getvalue())
        raise


def export_pt2(net: nn.Module, example: torch.Tensor, path) -> None:
    """torch.export.export with a dynamic batch dimension, then run_decompositions() to the core ATen operator set
    (the program's dialect becomes "ATEN", from torch.export's "TRAINING"): the program coremltools.convert and
    ExecuTorch's to_edge take as it is. Saved with torch.export.save (`path` ends in .pt2)."""
    batch = torch.export.Dim("batch", min=1, max=4096)
    with torch.no_grad():
        program = torch.export.export(net, (example,), dynamic_shapes=({0: batch},)).run_decompositions()
    torch.export.save(program, str(path))


def onnx_op_counts(path) -> Counter:
    """{op type: count} over the nodes of an ONNX graph and its functions (the structural fingerprint)."""
    import onnx
    m = onnx.load(str(path), load_external_data=False)
    counts = Counter(n.op_type for n in m.graph.node)
    for f in m.functions:
        counts.update(n.op_type for n in f.node)
    return counts


def median_time(fn, x, *, repeats: int = 10, warmup: int = 2) -> float:
    """Median wall time (seconds) of fn(x) over `repeats` calls after `warmup` calls."""
    for _ in range(warmup):
        fn(x)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn(x)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def parse_json_meta(meta: dict, key: str, default=None):
    """A JSON value of a safetensors metadata dict (all strings), or `default`."""
    v = meta.get(key)
    if v in (None, ""):
        return default
    try:
        return json.loads(v)
    except (json.JSONDecodeError, TypeError):
        return v


def quantize_onnx_int8(src, dst, batches) -> None:
    """Static int8 quantization of the ONNX model `src` into `dst` with onnxruntime.quantization: QDQ format,
    weights int8 per output channel, activations int8 (s8s8: the scheme with the least drift in onnxruntime's
    CPU kernels), ranges from min / max over `batches` (numpy arrays (B, 3, S, S)), input "image"."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter(batches)

        def get_next(self):
            x = next(self.it, None)
            return None if x is None else {"image": x}

    import logging
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # the quantizer logs a line per 1-D weight it does not quantize per channel
    try:
        quantize_static(str(src), str(dst), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QInt8, weight_type=QuantType.QInt8)
    finally:
        root.setLevel(level)
