"""The edge's tokenizer without transformers: `tokenizers` for the vocabulary, jinja2 for the chat template.

It reads what `save_pretrained` writes (tokenizer.json, tokenizer_config.json, chat_template.jinja) and gives the
same ids as transformers: the chat template is rendered the way `apply_chat_template` renders it (a sandboxed
jinja2 environment with trim_blocks/lstrip_blocks, `raise_exception`, `strftime_now`, a `tojson` that does not
escape HTML, the named special tokens as variables), then tokenized without adding special tokens.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from datetime import datetime
from functools import cached_property
from pathlib import Path
from typing import Any

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer

from offramp.shared.errors import ArtifactError, OfframpError

TOKENIZER_FILE = "tokenizer.json"
CONFIG_FILE = "tokenizer_config.json"
TEMPLATE_FILE = "chat_template.jinja"
SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


def _byte_level_symbols() -> dict[str, int]:
    """GPT-2's byte-level alphabet, symbol -> byte: printable bytes stand for themselves, the others are shifted
    past 255 (so a space is 'Ġ')."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    shifted = [b for b in range(256) if b not in printable]
    return {**{chr(b): b for b in printable}, **{chr(256 + i): b for i, b in enumerate(shifted)}}


_BYTE_OF_SYMBOL = _byte_level_symbols()


class ChatTemplateError(OfframpError, ValueError):
    """The messages cannot be rendered: no chat template, or the template refused them (`raise_exception`)."""


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None, sort_keys: bool = False) -> str:
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def _token_text(value: Any) -> str | None:
    """A special token in tokenizer_config.json is a string or an AddedToken dict with `content`."""
    if isinstance(value, Mapping):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _plain(value: Any) -> Any:
    """Messages rebuilt from plain JSON types, keys whose value is None dropped (as transformers normalizes them)."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items() if v is not None}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    return str(value)


class EdgeTokenizer:
    """Encode prompts, render chat templates and decode tokens like the model's transformers tokenizer."""

    def __init__(self, tokenizer: Tokenizer, config: dict[str, Any], chat_template: str | None) -> None:
        self.backend = tokenizer
        self.config = config
        self.chat_template = chat_template
        self.special_tokens_map = {name: text for name in SPECIAL_TOKEN_NAMES if (text := _token_text(config.get(name))) is not None}
        eos = self.special_tokens_map.get("eos_token")
        self.eos_token_id: int | None = tokenizer.token_to_id(eos) if eos is not None else None
        self.clean_up_tokenization_spaces = bool(config.get("clean_up_tokenization_spaces", False))

    @classmethod
    def from_dir(cls, path: Path | str) -> "EdgeTokenizer":
        """Load what `save_pretrained` wrote into `path`; ArtifactError if tokenizer.json is missing or broken."""
        path = Path(path)
        if not (path / TOKENIZER_FILE).is_file():
            raise ArtifactError(f"no {TOKENIZER_FILE} in {path}: the edge needs the fast tokenizer's file (export the edge directory again)")
        try:
            tokenizer = Tokenizer.from_file(str(path / TOKENIZER_FILE))
        except Exception as exc:  # tokenizers raises plain Exception subclasses for a bad file
            raise ArtifactError(f"{path / TOKENIZER_FILE} does not load: {exc}") from exc
        config: dict[str, Any] = {}
        if (path / CONFIG_FILE).is_file():
            try:
                config = json.loads((path / CONFIG_FILE).read_text())
            except json.JSONDecodeError as exc:
                raise ArtifactError(f"{path / CONFIG_FILE} is not valid JSON: {exc}") from exc
        template = (path / TEMPLATE_FILE).read_text() if (path / TEMPLATE_FILE).is_file() else config.get("chat_template")
        if isinstance(template, list):  # several named templates: the default one
            template = next((t.get("template") for t in template if t.get("name") == "default"), None)
        return cls(tokenizer, config, template if isinstance(template, str) else None)

    # -- text -> ids ------------------------------------------------------------------------------------

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Plain text; `add_special_tokens` applies the tokenizer's post-processor (BOS where the model has one)."""
        return list(self.backend.encode(text, add_special_tokens=add_special_tokens).ids)

    def render_chat(self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True, **kwargs: Any) -> str:
        """The chat template applied to `messages` (what transformers' apply_chat_template renders)."""
        if self.chat_template is None:
            raise ChatTemplateError("this model's tokenizer has no chat template; send a plain prompt instead of messages")
        if not messages:
            raise ChatTemplateError("cannot apply the chat template to an empty conversation: send at least one message")
        variables = {**self.special_tokens_map, **kwargs}
        try:
            return self._template.render(messages=_plain(list(messages)), tools=None, documents=None,
                                         add_generation_prompt=add_generation_prompt, **variables)
        except jinja2.exceptions.TemplateError as exc:
            raise ChatTemplateError(f"the model's chat template refused these messages: {exc}") from exc

    def encode_chat(self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True) -> list[int]:
        """Messages through the chat template, tokenized without adding special tokens (the template has them)."""
        return self.encode(self.render_chat(messages, add_generation_prompt), add_special_tokens=False)

    @cached_property
    def _template(self) -> jinja2.Template:
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
        env.filters["tojson"] = _tojson
        env.globals["raise_exception"] = _raise_exception
        env.globals["strftime_now"] = _strftime_now
        assert self.chat_template is not None
        try:
            return env.from_string(self.chat_template)
        except jinja2.exceptions.TemplateSyntaxError as exc:
            raise ChatTemplateError(f"the model's chat template does not parse: {exc}") from exc

    # -- ids -> text ------------------------------------------------------------------------------------

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        text = self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)
        if self.clean_up_tokenization_spaces and type(self.backend.model).__name__ != "BPE":
            for before, after in ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"),
                                  (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re")):
                text = text.replace(before, after)
        return text

    def token_bytes(self, token_id: int) -> bytes:
        """One token's own bytes (what OpenAI's logprobs report): a byte-level BPE token may hold part of a UTF-8
        character, which decoding it alone would turn into U+FFFD, so its symbols are mapped back to bytes."""
        piece = self.backend.id_to_token(token_id)
        if piece is None:
            raise ValueError(f"token id {token_id} is outside the vocabulary ({self.backend.get_vocab_size(True)} tokens)")
        if self._byte_level and token_id not in self._added_ids and all(ch in _BYTE_OF_SYMBOL for ch in piece):
            return bytes(_BYTE_OF_SYMBOL[ch] for ch in piece)
        return self.backend.decode([token_id], skip_special_tokens=False).encode("utf-8")

    @cached_property
    def _byte_level(self) -> bool:
        return type(self.backend.decoder).__name__ == "ByteLevel"

    @cached_property
    def _added_ids(self) -> frozenset[int]:
        """Added (special) tokens are stored as their text, not in the byte-level alphabet."""
        return frozenset(self.backend.get_added_tokens_decoder())

    def get_vocab(self) -> dict[str, int]:
        return self.backend.get_vocab(with_added_tokens=True)

    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)
