"""Does a model fit a parallel grid? The checks that need both the model's shape and the grid
(``parallel`` validates the grid alone and knows nothing of models).

``check_layout`` runs when a model is built on a grid; ``validate_layout`` runs the grid's and
the model's checks before any process starts (offline conversion, resharding, config tests).
"""

from __future__ import annotations

from megatron_lite.config import ConfigError, ModelConfig, ParallelConfig
from megatron_lite.parallel.context_parallel import check_sequence_splits
from megatron_lite.parallel.dims import ParallelDims, padded_vocab_size
from megatron_lite.parallel.pipeline import stage_layer_ranges


def kv_replicas_for(model: ModelConfig, tp: int) -> int:
    """Tensor-parallel ranks that share one kv head: tp / num_kv_heads when tp exceeds the kv heads."""
    if tp > model.num_kv_heads and tp % model.num_kv_heads == 0:
        return tp // model.num_kv_heads
    return 1  # also where tp cuts a kv head, which check_layout reports


def validate_layout(parallel: ParallelConfig, model: ModelConfig, world_size: int) -> int:
    """Check the grid against the world and the model; return dp. Errors say what to change."""
    dims = ParallelDims.for_world(parallel, world_size, kv_replicas=kv_replicas_for(model, parallel.tp))
    check_layout(model, dims)
    return dims.dp


def check_layout(model: ModelConfig, dims: ParallelDims) -> None:
    """Raise a ``ConfigError`` that says what to change when ``model`` cannot be laid out on ``dims``."""
    tp = dims.tp
    if model.num_heads % tp != 0:
        raise ConfigError(
            f"model.num_heads={model.num_heads} is not divisible by parallel.tp={tp}; "
            f"choose a tp that divides the head count"
        )
    _check_kv_heads(model.num_kv_heads, tp)
    if dims.kv_replicas != kv_replicas_for(model, tp):
        raise ValueError(
            f"the grid's kv-replica groups have {dims.kv_replicas} ranks but model.num_kv_heads="
            f"{model.num_kv_heads} at tp={tp} needs {kv_replicas_for(model, tp)}: build the dims with "
            f"ParallelDims.initialize(parallel, kv_replicas=kv_replicas_for(model, tp))"
        )
    if model.ffn_hidden_size % tp != 0:
        raise ConfigError(
            f"model.ffn_hidden_size={model.ffn_hidden_size} is not divisible by parallel.tp={tp}; "
            f"choose an ffn size that is a multiple of tp"
        )
    if dims.sequence_parallel and model.seq_length % tp != 0:
        raise ConfigError(
            f"parallel.sequence_parallel splits the sequence over parallel.tp={tp}, but model.seq_length="
            f"{model.seq_length} is not a multiple of it; change seq_length or turn sequence_parallel off"
        )
    _check_context_split(model.seq_length, dims)
    _check_layer_split(model.num_layers, dims)
    _check_vocab_split(model, tp)


def _check_kv_heads(kv_heads: int, tp: int) -> None:
    """Each rank holds whole kv heads (tp divides them) or one copy of a kv head shared by
    tp / num_kv_heads ranks (tp a multiple of them); anything between would cut a head."""
    if tp <= kv_heads and kv_heads % tp != 0:
        raise ConfigError(
            f"model.num_kv_heads={kv_heads} is not divisible by parallel.tp={tp}; each tensor-parallel rank "
            f"needs whole kv heads: choose a tp that divides num_kv_heads or a multiple of it "
            f"(then each kv head is copied to tp / num_kv_heads ranks)"
        )
    if tp > kv_heads and tp % kv_heads != 0:
        raise ConfigError(
            f"parallel.tp={tp} is larger than model.num_kv_heads={kv_heads} but not a multiple of it; each kv head "
            f"is copied to tp / num_kv_heads ranks, so choose a tp that is a multiple of num_kv_heads "
            f"(or a divisor of it), or change num_kv_heads"
        )


def _check_context_split(seq_length: int, dims: ParallelDims) -> None:
    """Each cp rank holds 2 of the 2 x cp chunks of a sequence; under sequence parallelism its tp
    ranks then split those T / cp tokens again."""
    if dims.cp == 1:
        return
    check_sequence_splits(seq_length, dims.cp, "model.seq_length")
    local = seq_length // dims.cp
    if dims.sequence_parallel and local % dims.tp != 0:
        raise ConfigError(
            f"parallel.sequence_parallel splits each cp rank's model.seq_length / parallel.cp = {local} tokens "
            f"over parallel.tp={dims.tp}, but {local} is not a multiple of it; set model.seq_length to a "
            f"multiple of 2 x cp x tp = {2 * dims.cp * dims.tp} or turn sequence_parallel off"
        )


def _check_layer_split(num_layers: int, dims: ParallelDims) -> None:
    ranges = stage_layer_ranges(num_layers, dims)  # raises when an even split is impossible
    if dims.stage_layers is not None and sum(len(r) for r in ranges) != num_layers:
        raise ConfigError(
            f"parallel.stage_layers={dims.stage_layers} sums to {sum(dims.stage_layers)} but model.num_layers="
            f"{num_layers}; the counts must add up to the number of layers (no layer is dropped or repeated)"
        )


def _check_vocab_split(model: ModelConfig, tp: int) -> None:
    if model.vocab_size <= 0:
        return
    padded = padded_vocab_size(model.vocab_size, model.make_vocab_size_divisible_by, tp)
    if padded % tp != 0 or padded < model.vocab_size:
        raise ConfigError(
            f"vocabulary {model.vocab_size} padded to {padded} does not split over parallel.tp={tp}; "
            f"set model.make_vocab_size_divisible_by to a positive integer"
        )
