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


def _read_int(path: str, field: int = 0) -> int | None:
    try:
        with open(path) as f:
            return int(f.read().split()[field])
    except (OSError, ValueError, IndexError):  # absent, or "max" / -1: no limit there
        return None


def usable_cores() -> int:
    """The cores this process may use: its CPU affinity, lowered by its container's CPU quota (cgroup v2 cpu.max,
    v1 cfs_quota_us / cfs_period_us), which os.cpu_count() and psutil do not see."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    for quota, period in ((_read_int("/sys/fs/cgroup/cpu.max"), _read_int("/sys/fs/cgroup/cpu.max", 1)),
                          (_read_int("/sys/fs/cgroup/cpu/cpu.cfs_quota_us"),
                           _read_int("/sys/fs/cgroup/cpu/cpu.cfs_period_us"))):
        if quota and period and quota > 0:
            cores = min(cores, max(1, quota // period))
    return cores


WORKER_GB = 3  # a worker's peak memory, with room: ~2.2 GB RSS seen while it lowers an ExecuTorch program


@pytest.hookimpl(optionalhook=True)  # a hook of pytest-xdist: the suite also runs without it (plain pytest -q)
def pytest_xdist_auto_num_workers(config):
    """-n auto: one worker per usable core (xdist's own count takes psutil's physical cores, which is 1 on a 2-vCPU
    machine with hyper-threads, and ignores container quotas), at most one per WORKER_GB of memory."""
    from models import _memory_bytes  # the machine's memory or its container's limit, as create_model checks
    memory = _memory_bytes()
    by_memory = max(1, memory // (WORKER_GB << 30)) if memory else usable_cores()
    return max(1, min(usable_cores(), by_memory))


def _share_cores_between_workers() -> None:
    """Under pytest-xdist each worker gets its share of the cores: with every worker (and every process a test
    starts) using all of them, OpenMP threads wait on each other's barriers longer than the work takes."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1:
        os.environ.setdefault("OMP_NUM_THREADS", str(max(1, usable_cores() // workers)))  # the processes tests start
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
