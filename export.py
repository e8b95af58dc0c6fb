r"""
Export a trained task as one file a runtime executes, and check that it computes what PyTorch computes.

PETAH's deployment claim: a task adapted with LoRA / conv-LoRA costs exactly the base model at inference,
because the adapters merge into the weights. This script merges the task into the base, optionally folds
every BatchNorm into the conv before it, exports the network, reloads the exported file, runs it on random
inputs (batch 1 and 2) and compares with the PyTorch model it was exported from (the tolerances below) and with
the unmerged adapted model (1e-3 of the output scale: merging reorders fp32 sums, a wrong merge changes outputs).
Nothing is written to --out unless both checks pass (the file is written to a temporary name beside it, then moved
into place).

    # a task file (train_cls.py: OUT/adapters.safetensors) on the base checkpoint it was trained on
    python export.py --weights efficientformer_l7.pth --task runs/cub/adapters.safetensors --fold-bn \
        --format onnx --out cub.onnx
    # a merged model (OUT/merged.safetensors): the settings come from its metadata
    python export.py --weights runs/cub/merged.safetensors --format pt2 --out cub.pt2
    # the base model alone (e.g. to compare its graph with a task's)
    python export.py --model efl7 --weights efficientformer_l7.pth --format onnx --img-size 224 --out base.onnx

Formats:
    onnx  ONNX (opset of torch.onnx's exporter), dynamic batch dimension, checked with onnxruntime (<= 1e-4).
          Needs the optional packages: pip install onnx onnxruntime onnxscript
    pt2   a torch.export program decomposed to the core ATen operators (dialect "ATEN", the form coremltools and
          ExecuTorch's to_edge take as it is), torch.export.save'd, reloaded with torch.export.load and run
          (<= 1e-5). Dynamic batch dimension too.
    pte   ExecuTorch, lowered with the XNNPACK partitioner (tasks/pte.py), batches 1 and 2, run by ExecuTorch's
          runtime (<= 1e-4). Needs: pip install executorch

A deployment bundle: one shared base and a small graph per task (tasks/bundle.py; run it with run_bundle.py):
    python export.py --bundle bundle/ --weights efficientformer_l7.pth --format onnx \
        --task cub=runs/cub/adapters.safetensors --task cars=runs/cars/adapters.safetensors
    # later, one more task: the base files are not rewritten; --replace replaces a task of the same name
    python export.py --bundle bundle/ --weights efficientformer_l7.pth --format onnx \
        --task pets=runs/pets/adapters.safetensors
--format pte makes an ExecuTorch bundle: base.pte + base.ptd, each task a .pte reading base.ptd (tasks/pte.py).
A run trained without --weights saves its random base as OUT/base.safetensors: without --weights, export.py uses
the base.safetensors beside the task file (and says so).

Models: every family the training scripts write: EfficientFormer and ViT classifiers (train_cls.py),
EfficientFormer + Semantic FPN and SAM's prompt-free segmentation (train_seg.py); the exported graph takes a
normalised (B, 3, S, S) image (mean / std in the metadata) and returns (B, K) logits or (B, K, S, S) logit maps.
Printed: the max abs difference per batch size, the file size, GFLOPs (2 x multiply-adds, models/flops.py) and
the latency at batch 1 of the unmerged PyTorch model (adapters active), the merged one and the exported file;
last, one JSON line with the same numbers.
"""

import argparse
import copy
import json
import os
import warnings
from pathlib import Path

import torch

from lora import load_adapters, merge_and_unload
from models import MODEL_NAMES, PRESETS
from tasks.deploy import (
    add_task_adapters,
    build_model,
    builder_of,
    export_onnx,
    export_pt2,
    exportable,
    fold_all_bn,
    fpn_widths,
    head_of,
    median_time,
    onnx_op_counts,
    parse_json_meta,
)
from tasks.flops import count_flops
from tasks.interop import reference_arch

FORMATS = {"onnx": 1e-4, "pt2": 1e-5, "pte": 1e-4}  # format -> max abs difference to PyTorch the check allows
# the opsets torch.onnx's exporter writes itself (below 18 it runs onnx's version converter, which fails on most
# of these graphs); above: what the onnx package knows, within what onnxruntime runs
OPSETS = (18, 23)
ONNX_PACKAGES = ("onnx", "onnxruntime", "onnxscript")

