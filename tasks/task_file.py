"""The task file (`OUT/adapters.safetensors`): what one fine-tuning run keeps and ships; save_task / read_task.

TaskBank (tasks/bank.py) serves many of them on one resident base model.

PETAH's argument is storage: ship ONE backbone and a 0.1-0.5M-parameter adapter per task. This file makes the
adapter file the task:

    save_task(model, path, *, meta)    write a task file (call before merging)
    read_task(path) -> Task            read and check one
    TaskBank(base_model)               many tasks on one resident base, no copy of the backbone:
        bank.add(name, path_or_task)   load a task (nothing changes if it does not fit)
        bank.select(name)              the model now computes that task (its adapters merged into task-owned
                                       copies of the layers it adapts); bank.select(None): the base again
        bank(x, tasks=[...])           a mixed batch: one task name per sample, one forward pass
        bank.remove(name) / bank.unload()   drop a task / every task: the plain base modules come back

The task file (`OUT/adapters.safetensors` of train_cls.py / train_seg.py) is a safetensors file holding
    - what the run changed: every adapter tensor (lora_A, lora_B, lora_interp, ia3_l), every other trained
      tensor (the head, and trained norms / biases), and the running statistics of the BatchNorms whose
      parameters trained; keys are the adapted model's state_dict keys (lora.adapter_state_dict),
    - metadata (all strings, JSON inside):
        "adapters"     {module name: adapter config} (type lora / conv_lora / ia3, r, alpha, rows, ...)
        "trainable"    the non-adapter keys of the file (head, norms, biases, BN statistics)
        "fingerprint"  sha256 of the frozen base: every state_dict entry NOT in the file (lora.base_fingerprint)
        "user"         the task description `meta` given to save_task (below)
        "task_format"  "1"
The first four are what lora.save_adapters writes, so lora.load_adapters reads a task file too.

save_task's `meta` (JSON-able dict) describes how to rebuild and use the task with no other file. Required:
    task_type     "cls", "seg" or "det" (files written before the rename hold it as "kind": read_task reads both)
    model         the model name of models.create_model (e.g. "efl7", "ef_tiny")
    method        the method of methods.py (e.g. "petah")
Expected (the scripts write them; predict_cls.py needs the classification ones):
    model_cfg     builder keyword arguments (dict), r, rc, alpha, learn_interp, train_norms, train_biases,
    num_classes, class_names (list or None), img_size, mean, std, interpolation, crop_pct
This signature, save_task(model, path, *, meta), and the file layout are stable: the training scripts
depend on them.
"""

import json
import os
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from lora import adapter_state_dict, base_fingerprint, write_safetensors
from tasks.atomic import atomic_write

TASK_FORMAT = "1"
REQUIRED_META = ("task_type", "model", "method")
TASK_TYPES = ("cls", "seg", "det")


# -----------------------------------------------------------------------------
# the task file

def _adapter_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    # the adapter protocol of lora.py / conv_lora.py / ia3.py
    return [(n, m) for n, m in model.named_modules() if hasattr(m, "adapter_names") and hasattr(m, "adapter_config")]


def _jsonable(x):
    """meta values as JSON: tuples -> lists, tensors / numpy scalars -> numbers or lists."""
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, torch.Tensor):
        return x.tolist()
    if hasattr(x, "item") and callable(x.item):  # numpy scalar
        return x.item()
    return x


def save_task(model: nn.Module, path, *, meta: dict) -> str:
    """Write the task file of a trained (unmerged) model: adapters + trained tensors + `meta`. Returns path.

    Args:
        model: the model as trained, adapters still in place (call before lora.merge_and_unload), with
            requires_grad marking what trained (apply_method's policy): that is what the file keeps.
        path: the file to write (".safetensors"); written atomically (a temporary file in the same folder,
            then os.replace), with the mode the umask gives, and no partial file if anything fails.
        meta: the task description, see the module docstring (task_type, model, method required; an older
            caller's "kind" is taken as task_type).
    """
    tensors = adapter_state_dict(model)  # adapters, trained params, BN statistics of trained BNs
    if not tensors:
        raise ValueError("save_task: the model has no adapters and no trainable parameter: nothing was trained")
    adapters = {name: m.adapter_config() for name, m in _adapter_modules(model)}
    adapter_keys = {f"{name}.{n}" for name, m in _adapter_modules(model) for n in m.adapter_names}
    return _write_task(path, tensors, adapters=adapters, trainable=[k for k in tensors if k not in adapter_keys],
                       fingerprint=base_fingerprint(model, exclude=set(tensors)), meta=meta)


