"""Shared test fixtures, and how the suite shares the machine's cores.

The README's test command runs the suite in one pytest-xdist worker per core (`-n auto --dist loadfile`: a module's
tests stay on one worker, so a module-scoped fixture, an ExecuTorch lowering say, is built once).
"""

import os

import pytest
import torch

# The modules that take longest (pytest --durations=0 on an idle 2-core machine: the GPU check's CPU dry run 87 s,
# the bundle tests 115 s, the bad-input table 103 s, ...). Collected first, so that the workers take them before the
# hundreds of short modules and do not end with one long module running alone; the rest keep their order.
LONG_MODULES = ("test_gpu_check.py", "test_tasks_bundle.py", "test_user_errors.py", "test_tasks_pte.py",
                "test_export.py", "test_run_bundle.py", "test_experiments.py", "test_real_formats.py")


def pytest_configure(config):
    if hasattr(config.option, "loadscopereorder"):  # pytest-xdist would sort the modules by their number of tests
        config.option.loadscopereorder = False


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(LONG_MODULES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: each module's order is kept


def _share_cores_between_workers() -> None:
    """Under pytest-xdist each worker gets its share of the cores: with every worker (and every process a test
    starts) using all of them, OpenMP threads wait on each other's barriers longer than the work takes."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        threads = str(max(1, cores // workers))
        os.environ.setdefault("OMP_NUM_THREADS", threads)  # the scripts the tests start as processes
        torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


_share_cores_between_workers()


@pytest.fixture(scope="module")
def one_thread():
    """Run a module's tests single-threaded, restoring the thread count afterwards.

    The adapter tests run many tiny ops: with 2 OpenMP threads on a busy 2-core machine the threads wait on each
    other's barriers far longer than the work takes (see BENCHMARKS.md, "How to read the numbers"). Opt in with
    `pytestmark = pytest.mark.usefixtures("one_thread")`.
    """
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
