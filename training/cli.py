"""The command line the training and predict scripts share: a stray leading "--", range checks of the
common flags, library errors turned into argparse-style messages, --model-cfg."""


import contextlib
import json
import math
import os
import sys

from data import CorruptImageError
from tasks.atomic import WriteError

# -----------------------------------------------------------------------------
# command line

def strip_leading_dashdash(argv: list[str]) -> list[str]:
    """argv without one leading "--".

    torchrun's own parser resolves abbreviations inside the training script's flags too (`--r` is "ambiguous:
    --rdzv-backend, --role, ..."), so the commands put a "--" between torchrun's options and the script. Both
    `torchrun ... -- train_cls.py --r 8` and `torchrun ... train_cls.py -- --r 8` work; this makes
    `torchrun ... -- train_cls.py -- --r 8` (and `python train_cls.py -- --r 8`) work as well.
    Usage: args = parser.parse_args(strip_leading_dashdash(sys.argv[1:]))
    """
    return list(argv[1:]) if argv and argv[0] == "--" else list(argv)


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(v)


# (attribute, test, what it must be). A check runs only when args has the attribute and its value is not None.
_COMMON_CHECKS = [
    ("batch_size", lambda v: v >= 1, "must be >= 1 (images per optimizer step)"),
    ("epochs", lambda v: v >= 1, "must be >= 1 (with 0 nothing would be trained)"),
    ("lr", lambda v: _finite(v) and v >= 0, "must be a finite number >= 0"),
    ("adapter_lr_factor", lambda v: _finite(v) and v >= 0, "must be a finite number >= 0"),
    ("backbone_lr_factor", lambda v: _finite(v) and v >= 0, "must be a finite number >= 0"),
    ("weight_decay", lambda v: _finite(v) and v >= 0, "must be a finite number >= 0"),
    ("warmup_epochs", lambda v: _finite(v) and v >= 0, "must be a finite number >= 0"),
    ("dropout", lambda v: _finite(v) and 0 <= v < 1, "must lie in [0, 1)"),
    ("drop_path", lambda v: _finite(v) and 0 <= v < 1, "must lie in [0, 1)"),
    ("workers", lambda v: v >= 0, "must be >= 0 (0 loads the data in the main process)"),
    ("alpha", lambda v: _finite(v) and v > 0,
     "must be > 0: the LoRA update is scaled by alpha / r, so with 0 the adapters would change nothing"),
    ("r", lambda v: v >= 1, "must be >= 1 (the LoRA rank)"),
    ("rc", lambda v: v >= 1, "must be >= 1 (the conv-LoRA rank)"),
    ("img_size", lambda v: v >= 1, "must be >= 1"),
    ("eval_every", lambda v: v >= 1, "must be >= 1 (1 = evaluate after every epoch)"),
    ("sparsity", lambda v: _finite(v) and 0 <= v < 1, "must lie in [0, 1), e.g. 0.9 for 90% zeros"),
    ("num_classes", lambda v: v >= 1, "must be >= 1"),
    ("synthetic_classes", lambda v: v >= 2, "must be >= 2"),
    ("synthetic_train", lambda v: v >= 1, "must be >= 1"),
    ("synthetic_val", lambda v: v >= 1, "must be >= 1"),
    ("stop_after_epoch", lambda v: v >= 1, "must be >= 1"),
    ("top_k", lambda v: v >= 1, "must be >= 1"),
    ("vis_images", lambda v: v >= 0, "must be >= 0 (0 writes no visualisation)"),
    ("lr_steps", lambda v: v >= 1, "must be >= 1 (epochs after which the LR drops x0.1)"),
    ("fpn_channels", lambda v: v >= 1, "must be >= 1"),
    ("fc_dim", lambda v: v >= 1, "must be >= 1"),
    ("mask_channels", lambda v: v >= 1, "must be >= 1"),
    ("rpn_batch", lambda v: v >= 1, "must be >= 1"),
    ("roi_batch", lambda v: v >= 1, "must be >= 1"),
    ("warmup_iters", lambda v: v >= 0, "must be >= 0"),
]
_MUST_EXIST = ("weights", "mask")  # file arguments: checked before anything is built


def check_common_args(parser, args) -> None:
    """parser.error (usage + message, exit 2) for the first shared flag out of its range.

    Checked when `args` has them: the ranges of _COMMON_CHECKS, --warmup-epochs < --epochs (else the LR would
    warm up for the whole run and never decay), and that --weights / --mask name existing files.
    """
    flag = lambda a: "--" + a.replace("_", "-")  # noqa: E731
    for attr, ok, rule in _COMMON_CHECKS:
        v = getattr(args, attr, None)
        for item in (v if isinstance(v, (list, tuple)) else [v]):  # a list flag (--lr-steps 8 11): each value
            if item is not None and not ok(item):
                parser.error(f"{flag(attr)} {item} {rule}")
    if getattr(args, "learn_interp", False) and getattr(args, "method", None) == "ia3":
        parser.error("--learn-interp belongs to LoRA (PETRAS's learnable interpolation of the LoRA update); "
                     "(IA)^3 has no interpolation: drop --learn-interp or use --method lora")
    warmup, epochs = getattr(args, "warmup_epochs", None), getattr(args, "epochs", None)
    if warmup is not None and epochs is not None and warmup > 0 and warmup >= epochs:
        parser.error(f"--warmup-epochs {warmup:g} must be < --epochs {epochs}: the LR would still be warming up at "
                     f"the end and never decay; lower it, e.g. --warmup-epochs {epochs / 2:g} (or 0)")
    for attr in _MUST_EXIST:
        v = getattr(args, attr, None)
        if v and not os.path.isfile(os.path.expanduser(v)):
            what = "is a directory, not a file" if os.path.isdir(os.path.expanduser(v)) else "does not exist"
            parser.error(f"{flag(attr)} {v}: {what}")


@contextlib.contextmanager
def user_errors(parser, *types, quiet: bool = False):
    """`with user_errors(parser): call()`: the clear message of a ValueError / FileNotFoundError / WriteError
    (or of `types`) raised inside, printed argparse-style (usage + message, exit 2) without a traceback.
    quiet=True (the non-master ranks of torchrun) exits 2 without printing, so the message appears once."""
    try:
        yield
    except (types or (ValueError, FileNotFoundError, WriteError)) as e:
        if quiet:
            sys.exit(2)
        parser.error(str(e))




def parse_model_cfg(parser, preset_cfg: dict, text: str, *, example: str = '{"depths": [1, 1, 1, 2]}') -> dict:
    """--model-cfg (a JSON object of builder keyword arguments) over a preset's values; anything else is a
    usage error showing `example`."""
    try:
        extra = json.loads(text)
    except json.JSONDecodeError:
        extra = None
    if not isinstance(extra, dict):
        parser.error(f"--model-cfg must be a JSON object such as '{example}', got {text!r}")
    return {**preset_cfg, **extra}


def batches(loader, parser):
    """The loader's batches; an unreadable image (or mask) stops the run argparse-style, naming the file (from a
    DataLoader worker the exception's text carries the worker's traceback: keep the message only)."""
    try:
        yield from loader
    except CorruptImageError as e:
        parser.error(str(e).rpartition("CorruptImageError: ")[2])