# -----------------------------------------------------------------------------
# configuration

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--model", default=None, choices=MODEL_NAMES + tuple(PRESETS),
                    help="backbone; default: the one named in --task's or --weights' metadata")
parser.add_argument("--model-cfg", default=None, metavar="JSON",
                    help="extra models.create_model keywords (as in training); default: from the metadata, else {}")
parser.add_argument("--weights", default=None, metavar="PATH",
                    help="the base checkpoint the task was trained on, or a merged model (OUT/merged.safetensors, "
                         "then no --task). Without it the weights are random: only for looking at the graph")
parser.add_argument("--task", default=None, action="append", metavar="FILE | NAME=FILE",
                    help="task file (OUT/adapters.safetensors, or an OUT/ckpt/epoch_*.safetensors) to merge in; with "
                         "--bundle: NAME=FILE, repeated, one per task to add")
parser.add_argument("--bundle", default=None, metavar="DIR",
                    help="create the deployment bundle DIR (one shared base, each --task a small graph on it, "
                         "manifest.json) or add the --task's to it (tasks/bundle.py); needs --weights")
parser.add_argument("--replace", action="store_true", help="--bundle: replace tasks of the same NAME")
parser.add_argument("--num-classes", type=int, default=None,
                    help="classes, when no metadata says (a base checkpoint alone); default: its head's, else 1000 "
                         "(SAM: 2, the binary single-mask output)")
parser.add_argument("--img-size", type=int, default=None,
                    help="input side of the exported graph; default: the trained size from the metadata, else 224 "
                         "(SAM 1024). EfficientFormer takes any multiple of 32; ViT and SAM their trained size")
parser.add_argument("--fold-bn", action="store_true",
                    help="fold every BatchNorm into the conv before it (EfficientFormer, FPN): the .pt2 program then "
                         "has no batch_norm op. The ONNX exporter folds eval-mode BatchNorms itself (same graph either "
                         "way)")
parser.add_argument("--format", required=True, metavar="{onnx,pt2,pte}",
                    help="onnx (checked with onnxruntime), pt2 (torch.export.save of the core-ATen program, checked "
                         "after torch.export.load) or pte (ExecuTorch with XNNPACK, checked with its runtime)")
parser.add_argument("--out", default=None, metavar="PATH",
                    help="the file to write (its suffix the format's: cub.onnx, cub.pt2, cub.pte); not with --bundle")
parser.add_argument("--opset", type=int, default=None,
                    help=f"--format onnx: ONNX opset, {OPSETS[0]}..{OPSETS[1]}; default: the exporter's "
                         f"({OPSETS[0]})")
parser.add_argument("--quantize", default=None, choices=("int8",),
                    help="--format onnx, one task: static int8 (QDQ, onnxruntime.quantization; weights per channel), "
                         "calibrated on --calib; the int8 file's drift from the fp32 one is printed")
parser.add_argument("--calib", default=None, metavar="DIR",
                    help="--quantize: calibration images (a folder, searched recursively; the first 64, sorted), "
                         "prepared as the task evaluates; default: the synthetic set's validation images of a "
                         "task trained on --data synthetic")
parser.add_argument("--repeats", type=int, default=10,
                    help="timed runs per latency number (median, after 2 warm-up runs); 0 skips timing; default 10")
parser.add_argument("--seed", type=int, default=0, help="seed of the random check inputs; default 0")
args = parser.parse_args()

# -----------------------------------------------------------------------------
# the cheap checks first: format, optional packages, the output path

if args.format not in FORMATS:
    parser.error(f"--format {args.format!r} is not supported; use --format onnx (onnxruntime), pt2 (torch.export's "
                 f"core-ATen program) or pte (ExecuTorch)")
if args.opset is not None and not OPSETS[0] <= args.opset <= OPSETS[1]:
    parser.error(f"--opset {args.opset}: torch.onnx's exporter writes opsets {OPSETS[0]}..{OPSETS[1]} (onnxruntime "
                 f"runs them all); drop --opset for {OPSETS[0]}")
if args.opset is not None and args.format != "onnx":
    parser.error(f"--opset is an ONNX setting; drop it for --format {args.format}")
