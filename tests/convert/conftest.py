"""Tiny tokenizers and random-weight helpers shared by the conversion tests."""

from __future__ import annotations

import zlib

import pytest
import torch

# Accents, CJK, an emoji outside the BMP, a combining mark, tabs and runs of spaces.
UNICODE_PROBE = "Grüße, naïve café — 日本語のテキスト 🎉🚀 e\u0301 def f(x):\n\treturn x  +  1 # Ω ≤ ∞"

_CORPUS = [
    "def add(a, b):\n    return a + b\n",
    "class Point:\n    def __init__(self, x, y):\n        self.x = x\n        self.y = y\n",
    "Grüße aus Köln, naïve café, 日本語のテキスト, emoji 🎉 and symbols Ω ≤ ∞.\n",
    "The quick brown fox jumps over the lazy dog. 0123456789\n",
]


@pytest.fixture(autouse=True)
def _single_thread(one_thread):
    yield


@pytest.fixture(scope="session")
def bytelevel_dir(tmp_path_factory):
    from megatron_lite.data.bytelevel import ByteLevelBPETokenizer

    return ByteLevelBPETokenizer.train(_CORPUS * 10, 300).save(tmp_path_factory.mktemp("bytelevel"))


@pytest.fixture(scope="session")
def sentencepiece_dir(tmp_path_factory):
    from megatron_lite.data.sentencepiece_bpe import SentencePieceTokenizer

    return SentencePieceTokenizer.train(_CORPUS * 20, 400).save(tmp_path_factory.mktemp("sentencepiece"))


@pytest.fixture(scope="session")
def tp2_pp2_checkpoints(tmp_path_factory, bytelevel_dir, sentencepiece_dir):
    """Every variant of workers.VARIANTS and workers.FAMILY_VARIANTS saved at (tp, pp) = (2, 2) by
    the trainer's save path, in one gloo launch; one directory per variant under the returned root."""
    from tests.convert.workers import FAMILY_VARIANTS, VARIANTS, save_variants_at_tp2_pp2
    from tests.distributed import run_distributed

    root = tmp_path_factory.mktemp("tp2pp2")
    tokenizers = {flavor: str(sentencepiece_dir) for flavor in ("llama", "mistral", "qwen2", "qwen3")}
    tokenizers["gpt2"] = str(bytelevel_dir)
    run_distributed(save_variants_at_tp2_pp2, 4, str(root), tokenizers, {**VARIANTS, **FAMILY_VARIANTS})
    return root


def random_full(name: str, shape: list[int], vocab_size: int, seed: int = 7) -> torch.Tensor:
    """A full tensor for parameter ``name`` that is the same whatever the layout: norms near 1,
    everything else small noise; vocabulary padding rows zero."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
    if name.endswith("norm.weight"):
        return 1.0 + 0.1 * torch.randn(shape, generator=generator)
    if name in ("embedding.word.weight", "output.weight"):
        full = torch.zeros(shape)
        full[:vocab_size] = 0.1 * torch.randn(vocab_size, *shape[1:], generator=generator)
        return full
    return 0.1 * torch.randn(shape, generator=generator)


def randomize_(chunks, tp: int, tp_rank: int, vocab_size: int, tied: bool, seed: int = 7) -> None:
    """Overwrite every parameter with this rank's shard of ``random_full``; a tied head copy
    (last stage, pp > 1) draws like the embedding so both copies agree."""
    from megatron_lite.parallel.layout import layout_of

    for chunk in chunks:
        for name, param in chunk.named_parameters():
            layout = layout_of(param)
            draw_as = "embedding.word.weight" if tied and name == "output.weight" else name
            full = random_full(draw_as, layout.full_shape(param.shape, tp), vocab_size, seed)
            with torch.no_grad():
                param.copy_(layout.shard_tensor(full, tp_rank, tp))
