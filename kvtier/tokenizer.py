"""The engine's tokenizer: an HF checkpoint's ``tokenizer.json`` through ``tokenizers``, plus its chat template.

Token ids must equal what ``transformers.AutoTokenizer`` gives for the same folder, since models were trained
on those ids. transformers (v5) takes special-token insertion from ``tokenizer.json``'s post-processor alone
(it drops ``add_bos_token`` / ``add_eos_token`` from ``tokenizer_config.json`` when a ``tokenizer.json`` exists),
so ``encode`` is the ``tokenizers`` encode with nothing added. Decoding also goes straight to ``tokenizers``:
transformers skips its ``clean_up_tokenization_spaces`` pass for BPE models, which Llama-family tokenizers are.

Also here: the incremental detokenizer for streaming (it never emits half a UTF-8 character) and the stop-string
search that runs on its output.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
from jinja2 import nodes
from jinja2.ext import Extension, loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer as HFTokenizer

from kvtier.errors import InvalidArgumentError, ModelNotFoundError

# The named special tokens transformers passes to chat templates (its SPECIAL_TOKENS_ATTRIBUTES)
_SPECIAL_TOKEN_KEYS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
_REPLACEMENT_CHAR = "\ufffd"


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def _token_content(value: Any) -> str | None:
    """tokenizer_config writes a special token as a string or as an AddedToken dict with ``content``."""
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


def _id_set(value: Any) -> set[int]:
    """``eos_token_id`` in config files is absent, one int, or a list of ints."""
    if value is None:
        return set()
    return set(value) if isinstance(value, list) else {value}


def _default_chat_template(path: Path, config: dict[str, Any]) -> str | None:
    """The template transformers would use: ``chat_template.jinja`` wins over tokenizer_config's entry.

    A list of named templates in tokenizer_config only yields one when it has a template named ``default``.
    """
    jinja_file = path / "chat_template.jinja"
    if jinja_file.is_file():
        return jinja_file.read_text(encoding="utf-8")
    template = config.get("chat_template")
    if isinstance(template, list):
        return next((t["template"] for t in template if t.get("name") == "default"), None)
    return template if isinstance(template, str) else None


class _GenerationTag(Extension):
    """Accept ``{% generation %}...{% endgeneration %}`` (transformers' assistant-mask marker) and render its body as is."""

    tags = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return nodes.Scope(body, lineno=lineno)


def _raise_exception(message: str) -> None:
    """Templates call this to reject a conversation (e.g. roles that do not alternate)."""
    raise InvalidArgumentError("messages", f"rejected by the chat template: {message}")


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None, separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
    """Plain ``json.dumps``, as transformers provides: jinja's own ``tojson`` HTML-escapes, which would change the prompt."""
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def _compile_template(source: str) -> jinja2.Template:
    """Sandboxed, with the whitespace rules and helpers that transformers' chat templates are written against."""
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols, _GenerationTag])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env.from_string(source)


