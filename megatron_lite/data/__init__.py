"""Data pipeline: BPE tokenizers -> indexed .bin/.idx datasets -> packed GPT samples -> mixtures."""

from megatron_lite.data.builder import build_datasets, resolve_demo
from megatron_lite.data.tokenizer import Tokenizer, TokenizerError, load_tokenizer

__all__ = ["Tokenizer", "TokenizerError", "build_datasets", "load_tokenizer", "resolve_demo"]
