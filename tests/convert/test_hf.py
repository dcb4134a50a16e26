"""Hugging Face conversion: logits parity both ways, exact round trips, tokenizers, errors."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors import safe_open
from tokenizers import Tokenizer as HFTokenizer
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)

from megatron_lite.config import Config, ConfigError, ModelConfig, ParallelConfig
from megatron_lite.convert import ConversionError, adapter_for_model, convert_from_hf, convert_to_hf
from megatron_lite.convert.hf import fuse_qkv, split_qkv
from megatron_lite.convert.hf_tokenizer import export_tokenizer, import_tokenizer
from megatron_lite.convert.tensor_io import parse_size
from megatron_lite.data import load_tokenizer
from megatron_lite.model.gpt import GPT
from megatron_lite.parallel.dims import ParallelDims
from megatron_lite.training.checkpoint import (
    CheckpointError,
    load_checkpoint,
    load_full_state_dict,
    read_manifest,
    save_full_state_dict,
)
from tests.convert.conftest import _CORPUS, UNICODE_PROBE, randomize_
from tests.data.test_tokenizer import special_positions, spliced_texts, train_sentencepiece
from tests.convert.workers import TINY, VARIANTS

HF_CLASS = {"gpt2": "GPT2LMHeadModel", "llama": "LlamaForCausalLM"}


def _tokens(vocab_size: int, length: int = 16) -> torch.Tensor:
    return torch.randint(0, vocab_size, (2, length), generator=torch.Generator().manual_seed(3))


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item()


def _safetensors(directory) -> dict[str, torch.Tensor]:
    tensors = {}
    for path in sorted(directory.glob("*.safetensors")):
        with safe_open(path, framework="pt") as f:
            tensors.update({name: f.get_tensor(name) for name in f.keys()})
    return tensors


def test_qkv_split_and_fuse_follow_the_grouped_layout():
    # 2 kv groups of [3 q heads, k, v], head_dim 2: group g owns rows 10g .. 10g + 9
    fused = torch.arange(20.0).unsqueeze(1).expand(20, 3)
    q, k, v = split_qkv(fused, num_kv_heads=2, q_per_kv=3, head_dim=2)
    assert q[:, 0].tolist() == [0, 1, 2, 3, 4, 5, 10, 11, 12, 13, 14, 15]
    assert k[:, 0].tolist() == [6, 7, 16, 17] and v[:, 0].tolist() == [8, 9, 18, 19]
    assert torch.equal(fuse_qkv(q, k, v, 2, 3, 2), fused)
    bias = torch.arange(20.0)
    assert torch.equal(fuse_qkv(*split_qkv(bias, 2, 3, 2), 2, 3, 2), bias)


# ----------------------------------------------------------------------------- ours at (tp, pp) = (2, 2) -> HF


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_tp2_pp2_checkpoint_gives_the_same_logits_in_transformers(variant, tp2_pp2_checkpoints, tmp_path):
    manifest = read_manifest(tp2_pp2_checkpoints / variant)
    assert (manifest.layout.tp, manifest.layout.pp) == (2, 2) and len(manifest.files) == 4
    cfg = manifest.model_config()
    reference = GPT(cfg)  # the same full weights at tp = pp = 1
    randomize_([reference], 1, 0, cfg.vocab_size, cfg.tie_embeddings)

    out = convert_to_hf(tp2_pp2_checkpoints / variant, tmp_path / "hf")
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(model).__name__ == HF_CLASS[cfg.flavor]
    assert model.config.tie_word_embeddings == cfg.tie_embeddings
    assert model.get_input_embeddings().weight.shape == (cfg.vocab_size, cfg.hidden_size)  # padding removed
    head, embedding = model.get_output_embeddings().weight, model.get_input_embeddings().weight
    assert torch.equal(head, embedding) == cfg.tie_embeddings
    tokens = _tokens(cfg.vocab_size)
    with torch.no_grad():
        expected = reference(tokens)[..., : cfg.vocab_size]
        logits = model(tokens).logits
    assert logits.shape == (2, 16, cfg.vocab_size) and expected.std() > 0.1
    assert _max_diff(logits, expected) < 1e-4


# ----------------------------------------------------------------------------- HF -> ours at (2, 1) and (1, 2) -> HF


def _random_hf_model(flavor: str, vocab_size: int, tied: bool):
    torch.manual_seed(11)
    if flavor == "gpt2":
        config = GPT2Config(vocab_size=vocab_size, n_positions=16, n_embd=32, n_layer=2, n_head=4,
                            tie_word_embeddings=tied, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
        model = GPT2LMHeadModel(config)
    else:
        config = LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
                             tie_word_embeddings=tied, rope_parameters={"rope_type": "default", "rope_theta": 500.0})
        model = LlamaForCausalLM(config)
    with torch.no_grad():  # move norms and biases off their initial ones and zeros
        for name, param in model.named_parameters():
            param.copy_(torch.randn_like(param) * 0.1 + (1.0 if "ln" in name or "norm" in name else 0.0))
    return model.eval()


def _save_hf_tokenizer(flavor: str, tokenizer_dir, hf_dir) -> None:
    """What a Hugging Face directory holds: tokenizer.json written by transformers, or tokenizer.model."""
    if flavor == "gpt2":
        PreTrainedTokenizerFast(tokenizer_file=str(tokenizer_dir / "tokenizer.json"),
                                eos_token="<|endoftext|>").save_pretrained(hf_dir)
    else:
        shutil.copy(tokenizer_dir / "tokenizer.model", hf_dir / "tokenizer.model")


@pytest.mark.parametrize("flavor, tied", [("gpt2", True), ("llama", False)])
def test_hf_model_to_layouts_and_back(flavor, tied, tmp_path, bytelevel_dir, sentencepiece_dir):
    tokenizer_dir = bytelevel_dir if flavor == "gpt2" else sentencepiece_dir
    vocab = load_tokenizer(tokenizer_dir).vocab_size + 5  # a model may have rows no token uses
    model = _random_hf_model(flavor, vocab, tied)
    hf_dir = tmp_path / "hf"
    model.save_pretrained(hf_dir)
    _save_hf_tokenizer(flavor, tokenizer_dir, hf_dir)
    originals = _safetensors(hf_dir)
    tokens = _tokens(vocab)
    with torch.no_grad():
        expected = model(tokens).logits

    for tp, pp in ((2, 1), (1, 2)):
        ckpt = convert_from_hf(hf_dir, tmp_path / f"ckpt-{tp}{pp}", tp=tp, pp=pp)
        manifest = read_manifest(ckpt)
        assert (manifest.layout.tp, manifest.layout.pp) == (tp, pp) and len(manifest.files) == tp * pp
        cfg = manifest.model_config()
        assert (cfg.flavor, cfg.vocab_size, cfg.tie_embeddings) == (flavor, vocab, tied)
        ours = GPT(cfg, seed=99)
        load_checkpoint(ckpt, [ours], ParallelDims.single(), weights_only=True, padded_vocab_size=ours.padded_vocab_size)
        with torch.no_grad():
            logits = ours(tokens)[..., :vocab]
        assert _max_diff(logits, expected) < 1e-4
        assert load_tokenizer(ckpt / "tokenizer").encode(UNICODE_PROBE) == load_tokenizer(tokenizer_dir).encode(UNICODE_PROBE)

        back = convert_to_hf(ckpt, tmp_path / f"back-{tp}{pp}", max_shard_size="16KB")
        index = json.loads((back / "model.safetensors.index.json").read_text())
        assert len(set(index["weight_map"].values())) > 2 and set(index["weight_map"]) == set(originals)
        for shard in set(index["weight_map"].values()):
            with safe_open(back / shard, framework="pt") as f:
                sizes = [f.get_slice(n).get_shape() for n in f.keys()]
            assert len(sizes) == 1 or sum(4 * torch.Size(s).numel() for s in sizes) <= 16_000
        round_trip = _safetensors(back)
        assert set(round_trip) == set(originals)
        for name, tensor in originals.items():
            assert round_trip[name].dtype == tensor.dtype and torch.equal(round_trip[name], tensor), name


def test_hub_gpt2_files_without_the_transformer_prefix_convert_the_same(tmp_path, bytelevel_dir):
    from safetensors.torch import save_file

    hf_dir = tmp_path / "hf"
    _random_hf_model("gpt2", 310, True).save_pretrained(hf_dir)
    _save_hf_tokenizer("gpt2", bytelevel_dir, hf_dir)
    prefixed, _ = load_full_state_dict(convert_from_hf(hf_dir, tmp_path / "prefixed"))
    tensors = _safetensors(hf_dir)
    save_file({name.removeprefix("transformer."): t for name, t in tensors.items()}, hf_dir / "model.safetensors")
    assert not any(name.startswith("transformer.") for name in _safetensors(hf_dir))
    bare, _ = load_full_state_dict(convert_from_hf(hf_dir, tmp_path / "bare"))
    assert set(bare) == set(prefixed) and all(torch.equal(bare[n], prefixed[n]) for n in bare)


def test_dtype_option_casts_both_ways(tmp_path, bytelevel_dir):
    hf_dir = tmp_path / "hf"
    _random_hf_model("gpt2", 310, False).save_pretrained(hf_dir)
    _save_hf_tokenizer("gpt2", bytelevel_dir, hf_dir)
    originals = _safetensors(hf_dir)
    ckpt = convert_from_hf(hf_dir, tmp_path / "ckpt", dtype="bfloat16")
    state, manifest = load_full_state_dict(ckpt)
    assert {record.dtype for record in manifest.params.values()} == {"bfloat16"}
    assert torch.equal(state["embedding.word.weight"][:310], originals["transformer.wte.weight"].bfloat16())

    out = convert_to_hf(ckpt, tmp_path / "out", dtype="float32")
    assert json.loads((out / "config.json").read_text())["dtype"] == "float32"
    for name, tensor in _safetensors(out).items():
        assert tensor.dtype == torch.float32 and torch.equal(tensor, originals[name].bfloat16().float()), name
    with pytest.raises(ConversionError, match="dtype 'int8' is not one of auto, float32, bfloat16, float16"):
        convert_to_hf(ckpt, tmp_path / "other", dtype="int8")


# ----------------------------------------------------------------------------- tokenizers


@pytest.mark.parametrize("kind", ["bytelevel", "sentencepiece"])
def test_exported_tokenizer_encodes_like_ours(kind, tmp_path, request):
    tokenizer_dir = request.getfixturevalue(f"{kind}_dir")
    ours = load_tokenizer(tokenizer_dir)
    ids = ours.encode(UNICODE_PROBE)
    assert len(ids) > 20 and ours.decode(ids) == UNICODE_PROBE

    out = tmp_path / "hf"
    out.mkdir()
    special = export_tokenizer(tokenizer_dir, out, ours.vocab_size)
    assert special == {"eos": ours.eod_id, "pad": ours.pad_id}
    hf = AutoTokenizer.from_pretrained(out)
    assert hf(UNICODE_PROBE)["input_ids"] == ids
    assert hf.decode(ids) == UNICODE_PROBE and hf.eos_token_id == ours.eod_id

    resaved = tmp_path / "resaved"  # and back, through files transformers wrote
    hf.save_pretrained(resaved)
    if kind == "sentencepiece":
        shutil.copy(out / "tokenizer.model", resaved / "tokenizer.model")
    back = import_tokenizer(resaved, tmp_path / "back", ours.vocab_size)
    assert load_tokenizer(back).encode(UNICODE_PROBE) == ids


SENTENCEPIECE_VARIANTS = {
    "sentencepiece-user-defined": {"user_defined_symbols": ["<sep>", "[MASK]"]},
    "sentencepiece-dummy-prefix": {"add_dummy_prefix": True, "user_defined_symbols": ["<sep>"]},
}


@pytest.mark.parametrize("kind", ["bytelevel", "sentencepiece", *SENTENCEPIECE_VARIANTS])
def test_exported_tokenizer_treats_special_strings_like_ours(kind, tmp_path, request):
    if kind in SENTENCEPIECE_VARIANTS:
        tokenizer = train_sentencepiece(_CORPUS * 20, vocab_size=400, **SENTENCEPIECE_VARIANTS[kind])
        tokenizer_dir = tokenizer.save(tmp_path / "sp")
    else:
        tokenizer_dir = request.getfixturevalue(f"{kind}_dir")
    ours = load_tokenizer(tokenizer_dir)
    out = tmp_path / "hf"
    out.mkdir()
    export_tokenizer(tokenizer_dir, out, ours.vocab_size)
    strings = list(ours.added_tokens)
    texts = special_positions(strings) + spliced_texts(strings, 150, seed=5) + [UNICODE_PROBE.replace(" ", strings[-1])]

    raw = HFTokenizer.from_file(str(out / "tokenizer.json"))
    fast = AutoTokenizer.from_pretrained(out)
    for text in texts:
        ids = ours.encode(text)
        assert raw.encode(text).ids == ids, repr(text)
        assert fast.encode(text, add_special_tokens=False) == ids, repr(text)
        assert ours.decode(ids) == text, repr(text)

    raw.encode_special_tokens = True  # both of Hugging Face's "special strings are text" switches
    as_text = AutoTokenizer.from_pretrained(out, split_special_tokens=True)
    changed = 0
    for text in texts:
        plain = ours.encode(text, allowed_special="none")
        assert raw.encode(text).ids == plain, repr(text)
        assert as_text.encode(text, add_special_tokens=False) == plain, repr(text)
        changed += plain != ours.encode(text)
    assert changed > 150


# ----------------------------------------------------------------------------- bad input


def test_bad_inputs_stop_with_a_message(tmp_path, bytelevel_dir):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CheckpointError, match="no checkpoint in"):
        convert_to_hf(empty, tmp_path / "out")
    with pytest.raises(ConversionError, match="no config.json"):
        convert_from_hf(empty, tmp_path / "ckpt")

    hf_dir = tmp_path / "hf"
    _random_hf_model("gpt2", 200, True).save_pretrained(hf_dir)
    with pytest.raises(ConversionError, match="has no tokenizer"):
        convert_from_hf(hf_dir, tmp_path / "ckpt")
    _save_hf_tokenizer("gpt2", bytelevel_dir, hf_dir)
    with pytest.raises(ConversionError, match="has 300 tokens but the model's vocabulary has only 200 rows"):
        convert_from_hf(hf_dir, tmp_path / "ckpt")
    with pytest.raises(ConfigError, match="num_heads=4 is not divisible by parallel.tp=3"):
        convert_from_hf(hf_dir, tmp_path / "ckpt", tp=3)

    config = json.loads((hf_dir / "config.json").read_text())
    (hf_dir / "config.json").write_text(json.dumps({**config, "architectures": ["MixtralForCausalLM"]}))
    with pytest.raises(ConversionError, match=r"unsupported Hugging Face architecture \['MixtralForCausalLM'\]"):
        convert_from_hf(hf_dir, tmp_path / "ckpt")
    (hf_dir / "config.json").write_text(json.dumps({**config, "activation_function": "relu"}))
    with pytest.raises(ConversionError, match="activation_function='relu'"):
        convert_from_hf(hf_dir, tmp_path / "ckpt")
    (hf_dir / "config.json").write_text(json.dumps(config))
    (hf_dir / "model.safetensors").unlink()
    with pytest.raises(ConversionError, match="only safetensors weights are read"):
        convert_from_hf(hf_dir, tmp_path / "ckpt")

    cfg = ModelConfig(**TINY, vocab_size=300)
    no_tokenizer = save_full_state_dict(GPT(cfg).state_dict(), Config(model=cfg).to_dict(), tmp_path / "bare")
    with pytest.raises(ConversionError, match="has no tokenizer/ directory"):
        convert_to_hf(no_tokenizer, tmp_path / "out")
    with pytest.raises(ConversionError, match="already exists and is not empty"):
        convert_to_hf(no_tokenizer, hf_dir)
    with pytest.raises(ConversionError, match="not a size such as 5GB"):
        parse_size("lots")


def test_a_structure_outside_the_family_preset_has_no_adapter():
    cfg = ModelConfig(flavor="llama", norm="layernorm", bias=True, num_layers=2, hidden_size=32, num_heads=4,
                      vocab_size=64)
    with pytest.raises(ConversionError, match=r"no Hugging Face adapter converts a llama model with "
                                              r"model.bias=True, model.norm='layernorm'"):
        adapter_for_model(cfg)
    assert type(adapter_for_model(ModelConfig(flavor="llama", tie_embeddings=True, vocab_size=64))).flavor == "llama"