class Tokenizer:
    """Encode, decode and chat-format text exactly as transformers does for the same checkpoint folder."""

    def __init__(self, backend: HFTokenizer, special_tokens: dict[str, str], eos_token_ids: set[int], chat_template: str | None) -> None:
        self._backend = backend
        self.special_tokens = special_tokens  # e.g. {"bos_token": "<s>", ...}: what the chat template sees
        self.bos_token: str | None = special_tokens.get("bos_token")
        self.eos_token: str | None = special_tokens.get("eos_token")
        self.bos_token_id: int | None = backend.token_to_id(self.bos_token) if self.bos_token is not None else None
        self.eos_token_ids: set[int] = set(eos_token_ids)
        self.chat_template = chat_template
        self._compiled: jinja2.Template | None = None

    @classmethod
    def from_pretrained(cls, path: str | Path) -> Tokenizer:
        """Load from an HF checkpoint folder.

        EOS ids are the union of tokenizer_config's ``eos_token`` and the ``eos_token_id`` of
        ``generation_config.json`` and ``config.json``: chat models often end turns with a token that only one
        of them names (Llama 3's ``<|eot_id|>``), and generation must stop on any of them.
        """
        path = Path(path)
        tokenizer_file = path / "tokenizer.json"
        if not path.is_dir():
            raise ModelNotFoundError(f"tokenizer: folder {str(path)!r} does not exist (expected an HF checkpoint folder with tokenizer.json)")
        if not tokenizer_file.is_file():
            raise ModelNotFoundError(f"tokenizer: no tokenizer.json in {str(path)!r} (kvtier reads fast-tokenizer files only)")
        backend = HFTokenizer.from_file(str(tokenizer_file))
        config = _read_json(path / "tokenizer_config.json")
        special = {k: v for k in _SPECIAL_TOKEN_KEYS if (v := _token_content(config.get(k))) is not None}
        eos_ids = _id_set(_read_json(path / "generation_config.json").get("eos_token_id")) | _id_set(_read_json(path / "config.json").get("eos_token_id"))
        if "eos_token" in special and (eos := backend.token_to_id(special["eos_token"])) is not None:
            eos_ids.add(eos)
        return cls(backend, special, eos_ids, _default_chat_template(path, config))

    @property
    def vocab_size(self) -> int:
        """Number of token ids, added tokens included (transformers' ``len(tokenizer)``)."""
        return self._backend.get_vocab_size(with_added_tokens=True)

    def id_to_token(self, token_id: int) -> str | None:
        """The vocabulary entry of ``token_id`` (byte-level form, e.g. ``Ġthe``), None if out of range."""
        return self._backend.id_to_token(token_id)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of ``text``; ``add_special_tokens`` applies tokenizer.json's post-processor (e.g. a leading BOS)."""
        return self._backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """Text of ``ids``; ``skip_special_tokens`` drops special tokens such as ``</s>``, as transformers does."""
        return self._backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True) -> str:
        """Render a conversation to prompt text with the checkpoint's chat template, as transformers renders it.

        The result already holds the template's special tokens, so encode it with ``add_special_tokens=False``.
        """
        if self.chat_template is None:
            raise InvalidArgumentError(
                "chat_template",
                "this checkpoint has no default chat template (none in tokenizer_config.json or chat_template.jinja); "
                "send a plain prompt instead of messages",
            )
        if not isinstance(messages, list) or not messages:
            raise InvalidArgumentError("messages", f"must be a non-empty list of {{'role': str, 'content': str}} dicts, got {messages!r}")
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
                raise InvalidArgumentError("messages", f"message {i} must be a dict with string 'role' and 'content', got {m!r}")
        if self._compiled is None:
            self._compiled = _compile_template(self.chat_template)
        # tools/documents are passed as None (not left undefined) because templates test `tools is not none`
        return self._compiled.render(
            messages=messages, add_generation_prompt=add_generation_prompt, tools=None, documents=None, **self.special_tokens
        )


class IncrementalDetokenizer:
    """Output text of a growing token list, released only as whole characters.

    Byte-level BPE can split one UTF-8 character over several tokens; decoding such a prefix ends in U+FFFD.
    Each step decodes only a short window ``ids[prefix_offset:]``; the window's text up to ``read_offset`` was
    already emitted, so whatever the new tokens add beyond it is the delta, released once it no longer ends in
    U+FFFD. The window starts inside the prompt's last tokens, so tokenizers whose decoding depends on the
    preceding token (SentencePiece dropping a leading space at the start of a text) give the in-context text.
    """

    CONTEXT_TOKENS = 5  # prompt tokens kept as decoding context

    def __init__(self, tokenizer: Tokenizer, prompt_token_ids: Sequence[int], skip_special_tokens: bool = True) -> None:
        self._tokenizer = tokenizer
        self._skip_special_tokens = skip_special_tokens
        context = list(prompt_token_ids)[-self.CONTEXT_TOKENS :]
        # a prompt ending mid-character would glue its bytes to the output's: then decode without context
        if tokenizer.decode(context, skip_special_tokens).endswith(_REPLACEMENT_CHAR):
            context = []
        self._ids: list[int] = context
        self._prefix_offset = 0
        self._read_offset = len(self._ids)
        self.text = ""  # all output text emitted so far

    def append(self, token_id: int) -> str:
        """Add one generated token; return the text it completes ("" while a character is still partial)."""
        self._ids.append(token_id)
        decode = self._tokenizer.decode
        emitted = decode(self._ids[self._prefix_offset : self._read_offset], self._skip_special_tokens)
        window = decode(self._ids[self._prefix_offset :], self._skip_special_tokens)
        if len(window) <= len(emitted) or window.endswith(_REPLACEMENT_CHAR):
            return ""
        delta = window[len(emitted) :]
        self._prefix_offset, self._read_offset = self._read_offset, len(self._ids)
        self.text += delta
        return delta


def find_stop(text: str, stops: Sequence[str], new_text_len: int) -> int | None:
    """Index in ``text`` where the earliest stop string starts, or None.

    Only the tail where a stop could newly appear is searched: one that ends inside the last ``new_text_len``
    characters starts at most ``len(stop) - 1`` characters before them. Earlier text was searched on earlier calls.
    """
    if not stops or new_text_len <= 0:
        return None
    start = max(0, len(text) - new_text_len - max(len(s) for s in stops) + 1)
    hits = [i for i in (text.find(s, start) for s in stops) if i != -1]
    return min(hits) if hits else None
