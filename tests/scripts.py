"""Run one of the project's scripts in this process (runpy), as the interpreter would: the tests use this instead of
a subprocess where they do not need a fresh process (it skips the interpreter start and the torch, torchvision,
onnx imports: seconds each time on a 2-core machine). A test that checks a script's exit status and stderr runs
its first case in a real process; the rest may run here."""

import contextlib
import io
import runpy
import subprocess
import sys
import traceback


def run_script(script, *argv) -> int:
    """`python SCRIPT *argv` in this process; the exit status a shell would see (0, or SystemExit's code)."""
    old = sys.argv
    sys.argv = [str(script), *map(str, argv)]
    try:
        runpy.run_path(str(script), run_name="__main__")
        return 0
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    finally:
        sys.argv = old


def run_captured(script, *argv) -> subprocess.CompletedProcess:
    """run_script with stdout and stderr captured, as a CompletedProcess; an exception other than SystemExit ends
    it with code 1 and its traceback in stderr, as the interpreter would print it."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = run_script(script, *argv)
        except Exception:  # noqa: BLE001
            traceback.print_exc()
            code = 1
    return subprocess.CompletedProcess([str(script), *map(str, argv)], code, out.getvalue(), err.getvalue())
