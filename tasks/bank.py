"""One backbone, many tasks: TaskBank serves any number of task files (tasks/task_file.py) on one resident base.

PETAH's argument is storage: ship ONE backbone and a 0.1-0.5M-parameter adapter per task. The bank is the runtime
side of it:

    TaskBank(base_model)               many tasks on one resident base, no copy of the backbone:
        bank.add(name, path_or_task)   load a task file (nothing changes if it does not fit)
        bank.select(name)              the model now computes that task (its adapters merged into task-owned
                                       copies of the layers it adapts); bank.select(None): the base again
        bank(x, tasks=[...])           a mixed batch: one task name per sample, one forward pass
        bank.remove(name) / bank.unload()   drop a task / every task: the plain base modules come back

What a task file holds, and save_task / read_task, are in tasks/task_file.py.
"""

import copy
import os
import re
from collections import Counter
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from lora import base_fingerprint, runs_to_rows
from tasks.task_file import Task, _adapter_modules, read_task

# -----------------------------------------------------------------------------
# the task bank
#
# Every layer a loaded task changes is replaced by a "switch": the same layer (same Parameter and buffer objects,
# same state_dict keys, a subclass of the same type), plus `variants`, {task name: a module that computes this layer
# for that task}. A variant shares every tensor of the base layer that the task did not change:
#   - an adapted layer: the adapter of lora.py / conv_lora.py / ia3.py built around the base layer (from_module:
#     W0 and b shared, not copied), holding the task's lora_A / lora_B / lora_interp or ia3_l (and a bias of its
#     own if the task trained biases);
#   - a head, a trained norm or bias: a shallow copy of the layer whose changed tensors are the task's.
# The base tensors are never written to, so the base is always there, bit for bit. Variants are plain attributes,
# not submodules: model.state_dict() and model.parameters() stay exactly the base model's.
#
#   select(name)   every switch of the task computes with a merged copy of its variant (adapter.to_base(): W0 + dW
#                  in one plain layer, as fast as the base); the other layers are untouched.
#   mixed batch    the bank sorts the batch by task, and every switch computes each task's contiguous slice of
#                  the batch as that task's (unmerged) variant would: y[s:e] = variant_t(x[s:e]). On a linear
#                  layer, slices whose task only adds a low-rank update (LoRA) or scales outputs ((IA)^3 "out")
#                  share one base forward W0 x + b over their span and get B_t A_t x[s:e] added (or s_t
#                  multiplied) in place; a conv-LoRA slice runs one conv with W0 + dW_t (the kernel path: the
#                  frozen conv's cost); the rest (heads, norms, interpolated or input-scaled adapters, own biases)
#                  run their variant on their slice. That is exact per sample because every adapted layer of these
#                  models keeps the batch as dimension 0 and treats samples independently (BatchNorm in eval mode
#                  included); a layer that sees another batch size (windowed attention) raises. Heads of different
#                  widths are zero-padded to the widest, then cut back per sample.

_END = object()  # marks the end of the runs in _Switch.forward


def _plain(obj, name, value):
    # set an attribute without nn.Module registering a module value as a submodule
    object.__setattr__(obj, name, value)