if args.img_size is not None and args.img_size < 1:
    parser.error(f"--img-size {args.img_size} must be a positive input side (drop it for the trained size)")
if args.repeats < 0:
    parser.error(f"--repeats {args.repeats} must be >= 0 (0 = no timing)")
if args.bundle is not None:
    if args.format == "pt2":
        parser.error("--bundle holds programs a runtime runs: --format onnx (onnxruntime) or pte (ExecuTorch); a "
                     ".pt2 program is one model (drop --bundle)")
    if args.out is not None:
        parser.error(f"--out is for one exported file; a bundle is written into --bundle {args.bundle} (drop --out)")
    if not args.task:
        parser.error("--bundle needs at least one --task NAME=FILE (e.g. --task cub=runs/cub/adapters.safetensors)")
else:
    if args.out is None:
        parser.error("the following arguments are required: --out (or --bundle DIR)")
    if args.task and len(args.task) > 1:
        parser.error(f"--task given {len(args.task)} times: one task per exported file (or --bundle DIR for many)")
    for flag, given in (("--replace", args.replace),):
        if given:
            parser.error(f"{flag} belongs to --bundle; drop it")
    if not args.out.endswith("." + args.format) and not os.path.isdir(args.out):
        parser.error(f"--out {args.out} does not end in .{args.format}: --format {args.format} writes a "
                     f".{args.format} file (name it e.g. {os.path.splitext(args.out)[0]}.{args.format})")
args.task = args.task[0] if args.task and args.bundle is None else args.task
if args.quantize and (args.format != "onnx" or args.bundle is not None):
    parser.error("--quantize int8 is built for one --format onnx file here (per-task quantized merged model); drop "
                 "--bundle / use --format onnx")
if args.calib is not None and not args.quantize:
    parser.error("--calib belongs to --quantize int8; drop it")
if args.calib is not None and not os.path.isdir(args.calib):
    parser.error(f"--calib {args.calib} is not a folder of images")
if args.format == "pte":
    try:
        from tasks.pte import require_executorch
        require_executorch()
    except (ImportError, ValueError) as e:
        parser.error(f"--format pte: {e}")
if args.format == "onnx":
    missing = []
    for pkg in ONNX_PACKAGES:
        try:
            __import__(pkg)
        except ImportError:
            missing.append(pkg)
    if missing:
        parser.error(f"--format onnx needs the optional package(s) {', '.join(missing)}: "
                     f"pip install {' '.join(ONNX_PACKAGES)}   (or export with --format pt2, which needs torch only)")
    import onnx
    import onnxruntime as ort
out = os.path.abspath(args.out or args.bundle)
out_dir = os.path.dirname(out)
if args.bundle is None and os.path.isdir(out):
    parser.error(f"--out {args.out} is a directory; give a file name, e.g. --out "
                 f"{os.path.join(args.out, 'task.' + args.format)}")
if not os.path.isdir(out_dir):
    parser.error(f"{'--out' if args.bundle is None else '--bundle'} {args.out or args.bundle}: the folder {out_dir} "
                 f"does not exist; create it (mkdir -p {out_dir}) or choose another path")
if not os.access(out_dir, os.W_OK) or (os.path.exists(out) and not os.access(out, os.W_OK)):
    parser.error(f"{args.out or args.bundle}: cannot write there (permission denied); choose a writable path")

# -----------------------------------------------------------------------------
# what --weights and --task hold: a base checkpoint, a merged model (with metadata), a task file


def safetensors_meta(path: str) -> dict:
    if not path.endswith(".safetensors"):
        return {}
    from safetensors import safe_open
    try:
        with safe_open(path, framework="pt") as f:
            return f.metadata() or {}
    except Exception as e:  # safetensors raises its own error types for a bad header
        parser.error(f"--weights {path} is not a readable safetensors file ({e}); pass a checkpoint or a merged model")


if args.weights is None and args.task:  # a run trained without --weights saves its random base beside the task
    first_task = args.task if args.bundle is None else args.task[0].partition("=")[2]
    beside = os.path.join(os.path.dirname(os.path.abspath(first_task)), "base.safetensors")
    if os.path.isfile(beside):
        args.weights = beside
        print(f"no --weights: using {beside}, the base its training run saved beside the task file", flush=True)
