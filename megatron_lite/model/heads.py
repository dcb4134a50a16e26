"""Heads on the final hidden state that replace the vocabulary projection.

The language-model head (next-token logits, possibly tied to the word embedding) lives in ``GPT``;
``HEADS`` names every head a ``GPT`` can be built with.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from megatron_lite.parallel.layout import ParamLayout, attach_layout

HEADS = ("lm", "value")


class ValueHead(nn.Module):
    """One scalar per position from the final hidden state: the reward model's and the PPO critic's head.

    A (1, H) weight and a bias, replicated over tp. Under sequence parallelism each rank scores its
    sequence shard, so (as for the norms) its gradient covers only its tokens and is summed over tp.
    """

    def __init__(self, hidden_size: int, sequence_parallel: bool, device):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(1, hidden_size, device=device))
        self.bias = nn.Parameter(torch.zeros(1, device=device))
        for p in self.parameters():
            attach_layout(p, ParamLayout(sequence_parallel=sequence_parallel))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return F.linear(h, self.weight, self.bias).squeeze(-1).float()  # (B, T) fp32
