"""The edge's tokenizer (tokenizers + jinja2, no transformers) gives transformers' ids, text and special tokens."""

from __future__ import annotations

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from offramp.edge.tokenizer import ChatTemplateError, EdgeTokenizer
from offramp.shared.tokens import stop_token_ids
from tests.conftest import save_tiny_checkpoint

CONVERSATIONS = [
    [{"role": "user", "content": "What is gravity?"}],
    [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "Hi"}],
    [{"role": "user", "content": "Ünïcödé, emoji 😀, <b>html</b> & \"quotes\""}, {"role": "assistant", "content": "ok"},
     {"role": "user", "content": "again\n\nwith  spaces\tand tabs"}],
    [{"role": "user", "content": ""}],
    [{"role": "user", "content": "<|im_end|> a special token typed by the user"}],
]
PROMPTS = ["The capital of France is", "  leading spaces\n\nand newlines", "日本語のテキスト", "", "<|im_start|>x"]


def pair(tokenizer, tmp_path) -> tuple[object, EdgeTokenizer]:
    """The transformers tokenizer as saved by export, reloaded, and the edge's over the same files."""
    tokenizer.save_pretrained(tmp_path)
    return AutoTokenizer.from_pretrained(tmp_path), EdgeTokenizer.from_dir(tmp_path)


def chat_ids(hf, messages, add_generation_prompt=True) -> list[int]:
    ids = hf.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=True)
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)


@pytest.mark.slow
def test_default_model_ids_and_text_equal_transformers(default_model, tmp_path) -> None:
    hf, edge = pair(default_model[1], tmp_path)
    for messages in CONVERSATIONS:
        for gen in (True, False):
            assert edge.encode_chat(messages, add_generation_prompt=gen) == chat_ids(hf, messages, gen), messages
    for text in PROMPTS:
        ids = edge.encode(text)
        assert ids == list(hf(text, add_special_tokens=True)["input_ids"]), text
        assert edge.decode(ids) == hf.decode(ids, skip_special_tokens=True)
    with_specials = chat_ids(hf, CONVERSATIONS[2])
    assert edge.decode(with_specials) == hf.decode(with_specials, skip_special_tokens=True)
    assert edge.decode(with_specials, skip_special_tokens=False) == hf.decode(with_specials, skip_special_tokens=False)
    assert edge.eos_token_id == hf.eos_token_id and stop_token_ids(edge) == stop_token_ids(hf)


def test_tiny_checkpoint_ids_equal_transformers_and_no_template_is_a_clear_error(tmp_path) -> None:
    checkpoint = save_tiny_checkpoint(tmp_path / "ckpt")
    hf, edge = AutoTokenizer.from_pretrained(checkpoint), EdgeTokenizer.from_dir(checkpoint)
    for text in ("t1 t2 t3", "t5  t9\nt100", "t3 unknown-word t4"):
        assert edge.encode(text) == list(hf(text, add_special_tokens=True)["input_ids"])
        assert edge.decode(edge.encode(text)) == hf.decode(edge.encode(text), skip_special_tokens=True)
    assert edge.eos_token_id is None and stop_token_ids(edge) == stop_token_ids(hf) == ()
    with pytest.raises(ChatTemplateError, match="no chat template"):
        edge.encode_chat([{"role": "user", "content": "t1"}])
    hf.chat_template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }} {% endfor %}{% if add_generation_prompt %}t7{% endif %}"
    hf2, edge2 = pair(hf, tmp_path / "templated")
    messages = [{"role": "user", "content": "t1 t2"}, {"role": "assistant", "content": "t3"}]
    assert edge2.encode_chat(messages) == chat_ids(hf2, messages)


def test_bos_post_processor_and_template_helpers_match_transformers(tmp_path) -> None:
    vocab = {"<s>": 0, "</s>": 1, "<unk>": 2, **{f"w{i}": 3 + i for i in range(20)}}
    words = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    words.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    words.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    template = (
        "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'tool' %}{{ raise_exception('no tools here') }}{% endif %}"
        "{{ m['content'] }} {{ m | tojson }}{% endfor %}{{ eos_token }}{% if strftime_now('%Y') | length != 4 %}bad{% endif %}"
    )
    hf = PreTrainedTokenizerFast(tokenizer_object=words, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    hf.chat_template = template
    hf, edge = pair(hf, tmp_path)
    assert edge.encode("w1 w2") == list(hf("w1 w2", add_special_tokens=True)["input_ids"]) == [0, 4, 5]
    assert edge.encode("w1 w2", add_special_tokens=False) == [4, 5]
    messages = [{"role": "user", "content": "w3 <b>&</b>"}]
    assert edge.render_chat(messages) == hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert '"w3 <b>&</b>"' in edge.render_chat(messages)  # tojson does not HTML-escape, as transformers' does not
    assert edge.encode_chat(messages) == chat_ids(hf, messages)
    with pytest.raises(ChatTemplateError, match="no tools here"):
        edge.encode_chat([{"role": "tool", "content": "w1"}])
    assert edge.eos_token_id == 1 and stop_token_ids(edge) == (1,)


@pytest.mark.slow
def test_token_bytes_are_each_tokens_own_bytes(default_model, tmp_path) -> None:
    """What OpenAI's logprobs report as a token's bytes: they join into the text's UTF-8 even where one token holds
    part of a character (decoding that token alone gives U+FFFD); special tokens are their text."""
    _, edge = pair(default_model[1], tmp_path)
    for text in ["naïve café — 東京 🚀 done", "  spaces\n\nand\ttabs", "<|im_end|> typed"]:
        ids = edge.encode(text, add_special_tokens=False)
        assert b"".join(edge.token_bytes(i) for i in ids) == text.encode()
    split = [i for i in edge.encode("🚀", add_special_tokens=False) if "\ufffd" in edge.decode([i])]
    assert split and all(b"\xef\xbf\xbd" not in edge.token_bytes(i) for i in split)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        edge.token_bytes(10**7)