def _write_task(path, tensors: dict, *, adapters: dict, trainable: list, fingerprint: str, meta: dict) -> str:
    """The task file itself (save_task, and peft_io for adapters made elsewhere), after checking `meta`:
    lora.write_safetensors through tasks.atomic.atomic_write (a temporary, then os.replace; the umask's mode; no
    partial file if anything fails; a full disk or a read-only folder is a WriteError naming the file)."""
    if not isinstance(meta, dict):
        raise TypeError(f"save_task: meta must be a dict, got {type(meta).__name__}")
    meta = _task_type_from_kind(meta, "save_task: meta")
    missing = [k for k in REQUIRED_META if k not in meta]
    if missing:
        raise ValueError(f"save_task: meta lacks {missing}; it needs at least {list(REQUIRED_META)}")
    if meta["task_type"] not in TASK_TYPES:
        raise ValueError(f"save_task: meta['task_type'] must be one of {TASK_TYPES}, got {meta['task_type']!r}")
    try:
        user = json.dumps(_jsonable(meta))
    except (TypeError, ValueError) as e:
        raise TypeError(f"save_task: meta must be JSON-serialisable: {e}") from None
    metadata = {
        "format": "pt",
        "adapters": json.dumps(adapters),
        "trainable": json.dumps(list(trainable)),
        "fingerprint": fingerprint,
        "user": user,
        "task_format": TASK_FORMAT,
    }
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    path = os.fspath(path)
    atomic_write(path, lambda f: write_safetensors(tensors, f, metadata))
    return path


def _task_type_from_kind(meta: dict, where: str) -> dict:
    """meta with "task_type": the task's type was called "kind" before (files and callers of that time)."""
    if "kind" not in meta:
        return meta
    meta = dict(meta)
    kind = meta.pop("kind")
    if meta.setdefault("task_type", kind) != kind:
        raise ValueError(f"{where} gives task_type {meta['task_type']!r} and kind {kind!r}; kind is the old name of "
                         f"task_type: give task_type only")
    return meta


@dataclass
class Task:
    """A task file in memory. tensors: {state_dict key: tensor}; adapters: {module: config};
    trainable: the non-adapter keys; fingerprint: of the base it was trained on; meta: save_task's meta."""
    path: str
    tensors: dict
    adapters: dict
    trainable: list
    fingerprint: str
    meta: dict = field(default_factory=dict)

    @property
    def task_type(self) -> str | None:
        """"cls", "seg" or "det"."""
        return self.meta.get("task_type")

    @property
    def num_classes(self):
        return self.meta.get("num_classes")

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())


def read_task(path) -> Task:
    """Read a task file; a missing, truncated, corrupt or foreign file is a FileNotFoundError / ValueError
    that names the file and what is wrong."""
    path = os.fspath(path)
    if os.path.isdir(path):
        inside = os.path.join(path, "adapters.safetensors")
        raise ValueError(f"task file {path} is a directory, not a file: a task file is the OUT/adapters.safetensors "
                         f"a training run writes" + (f"; pass {inside}" if os.path.isfile(inside) else ""))
    if not os.path.isfile(path):
        raise FileNotFoundError(f"task file {path} does not exist (a training run writes OUT/adapters.safetensors)")
    from safetensors import SafetensorError, safe_open
    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            metadata = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise ValueError(f"task file {path} is not a readable safetensors file (truncated or corrupt?): {e}") from None
    if "adapters" not in metadata or "fingerprint" not in metadata:
        raise ValueError(f"{path} is a safetensors file but not a task file (no adapter metadata): a task file is "
                         f"written by tasks.task_file.save_task (train_cls.py: OUT/adapters.safetensors); "
                         f"merged.safetensors is a full model, not a task")
    try:
        adapters = json.loads(metadata["adapters"])
        trainable = json.loads(metadata.get("trainable", "[]"))
        meta = json.loads(metadata.get("user", "{}"))
    except json.JSONDecodeError as e:
        raise ValueError(f"task file {path}: its metadata is not valid JSON ({e}); the file is corrupt") from None
    # the JSON may parse and still not be what save_task writes (a hand-edited or foreign file)
    shapes = [("adapters", adapters, isinstance(adapters, dict) and all(
                  isinstance(k, str) and isinstance(v, dict) and "type" in v for k, v in adapters.items()),
               "{module name: adapter config with a 'type'}"),
              ("trainable", trainable, isinstance(trainable, list) and all(isinstance(k, str) for k in trainable),
               "a list of tensor names"),
              ("user", meta, isinstance(meta, dict), "the task description, a JSON object")]
    for key, value, ok, want in shapes:
        if not ok:
            raise ValueError(f"task file {path}: its {key!r} metadata must be {want}, got {str(value)[:100]}; the file "
                             f"was not written by save_task, or was edited")
    meta = _task_type_from_kind(meta, f"task file {path}: the metadata")
    prefixes = tuple(f"{m}." for m in adapters)
    stray = [k for k in tensors if k not in trainable and not k.startswith(prefixes)]
    if stray:
        raise ValueError(f"task file {path}: tensors {stray[:4]} are neither adapter tensors nor listed as trained; "
                         f"the file is inconsistent")
    return Task(path=path, tensors=tensors, adapters=adapters, trainable=trainable,
                fingerprint=metadata["fingerprint"], meta=meta)