if args.weights is not None and not os.path.isfile(args.weights):
    parser.error(f"--weights {args.weights} does not exist (or is not a file)")


def export_bundle() -> None:
    """--bundle: the tasks' graphs on one shared base (tasks/bundle.py), checked, then the manifest."""
    from tasks import bundle
    from tasks.task_file import read_task
    if args.weights is None:
        parser.error("--bundle needs --weights: the base checkpoint the tasks were trained on (a run without "
                     "--weights saves it as OUT/base.safetensors)")
    tasks = {}
    for spec in args.task:
        tname, sep, path = spec.partition("=")
        if not sep or not tname or not path:
            parser.error(f"--task {spec!r}: with --bundle write each task as NAME=FILE, e.g. "
                         f"cub=runs/cub/adapters.safetensors")
        if tname in tasks:
            parser.error(f"--task names {tname!r} twice; give each task its own name")
        try:
            tasks[tname] = read_task(bundle.check_name(tname) and path)
        except (FileNotFoundError, ValueError) as e:
            parser.error(f"--task {spec}: {e}")
        if tasks[tname].meta.get("task_type", tasks[tname].meta.get("kind")) == "det":
            parser.error(f"--task {spec} is a detection task: detection runs in PyTorch only (no bundle)")
    first = next(iter(tasks))
    desc = {n: (t.meta.get("model"), t.meta.get("model_cfg") or {}, t.meta.get("img_size")) for n, t in tasks.items()}
    for n, d in desc.items():
        if None in (d[0], d[2]):
            parser.error(f"--task {n}: the task file does not record its model and input size (an epoch "
                         f"checkpoint?); bundle the run's OUT/adapters.safetensors")
        if d != desc[first]:
            parser.error(f"tasks {first!r} and {n!r} were trained on different base models or input sizes "
                         f"({desc[first]} vs {d}); a bundle holds tasks of one base")
    name, model_cfg, img_size = desc[first][0], desc[first][1], int(desc[first][2])
    base = dict(model=name, model_cfg=model_cfg, img_size=img_size,
                fingerprint=bundle.checkpoint_fingerprint(args.weights))
    try:
        manifest = bundle.open_for_adding(args.bundle, base, list(tasks), replace=args.replace, runtime=args.format)
    except bundle.BundleError as e:
        parser.error(str(e))
    entries = []
    for tname, t in tasks.items():
        try:
            model, head = bundle.build_task(t, args.weights)
        except (ValueError, TypeError) as e:
            msg = str(e)
            if "fingerprint" in msg:
                msg = (f"--task {tname}={t.path} was trained on another base than --weights {args.weights} "
                       f"(fingerprint mismatch): bundle it with the base checkpoint it was trained on")
            parser.error(msg)
        data_cfg = getattr(model, "data_cfg", None) or {}
        reference = exportable(merge_and_unload(copy.deepcopy(model)), head)
        prep = (bundle.preprocess_cls(t.meta, data_cfg, img_size) if head == "cls"
                else bundle.preprocess_seg(t.meta, img_size))
        entry = dict(task_type="cls" if head == "cls" else "seg", head=head, num_classes=int(t.meta["num_classes"]),
                     class_names=t.meta.get("class_names"), img_size=img_size, preprocess=prep,
                     method=t.meta.get("method"), source=bundle.file_entry(t.path))
        unmerged = exportable(copy.deepcopy(model), head) if args.format == "pte" else None
        entries.append(dict(name=tname, unmerged=unmerged, net=exportable(bundle.merge_in_graph(model), head),
                            reference=reference, entry=entry))
    base_head = "sam" if "sam" in {e["entry"]["head"] for e in entries} else "cls"
    base_net = exportable(bundle.build_base(name, head=base_head, model_cfg=model_cfg, img_size=img_size,
                                            weights=args.weights), base_head)
    try:
        manifest = bundle.add_tasks(args.bundle, manifest, base_net=base_net, base=base, tasks=entries,
                                    runtime=args.format, opset=args.opset, seed=args.seed,
                                    log=lambda m: print(m, flush=True))
    except bundle.BundleError as e:
        raise SystemExit(f"export.py: error: {e}") from None
    except OSError as e:
        raise SystemExit(f"export.py: error: cannot write the bundle {args.bundle} ({e}); nothing changed") from None
    base_bytes = sum(f["bytes"] for f in manifest["base"]["files"].values())
    for tname in tasks:
        own = sum(f["bytes"] for f in manifest["tasks"][tname]["files"].values())
        print(f"bundle {args.bundle}: task {tname} {own / 2**20:.3f} MB = {100 * own / base_bytes:.2f}% of the base's "
              f"{base_bytes / 2**20:.2f} MB", flush=True)
    print(json.dumps(dict(bundle=args.bundle, format=args.format, tasks=sorted(manifest["tasks"]),
                          added=list(tasks), base_bytes=base_bytes)), flush=True)