class _Switch:
    """Mixin: a base layer that computes the selected task, or per batch slice the task of that slice."""

    def forward(self, x):
        if self.route is None:
            m = self.active_module
            return super().forward(x) if m is None else m(x)
        route = self.route  # [(task or None, start, stop), ...] covering the batch in order
        if x.shape[0] != route[-1][2]:
            raise ValueError(f"mixed-task batch: layer '{self.qualname}' received {x.shape[0]} samples but the batch "
                             f"has {route[-1][2]}: this model reshapes its batch before the layer (e.g. windowed "
                             f"attention), so one forward cannot route samples to tasks; use bank.select(task)")
        runs = []  # consecutive slices computed by the same module
        for task, s, e in route:
            m = self.variants.get(task)
            if runs and runs[-1][0] is m:
                runs[-1][2] = e
            else:
                runs.append([m, s, e])
        # Linear slices whose task adds a low-rank update or scales outputs share ONE base forward over their span
        # of the batch (the frozen layer's work at full batch size), then get their update in place; other slices
        # (conv-LoRA, heads, norms, interpolated or input-scaled adapters, own biases) run their variant alone.
        outs, span = [], []
        for m, s, e in runs + [[_END, 0, 0]]:
            if m is not _END and (m is None or self._shares_base(m)):
                span.append((m, s, e))
                continue
            if len(span) == 1:  # one task alone: its variant's own forward, nothing to share
                v, s2, e2 = span[0]
                outs.append(super(_Switch, self).forward(x[s2:e2]) if v is None else v(x[s2:e2]))
                span = []
            if span:
                a, b = span[0][1], span[-1][2]
                y = super(_Switch, self).forward(x[a:b])                    # W0 x + b over the span
                for v, s2, e2 in span:
                    if v is not None:
                        self._update_(v, y[s2 - a:e2 - a], x[s2:e2])
                outs.append(y)
                span = []
            if m is not _END:
                outs.append(m(x[s:e]))
        if len(outs) == 1:
            return outs[0]
        dim = 1 if isinstance(self, nn.Conv2d) else -1  # the feature dim heads of different widths differ in
        width = max(o.shape[dim] for o in outs)
        if any(o.shape[dim] != width for o in outs):  # pad narrower heads with zeros (cut off per sample later)
            outs = [o if o.shape[dim] == width else
                    torch.nn.functional.pad(o, (0, width - o.shape[dim]) if dim == -1 else
                                            (0, 0, 0, 0, 0, width - o.shape[dim])) for o in outs]
        return torch.cat(outs, 0)

    def _shares_base(self, v) -> bool:
        """Can slice outputs of variant v be made from the base layer's output (same weight and bias)?"""
        if v.weight is not self.weight or getattr(v, "bias", None) is not self.bias:
            return False
        if hasattr(v, "lora_A"):  # y_t = W0 x + b + B_t A_t x; conv-LoRA: its own conv with W0 + dW_t is cheaper
            return not v.learn_interp and not isinstance(v, nn.Conv2d)
        return getattr(v, "mode", None) == "out"  # (IA)^3 on outputs: y_t = s_t * (W0 x + b)

    @staticmethod
    def _update_(v, y, x) -> None:
        """In place: y (the base output of x) becomes variant v's output."""
        if hasattr(v, "lora_A"):  # LoRALinear
            delta = F.linear(F.linear(x, v.lora_A) * v.scaling, v.lora_B)       # (b, ..., out or len(rows))
            if v.lora_rows is None:
                y += delta
            else:
                y.index_add_(-1, v.lora_rows, delta)
        else:
            s = v._out_scale()                                                   # (out,)
            y *= s if isinstance(v, nn.Linear) else s.view(-1, 1, 1)


class SwitchLinear(_Switch, nn.Linear):
    pass


class SwitchConv2d(_Switch, nn.Conv2d):
    pass


class SwitchLayerNorm(_Switch, nn.LayerNorm):
    pass


class SwitchBatchNorm2d(_Switch, nn.BatchNorm2d):
    pass


class SwitchGroupNorm(_Switch, nn.GroupNorm):
    pass


SWITCHES = {nn.Linear: SwitchLinear, nn.Conv2d: SwitchConv2d, nn.LayerNorm: SwitchLayerNorm,
            nn.BatchNorm2d: SwitchBatchNorm2d, nn.GroupNorm: SwitchGroupNorm}


def _shallow_copy(module: nn.Module) -> nn.Module:
    """A copy sharing every tensor, with its own parameter / buffer / submodule / hook tables (changing one of
    them, e.g. registering a hook or replacing a parameter on the copy, leaves the original alone)."""
    new = copy.copy(module)
    for k, v in module.__dict__.items():
        if isinstance(v, (dict, set)):  # _parameters, _buffers, _modules, hook tables, _non_persistent_buffers_set
            new.__dict__[k] = type(v)(v)
    return new


def _make_switch(module: nn.Module, qualname: str) -> nn.Module:
    """The switch of a layer: a shallow copy (every tensor shared) whose class is the Switch subclass of its type."""
    sw = _shallow_copy(module)
    sw.__class__ = SWITCHES[type(module)]
    sw.__dict__.update(base_module=module, variants={}, active_module=None, route=None, qualname=qualname)
    return sw


