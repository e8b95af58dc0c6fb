"""Tasks of this project <-> peft adapter directories (Hugging Face peft), for timm-named models.

    export_peft(task, model, out_dir)          a task file -> adapter_model.safetensors + adapter_config.json that
                                               peft.PeftModel.from_pretrained(model, out_dir) loads (LoRA; IA3 for
                                               (IA)^3 tasks)
    task_from_peft(adapter_dir, model, path, meta=...)   a peft LoRA directory trained on `model` -> a task file

`model` is the base: a timm model or one of this project's (whose module names ARE timm's), without adapters.

The peft format (peft 0.21), as this file writes and reads it:
    adapter_model.safetensors   base_model.model.<module>.lora_A.weight   Linear (r, d_in), Conv2d (r, c_in, kh, kw)
                                base_model.model.<module>.lora_B.weight   Linear (d_out, r), Conv2d (c_out, r, 1, 1)
                                base_model.model.<module>.<tensor>        every tensor of a module in modules_to_save
    adapter_config.json         peft_type "LORA", r / lora_alpha (the most common rank; alpha = scale * r) with
                                per-layer rank_pattern / alpha_pattern, target_modules (full module names),
                                modules_to_save
peft's update is scaling * B(A(x)), scaling = lora_alpha / r (use_rslora: lora_alpha / sqrt(r)); its conv update is a
conv with A (the base conv's kernel, stride and padding) followed by a 1x1 conv with B, i.e. ours (conv_lora.py)
with A viewed as r kernels (r, c_in, kh, kw), when the conv has one group.

What maps, and how:
    LoRA on a linear layer                  A, B as they are
    LoRA on some output rows (rows=...)     B padded with zero rows to every output: the same update, exactly
    conv-LoRA, groups = 1                   A.view(r, c_in, kh, kw), B.view(c_out, r, 1, 1)
    conv-LoRA, groups g > 1                 ours shares A over the groups and each output reads its own group; peft's
                                            A spans every input channel and its B is grouped (g groups of r' / g
                                            channels). Ours = peft's with r' = g r and a block-diagonal A (group i's
                                            r rows hold A on group i's channels, zeros elsewhere): exact, g times the
                                            rank (export only)
    head, trained norms (BatchNorm statistics included)   modules_to_save (the whole module)
    (IA)^3, output scaling ("out")          a peft IA3 target; output rows we leave alone (k and v only of a
                                            fused qkv) get a scale of exactly 1
    (IA)^3, input scaling ("in")            a peft IA3 feedforward module
What does not map, and is refused with a ValueError naming the layer:
    learn_interp (peft has no a W0 + (1 - a) dW), trained biases of layers other than heads (--train-biases),
    LoRA and (IA)^3 in one task, dilated or non-zero-padded convs (peft's A conv has neither); on import (LoRA
    only): DoRA, lora_bias, bias != "none", fan_in_fan_out, a grouped conv adapted by peft (its update spans
    every input channel: not a grouped kernel). Rank-stabilised scaling is converted (alpha = scaling * r).
"""

import json
import os
import re
from collections import Counter

import torch
import torch.nn as nn

from lora import base_fingerprint, write_safetensors
from tasks.atomic import atomic_write
from tasks.task_file import Task, _write_task, read_task

PREFIX = "base_model.model."


def _pattern_key(keys, name):
    """peft's rule for rank_pattern / alpha_pattern: the first key k with re.match(rf"(.*\\.)?({k})$", name)."""
    for k in keys:
        if re.match(rf"(.*\.)?({k})$", name):
            return k
    return None


def _owner(key: str) -> tuple[str, str]:
    mname, _, attr = key.rpartition(".")
    return mname, attr


# -----------------------------------------------------------------------------
# ours -> peft

def _check_base(task: Task, model: nn.Module) -> None:
    """As TaskBank.add and export.py: adapters trained on another base would compute something else there."""
    fp = base_fingerprint(model, exclude=set(task.tensors))
    if fp != task.fingerprint:
        m = task.meta
        raise ValueError(f"task {task.path} was trained on another base model: its base fingerprint is "
                         f"{task.fingerprint[:16]}, this {type(model).__name__}'s is {fp[:16]} (the task was made on "
                         f"model={m.get('model')!r}, img_size={m.get('img_size')!r}, "
                         f"model_cfg={m.get('model_cfg')!r}); pass the base model the task was trained on, with its "
                         f"checkpoint loaded")


