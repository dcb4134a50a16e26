"""Sampling with a KV cache: greedy, temperature, top-k, top-p, batched prompts of any lengths.

Prompts are sorted by length (longest first) and generated in batches of ``batch_size`` rows,
so a batch holds prompts of similar lengths; answers come back in the caller's order. Within a
batch prompts are left-padded to a common length; each row's positions count from its first
real token (so learned positions and RoPE see the same positions as an unpadded run), and the
attention mask hides the padding keys. A row that emits ``eod_id`` leaves the batch: its rows
of the KV cache, mask and positions are dropped, so later decode steps run on fewer rows.
Vocabulary padding is never sampled.

Every prompt samples from its own generator, seeded from ``seed`` and the prompt's index, so
an answer does not depend on the batch size, on the order rows leave the batch, or on the
other prompts' lengths. Works at any tp: every tp rank gathers the full logits and samples
with the same generators, so all ranks pick the same tokens and drop the same rows. At pp > 1
every rank of the pipeline calls ``generate`` with its stage's chunk: each step's hidden states
go stage to stage, the last stage samples, and the chosen tokens are broadcast back to every
stage; each stage derives the rows that finished from those tokens, so the stages drop the same
rows without another message.

Host synchronisation per decode step is what sampling needs and no more: the last stage's
logits come to the host to be sampled (the finished rows are read from those host tokens), and
at pp > 1 the other stages read the broadcast tokens.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from megatron_lite.model.gpt import GPT, local_kv_heads
from megatron_lite.parallel.mappings import gather_from_region
from megatron_lite.parallel.pipeline import recv_from_previous_stage, send_to_next_stage


class KVCache:
    """Keys and values of every processed position, per global layer: (B, S_max, nkv, hd)."""

    def __init__(self, layers, batch: int, max_length: int, kv_heads: int, head_dim: int, device, dtype):
        shape = (batch, max_length, kv_heads, head_dim)
        self.keys = {i: torch.zeros(shape, device=device, dtype=dtype) for i in layers}
        self.values = {i: torch.zeros(shape, device=device, dtype=dtype) for i in layers}
        self.length = 0  # positions already stored
        self.dtype = dtype

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        end = self.length + k.shape[1]
        self.keys[layer][:, self.length : end] = k
        self.values[layer][:, self.length : end] = v
        return self.keys[layer][:, :end], self.values[layer][:, :end]

    def keep_rows(self, rows: torch.Tensor) -> None:
        """Keep only batch rows ``rows`` (in that order): the rows of finished sequences leave."""
        for layer in self.keys:
            self.keys[layer] = self.keys[layer].index_select(0, rows)
            self.values[layer] = self.values[layer].index_select(0, rows)

    def drop_leading(self, count: int) -> None:
        """Forget the first ``count`` positions of every row: left padding no remaining row attends to."""
        for layer in self.keys:
            self.keys[layer] = self.keys[layer][:, count:]
            self.values[layer] = self.values[layer][:, count:]
        self.length -= count

    def causal_mask(self, new_length: int, device) -> torch.Tensor:
        """(1, 1, T, S) additive bias for T new queries after the cached keys: causal alignment is
        bottom-right, query i sees the cached positions and the new ones up to itself."""
        keys = torch.arange(self.length + new_length, device=device)
        queries = self.length + torch.arange(new_length, device=device).unsqueeze(1)
        return attention_bias((keys <= queries)[None, None], self.dtype)


def attention_bias(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A boolean mask (True = may attend) as the additive bias attention takes as is: 0 where allowed,
    -inf elsewhere, in the queries' dtype. Built once per decode step and shared by every layer;
    a boolean mask would be converted to this again inside every layer's attention call."""
    bias = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
    return bias.masked_fill_(~allowed, float("-inf"))


def _check(model: GPT, prompts: list[list[int]], max_new_tokens: int, temperature: float, top_k: int, top_p: float):
    whole = model.pre_process and model.post_process and len(model.layer_range) == model.config.num_layers
    if not whole and not (model.dims.pp > 1 and model.dims.virtual_pp == 1):
        raise ValueError("generate needs the whole model, or at pp > 1 one chunk per stage (virtual_pp=1) on every rank")
    if model.dims.sequence_parallel:
        raise ValueError("generate does not run with sequence parallelism; build the model with it off")
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("generate needs at least one prompt and every prompt needs at least one token")
    if any(t < 0 or t >= model.config.vocab_size for p in prompts for t in p):
        raise ValueError(f"prompt token ids must be in [0, {model.config.vocab_size})")
    if max_new_tokens < 0 or temperature < 0 or top_k < 0 or not (0 < top_p <= 1):
        raise ValueError(
            f"need max_new_tokens >= 0, temperature >= 0, top_k >= 0 and 0 < top_p <= 1; got "
            f"{max_new_tokens}, {temperature}, {top_k}, {top_p}"
        )
    longest = max(len(p) for p in prompts) + max_new_tokens
    if model.config.position_embedding == "learned" and longest > model.config.seq_length:
        raise ValueError(
            f"prompt plus max_new_tokens reaches {longest} positions but the learned position table has "
            f"model.seq_length={model.config.seq_length}; shorten the prompt or max_new_tokens"
        )


