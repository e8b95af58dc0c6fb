"""Shared test fixtures."""

import pytest
import torch


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