def export_peft(task, model: nn.Module, out_dir) -> dict:
    """Write `task` (a task file path or a Task) as a peft adapter directory for `model` (the base): a LoRA
    adapter for lora / lora_mlp / petah tasks, an IA3 adapter for (IA)^3 tasks. Returns the adapter config dict.
    Raises ValueError naming what cannot map (see the module docstring)."""
    import peft
    task = task if isinstance(task, Task) else read_task(task)
    _check_base(task, model)
    modules = dict(model.named_modules())
    adapter_types = {cfg.get("type") for cfg in task.adapters.values()}
    if adapter_types == {"ia3"}:
        return _export_ia3(task, modules, out_dir)
    problems, tensors, ranks, alphas = [], {}, {}, {}
    for name, cfg in task.adapters.items():
        base = modules.get(name)
        if base is None:
            problems.append(f"'{name}': no such module in the model")
            continue
        if cfg.get("type") not in ("lora", "conv_lora"):
            problems.append(f"'{name}': a {cfg.get('type')} adapter beside LoRA ones; a peft adapter is LoRA or IA3")
            continue
        if cfg.get("learn_interp"):
            problems.append(f"'{name}': learn_interp (y = a W0 x + (1 - a) dW x) has no peft LoRA equivalent")
            continue
        A, B = task.tensors[f"{name}.lora_A"], task.tensors[f"{name}.lora_B"]  # (r, fan_in), (out or rows, r)
        r, scaling = A.shape[0], cfg["alpha"] / cfg["r"]
        if cfg["type"] == "lora":
            if type(base) is not nn.Linear:
                problems.append(f"'{name}': a linear adapter on a {type(base).__name__}")
                continue
            if cfg.get("rows"):  # zero rows outside the adapted ones: B_full A x is the same update
                rows = torch.tensor([i for a, b in cfg["rows"] for i in range(a, b)])
                B = torch.zeros(base.out_features, r, dtype=B.dtype).index_copy(0, rows, B)
            a_w, b_w = A, B
        else:
            if type(base) is not nn.Conv2d:
                problems.append(f"'{name}': a conv adapter on a {type(base).__name__}")
                continue
            if base.dilation != (1, 1) or base.padding_mode != "zeros":
                problems.append(f"'{name}': dilation {base.dilation} / padding_mode {base.padding_mode!r}: peft's "
                                f"lora_A conv uses neither")
                continue
            g, (kh, kw) = base.groups, base.kernel_size
            cin_g = base.in_channels // g
            a_w = A.view(r, cin_g, kh, kw)
            if g > 1:  # block-diagonal A of rank g r: group i's rows see only group i's input channels
                full = torch.zeros(g * r, base.in_channels, kh, kw, dtype=A.dtype)
                for i in range(g):
                    full[i * r:(i + 1) * r, i * cin_g:(i + 1) * cin_g] = a_w
                a_w, r = full, g * r
            b_w = B.reshape(base.out_channels, -1, 1, 1)  # (c_out, r_group, 1, 1): grouped B reads its group's r
        tensors[f"{PREFIX}{name}.lora_A.weight"] = a_w.contiguous()
        tensors[f"{PREFIX}{name}.lora_B.weight"] = b_w.contiguous()
        ranks[name], alphas[name] = r, scaling * r
    to_save = _modules_to_save(task, modules, tensors, problems)
    if problems:
        raise ValueError(f"task {task.path} cannot be written as a peft LoRA adapter:\n  - " + "\n  - ".join(problems))
    if not ranks:
        raise ValueError(f"task {task.path} has no LoRA adapter (method {task.meta.get('method')!r}): nothing to "
                         f"export")
    r0 = Counter(ranks.values()).most_common(1)[0][0]
    a0 = Counter(alphas[n] for n in ranks if ranks[n] == r0).most_common(1)[0][0]
    cfg = peft.LoraConfig(r=r0, lora_alpha=a0, lora_dropout=0.0, bias="none", target_modules=sorted(ranks),
                          rank_pattern={re.escape(n): r for n, r in ranks.items() if r != r0},
                          alpha_pattern={re.escape(n): a for n, a in alphas.items() if a != a0},
                          modules_to_save=sorted(to_save) or None)
    _write_peft(cfg, tensors, out_dir)
    return cfg.to_dict()


