"""Shared test setup.

Triton kernels run under the interpreter when there is no GPU; the variable must be
set before any kernel module is imported, so it is set here, first.
"""

import os

if not os.environ.get("CUDA_VISIBLE_DEVICES", "x") == "" and os.path.exists("/dev/nvidia0"):
    pass  # a GPU may be present: let the kernels compile for it
else:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