if args.bundle is not None:
    export_bundle()
    raise SystemExit(0)
wmeta = safetensors_meta(args.weights) if args.weights else {}
if "adapters" in wmeta:
    parser.error(f"--weights {args.weights} is a task file (adapters only); pass it as --task and the base checkpoint "
                 f"it was trained on as --weights")
# train_cls.py / train_seg.py write the model name and the task's settings into merged.safetensors; the random base
# of a run without --weights (OUT/base.safetensors) carries the model name, its seed and a note, no task settings
merged_file = "model" in wmeta and any(k in wmeta for k in ("arch", "method", "num_classes"))
if merged_file and args.task:
    parser.error(f"--weights {args.weights} is a merged model: its task is already in the weights. Drop --task, or "
                 f"pass the base checkpoint the task was trained on as --weights")
task = None
if args.task:
    from tasks.task_file import read_task
    try:
        task = read_task(args.task)
    except (FileNotFoundError, ValueError) as e:
        parser.error(f"--task: {e}")
tmeta = task.meta if task is not None else {}
stored = tmeta or {k: parse_json_meta(wmeta, k) for k in wmeta}  # the task's settings, else the merged file's

name = stored.get("model")
if args.model and name and args.model != name:
    parser.error(f"--model {args.model}, but {args.task or args.weights} was made with --model {name}; drop --model "
                 f"or pass the matching file")
name = args.model or name
if not name:
    parser.error("no --model given and the files do not name one (a base checkpoint has no metadata): pass --model")
try:
    model_cfg = json.loads(args.model_cfg) if args.model_cfg is not None else stored.get("model_cfg") or {}
    if isinstance(model_cfg, str):
        model_cfg = json.loads(model_cfg)
    assert isinstance(model_cfg, dict)
except (json.JSONDecodeError, AssertionError):
    parser.error(f"--model-cfg must be a JSON object such as '{{\"depths\": [1, 1, 1, 2]}}', got {args.model_cfg!r}")

keys = list(task.tensors) if task is not None else []
if merged_file:
    from safetensors.torch import load_file
    merged_state = load_file(args.weights)
    keys = list(merged_state)
head = head_of(name, keys)
if tmeta.get("task_type", tmeta.get("kind")) == "seg" and head == "cls":
    head = "fpn"  # an EfficientFormer segmentation task that trained no decode_head tensor (none in practice)
num_classes = stored.get("num_classes") or args.num_classes
if args.num_classes is not None and int(num_classes) != args.num_classes:
    parser.error(f"--num-classes {args.num_classes}, but {args.task or args.weights} has {num_classes} classes; drop "
                 f"--num-classes")
fpn = dict(fpn_channels=stored.get("fpn_channels") or 256, fpn_head_channels=stored.get("fpn_head_channels") or 128)
if head == "fpn" and "decode_head.conv_seg.weight" in keys:  # the head's sizes from its tensors
    state = task.tensors if task is not None else merged_state
    num_classes, fpn["fpn_channels"], fpn["fpn_head_channels"] = fpn_widths(state)
if num_classes is None and head == "sam":  # a base SAM (Meta's checkpoint): the binary, single-mask output
    num_classes = 2
if num_classes is None:  # a base classifier checkpoint alone: its head's size
    num_classes = 1000
    if args.weights:
        from models import read_checkpoint
        head_tensors = {k: v for k, v in read_checkpoint(args.weights).items()
                        if k in ("head.weight", "head_dist.weight")}
        num_classes = next(iter(head_tensors.values())).shape[0] if head_tensors else 1000
