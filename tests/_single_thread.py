"""``single_thread``: run a test module with one intra-op torch thread, restored afterwards.

The model tests work on tiny tensors, where a second thread buys nothing and, on a busy
2-core machine, every parallel op can wait a whole scheduler slice for it (tens of times
slower). Results do not depend on the thread count the tests check.
"""

import pytest
import torch


@pytest.fixture(autouse=True, scope="module")
def single_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
