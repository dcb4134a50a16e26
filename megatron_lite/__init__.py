"""megatron-lite: a readable, Megatron-style GPT training system."""

__version__ = "0.1.0"