num_classes = int(num_classes)
trained_size = int(stored["img_size"]) if stored.get("img_size") else None
img_size = args.img_size or trained_size or (1024 if head == "sam" else 224)
build_size = trained_size or img_size  # the tables (biases, pos_embed) are stored for the trained size
if img_size != build_size and not builder_of(name).startswith("ef"):
    parser.error(f"--img-size {img_size}: {name} was trained at {build_size} and a ViT / SAM graph takes exactly its "
                 f"trained size (position tables); drop --img-size or pass --img-size {build_size}")
if not args.weights:
    warnings.warn("no --weights: the model is RANDOMLY initialised; the export shows the graph and its cost only",
                  stacklevel=1)

# -----------------------------------------------------------------------------
# the PyTorch model: base weights, then the task's adapters; or the merged weights

print(f"model {name} ({head}), {num_classes} classes, trained at {build_size}, exported at {img_size}, "
      f"format {args.format}{', BN folded' if args.fold_bn else ''}", flush=True)
torch.manual_seed(args.seed)
try:
    model = build_model(name, head=head, num_classes=num_classes, img_size=build_size, model_cfg=model_cfg,
                        weights=None if merged_file else args.weights, verbose=True, **fpn)
except (TypeError, ValueError, FileNotFoundError) as e:  # a bad --model-cfg, a checkpoint of another model
    parser.error(f"cannot build {name} from {args.weights or 'random weights'}: {e}")
if merged_file:
    try:
        model.load_state_dict(merged_state, strict=True)
    except RuntimeError as e:
        parser.error(f"--weights {args.weights} does not load into {name} with {model_cfg}: {str(e)[:600]}")
if task is not None:
    try:
        add_task_adapters(model, task.adapters)
        load_adapters(model, args.task)  # checks every adapter config, every shape and the base fingerprint
    except ValueError as e:
        msg = str(e)
        if "fingerprint" in msg and msg.count("\n  - ") == 1:  # the base is the only problem
            msg = (f"--task {args.task} was trained on another base than --weights {args.weights} (fingerprint "
                   f"mismatch): pass the base checkpoint the task was trained on (same file, same --model-cfg)")
            if trained_size is None:  # an epoch checkpoint records no input size; tables resized for another one
                msg += (f". The task file does not record its input size and the model was built for {build_size}: "
                        f"pass the training --img-size")
        parser.error(msg)
    print(f"task {args.task}: {len(task.adapters)} adapted layers, {len(task.trainable)} other trained tensors, "
          f"{task.nbytes() / 2**20:.2f} MB", flush=True)
model.eval().requires_grad_(False)  # inference only (and FlopCounterMode's tracker wants no grad leaves)
unmerged = copy.deepcopy(model)  # the adapted model as trained: the reference for latency (and a second check)
merged = merge_and_unload(model)  # plain nn.Linear / nn.Conv2d again: the base model's graph
if args.fold_bn:
    folded, left = fold_all_bn(merged)
    print(f"folded {folded} BatchNorms into their convs ({left} left)", flush=True)
net, ref_net = exportable(merged, head), exportable(unmerged, head)

arch, arch_kwargs, note = reference_arch(merged)
if note:
    print(f"note: {note}", flush=True)
elif arch:
    print(f"reference: the merged weights load strictly into {'timm' if arch != 'sam_vit_b' else 'segment_anything'} "
          f"{arch} {arch_kwargs}", flush=True)
if img_size != build_size:
    print(f"note: exported at {img_size} but trained at {build_size}: the attention-bias tables are resampled to the "
          f"new token grid inside the graph (an extra bicubic resize per call)", flush=True)