def _modules_to_save(task: Task, modules: dict, tensors: dict, problems: list) -> list:
    """Every trained tensor that is not an adapter's: whole modules in modules_to_save (heads, norms with their
    BatchNorm statistics), their tensors added to `tensors`; what cannot go there is appended to `problems`."""
    to_save = {}
    for key in task.trainable:
        mname, _ = _owner(key)
        to_save.setdefault(mname, []).append(key)
    for mname, keys in to_save.items():
        if mname in task.adapters:
            problems.append(f"'{mname}': trained {[_owner(k)[1] for k in keys]} of an adapted layer (e.g. "
                            f"--train-biases) cannot be both an adapter target and a module to save in peft")
            continue
        base = modules.get(mname)
        if base is None or not mname:
            problems.append(f"tensors {keys[:3]}: no module to save them with")
            continue
        state = base.state_dict()
        if not isinstance(base, (nn.Linear, nn.Conv2d, nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._BatchNorm)):
            problems.append(f"'{mname}': trained tensors of a {type(base).__name__} (not a head or a norm)")
            continue
        params = {f"{mname}.{a}" for a, _ in base.named_parameters()}
        if isinstance(base, (nn.Linear, nn.Conv2d)) and params - set(keys):
            problems.append(f"'{mname}': trained biases of a layer that is not a head (--train-biases) have no peft "
                            f"equivalent")
            continue
        for a, t in state.items():
            tensors[f"{PREFIX}{mname}.{a}"] = task.tensors.get(f"{mname}.{a}", t).contiguous()
    return sorted(to_save)


def _export_ia3(task: Task, modules: dict, out_dir) -> dict:
    """(IA)^3 as a peft IA3 adapter: mode "out" = peft's scaling of the output (its ia3_l (d_out, 1) for a linear,
    (1, c_out, 1, 1) for a conv; output rows we leave alone get a scale of exactly 1), mode "in" = a peft
    feedforward module (ia3_l (1, d_in) / (1, c_in, 1, 1)). Both are the same functions as ours."""
    import peft
    problems, tensors, targets, feedforward = [], {}, [], []
    for name, cfg in task.adapters.items():
        base = modules.get(name)
        if base is None or type(base) not in (nn.Linear, nn.Conv2d):
            problems.append(f"'{name}': {'no such module' if base is None else type(base).__name__} in the model")
            continue
        l = task.tensors[f"{name}.ia3_l"]
        if cfg["mode"] == "out" and cfg.get("rows"):  # ones on the rows we do not scale
            rows = torch.tensor([i for a, b in cfg["rows"] for i in range(a, b)])
            l = torch.ones(cfg["out_dim"], dtype=l.dtype).index_copy(0, rows, l)
        if isinstance(base, nn.Linear):
            l = l.view(-1, 1) if cfg["mode"] == "out" else l.view(1, -1)
        else:
            l = l.view(1, -1, 1, 1)
        tensors[f"{PREFIX}{name}.ia3_l"] = l.contiguous()
        targets.append(name)
        if cfg["mode"] == "in":
            feedforward.append(name)
    to_save = _modules_to_save(task, modules, tensors, problems)
    if problems:
        raise ValueError(f"task {task.path} cannot be written as a peft IA3 adapter:\n  - " + "\n  - ".join(problems))
    cfg = peft.IA3Config(target_modules=sorted(targets), feedforward_modules=sorted(feedforward),
                         modules_to_save=to_save or None)
    _write_peft(cfg, tensors, out_dir)
    return cfg.to_dict()


def _write_peft(cfg, tensors: dict, out_dir) -> None:
    os.makedirs(out_dir, exist_ok=True)
    cfg.save_pretrained(out_dir)  # adapter_config.json
    # atomically, with the mode the umask gives (safetensors' save_file would make it 0600)
    atomic_write(os.path.join(out_dir, "adapter_model.safetensors"),
                 lambda f: write_safetensors(tensors, f, {"format": "pt"}))


# -----------------------------------------------------------------------------
# peft -> ours

