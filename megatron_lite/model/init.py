"""Layout-invariant initialisation of the model's own parameters.

``init_parameters`` gives every layout the same full model: each parameter's full (tp = 1) tensor is
drawn from a generator seeded by (seed, the parameter's global name), and each rank keeps its shard.
Global names carry global layer indices, so a pipeline stage draws its layers exactly as the single
process does, and nothing touches torch's default generator.
"""

from __future__ import annotations

import math
import zlib

import torch
from torch import nn

from megatron_lite.parallel.layers import fill_from_full_
from megatron_lite.parallel.layout import layout_of

WORD_EMBEDDING = "embedding.word.weight"
RESIDUAL_PROJECTIONS = ("attention.proj.weight", "mlp.proj.weight")


@torch.no_grad()
def init_parameters(model: nn.Module, seed: int) -> None:
    """Fill every parameter of a ``GPT`` chunk with its shard of the full initial tensor.

    Rules (GPT-2's): norm weights 1 and every bias 0; other weights N(0, init_std), the residual
    projections N(0, init_std / sqrt(2 num_layers)); vocabulary rows past ``vocab_size`` 0, so the
    values do not depend on the padding; the last stage's copy of a tied embedding is drawn under the
    word embedding's name, so both copies start equal. Norms are the modules whose name ends in "norm".
    """
    if model.dims.device.type == "meta":  # shapes only (planning a checkpoint layout): nothing to draw
        return
    for module_name, module in model.named_modules():
        for param_name, param in module.named_parameters(recurse=False):
            name = f"{module_name}.{param_name}"
            full = _full_initial_tensor(model, name, param, module_name.endswith("norm"), seed)
            fill_from_full_(param, full, model.dims.tp_group)


def _full_initial_tensor(model, name: str, param: nn.Parameter, is_norm: bool, seed: int) -> torch.Tensor:
    cfg = model.config
    shape = layout_of(param).full_shape(param.shape, model.dims.tp)
    if is_norm and name.endswith("weight"):
        return torch.ones(shape)
    if name.endswith("bias"):
        return torch.zeros(shape)
    is_output = model.output is not None and param is model.output.weight
    if is_output and cfg.tie_embeddings:
        name = WORD_EMBEDDING
    generator = torch.Generator().manual_seed(_param_seed(seed, name))
    std = cfg.init_std / math.sqrt(2 * cfg.num_layers) if name.endswith(RESIDUAL_PROJECTIONS) else cfg.init_std
    if name == WORD_EMBEDDING or is_output:
        full = torch.zeros(shape)
        full[: cfg.vocab_size] = torch.randn(cfg.vocab_size, shape[1], generator=generator) * std
        return full
    return torch.randn(shape, generator=generator) * std


def _param_seed(seed: int, name: str) -> int:
    return (seed * 1_000_003 + zlib.crc32(name.encode())) % (2**63)