def calibration_batches(model, meta: dict, size: int, count: int = 64, batch: int = 8) -> list:
    """--quantize: up to `count` images from --calib (or the synthetic validation set), as the task evaluates them
    (data.build_transform with its mean / std / crop / interpolation), in numpy batches."""
    from data import IMG_EXTENSIONS, CorruptImageError, build_datasets, build_transform, read_image
    dc = {**getattr(model, "data_cfg", {}), **{k: meta[k] for k in ("mean", "std", "crop_pct", "interpolation")
                                               if meta.get(k) is not None}}
    cfg = dict(img_size=size, mean=dc["mean"], std=dc["std"], crop_pct=dc["crop_pct"],
               interpolation=dc["interpolation"])
    if args.calib is not None:
        files = sorted(p for p in Path(args.calib).rglob("*") if p.suffix.lower() in IMG_EXTENSIONS)[:count]
        if not files:
            parser.error(f"--calib {args.calib} holds no {'/'.join(IMG_EXTENSIONS)} images")
        transform = build_transform(train=False, **cfg)
        try:
            images = [transform(read_image(p)) for p in files]
        except CorruptImageError as e:
            parser.error(f"--calib: {e}")
    elif meta.get("data") == "synthetic":
        _, val_ds, _, _ = build_datasets("synthetic", synthetic_cfg=dict(num_classes=int(meta["num_classes"])),
                                         **cfg)
        images = [val_ds[i][0] for i in range(min(count, len(val_ds)))]
    else:
        parser.error("--quantize int8 needs calibration images: pass --calib DIR (a few dozen images of the task)")
    return [torch.stack(images[i:i + batch]).numpy() for i in range(0, len(images), batch)]


calib = calibration_batches(unmerged, tmeta, img_size) if args.quantize else None
gen = torch.Generator().manual_seed(args.seed)
inputs = {B: torch.randn(B, 3, img_size, img_size, generator=gen) for B in (1, 2)}
try:
    with torch.no_grad():
        expected = {B: net(x) for B, x in inputs.items()}  # the merged (folded) PyTorch model
        adapted = {B: ref_net(x) for B, x in inputs.items()}  # the unmerged adapted model
except ValueError as e:  # an input size the model cannot take
    parser.error(f"--img-size {img_size}: {e}")

# -----------------------------------------------------------------------------
# export to a temporary file beside --out, reload, check, then move into place

tmp = f"{out}.tmp.{os.getpid()}.{args.format}"  # torch.export.load wants the .pt2 suffix
try:
    if args.format == "onnx":  # traced at batch 2: torch.export specialises a dimension it sees at size 1
        export_onnx(net, inputs[2], tmp, opset=args.opset)
        onnx.checker.check_model(tmp)
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = torch.get_num_threads()  # the same threads as PyTorch, for the timings
        session = ort.InferenceSession(tmp, opts, providers=["CPUExecutionProvider"])

        def run(x: torch.Tensor) -> torch.Tensor:
            return torch.from_numpy(session.run(None, {"image": x.numpy()})[0])
    elif args.format == "pte":  # XNNPACK; the program runs batches 1..2, checked at both below
        from tasks.pte import export_pte, load_pte
        export_pte(net, inputs[2], tmp, batch_sizes=(1, 2))
        method = load_pte(tmp)

        def run(x: torch.Tensor) -> torch.Tensor:
            return method.execute((x.contiguous(),))[0].clone()
    else:
        export_pt2(net, inputs[2], tmp)
        program = torch.export.load(tmp).module()

        def run(x: torch.Tensor) -> torch.Tensor:
            with torch.no_grad():
                return program(x)

    tol = FORMATS[args.format]
    diffs, diffs_adapted = {}, {}
    for B, x in inputs.items():
        y = run(x)
        if y.shape != expected[B].shape:
            raise RuntimeError(f"the exported model returns {tuple(y.shape)} for batch {B}, PyTorch "
                               f"{tuple(expected[B].shape)}")
        diffs[B] = (y - expected[B]).abs().max().item()
        diffs_adapted[B] = (y - adapted[B]).abs().max().item()
        vs_task = f"; vs the unmerged adapted model {diffs_adapted[B]:.2e}" if task is not None else ""
        print(f"check batch {B}: max |exported - PyTorch| = {diffs[B]:.2e} (allowed {tol:.0e}){vs_task}; output "
              f"{tuple(y.shape)}, max |y| {y.abs().max().item():.3g}", flush=True)
    if max(diffs.values()) > tol:
        raise SystemExit(f"export.py: error: the exported model differs from the PyTorch model by "
                         f"{max(diffs.values()):.2e} > {tol:.0e}; nothing written to {args.out}")
    # merging only reorders fp32 sums (W0 x + B A x -> (W0 + B A) x): relative differences ~1e-6, where a wrong merge
    # gives O(1); 1e-3 of the output's scale separates the two
    scale = max(adapted[B].abs().max().item() for B in inputs)
    if max(diffs_adapted.values()) > 1e-3 * max(scale, 1.0):
        raise SystemExit(f"export.py: error: the merged model differs from the unmerged adapted one by "
                         f"{max(diffs_adapted.values()):.2e} (outputs up to {scale:.3g}): a merge bug; nothing "
                         f"written to {args.out}")
    if args.quantize:  # the fp32 file passed its checks: quantize it, then measure what int8 changed
        from tasks.deploy import quantize_onnx_int8
        fp32_session = session
        qtmp = f"{out}.tmp.{os.getpid()}.int8.onnx"
        try:
            quantize_onnx_int8(tmp, qtmp, calib)
            session = ort.InferenceSession(qtmp, opts, providers=["CPUExecutionProvider"])
            drift, agree, total = 0.0, 0, 0
            for xb in calib:
                f = fp32_session.run(None, {"image": xb})[0]
                q = session.run(None, {"image": xb})[0]
                drift = max(drift, float(abs(q - f).max() / max(abs(f).max(), 1e-12)))
                agree += int((q.argmax(1) == f.argmax(1)).sum())
                total += q.shape[0] * (q[0, 0].size if q.ndim == 4 else 1)
            int8_stats = dict(int8_rel_drift=round(drift, 4), int8_argmax_agreement=round(agree / total, 4),
                              calib_images=sum(len(b) for b in calib))
            print(f"int8: max |int8 - fp32| / max |fp32| = {drift:.3f} on {int8_stats['calib_images']} calibration "
                  f"images; argmax agreement {100 * agree / total:.1f}%", flush=True)
            os.replace(qtmp, out)
        finally:
            if os.path.exists(qtmp):
                os.remove(qtmp)
    else:
        os.replace(tmp, out)
