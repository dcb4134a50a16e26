"""A tiny tokenized corpus (the demo builder on a small slice of the standard library),
built once per test session; training tests run torch on one thread."""

from __future__ import annotations

import pytest
import torch

from tests.training.tiny import build_tiny_data


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models: a second thread only adds synchronisation, and CI cores are shared."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    return build_tiny_data(tmp_path_factory.mktemp("tiny-data"))