def sample(logits: torch.Tensor, temperature: float, top_k: int, top_p: float, generator: torch.Generator):
    """One token per row from logits (B, V); -inf entries are never chosen."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits / temperature
    if top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        probs = torch.softmax(sorted_logits, dim=-1)
        # Drop a token once the mass before it already reaches top_p; the first always stays.
        drop_sorted = probs.cumsum(dim=-1) - probs >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def _full_logits(model: GPT, logits: torch.Tensor) -> torch.Tensor:
    """(B, V/tp) shard -> (B, vocab) float on CPU, padding columns dropped."""
    full = gather_from_region(logits, model.dims.tp_group)
    return full[:, : model.config.vocab_size].float().cpu()


@torch.no_grad()
def generate(
    model: GPT,
    prompts: list[list[int]],
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    eod_id: int | None = None,
    seed: int = 0,
    batch_size: int | None = None,
    compact: bool = True,
) -> list[list[int]]:
    """New tokens for each prompt; a row stops after emitting ``eod_id`` (which it includes).

    ``batch_size`` rows of length-sorted prompts are generated together (all of them when None);
    ``compact=False`` keeps finished rows in the batch until it ends (the same answers, more
    compute: kept to measure what compaction saves)."""
    _check(model, prompts, max_new_tokens, temperature, top_k, top_p)
    if batch_size is not None and batch_size < 1:
        raise ValueError(f"batch_size must be at least 1 (or None for one batch of all prompts); got {batch_size}")
    was_training = model.training
    model.eval()
    try:
        generators = _row_generators(seed, len(prompts))
        outputs: list[list[int]] = [[] for _ in prompts]
        for rows in _length_buckets(prompts, batch_size or len(prompts)):
            answers = _generate_batch(model, [prompts[r] for r in rows], [generators[r] for r in rows],
                                      max_new_tokens, (temperature, top_k, top_p), eod_id, compact)
            for row, answer in zip(rows, answers):
                outputs[row] = answer
        return outputs
    finally:
        model.train(was_training)


def _row_generators(seed: int, count: int) -> list[torch.Generator]:
    """One generator per prompt, seeded from ``seed`` and the prompt's index."""
    seeds = torch.randint(0, 2**62, (count,), generator=torch.Generator().manual_seed(seed)).tolist()
    return [torch.Generator().manual_seed(s) for s in seeds]


def _length_buckets(prompts: list[list[int]], size: int) -> list[list[int]]:
    """Prompt indices sorted longest first, in consecutive groups of ``size``."""
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    return [order[i : i + size] for i in range(0, len(order), size)]


def _sample_rows(logits: torch.Tensor, sampling: tuple[float, int, float], generators: list[torch.Generator]):
    """One token per row of logits (B, V), row i drawn with ``generators[i]``."""
    temperature, top_k, top_p = sampling
    if temperature == 0:
        return logits.argmax(dim=-1)
    return torch.cat([sample(logits[i : i + 1], temperature, top_k, top_p, g) for i, g in enumerate(generators)])


class _Stage:
    """One pipeline stage's part of a generation step (the whole model at pp = 1)."""

    def __init__(self, model: GPT):
        self.model, self.dims = model, model.dims
        if self.dims.pp > 1:
            self.last = dist.get_global_rank(self.dims.pp_group, self.dims.pp - 1)

    def forward(self, tokens: torch.Tensor, **kwargs) -> torch.Tensor | None:
        """tokens (B, T) -> the last position's logits (B, V/tp) on the last stage, None elsewhere."""
        model, dims = self.model, self.dims
        x = tokens
        if not model.pre_process:
            x = recv_from_previous_stage((*tokens.shape, model.config.hidden_size), next(model.parameters()).dtype,
                                         tokens.device, dims.pp_group, dims.pp_rank)
        out = model(x, **kwargs)
        if not model.post_process:
            send_to_next_stage(out, dims.pp_group, dims.pp_rank)
            return None
        return out[:, -1]

    def share(self, tokens: torch.Tensor | None, batch: int, device) -> torch.Tensor:
        """The last stage's sampled tokens (B,) on every stage."""
        if self.dims.pp == 1:
            return tokens
        buffer = tokens.to(device) if tokens is not None else torch.empty(batch, dtype=torch.long, device=device)
        dist.broadcast(buffer, src=self.last, group=self.dims.pp_group)
        return buffer


