"""tasks/atomic.py: a failed write leaves nothing behind and names the file and the fix."""

import os

import pytest

from tasks import atomic


def test_atomic_write_leaves_nothing_on_failure(tmp_path):
    def fail(f):
        f.write(b"half")
        raise OSError(28, "No space left on device")

    with pytest.raises(atomic.WriteError, match=r"disk full while writing .*x\.bin.*free space or choose "
                                                     r"another --out"):
        atomic.atomic_write(str(tmp_path / "x.bin"), fail)
    assert os.listdir(tmp_path) == []
