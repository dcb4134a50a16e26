"""A tiny tokenized corpus (the demo builder on a small slice of the standard library),
built once per test session; training tests run torch on one thread."""

from __future__ import annotations

import pytest

from tests.training.tiny import build_tiny_data


@pytest.fixture(autouse=True)
def _single_thread(one_thread):
    yield


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    return build_tiny_data(tmp_path_factory.mktemp("tiny-data"))