class _Rows:
    """The rows a batch still generates, in KV-cache row order: their prompts' left padding and
    which cached keys are real."""

    def __init__(self, prompts: list[list[int]], max_new_tokens: int, device):
        self.prompts = prompts
        self.active = list(range(len(prompts)))  # the prompt of each cache row
        self.width = max(len(p) for p in prompts)  # prompt columns held in the cache
        self.pads = torch.tensor([self.width - len(p) for p in prompts], device=device)  # (B,)
        total = self.width + max_new_tokens
        self.key_valid = torch.arange(total, device=device).unsqueeze(0) >= self.pads.unsqueeze(1)  # (B, S_max)

    def keep(self, kept: list[int], cache: KVCache, tokens: torch.Tensor) -> torch.Tensor:
        """Only the rows ``kept`` go on; returns their ``tokens``. Once the longest prompts are done,
        the padding columns every remaining row has leave the cache too."""
        self.active = [self.active[i] for i in kept]
        rows = torch.tensor(kept, device=tokens.device)
        cache.keep_rows(rows)
        self.pads, self.key_valid = self.pads[rows], self.key_valid[rows]
        shared_padding = self.width - max(len(self.prompts[r]) for r in self.active)
        if shared_padding:
            cache.drop_leading(shared_padding)
            self.pads, self.key_valid = self.pads - shared_padding, self.key_valid[:, shared_padding:]
            self.width -= shared_padding
        return tokens[rows]


def _prefill(stage: _Stage, model: GPT, rows: _Rows, max_new_tokens: int):
    """Runs the left-padded prompts into a new cache; returns it and the last stage's logits (B, V/tp)."""
    device, cfg, width, pads = model.dims.device, model.config, rows.width, rows.pads
    tokens = torch.tensor([[0] * (width - len(p)) + p for p in rows.prompts], device=device)  # (B, T)
    dtype = next(model.parameters()).dtype
    cache = KVCache(model.layer_range, len(rows.prompts), width + max_new_tokens, local_kv_heads(cfg, model.dims.tp),
                    cfg.head_dim, device, dtype)
    positions = (torch.arange(width, device=device).unsqueeze(0) - pads.unsqueeze(1)).clamp(min=0)
    causal = torch.ones(width, width, dtype=torch.bool, device=device).tril()
    # Padding queries see themselves only, so no softmax row is empty; real queries never see padding.
    allowed = (causal & rows.key_valid[:, None, None, :width]) | torch.eye(width, dtype=torch.bool, device=device)
    mask = attention_bias(allowed, dtype)  # (B, 1, T, T)
    return cache, stage.forward(tokens, position_ids=positions, kv_cache=cache, attention_mask=mask)


def _generate_batch(model, prompts, generators, max_new_tokens, sampling, eod_id, compact):
    device = model.dims.device
    stage, rows = _Stage(model), _Rows(prompts, max_new_tokens, device)
    cache, logits = _prefill(stage, model, rows, max_new_tokens)
    outputs: list[list[int]] = [[] for _ in prompts]
    finished = [False] * len(prompts)  # per cache row; stays all False when finished rows leave
    for step in range(max_new_tokens):
        next_tokens = None
        if logits is not None:
            next_tokens = _sample_rows(_full_logits(model, logits), sampling, [generators[r] for r in rows.active])
        next_tokens = stage.share(next_tokens, len(rows.active), device)  # (B,)
        for i, token in enumerate(next_tokens.tolist()):
            if not finished[i]:
                outputs[rows.active[i]].append(token)
                finished[i] = token == eod_id
        if all(finished) or step == max_new_tokens - 1:
            break
        if compact and any(finished):
            kept = [i for i, done in enumerate(finished) if not done]
            next_tokens, finished = rows.keep(kept, cache, next_tokens.to(device)), [False] * len(kept)
        length = cache.length + 1
        positions = (torch.full((len(rows.active), 1), length - 1, device=device) - rows.pads.unsqueeze(1)).clamp(min=0)
        mask = attention_bias(rows.key_valid[:, None, None, :length], cache.dtype)  # (B, 1, 1, S), once for every layer
        logits = stage.forward(next_tokens.to(device).unsqueeze(1), position_ids=positions, kv_cache=cache,
                               attention_mask=mask)
    return outputs
