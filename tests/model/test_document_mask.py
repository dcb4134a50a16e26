"""Document-masked packed samples: every document of a packed sample gives the logits and
gradients it gives when run alone, on both attention backends; and the training path (micro-
batches, loss, pipeline plumbing) carries the documents and positions."""

import numpy as np
import pytest
import torch

from megatron_lite.config import ConfigError, ModelConfig
from megatron_lite.model import ops
from megatron_lite.model.gpt import GPT
from megatron_lite.training.setup import split_micro_batches
from megatron_lite.training.step import PackedTarget, chunk_inputs, language_model_loss

EOD = 3
LENGTHS = [5, 1, 7, 3]  # ragged, one single-token document, 16 tokens in all


def tiny(flavor: str, **overrides) -> ModelConfig:
    values = dict(flavor=flavor, num_layers=2, hidden_size=32, num_heads=4, seq_length=16, vocab_size=50,
                  make_vocab_size_divisible_by=16)
    if flavor == "llama":
        values["num_kv_heads"] = 2  # grouped-query attention
    values.update(overrides)
    return ModelConfig(**values)


def packed(lengths):
    """Documents, their packed (1, T) tokens, document ids and restarting positions."""
    docs = [torch.randint(4, 50, (n,)) for n in lengths]
    document_ids = torch.cat([torch.full((n,), i, dtype=torch.int32) for i, n in enumerate(lengths)])[None]
    position_ids = torch.cat([torch.arange(n) for n in lengths])[None]
    return docs, torch.cat(docs)[None], document_ids, position_ids


def grads(model):
    return {name: p.grad.clone() for name, p in model.named_parameters()}


@pytest.mark.parametrize("flavor,backend", [("gpt2", "torch"), ("llama", "torch"), ("llama", "triton")])
def test_packed_sample_equals_each_document_alone(flavor, backend):
    torch.manual_seed(0)
    model = GPT(tiny(flavor, attention_backend=backend))
    docs, tokens, document_ids, position_ids = packed(LENGTHS)
    labels = torch.randint(0, 50, tokens.shape)

    logits = model(tokens, position_ids=position_ids, document_ids=document_ids)  # (1, T, V)
    alone = torch.cat([model(doc[None]) for doc in docs], dim=1)
    torch.testing.assert_close(logits, alone, rtol=1e-5, atol=1e-5)

    model(tokens, labels, position_ids, document_ids=document_ids).sum().backward()
    packed_grads = grads(model)
    model.zero_grad()
    for doc, doc_labels in zip(docs, labels[0].split(LENGTHS)):
        model(doc[None], doc_labels[None]).sum().backward()
    for name, grad in grads(model).items():
        torch.testing.assert_close(packed_grads[name], grad, rtol=1e-5, atol=1e-5, msg=name)


@pytest.mark.parametrize("causal", [True, False])
def test_torch_backend_matches_the_masked_reference(causal):
    from megatron_lite.kernels import eager, reference

    documents = torch.tensor([[0] * 3 + [1] * 9 + [2] * 1 + [3] * 7, [5] * 20])
    q = torch.randn(2, 20, 4, 8, dtype=torch.float64)
    k, v = torch.randn(2, 20, 2, 8, dtype=torch.float64), torch.randn(2, 20, 2, 8, dtype=torch.float64)  # GQA
    torch.testing.assert_close(eager.attention(q, k, v, causal, document_ids=documents),
                               reference.flash_attention(q, k, v, causal, document_ids=documents))


def test_without_document_ids_documents_see_each_other():
    # The check above is not vacuous: plain causal attention over the same sample differs.
    torch.manual_seed(0)
    model = GPT(tiny("llama"))
    docs, tokens, document_ids, position_ids = packed(LENGTHS)
    masked = model(tokens, position_ids=position_ids, document_ids=document_ids)
    plain = model(tokens, position_ids=position_ids)
    assert torch.allclose(masked[:, :5], plain[:, :5], atol=1e-6)  # the first document has nothing before it
    assert not torch.allclose(masked[:, 5:], plain[:, 5:], atol=1e-3)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_a_document_is_a_run_of_equal_ids(backend):
    # [0 0 1 1 0 0]: the second run of 0s is a third document on both backends, not the first's.
    torch.manual_seed(0)
    model = GPT(tiny("llama", attention_backend=backend))
    tokens = torch.randint(4, 50, (1, 6))
    positions = torch.tensor([[0, 1, 0, 1, 0, 1]])
    reused = model(tokens, position_ids=positions, document_ids=torch.tensor([[0, 0, 1, 1, 0, 0]]))
    numbered = model(tokens, position_ids=positions, document_ids=torch.tensor([[0, 0, 1, 1, 2, 2]]))
    torch.testing.assert_close(reused, numbered, rtol=1e-5, atol=1e-5)