except OSError as e:  # the disk, not the model: full, read-only, permissions
    raise SystemExit(f"export.py: error: cannot write {args.out} ({e}); choose a writable --out") from None
finally:
    if os.path.exists(tmp):
        os.remove(tmp)

# -----------------------------------------------------------------------------
# what it costs: size, GFLOPs, latency at batch 1

size_mb = os.path.getsize(out) / 2**20
x1 = inputs[1]
flops_merged = count_flops(net, x1)[0] / 1e9
flops_unmerged = count_flops(ref_net, x1)[0] / 1e9
result = dict(**(int8_stats if args.quantize else {}), quantize=args.quantize, out=args.out, format=args.format,
              model=name, head=head, img_size=img_size, fold_bn=args.fold_bn,
              task=args.task, max_abs_diff=max(diffs.values()), max_abs_diff_vs_unmerged=max(diffs_adapted.values()),
              size_mb=round(size_mb, 3), gflops=round(flops_merged, 4), gflops_unmerged=round(flops_unmerged, 4),
              threads=torch.get_num_threads())
print(f"wrote {args.out}: {size_mb:.2f} MB; {flops_merged:.3f} GFLOPs per image (unmerged adapted model: "
      f"{flops_unmerged:.3f})", flush=True)
if args.format == "onnx":
    ops = onnx_op_counts(out)
    result["onnx_nodes"] = sum(ops.values())
    print(f"ONNX graph: {sum(ops.values())} nodes, " + ", ".join(f"{k} {v}" for k, v in ops.most_common(8)), flush=True)
if not args.repeats:
    print("latency: not measured (--repeats 0)", flush=True)
else:
    with torch.no_grad():
        t_unmerged = median_time(ref_net, x1, repeats=args.repeats)
        t_merged = median_time(net, x1, repeats=args.repeats)
    t_export = median_time(run, x1, repeats=args.repeats)
    result.update(ms_unmerged=round(1e3 * t_unmerged, 3), ms_merged=round(1e3 * t_merged, 3),
                  ms_exported=round(1e3 * t_export, 3))
    ref_name = "unmerged PyTorch (adapters active)" if task is not None else "PyTorch as loaded"
    print(f"latency, batch 1, {torch.get_num_threads()} thread(s), median of {args.repeats}: {ref_name} "
          f"{1e3 * t_unmerged:.2f} ms, merged{' + BN-folded' if args.fold_bn else ''} PyTorch {1e3 * t_merged:.2f} ms, "
          f"exported ({args.format}) {1e3 * t_export:.2f} ms", flush=True)
print(json.dumps(result), flush=True)
