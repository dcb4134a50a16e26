"""Checkpoint conversion to and from Hugging Face format (GPT-2, Llama, Mistral, Qwen2, Qwen3 causal LMs)."""

from megatron_lite.convert.hf import ADAPTERS, adapter_class_for_hf, adapter_for_model, convert_from_hf, convert_to_hf
from megatron_lite.convert.tensor_io import ConversionError

__all__ = ["ADAPTERS", "ConversionError", "adapter_class_for_hf", "adapter_for_model", "convert_from_hf", "convert_to_hf"]
