"""Shared test setup.

Without a GPU the Triton kernels run under Triton's interpreter. The variable is read when
a kernel is defined, so it is set here, before any test module imports the kernels.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture
def one_thread():
    """Tiny models: a second thread only adds synchronisation, and CI cores are shared.
    Test folders of tiny models use it for every test (an autouse fixture in their conftest)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
