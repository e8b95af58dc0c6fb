"""Run one of the project's scripts in this process (runpy), as the interpreter would: the tests use this instead of
a subprocess where they do not need a fresh process (it skips the interpreter start and the torch import)."""

import runpy
import sys


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