def test_document_ids_errors():
    model = GPT(tiny("llama"))
    tokens = torch.randint(0, 50, (2, 8))
    with pytest.raises(ValueError, match=r"document_ids must be \(batch, seq\) = \(2, 8\), one id per token, got shape \(2, 7\)"):
        model(tokens, document_ids=torch.zeros(2, 7, dtype=torch.int32))
    with pytest.raises(ValueError, match="do not combine with a kv_cache or an attention_mask"):
        model(tokens, document_ids=torch.zeros(2, 8, dtype=torch.int32),
              attention_mask=torch.ones(2, 1, 8, 8, dtype=torch.bool))
    q = torch.randn(1, 8, 2, 16)
    with pytest.raises(ValueError, match="attention takes a mask or document_ids, not both"):
        ops.attention(q, q, q, True, "torch", mask=torch.ones(1, 1, 8, 8, dtype=torch.bool),
                      document_ids=torch.zeros(1, 8, dtype=torch.int32))
    with pytest.raises(ConfigError, match="model.attention_backend=flash_attn cannot mask packed documents; use one of "
                                          "torch, triton or set data.document_mask=false"):
        ops.attention(q, q, q, True, "flash_attn", document_ids=torch.zeros(1, 8, dtype=torch.int32))


def test_micro_batches_carry_documents_and_positions():
    batch = torch.tensor([[5, 6, EOD, 7, EOD, 8, 9],
                          [EOD, 5, 6, 7, 8, 9, 10],
                          [5, 6, 7, 8, 9, 10, 11],
                          [5, EOD, EOD, 6, 7, 8, 9]])  # (B, T + 1)
    plain = split_micro_batches(batch, 2, torch.device("cpu"))
    assert isinstance(plain[0][1], torch.Tensor) and chunk_inputs(plain[0][1]) == {}
    micro = split_micro_batches(batch, 2, torch.device("cpu"), eod_id=EOD)
    assert len(micro) == 2
    tokens, target = micro[1]
    assert isinstance(target, PackedTarget)
    torch.testing.assert_close(tokens, batch[2:, :-1])
    torch.testing.assert_close(target.labels, batch[2:, 1:])
    np.testing.assert_array_equal(target.document_ids, [[0, 0, 0, 0, 0, 0], [0, 0, 1, 2, 2, 2]])
    np.testing.assert_array_equal(target.position_ids, [[0, 1, 2, 3, 4, 5], [0, 1, 0, 0, 1, 2]])
    assert set(chunk_inputs(target)) == {"document_ids", "position_ids"}


def test_language_model_loss_reads_a_packed_target():
    torch.manual_seed(0)
    model = GPT(tiny("gpt2"))
    batch = torch.randint(4, 50, (2, 17))
    batch[0, 6] = batch[1, 3] = batch[1, 11] = EOD
    (tokens, target), = split_micro_batches(batch, 2, torch.device("cpu"), eod_id=EOD)
    loss = language_model_loss(model, tokens, target, num_micro_batches=2)
    want = model(tokens, target.labels, target.position_ids, document_ids=target.document_ids).mean() / 2
    torch.testing.assert_close(loss, want)
    unmasked = language_model_loss(model, tokens, target.labels, num_micro_batches=2)
    assert not torch.allclose(loss, unmasked)


# ----------------------------------------------------------------------------- through the trainer

