"""Every kernel test runs on fresh random inputs and with NaN-filled output buffers.

The seed changes every run (set MEGATRON_LITE_TEST_SEED to repeat one); a failing test
prints it with its captured output. NaN-filled outputs make an unwritten element fail.
"""

import os

import pytest
import torch

from megatron_lite.kernels._common import poisoned_outputs


@pytest.fixture(autouse=True)
def _fresh_seed():
    seed = int(os.environ.get("MEGATRON_LITE_TEST_SEED", int.from_bytes(os.urandom(4), "little")))
    torch.manual_seed(seed)
    print(f"torch seed {seed} (MEGATRON_LITE_TEST_SEED={seed} repeats it)")
    yield


@pytest.fixture(autouse=True)
def _poison_kernel_outputs():
    with poisoned_outputs():
        yield