def _clone_with(module: nn.Module, tensors: dict) -> nn.Module:
    """A shallow copy of `module` whose tensors named in `tensors` are replaced (the others stay shared)."""
    new = _shallow_copy(module)
    for n, t in tensors.items():
        if n in new._parameters:
            new._parameters[n] = nn.Parameter(t, requires_grad=False)
        else:
            new._buffers[n] = t
    if isinstance(new, nn.Linear):
        new.out_features = new.weight.shape[0]  # a head of another width
    elif isinstance(new, nn.Conv2d):
        new.out_channels = new.weight.shape[0]
    return new


def _build_adapter(base: nn.Module, cfg: dict) -> nn.Module:
    """The adapter of lora.py / conv_lora.py / ia3.py that `cfg` (adapter_config()) describes, around `base`
    (its weight and bias shared, not copied). Raises ValueError when the config does not fit the layer."""
    from conv_lora import LoRAConv2d
    from ia3 import IA3Conv2d, IA3Linear
    from lora import LoRALinear
    adapter_type = cfg.get("type")
    if adapter_type == "lora":
        if type(base) is not nn.Linear:
            raise ValueError(f"a LoRA linear adapter, but the model's layer is a {type(base).__name__}")
        if (cfg["in_features"], cfg["out_features"]) != (base.in_features, base.out_features):
            raise ValueError(f"adapter made for a {cfg['in_features']} -> {cfg['out_features']} linear layer, the "
                             f"model's is {base.in_features} -> {base.out_features}")
        cls, kw = LoRALinear, dict(r=cfg["r"], alpha=cfg["alpha"], learn_interp=cfg.get("learn_interp", False),
                                   rows=runs_to_rows(cfg.get("rows")))
    elif adapter_type == "conv_lora":
        if type(base) is not nn.Conv2d:
            raise ValueError(f"a conv-LoRA adapter, but the model's layer is a {type(base).__name__}")
        have = [base.in_channels, base.out_channels, list(base.kernel_size), base.groups]
        want = [cfg["in_channels"], cfg["out_channels"], list(cfg["kernel_size"]), cfg["groups"]]
        if have != want:
            raise ValueError(f"conv adapter made for (c_in, c_out, kernel, groups) = {want}, the model's conv is "
                             f"{have}")
        # path="kernel": at inference one conv with W0 + dW_t (a tiny matmul per forward) costs what the frozen conv
        # costs, less than the frozen conv plus the two low-rank convs of the factored path
        cls, kw = LoRAConv2d, dict(r=cfg["r"], alpha=cfg["alpha"], learn_interp=cfg.get("learn_interp", False),
                                   path="kernel")
    elif adapter_type == "ia3":
        cls = {"IA3Linear": IA3Linear, "IA3Conv2d": IA3Conv2d}.get(cfg.get("layer"))
        want = {IA3Linear: nn.Linear, IA3Conv2d: nn.Conv2d}.get(cls)
        if want is None or type(base) is not want:
            raise ValueError(f"an (IA)^3 adapter of a {cfg.get('layer')}, but the model's layer is a "
                             f"{type(base).__name__}")
        dims = (base.in_features, base.out_features) if want is nn.Linear else (base.in_channels, base.out_channels)
        if (cfg["in_dim"], cfg["out_dim"]) != dims:
            raise ValueError(f"(IA)^3 adapter made for (in, out) = {(cfg['in_dim'], cfg['out_dim'])}, the model's "
                             f"layer has {dims}")
        kw = dict(mode=cfg["mode"], rows=runs_to_rows(cfg.get("rows")))
    else:
        raise ValueError(f"unknown adapter type {adapter_type!r}")
    with torch.random.fork_rng(devices=[]):  # the throw-away random init of A must not move the caller's RNG
        return cls.from_module(base, **kw).eval()


class _Snapshot:
    """Duck-types model.state_dict() for lora.base_fingerprint, over the base tensors kept at bank creation."""

    def __init__(self, state):
        self._state = state

    def state_dict(self):
        return self._state


@dataclass
class _Loaded:
    task: Task
    variants: dict            # module name -> variant module
    swaps: dict               # state_dict key -> tensor: trained tensors of modules no switch exists for
    width: int | None         # output width of the task's own head (None: the base's)
    heads: list               # layers the task replaces wholesale (its head): the base's width is theirs


