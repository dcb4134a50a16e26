"""Chat templates travel: ours exported for ``apply_chat_template``, Hugging Face's rendering our data."""

from __future__ import annotations

import json
import shutil

import pytest
from transformers import AutoTokenizer

from megatron_lite.config import ConfigError, load_config
from megatron_lite.convert.hf_tokenizer import export_tokenizer, import_tokenizer
from megatron_lite.data import load_tokenizer
from megatron_lite.rlhf.chat_template import CHAT_TEMPLATE_FILE, ChatTemplateError, native_chat_template
from megatron_lite.rlhf.data import (
    PreferenceDataset,
    PromptDataset,
    RLHFDataError,
    SFTDataset,
    TemplateChat,
    chat_format,
    encode_chat,
    prompt_ids,
)

CONVERSATION = [
    {"role": "system", "content": "Answer briefly."},
    {"role": "user", "content": "def add(a, b):"},
    {"role": "assistant", "content": "return a + b"},
    {"role": "user", "content": "class Point:"},
    {"role": "assistant", "content": "Grüße, naïve café 日本語 🎉"},
]
# A ChatML-style template of the kind Qwen models carry: text markers around each turn.
CHATML = (
    "{% for message in messages %}{{ '<|user|>' if message['role'] == 'user' else '<|system|>' }}"
    "{{ message['role'] }}\n{{ message['content'] }}{{ eos_token }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|system|>assistant\n{% endif %}"
)


def _ids(result) -> list[int]:
    return list(result["input_ids"]) if hasattr(result, "keys") else list(result)


@pytest.mark.parametrize("kind", ["bytelevel", "sentencepiece"])
def test_exported_template_renders_our_sft_ids(kind, tmp_path, request):
    tokenizer_dir = request.getfixturevalue(f"{kind}_dir")
    ours = load_tokenizer(tokenizer_dir)
    out = tmp_path / "hf"
    out.mkdir()
    export_tokenizer(tokenizer_dir, out, ours.vocab_size)
    config = json.loads((out / "tokenizer_config.json").read_text())
    assert config["chat_template"] == native_chat_template(ours)
    hf = AutoTokenizer.from_pretrained(out)
    assert _ids(hf.apply_chat_template(CONVERSATION, tokenize=True)) == encode_chat(ours, CONVERSATION)[0]
    prompt = CONVERSATION[:4]
    assert _ids(hf.apply_chat_template(prompt, tokenize=True, add_generation_prompt=True)) == prompt_ids(ours, prompt)
    eod = hf.convert_ids_to_tokens(ours.eod_id)  # </s> for SentencePiece
    rendered = hf.apply_chat_template(CONVERSATION[1:3], tokenize=False)
    assert rendered == f"<|user|>def add(a, b):<|assistant|>return a + b{eod}"


def _hf_dir_with_template(tmp_path, bytelevel_dir, template: str):
    """A Hugging Face tokenizer directory (written by transformers) carrying ``template``."""
    out = tmp_path / "exported"
    out.mkdir()
    export_tokenizer(bytelevel_dir, out, 300)
    hf = AutoTokenizer.from_pretrained(out)
    hf.chat_template = template
    hf_dir = tmp_path / "hf"
    hf.save_pretrained(hf_dir)
    return hf, hf_dir


