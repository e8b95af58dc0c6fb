"""Files written atomically: a temporary next to the target, then os.replace, so that a process killed at any
moment leaves the old file or the new one, never half of one; mode 0666 minus the umask, as open() gives."""


import contextlib
import errno
import io
import json
import os
import re

import torch

from lora import save_adapters, write_safetensors

# -----------------------------------------------------------------------------
# atomic writes: write a temporary file next to the target, then os.replace (atomic on POSIX), so a
# run killed at any moment leaves either the old file or the new one, never a half-written file.
# The temporary is created with mode 0666 and the umask applies, as for any open(): a colleague can read
# what the umask lets them read (safetensors.torch.save_file would make it 0600).

class WriteError(OSError):
    """A file could not be written for a reason the user can fix (disk full, read-only file system, no
    permission, a file size limit). str() is the whole message; .errno the operating system's code."""


def write_error(e: OSError, path: str) -> WriteError:
    """The clear message for an OSError raised while writing `path`."""
    if isinstance(e, WriteError):
        return e
    code = e.errno
    if code in (errno.ENOSPC, getattr(errno, "EDQUOT", -1)):
        msg = f"disk full while writing {path} ({e.strerror}); free space or choose another --out"
    elif code == errno.EROFS:
        msg = f"read-only file system: cannot write {path}; choose another --out on a writable disk"
    elif code in (errno.EACCES, errno.EPERM):
        msg = f"permission denied: cannot write {path}; choose another --out that you can write to"
    elif code == errno.EFBIG:
        msg = (f"file too large while writing {path} (a file size limit, `ulimit -f`, or the file system's "
               f"maximum); raise the limit or choose another --out")
    elif code == errno.ENOTDIR:
        msg = f"cannot write {path}: a part of that path is a file, not a directory; choose another --out"
    else:
        msg = f"cannot write {path}: {e.strerror or e}"
    err = WriteError(msg)
    err.errno = code
    return err


def _tmp_path(path: str) -> str:
    return f"{path}.tmp.{os.getpid()}"


_TMP = re.compile(r"\.tmp\.(\d+)$")  # what _tmp_path appends


def atomic_write(path: str, write) -> None:
    """Create or replace `path` atomically: write(f) fills a binary file object opened on a temporary next
    to it, then flush, fsync, os.replace. On any error the temporary is removed; an OSError becomes a
    WriteError that names the file and the fix (never a half-written file, never a partial temporary)."""
    tmp = _tmp_path(path)
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)  # 0666 & ~umask, as open() does
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        if isinstance(e, OSError):
            raise write_error(e, path) from None
        raise


def atomic_write_text(text: str, path: str) -> None:
    atomic_write(path, lambda f: f.write(text.encode()))


def atomic_torch_save(obj, path: str) -> None:
    # serialise in memory first: torch.save writing into a full disk reports "inline_container.cc ... unexpected
    # pos", while a plain write of the bytes raises the OSError (ENOSPC) that names the problem
    buf = io.BytesIO()
    torch.save(obj, buf)
    atomic_write(path, lambda f: f.write(buf.getbuffer()))


def atomic_save_adapters(model: torch.nn.Module, path: str, *, metadata: dict | None = None) -> None:
    """lora.save_adapters, atomically. A model without adapter layers (linear probing, full fine-tuning) saves
    its trainable parameters: the scripts' checkpoints of those methods."""
    atomic_write(path, lambda f: save_adapters(model, f, metadata=metadata, allow_no_adapters=True))


def atomic_save_safetensors(tensors: dict[str, torch.Tensor], path: str, *, metadata: dict | None = None) -> None:
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    atomic_write(path, lambda f: write_safetensors(tensors, f, {k: str(v) for k, v in (metadata or {}).items()}))


def write_jsonl(records: list[dict], path: str) -> None:
    atomic_write_text("".join(json.dumps(r) + "\n" for r in records), path)


def write_csv(rows: list[dict], path: str, columns: list[str]) -> None:
    """A CSV table (header + one line per row; a missing or None value is an empty cell), atomically."""
    def cell(v):
        return "" if v is None else (f"{v:.6g}" if isinstance(v, float) else str(v))
    lines = [",".join(columns)] + [",".join(cell(r.get(c)) for c in columns) for r in rows]
    atomic_write_text("\n".join(lines) + "\n", path)


