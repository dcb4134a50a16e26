"""The distributed tests launch their gloo ranks with the library's launcher."""

from megatron_lite.parallel.launch import run_distributed

__all__ = ["run_distributed"]
