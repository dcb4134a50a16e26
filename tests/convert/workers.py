"""Rank bodies for the distributed conversion tests; kept free of heavy imports (transformers)
because every spawned rank imports this module."""

from __future__ import annotations

TINY = dict(num_layers=2, hidden_size=32, num_heads=4, seq_length=16, make_vocab_size_divisible_by=16)
VARIANTS = {
    "gpt2-tied": dict(flavor="gpt2", tie_embeddings=True),
    "gpt2-untied": dict(flavor="gpt2", tie_embeddings=False),
    "llama-gqa-untied": dict(flavor="llama", num_kv_heads=2, tie_embeddings=False, rope_theta=500.0),
    "llama-gqa-tied": dict(flavor="llama", num_kv_heads=2, tie_embeddings=True),
}
LLAMA3_ROPE = dict(type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                   original_max_position_embeddings=4)
# Today's families; the short original context makes the scalings change positions 0..15.
FAMILY_VARIANTS = {
    "llama3.1-rope-llama3": dict(flavor="llama", num_kv_heads=2, rope_theta=500000.0, rope_scaling=LLAMA3_ROPE),
    "llama3.2-tied-rope-linear": dict(flavor="llama", num_kv_heads=2, tie_embeddings=True,
                                      rope_scaling=dict(type="linear", factor=4.0)),
    "mistral": dict(flavor="mistral", num_kv_heads=2, rope_theta=1000000.0),
    "qwen2.5-tied": dict(flavor="qwen2", num_kv_heads=2, tie_embeddings=True, rope_theta=1000000.0),
    "qwen3-head-dim-yarn": dict(flavor="qwen3", num_kv_heads=2, head_dim=12,
                                rope_scaling=dict(type="yarn", factor=4.0, original_max_position_embeddings=4)),
}


def save_variants_at_tp2_pp2(rank, world_size, root, tokenizer_dirs, variants=None):
    """Save every variant (default ``VARIANTS``) with the trainer's save path at (tp, pp) = (2, 2),
    random full weights; ``tokenizer_dirs`` maps each variant's flavor to a tokenizer."""
    import time

    from megatron_lite.config import Config, ModelConfig, ParallelConfig
    from megatron_lite.data import load_tokenizer
    from megatron_lite.training.checkpoint import save_checkpoint
    from megatron_lite.training.setup import build_model_chunks, setup_dims
    from tests.convert.conftest import randomize_

    start = time.perf_counter()
    for variant, fields in (variants or VARIANTS).items():
        tokenizer_dir = tokenizer_dirs[fields["flavor"]]
        vocab = load_tokenizer(tokenizer_dir).vocab_size
        cfg = Config(model=ModelConfig(**TINY, **fields, vocab_size=vocab), parallel=ParallelConfig(tp=2, pp=2))
        dims = setup_dims(cfg)
        chunks = build_model_chunks(cfg, dims)
        randomize_(chunks, dims.tp, dims.tp_rank, vocab, cfg.model.tie_embeddings)
        save_checkpoint(f"{root}/{variant}", 5, chunks, dims, cfg.to_dict(), tokenizer_dir=tokenizer_dir,
                        padded_vocab_size=chunks[0].padded_vocab_size)
    return time.perf_counter() - start
