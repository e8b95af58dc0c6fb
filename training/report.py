"""What a run leaves for people: progress lines, training curves (matplotlib), tensorboard."""


import io
import sys
import time

from tasks.atomic import atomic_write

# -----------------------------------------------------------------------------
# what a run leaves for people: progress on a terminal, readable logs in files, curves

class _PlainProgress:
    """tqdm's interface (iteration, set_postfix, close) printing one plain line at most every `every` seconds,
    for stderr redirected to a file: no carriage-return frames."""

    def __init__(self, iterable, desc: str, every: float = 30.0):
        self.iterable, self.desc, self.every, self.postfix = iterable, desc, every, ""
        self.total = len(iterable) if hasattr(iterable, "__len__") else None

    def __iter__(self):
        last = t0 = time.time()
        for i, item in enumerate(self.iterable, 1):
            yield item
            if time.time() - last >= self.every:
                last = time.time()
                total = f"/{self.total}" if self.total else ""
                print(f"{self.desc}: step {i}{total}, {time.time() - t0:.0f} s{self.postfix}", file=sys.stderr,
                      flush=True)

    def set_postfix(self, **kw):
        self.postfix = "".join(f", {k} {v}" for k, v in kw.items())

    def close(self):
        pass


def progress(iterable, *, desc: str, enabled: bool = True, every: float = 30.0):
    """A progress bar on a terminal (tqdm); with stderr redirected to a file or a pipe, a plain line at most
    every `every` seconds instead (tqdm's carriage-return frames would fill the log); nothing when not enabled
    (the non-master ranks)."""
    if not enabled:
        return _PlainProgress(iterable, desc, every=float("inf"))
    if sys.stderr.isatty():
        from tqdm import tqdm
        return tqdm(iterable, desc=desc, dynamic_ncols=True)
    return _PlainProgress(iterable, desc, every=every)


def plot_curves(rows: list[dict], path: str, *, x: str = "epoch", panels=(("train_loss", "eval_loss"),
                ("eval_top1", "eval_top5"), ("lr",)), title: str = "") -> bool:
    """Training curves as a PNG (one panel per group of columns; missing values skipped), atomically.
    Returns False, writing nothing, when matplotlib is not installed (it is optional)."""
    try:
        # a Figure of its own, not pyplot's: no display, no global figure state, and about half of pyplot's time
        # (its import and a draw: ~0.35 s a run, which a sweep of short runs pays each time)
        from matplotlib.figure import Figure
    except ImportError:
        return False
    fig = Figure(figsize=(4.2 * len(panels), 3.2))
    axes = fig.subplots(1, len(panels), squeeze=False)
    for ax, cols in zip(axes[0], panels):
        for c in cols:
            pts = [(r[x], r[c]) for r in rows if r.get(c) is not None and r.get(x) is not None]
            if pts:
                ax.plot(*zip(*pts), marker="o", markersize=3, label=c)
        ax.set_xlabel(x)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    atomic_write(path, lambda f: f.write(buf.getbuffer()))
    return True


def open_tensorboard(parser, logdir: str):
    """torch.utils.tensorboard.SummaryWriter(logdir), or parser.error naming the missing package."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        parser.error("--tensorboard needs the tensorboard package: pip install tensorboard (or drop --tensorboard)")
    return SummaryWriter(logdir)