def test_imported_template_renders_sft_dpo_and_ppo_data_with_the_template_ids(tmp_path, bytelevel_dir):
    hf, hf_dir = _hf_dir_with_template(tmp_path, bytelevel_dir, CHATML)
    ours_dir = import_tokenizer(hf_dir, tmp_path / "ours", 300)
    assert (ours_dir / CHAT_TEMPLATE_FILE).read_text() == CHATML
    tokenizer = load_tokenizer(ours_dir)
    chat = chat_format("hf", tokenizer, ours_dir)
    assert isinstance(chat, TemplateChat)

    ids, trainable = chat.conversation(CONVERSATION)
    assert ids == _ids(hf.apply_chat_template(CONVERSATION, tokenize=True))
    trained_text = tokenizer.decode([i for i, t in zip(ids, trainable) if t])
    assert trained_text == "return a + b<|endoftext|>\nGrüße, naïve café 日本語 🎉<|endoftext|>\n"
    assert ids != encode_chat(tokenizer, CONVERSATION)[0]

    (tmp_path / "sft.jsonl").write_text(json.dumps({"messages": CONVERSATION}) + "\n")
    sft = SFTDataset(tmp_path / "sft.jsonl", tokenizer, 200, chat)
    assert sft[0]["tokens"][: len(ids) - 1].tolist() == ids[:-1]
    pair = {"messages": CONVERSATION[:4], "chosen": "yes", "rejected": "no"}
    (tmp_path / "pairs.jsonl").write_text(json.dumps(pair) + "\n")
    pairs = PreferenceDataset(tmp_path / "pairs.jsonl", tokenizer, 200, chat)
    prompt = _ids(hf.apply_chat_template(CONVERSATION[:4], tokenize=True, add_generation_prompt=True))
    chosen = _ids(hf.apply_chat_template(CONVERSATION[:4] + [{"role": "assistant", "content": "yes"}], tokenize=True))
    assert chosen[: len(prompt)] == prompt
    assert pairs[0]["chosen_tokens"][: len(chosen)].tolist() == chosen and pairs[0]["chosen_last"] == len(chosen) - 1
    assert (pairs[0]["chosen_labels"][: len(prompt) - 1] == -100).all()
    assert pairs[0]["chosen_labels"][len(prompt) - 1] == chosen[len(prompt)]
    prompts = PromptDataset(tmp_path / "pairs.jsonl", tokenizer, 200, chat)
    assert prompts[0] == prompt


def test_template_from_an_older_tokenizer_config_and_the_config_field(tmp_path, bytelevel_dir):
    shutil.copytree(bytelevel_dir, tmp_path / "tok")
    config_path = tmp_path / "tok" / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config_path.write_text(json.dumps({**config, "chat_template": [{"name": "default", "template": CHATML}]}))
    tokenizer = load_tokenizer(tmp_path / "tok")
    assert isinstance(chat_format("hf", tokenizer, tmp_path / "tok"), TemplateChat)
    assert load_config(None, ["rlhf.chat_template=hf"]).rlhf.chat_template == "hf"
    with pytest.raises(ConfigError, match=r"rlhf.chat_template='jinja' is not one of native, hf"):
        load_config(None, ["rlhf.chat_template=jinja"])


def test_template_errors_say_what_to_change(tmp_path, bytelevel_dir):
    tokenizer = load_tokenizer(bytelevel_dir)
    with pytest.raises(ChatTemplateError, match=r"rlhf.chat_template=hf renders with the tokenizer's Hugging Face chat "
                                                r"template, but .* has none .*use rlhf.chat_template=native"):
        chat_format("hf", tokenizer, bytelevel_dir)
    with pytest.raises(ChatTemplateError, match=r"the chat template is not valid Jinja: .*line 1"):
        TemplateChat(tokenizer, "{% for m in messages %}")
    newest_first = "{% for message in messages | reverse %}{{ message['content'] }}{% endfor %}"
    (tmp_path / "sft.jsonl").write_text(json.dumps({"messages": CONVERSATION}) + "\n")
    with pytest.raises(RLHFDataError, match=r"sft.jsonl:1: the chat template renders the conversation up to message 2 "
                                            r"as something other than the beginning"):
        SFTDataset(tmp_path / "sft.jsonl", tokenizer, 200, TemplateChat(tokenizer, newest_first))
    refusing = "{{ raise_exception('system messages are not supported') }}"
    with pytest.raises(RLHFDataError, match=r"sft.jsonl:1: the chat template cannot render this conversation: "
                                            r"system messages are not supported"):
        SFTDataset(tmp_path / "sft.jsonl", tokenizer, 200, TemplateChat(tokenizer, refusing))


