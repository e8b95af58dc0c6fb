"""Shared test fixtures."""

import pytest
import torch


@pytest.fixture(scope="module")
def one_thread():
    """Run a module's tests single-threaded, restoring the thread count afterwards.

    The adapter tests run many tiny ops: with 2 OpenMP threads on a busy 2-core machine the hand-off
    costs ~1000x the work (measured 89 ms vs 11 us per small conv). Opt in with
    `pytestmark = pytest.mark.usefixtures("one_thread")`.
    """
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
