"""Data pipeline: BPE tokenizers -> indexed .bin/.idx datasets -> packed GPT samples -> mixtures."""

from megatron_lite.data.blend import BlendedDataset, MixtureError, plan_mixture
from megatron_lite.data.gpt_dataset import GPTDataset, build_datasets
from megatron_lite.data.tokenizer import Tokenizer, TokenizerError
from megatron_lite.data.tokenizer_dir import load_tokenizer

__all__ = ["BlendedDataset", "GPTDataset", "MixtureError", "Tokenizer", "TokenizerError", "build_datasets",
           "load_tokenizer", "plan_mixture"]