def task_from_peft(adapter_dir, model: nn.Module, path, *, meta: dict) -> Task:
    """Read a peft LoRA directory trained on `model` (the base) and write it as a task file at `path`.

    meta: as save_task's (task_type, model, method required; num_classes etc. for predict_cls.py).
    Returns the Task read back. Raises ValueError naming what cannot map."""
    from safetensors.torch import load_file
    cfg_path = os.path.join(adapter_dir, "adapter_config.json")
    st_path = os.path.join(adapter_dir, "adapter_model.safetensors")
    for p in (cfg_path, st_path):
        if not os.path.isfile(p):
            raise FileNotFoundError(f"{p} does not exist: a peft adapter directory holds adapter_config.json and "
                                    f"adapter_model.safetensors (PeftModel.save_pretrained)")
    try:
        with open(cfg_path) as f:
            cfg = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{cfg_path} is not valid JSON ({e}); PeftModel.save_pretrained writes it as JSON: the file "
                         f"is damaged or is not peft's") from None
    if not isinstance(cfg, dict):
        raise ValueError(f"{cfg_path} holds a JSON {type(cfg).__name__}, not the object peft writes")
    problems = []
    if cfg.get("peft_type") != "LORA":
        raise ValueError(f"{adapter_dir}: peft_type {cfg.get('peft_type')!r}; only LoRA adapters are read")
    for flag in ("use_dora", "lora_bias", "fan_in_fan_out"):
        if cfg.get(flag):
            problems.append(f"{flag}=true is not supported")
    if cfg.get("bias", "none") != "none":
        problems.append(f"bias={cfg['bias']!r} (trained biases) is not supported")
    try:
        raw = load_file(st_path)
    except Exception as e:  # safetensors raises its own error types for a bad header or a short file
        raise ValueError(f"{st_path} is not a readable safetensors file (truncated or corrupt?): {e}") from None
    modules = dict(model.named_modules())
    tensors, adapters, trainable = {}, {}, []
    lora = {}
    for key, t in raw.items():
        if not key.startswith(PREFIX):
            problems.append(f"key {key}: expected the prefix {PREFIX!r}")
            continue
        key = key[len(PREFIX):]
        m = re.fullmatch(r"(.+)\.lora_([AB])(?:\.[^.]+)?\.weight", key)
        if m:
            lora.setdefault(m.group(1), {})[m.group(2)] = t
        else:
            mname, attr = _owner(key.replace(".modules_to_save.default", ""))
            tensors[f"{mname}.{attr}" if mname else attr] = t
            trainable.append(f"{mname}.{attr}" if mname else attr)
    for name, ab in lora.items():
        base = modules.get(name)
        if base is None or set(ab) != {"A", "B"}:
            why = "no such module in the model" if base is None else "lora_A or lora_B missing"
            problems.append(f"'{name}': {why}")
            continue
        A, B = ab["A"], ab["B"]
        r = A.shape[0]
        alpha_key = _pattern_key(cfg.get("alpha_pattern") or {}, name)
        lora_alpha = (cfg.get("alpha_pattern") or {}).get(alpha_key, cfg.get("lora_alpha", 8))
        scaling = lora_alpha / (r ** 0.5 if cfg.get("use_rslora") else r)
        if type(base) is nn.Linear:
            if tuple(A.shape) != (r, base.in_features) or tuple(B.shape) != (base.out_features, r):
                problems.append(f"'{name}': lora_A {tuple(A.shape)} / lora_B {tuple(B.shape)} do not fit a "
                                f"{base.in_features} -> {base.out_features} linear layer")
                continue
            adapters[name] = dict(type="lora", r=r, alpha=scaling * r, dropout=0.0, learn_interp=False, rows=None,
                                  in_features=base.in_features, out_features=base.out_features)
            tensors[f"{name}.lora_A"], tensors[f"{name}.lora_B"] = A, B
        elif type(base) is nn.Conv2d:
            kh, kw = base.kernel_size
            if base.groups > 1:
                problems.append(f"'{name}': a conv with groups={base.groups}: peft's update spans every input "
                                f"channel, a grouped conv-LoRA cannot hold it")
                continue
            if tuple(A.shape) != (r, base.in_channels, kh, kw) or tuple(B.shape) != (base.out_channels, r, 1, 1):
                problems.append(f"'{name}': lora_A {tuple(A.shape)} / lora_B {tuple(B.shape)} do not fit the conv "
                                f"({base.out_channels}, {base.in_channels}, {kh}, {kw})")
                continue
            adapters[name] = dict(type="conv_lora", r=r, alpha=scaling * r, dropout=0.0, learn_interp=False,
                                  in_channels=base.in_channels, out_channels=base.out_channels,
                                  kernel_size=[kh, kw], groups=1)
            tensors[f"{name}.lora_A"], tensors[f"{name}.lora_B"] = A.reshape(r, -1), B.reshape(base.out_channels, r)
        else:
            problems.append(f"'{name}': LoRA on a {type(base).__name__} is not supported")
    state = model.state_dict()
    for k in trainable:
        if k not in state:
            problems.append(f"saved module tensor {k}: no such tensor in the model")
    if problems:
        raise ValueError(f"peft adapter {adapter_dir} cannot be read as a task:\n  - " + "\n  - ".join(problems))
    fingerprint = base_fingerprint(model, exclude=set(tensors))
    _write_task(path, tensors, adapters=adapters, trainable=trainable, fingerprint=fingerprint,
                meta={**meta, "source": f"peft:{os.fspath(adapter_dir)}"})
    return read_task(path)