class TaskBank:
    """One resident base model and any number of named tasks (task files of save_task).

    Args:
        model: the plain base model (no adapters), on its device, with the base weights loaded. The bank puts it
            in eval mode; it serves inference (BatchNorms use running statistics). Tasks are put on the model's
            device when loaded: move the model before creating the bank, not after.

    bank.add(name, path) / bank.remove(name) / bank.select(name or None) / bank(x) (the selected task, or the base)
    / bank(x, tasks=[name per sample]) (a mixed batch: a list of per-sample outputs) / bank.unload() (the plain
    base model, every adapter removed, bit-exact). A failed call leaves the bank as it was.
    """

    NAME = re.compile(r"[A-Za-z0-9_-]+")

    def __init__(self, model: nn.Module):
        if not isinstance(model, nn.Module):
            raise TypeError(f"TaskBank(model): model must be the base model, an nn.Module (e.g. models.create_model("
                            f"...) with its checkpoint loaded), got {type(model).__name__} {str(model)[:50]!r}; task "
                            f"files are added afterwards with bank.add(name, path)")
        adapted = [n for n, _ in _adapter_modules(model)]
        if adapted:
            raise ValueError(f"TaskBank needs the plain base model, but it has adapters ({adapted[:3]} ...): build the "
                             f"base without adapters (or lora.merge_and_unload it)")
        if any(isinstance(m, _Switch) for m in model.modules()):
            raise ValueError("this model already serves a TaskBank: use that bank, or bank.unload() it first")
        self.model = model.eval()
        self.base_state = dict(model.state_dict())  # the base tensors (references): the fingerprint's input
        self.layers = dict(model.named_modules())   # the original modules by name (unload puts them back)
        self.tasks = {}                               # name -> _Loaded, in loading order
        self.active = None
        self._swapped = {}                            # key -> the base tensor, while a task with swaps is selected
        self._fingerprints = {}

    @property
    def names(self) -> list:
        return list(self.tasks)

    def _unknown(self, name) -> ValueError:
        return ValueError(f"unknown task {name!r}; loaded tasks: {self.names or 'none'}")

    def fingerprint(self, exclude) -> str:
        key = frozenset(exclude)
        if key not in self._fingerprints:
            self._fingerprints[key] = base_fingerprint(_Snapshot(self.base_state), exclude=key)
        return self._fingerprints[key]

    # ---- loading -------------------------------------------------------------------------------------------
    def add(self, name: str, task) -> Task:
        """Load a task (a path or a Task) under `name`. Raises ValueError / FileNotFoundError, with the bank
        unchanged, for a bad name, a name in use, an unreadable file, another base, or a layout that does not fit."""
        if not isinstance(name, str) or not self.NAME.fullmatch(name):
            raise ValueError(f"task name {name!r}: use letters, digits, '_' and '-'")
        if name in self.tasks:
            raise ValueError(f"a task named {name!r} is already loaded (loaded: {self.names}); remove it first or "
                             f"pick another name")
        if not isinstance(task, (Task, str, os.PathLike)):
            raise TypeError(f"bank.add({name!r}, task): task must be a task file's path (OUT/adapters.safetensors) or "
                            f"a Task of tasks.task_file.read_task, got {type(task).__name__}")
        task = task if isinstance(task, Task) else read_task(task)
        where = f"task {name!r} ({task.path})"
        loaded = self._build(task, where)  # every check, and every variant built, before the model is touched
        fp = self.fingerprint(task.tensors)
        if fp != task.fingerprint:
            m = task.meta
            raise ValueError(f"{where} was trained on another base model: its base fingerprint is "
                             f"{task.fingerprint[:16]}, this base's is {fp[:16]} (the task was made on "
                             f"model={m.get('model')!r}, img_size={m.get('img_size')!r}, "
                             f"model_cfg={m.get('model_cfg')!r}); load the base checkpoint the task was trained on")
        for mname, v in loaded.variants.items():  # commit: nothing below can fail
            sw = self.model.get_submodule(mname) if mname else self.model
            if not isinstance(sw, _Switch):
                sw = _make_switch(self.layers[mname], mname)
                self._put(mname, sw)
            sw.variants[name] = v
        self.tasks[name] = loaded
        return task

    def _build(self, task: Task, where: str) -> _Loaded:
        problems, per_module = [], {}
        for mname, cfg in task.adapters.items():
            if mname not in self.layers:
                problems.append(f"adapted layer '{mname}' does not exist in this {type(self.model).__name__}")
        for key in task.tensors:
            mname, _, attr = key.rpartition(".")
            per_module.setdefault(mname, {})[attr] = key
            if mname not in self.layers:
                if mname not in task.adapters:
                    problems.append(f"tensor {key}: no module '{mname}' in this {type(self.model).__name__}")
        if problems:
            raise ValueError(f"{where} does not fit this model (made for model={task.meta.get('model')!r}, "
                             f"method={task.meta.get('method')!r}):\n  - " + "\n  - ".join(problems[:10])
                             + (f"\n  ... {len(problems) - 10} more" if len(problems) > 10 else ""))
        variants, swaps, widths, heads = {}, {}, set(), []
        for mname, attrs in per_module.items():
            base = self.layers[mname]
            ref = base.weight if getattr(base, "weight", None) is not None else next(
                (t for t in base.state_dict().values()), None)
            dev = ref.device if ref is not None else torch.device("cpu")
            own = {a: task.tensors[k] for a, k in attrs.items()}
            try:
                if mname in task.adapters:
                    v = _build_adapter(base, task.adapters[mname])
                    for a, t in own.items():
                        cur = getattr(v, a, None)
                        if not isinstance(cur, torch.Tensor):
                            raise ValueError(f"tensor {mname}.{a} has no place in the adapter")
                        if tuple(cur.shape) != tuple(t.shape):
                            raise ValueError(f"tensor {mname}.{a} has shape {tuple(t.shape)}, the layer needs "
                                             f"{tuple(cur.shape)}")
                        t = t.to(dev, cur.dtype if cur.is_floating_point() else t.dtype)
                        if a in v._parameters:
                            setattr(v, a, nn.Parameter(t, requires_grad=False))
                        else:
                            v._buffers[a] = t
                    variants[mname] = v
                    continue
                state = dict(base.named_parameters(recurse=False)) | dict(base.named_buffers(recurse=False))
                bad = [a for a in own if a not in state]
                if bad:
                    raise ValueError(f"tensors {[f'{mname}.{a}' for a in bad]} have no place in the model")
                mis = {a: (tuple(own[a].shape), tuple(state[a].shape)) for a in own
                       if tuple(own[a].shape) != tuple(state[a].shape)}
                wholesale = isinstance(base, (nn.Linear, nn.Conv2d)) and set(own) >= {
                    n for n, p in base.named_parameters(recurse=False)}
                if mis and not (wholesale and all(s[1:] == b[1:] for s, b in mis.values())):
                    raise ValueError("shapes differ from the model's: " + ", ".join(
                        f"{mname}.{a} {s} in the file vs {b}" for a, (s, b) in mis.items()))
                own = {a: t.to(dev, state[a].dtype) for a, t in own.items()}
                if wholesale:
                    widths.add(own["weight"].shape[0])
                    heads.append(mname)
                if type(base) in SWITCHES:
                    variants[mname] = _clone_with(base, own).eval()
                else:  # e.g. attention_biases, layer scales, a class token: select() only
                    swaps.update({f"{mname}.{a}" if mname else a: t for a, t in own.items()})
            except ValueError as e:
                problems.append(f"{mname}: {e}")
        if problems:
            raise ValueError(f"{where} does not fit this model (made for model={task.meta.get('model')!r}, "
                             f"method={task.meta.get('method')!r}):\n  - " + "\n  - ".join(problems[:10]))
        return _Loaded(task=task, variants=variants, swaps=swaps, width=max(widths) if widths else None, heads=heads)

    def _put(self, mname: str, module: nn.Module) -> None:
        parent, _, child = mname.rpartition(".")
        setattr(self.model.get_submodule(parent), child, module)

    def remove(self, name: str) -> None:
        """Drop a task; layers no task adapts any more get their original module back."""
        if name not in self.tasks:
            raise self._unknown(name)
        if self.active == name:
            self.select(None)
        for mname in self.tasks[name].variants:
            sw = self.model.get_submodule(mname)
            del sw.variants[name]
            if not sw.variants:
                self._put(mname, sw.base_module)
        del self.tasks[name]

    def unload(self) -> nn.Module:
        """Remove every task without merging anything: the plain base model (its original modules), returned."""
        for name in list(self.tasks):
            self.remove(name)
        return self.model

    # ---- selecting -----------------------------------------------------------------------------------------
    def select(self, name: str | None) -> None:
        """Make bank(x) / bank.model(x) compute task `name` (None: the base). Only the task's layers change:
        each gets a merged copy of its variant (W0 + dW, one plain layer); the base tensors stay untouched."""
        if name is not None and name not in self.tasks:
            raise self._unknown(name)
        if name == self.active:
            return
        if self.active is not None:  # back to the base: drop the merged copies, put swapped tensors back
            for mname in self.tasks[self.active].variants:
                _plain(self.model.get_submodule(mname), "active_module", None)
            for key, t in self._swapped.items():
                self._set_tensor(key, t)
            self._swapped, self.active = {}, None
        if name is None:
            return
        loaded = self.tasks[name]
        merged = {m: (v.to_base() if hasattr(v, "to_base") else v) for m, v in loaded.variants.items()}
        for mname, m in merged.items():
            _plain(self.model.get_submodule(mname), "active_module", m.eval())
        for key, t in loaded.swaps.items():
            self._swapped[key] = self._set_tensor(key, t)
        self.active = name

    def _set_tensor(self, key: str, t: torch.Tensor) -> torch.Tensor:
        """Point a parameter's .data / a buffer at `t`; returns what it held (the very tensor: restored bit for bit)."""
        mname, _, attr = key.rpartition(".")
        owner = self.model.get_submodule(mname)
        if attr in owner._parameters:
            old = owner._parameters[attr].data
            owner._parameters[attr].data = t
        else:
            old = owner._buffers[attr]
            owner._buffers[attr] = t
        return old

    # ---- forward -------------------------------------------------------------------------------------------
    def __call__(self, x: torch.Tensor, tasks=None):
        """bank(x): the selected task (or the base) on the whole batch, the model's output.
        bank(x, tasks=[...]): one task name per sample (None = the base); a list of per-sample outputs, each as
        that task's merged model returns it (a classifier: its own num_classes logits)."""
        if self.model.training:
            raise ValueError("the task bank serves inference: call bank.model.eval() (BatchNorms must use their "
                             "running statistics, which are per task)")
        if tasks is None:
            return self.model(x)
        tasks = list(tasks)
        if len(tasks) != x.shape[0]:
            raise ValueError(f"tasks names {len(tasks)} samples, the batch has {x.shape[0]}")
        unknown = sorted({t for t in tasks if t is not None and t not in self.tasks})
        if unknown:
            raise ValueError(f"unknown task(s) {unknown}; loaded tasks: {self.names or 'none'}")
        order_of = {None: -1, **{n: i for i, n in enumerate(self.tasks)}}
        present = sorted(set(tasks), key=order_of.get)
        blocked = {t: sorted(self.tasks[t].swaps) for t in present if t is not None and self.tasks[t].swaps}
        if self.active is not None and self.tasks[self.active].swaps:
            blocked[self.active] = sorted(self.tasks[self.active].swaps)
        if blocked:
            raise ValueError("mixed-task batches support adapters, heads, norms (BatchNorm statistics included), "
                             "biases and linear / conv weights; these tasks also trained tensors no switch routes "
                             "per sample: " + "; ".join(f"{t}: {k[:4]}" for t, k in blocked.items())
                             + ". Run them alone with bank.select(task) (and select(None) before a mixed batch)")
        ids = torch.tensor([order_of[t] for t in tasks])
        order = torch.sort(ids, stable=True).indices                       # samples grouped by task
        counts, route, s = Counter(tasks), [], 0
        for t in present:
            route.append((t, s, s + counts[t]))
            s += counts[t]
        switches = [m for m in self.model.modules() if isinstance(m, _Switch)]
        xs = x if bool((order == torch.arange(len(order))).all()) else x[order.to(x.device)]
        for sw in switches:
            _plain(sw, "route", route)
        try:
            out = self.model(xs)                                            # (B, C, ...) padded to the widest head
        finally:
            for sw in switches:
                _plain(sw, "route", None)
        # the base's own head width, for base samples among tasks with wider heads
        base_w = max((self.layers[h].weight.shape[0] for t in present if t is not None for h in self.tasks[t].heads),
                     default=None)
        result = [None] * len(tasks)
        for j, i in enumerate(order.tolist()):
            t = tasks[i]
            w = base_w if t is None else (self.tasks[t].width or base_w)  # no head of its own: the base's
            o = out[j]
            result[i] = o if w is None or o.dim() == 0 else o[:w]
        return result