def test_a_converted_model_fine_tunes_on_its_own_template_and_exports_it_again(tmp_path, bytelevel_dir):
    """The user's path: a Qwen2 model with a ChatML-style template -> our checkpoint -> SFT rendered
    with the template (rlhf.chat_template=hf) -> Hugging Face again, template included."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from megatron_lite.convert import convert_from_hf, convert_to_hf
    from megatron_lite.rlhf.sft import SFTTask
    from megatron_lite.training.checkpoint import resolve_checkpoint_dir
    from megatron_lite.training.trainer import Trainer

    hf, hf_dir = _hf_dir_with_template(tmp_path, bytelevel_dir, CHATML)
    torch.manual_seed(0)
    Qwen2ForCausalLM(Qwen2Config(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                 tie_word_embeddings=True)).save_pretrained(hf_dir)
    ckpt = convert_from_hf(hf_dir, tmp_path / "ckpt", make_vocab_size_divisible_by=16)
    records = tmp_path / "sft.jsonl"
    records.write_text("".join(json.dumps({"messages": CONVERSATION[:3 + i % 2 * 2]}) + "\n" for i in range(8)))
    cfg = load_config(None, [
        *(f"model.{k}={v}" for k, v in _converted_model(ckpt).items()), "model.seq_length=64",
        f"data.tokenizer={ckpt / 'tokenizer'}", f"rlhf.data={records}", "rlhf.chat_template=hf",
        "rlhf.valid_fraction=0", "train.eval_interval=0", "train.micro_batch_size=2", "train.global_batch_size=4",
        "train.max_steps=2", "train.device=cpu", f"checkpoint.load={ckpt}", "checkpoint.finetune=true",
        f"checkpoint.save={tmp_path / 'sft'}", f"log.dir={tmp_path / 'log'}", "log.tensorboard=false"])
    trainer = Trainer(cfg, task=SFTTask)
    sample = trainer.task.records[0]
    expected = _ids(hf.apply_chat_template(CONVERSATION[:3], tokenize=True))
    assert sample["tokens"][: len(expected) - 1].tolist() == expected[:-1]
    assert trainer.train().steps == 2

    out = convert_to_hf(resolve_checkpoint_dir(tmp_path / "sft"), tmp_path / "exported-again")
    assert AutoTokenizer.from_pretrained(out).chat_template == CHATML
    _generate_chat_renders_with_the_runs_template(tmp_path / "sft", hf)


def _generate_chat_renders_with_the_runs_template(ckpt, hf) -> None:
    """``generate --chat`` prompts the fine-tuned model as its run rendered the data."""
    from megatron_lite.inference import generate_text, single_device_model
    from megatron_lite.model.generation import generate
    from megatron_lite.training.checkpoint import load_full_state_dict

    state, manifest = load_full_state_dict(ckpt)
    model = single_device_model(manifest.model_config(), state, "cpu")
    prompt = _ids(hf.apply_chat_template([{"role": "user", "content": "hello"}], tokenize=True,
                                         add_generation_prompt=True))
    expected = generate(model, [prompt], 4, temperature=0, eod_id=hf.eos_token_id)[0]
    assert generate_text(ckpt, ["hello"], 4, temperature=0, device="cpu", chat=True) == [hf.decode(expected)]


def _converted_model(ckpt) -> dict:
    """The converted model's fields as overrides (the stage config names the model it fine-tunes)."""
    from megatron_lite.training.checkpoint import read_manifest

    model = read_manifest(ckpt).model_config()
    return {"flavor": model.flavor, "num_layers": model.num_layers, "hidden_size": model.hidden_size,
            "num_heads": model.num_heads, "num_kv_heads": model.num_kv_heads, "ffn_hidden_size": model.ffn_hidden_size,
            "vocab_size": model.vocab_size, "tie_embeddings": model.tie_embeddings, "norm_eps": model.norm_eps,
            "rope_theta": model.rope_theta, "make_vocab_size_divisible_by": model.make_vocab_size_divisible_by}
