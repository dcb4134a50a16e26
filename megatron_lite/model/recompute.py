"""Activation recomputation: keep fewer tensors from forward to backward and rebuild them in backward.

``train.recompute`` picks what is rebuilt:

- ``none``: autograd keeps whatever each op saves;
- ``selective``: the attention core, softmax(QK^T)V with its dropout, is run again in backward
  from q, k, v (the (B, nh, T, S) scores, probabilities and dropout mask are never kept), and the
  MLP activation's output (gelu or swiglu, ffn wide) is rebuilt from its input when the output
  projection's backward needs it: an elementwise op, cheap to redo, while the unfused attention
  core costs a second attention forward (figures in docs/benchmarks.md);
- ``full``: a transformer layer keeps only its input and runs its whole forward again in
  backward; ``train.recompute_layers`` = N does this for the first N layers of each pipeline
  chunk (None: all of them), trading memory for speed a layer at a time.

Recomputed forwards replay the dropout streams of ``RNGStatesTracker`` (and torch's default
generator), so the gradients equal the ones without recomputation bit for bit.

A fused attention kernel keeps only q, k, v, the output and the log-sum-exp: its attention is
selective by construction, and running it again would cost a whole attention forward for the
log-sum-exp alone. That is our Triton kernel and flash_attn, and torch's
``scaled_dot_product_attention`` everywhere but on its math path, which it takes for attention
dropout off a GPU (its CPU flash kernel has no dropout; on CUDA its fused kernels drop inside).
There ``selective`` rebuilds the MLP activation only.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Callable, Iterator

import torch
from torch.utils._pytree import tree_flatten, tree_unflatten
from torch.utils.checkpoint import checkpoint

from megatron_lite.config import ConfigError, TrainConfig
from megatron_lite.parallel.random import RNGStatesTracker

MODES = ("none", "selective", "full")


def attention_keeps_probabilities(attention_backend: str, dropout: float, device: torch.device | str) -> bool:
    """Whether the attention forward keeps its (B, nh, T, S) probabilities for backward: only torch's
    SDPA on its math path, which it takes for dropout off a GPU (see the module docstring)."""
    return attention_backend == "torch" and dropout > 0 and torch.device(device).type != "cuda"


@dataclasses.dataclass(frozen=True)
class RecomputePolicy:
    """What a model chunk recomputes: ``mode`` (one of ``MODES``) and, for ``full``, ``layers``: the
    first this many layers of the chunk (None: every layer)."""

    mode: str = "none"
    layers: int | None = None

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ConfigError(f"train.recompute={self.mode!r} is not one of {', '.join(MODES)}")
        if self.layers is not None and self.mode != "full":
            raise ConfigError(f"train.recompute_layers={self.layers} applies only to train.recompute=full "
                              f"(got train.recompute={self.mode}); set train.recompute=full or drop train.recompute_layers")

    @classmethod
    def from_config(cls, train_cfg: TrainConfig) -> RecomputePolicy:
        return cls(train_cfg.recompute, train_cfg.recompute_layers)

    @property
    def selective(self) -> bool:
        return self.mode == "selective"

    def recomputes_layer(self, position: int) -> bool:
        """Whether the chunk's ``position``-th layer (0 = its first) is recomputed whole."""
        return self.mode == "full" and (self.layers is None or position < self.layers)

    def recomputes_attention_core(self, attention_backend: str, dropout: float, device: torch.device | str) -> bool:
        return self.selective and attention_keeps_probabilities(attention_backend, dropout, device)

    def check_chunks(self, chunk_layer_counts: list[int]) -> None:
        """Refuse ``layers`` above the layers of the smallest pipeline chunk, with the reason. A chunk
        without layers (an embedding-only stage) has nothing to recompute and is left out."""
        counts = [count for count in chunk_layer_counts if count > 0]
        if self.layers is None or not counts or self.layers <= min(counts):
            return
        smallest = min(counts)
        raise ConfigError(
            f"train.recompute_layers={self.layers} is more than the smallest pipeline chunk holds ({smallest} "
            f"layer{'s' if smallest != 1 else ''}; layers per chunk: {chunk_layer_counts}); set it to at most "
            f"{smallest}, or null to recompute every layer"
        )


def recomputed(function: Callable[..., torch.Tensor], *args, rng_tracker: RNGStatesTracker) -> torch.Tensor:
    """``function(*args)``, keeping only ``args`` for backward and running ``function`` again there, with
    the dropout streams (and torch's default generator) replayed so that it draws the same masks."""
    # Tensors inside containers (rope's (cos, sin)) are passed loose, so that checkpoint keeps them
    # as saved tensors, visible to saved-tensor hooks, rather than as hidden references.
    leaves, structure = tree_flatten(args)

    def run(*flat_args):
        return function(*tree_unflatten(list(flat_args), structure))

    return checkpoint(run, *leaves, use_reentrant=False, preserve_rng_state=True,
                      context_fn=rng_tracker.recompute_contexts)


class _Rebuilt:
    """Stands in for a saved view of a dropped tensor: where the view sits in the rebuilt tensor."""

    def __init__(self, view: torch.Tensor):
        self.size, self.stride, self.offset = view.size(), view.stride(), view.storage_offset()


@contextlib.contextmanager
def rebuilt_in_backward(output: torch.Tensor, rebuild: Callable[[], torch.Tensor]) -> Iterator[None]:
    """Ops inside this block that save ``output`` (or a view of it) for backward keep ``rebuild``
    instead, which backward calls to make it again. ``rebuild`` must return a tensor laid out as
    ``output`` (a fresh contiguous result of the same op), and may only hold tensors autograd keeps
    anyway (the op's inputs), or nothing is saved."""
    storage = output.untyped_storage().data_ptr()

    def pack(tensor: torch.Tensor):
        # Compared by storage: a linear saves a 2-D view of its 3-D input, not the tensor itself.
        if tensor.untyped_storage().data_ptr() == storage:
            return _Rebuilt(tensor)
        return tensor

    def unpack(saved):
        if not isinstance(saved, _Rebuilt):
            return saved
        with torch.no_grad():
            return rebuild().as_strided(saved.size, saved.stride, saved.offset)

    with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        yield