VOCAB, SEQ, STEPS = 120, 32, 3
BASE = [
    "model.num_layers=4", "model.hidden_size=64", "model.num_heads=4", f"model.seq_length={SEQ}",
    f"model.vocab_size={VOCAB}", "model.make_vocab_size_divisible_by=16", "train.micro_batch_size=2",
    "train.global_batch_size=8", f"train.max_steps={STEPS}", f"train.eval_interval={STEPS}", "train.eval_steps=1",
    "train.device=cpu", "train.seed=7", "optim.lr=1e-2", "optim.warmup_steps=1", "log.interval=1",
    "log.tensorboard=false", "data.document_mask=true",
]
FLAVORS = {"gpt2": [], "llama": ["model.flavor=llama", "model.num_kv_heads=2"]}
LAYOUTS = {  # world size 4
    "llama tp2 pp2 sequence-parallel": ("llama", ["parallel.tp=2", "parallel.pp=2", "parallel.sequence_parallel=true"]),
    "gpt2 pp2x2 interleaved dp2": ("gpt2", ["parallel.pp=2", "parallel.virtual_pp=2"]),
}


def _datasets() -> tuple[np.ndarray, np.ndarray]:
    """Rows of T + 1 tokens counting up from random starts, cut into documents by EOD tokens."""
    rng = np.random.default_rng(0)
    rows = (rng.integers(4, VOCAB, size=(STEPS * 8 + 8, 1)) + np.arange(SEQ + 1)) % VOCAB
    rows = np.where(rng.random(rows.shape) < 0.15, EOD, rows)
    return rows[: STEPS * 8], rows[STEPS * 8 :]


def _train(root: str, name: str, flavor: str, overrides: list[str], distributed: bool) -> dict:
    import functools

    from megatron_lite.config import load_config
    from megatron_lite.training.setup import setup_dims
    from megatron_lite.training.trainer import LanguageModelTask, Trainer

    cfg = load_config(None, BASE + FLAVORS[flavor] + overrides + [f"log.dir={root}/{name.replace(' ', '_')}"])
    trainer = Trainer(cfg, setup_dims(cfg) if distributed else None, datasets=_datasets(),
                      task=functools.partial(LanguageModelTask, eod_id=EOD))
    result = trainer.train()
    return {"losses": result.losses, "val": result.val_losses[-1][1]}


def _train_layouts(rank: int, world_size: int, root: str) -> dict:
    return {name: _train(root, name, flavor, overrides, True) for name, (flavor, overrides) in LAYOUTS.items()}


def test_parallel_layouts_train_like_one_process_with_document_masks(tmp_path):
    from tests.distributed import run_distributed

    results = run_distributed(_train_layouts, 4, str(tmp_path))
    for name, (flavor, _) in LAYOUTS.items():
        single = _train(str(tmp_path), f"{flavor} single", flavor, [], False)
        for rank_result in results:
            got = rank_result[name]
            torch.testing.assert_close(got["losses"], single["losses"], rtol=1e-5, atol=0, msg=name)
            assert abs(got["val"] - single["val"]) / single["val"] < 1e-5, name
        unmasked = _train(str(tmp_path), f"{flavor} unmasked", flavor, ["data.document_mask=false"], False)
        assert abs(unmasked["losses"][0] - single["losses"][0]) > 1e-3, "document masks must change the loss"


def test_document_mask_needs_an_end_of_document_id_and_a_masking_backend(tmp_path):
    from megatron_lite.config import load_config
    from megatron_lite.parallel.dims import ParallelDims
    from megatron_lite.training.trainer import LanguageModelTask

    cfg = load_config(None, BASE)
    with pytest.raises(ConfigError, match="data.document_mask=true needs the end-of-document token id"):
        LanguageModelTask(cfg, ParallelDims.single())
    cfg = load_config(None, BASE + ["model.attention_backend=flash_attn"])
    with pytest.raises(ConfigError, match="model.attention_backend=flash_attn cannot mask packed documents"):
        LanguageModelTask(cfg, ParallelDims.single(), eod_id=EOD)
    # the Triton kernel masks documents under context parallelism too (tests/parallel/test_context_parallel.py)
    cfg = load_config(None, BASE + ["model.attention_backend=triton", "parallel.cp=2"])
    assert LanguageModelTask(cfg, ParallelDims.single(), eod_id=EOD).eod_id == EOD
