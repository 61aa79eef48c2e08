"""The engine's tokenizer: an HF checkpoint's ``tokenizer.json`` through ``tokenizers``, plus its chat template.

Also the incremental detokenizer used for streaming and stop strings: it emits text only once
the bytes of a character are complete, so byte-level BPE never streams a half character.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer as HFTokenizer

from kvtier.errors import InvalidArgumentError, ModelNotFoundError


def _token_text(value: Any) -> str | None:
    if isinstance(value, dict):
        return value.get("content")
    return value


def _ids(value: Any) -> set[int]:
    if value is None:
        return set()
    return set(value) if isinstance(value, list) else {value}


class Tokenizer:
    def __init__(self, tok: HFTokenizer, config: dict[str, Any], eos_ids: set[int], chat_template: str | None) -> None:
        self._tok = tok
        self.bos_token = _token_text(config.get("bos_token"))
        self.eos_token = _token_text(config.get("eos_token"))
        self.bos_token_id = tok.token_to_id(self.bos_token) if self.bos_token else None
        eos_from_config = tok.token_to_id(self.eos_token) if self.eos_token else None
        self.eos_token_ids: set[int] = eos_ids | ({eos_from_config} if eos_from_config is not None else set())
        self.chat_template = chat_template
        # prepend BOS ourselves only when tokenizer.json has no post-processor doing it
        self._add_bos = bool(config.get("add_bos_token")) and tok.post_processor is None and self.bos_token_id is not None
        self._template: jinja2.Template | None = None

    @classmethod
    def from_pretrained(cls, path: str | Path) -> "Tokenizer":
        path = Path(path)
        tj = path / "tokenizer.json"
        if not tj.is_file():
            raise ModelNotFoundError(f"tokenizer: no tokenizer.json in {path}")
        config = _read_json(path / "tokenizer_config.json")
        template = config.get("chat_template")
        if isinstance(template, list):
            template = next((t["template"] for t in template if t.get("name") == "default"), template[0]["template"] if template else None)
        jinja_file = path / "chat_template.jinja"
        if template is None and jinja_file.is_file():
            template = jinja_file.read_text()
        eos = _ids(_read_json(path / "generation_config.json").get("eos_token_id")) | _ids(_read_json(path / "config.json").get("eos_token_id"))
        return cls(HFTokenizer.from_file(str(tj)), config, eos, template)

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def id_to_token(self, token_id: int) -> str | None:
        return self._tok.id_to_token(token_id)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids = self._tok.encode(text, add_special_tokens=add_special_tokens).ids
        if add_special_tokens and self._add_bos:
            ids = [self.bos_token_id, *ids]
        return ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """Render a conversation as transformers does (trim_blocks, lstrip_blocks, sandboxed)."""
        if self.chat_template is None:
            raise InvalidArgumentError("chat_template", "this checkpoint's tokenizer_config.json has no chat_template; use generate() with a plain prompt")
        if not isinstance(messages, list) or not messages or not all(isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in messages):
            raise InvalidArgumentError("messages", "must be a non-empty list of {'role': str, 'content': str} dicts")
        if self._template is None:
            env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
            env.globals["raise_exception"] = _raise
            self._template = env.from_string(self.chat_template)
        return self._template.render(messages=messages, bos_token=self.bos_token or "", eos_token=self.eos_token or "", add_generation_prompt=add_generation_prompt)


def _raise(message: str) -> None:
    raise InvalidArgumentError("messages", message)


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.is_file() else {}


class IncrementalDetokenizer:
    """Text of a growing token list, released one complete character run at a time.

    Decodes only a short window (from ``prefix_offset``) each step: the window's text before
    ``read_offset`` was already emitted, so the delta is what the new token completed.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True) -> None:
        self.tokenizer = tokenizer
        self.skip = skip_special_tokens
        self.ids: list[int] = []
        self.prefix_offset = 0
        self.read_offset = 0
        self.text = ""

    def append(self, token_id: int) -> str:
        self.ids.append(token_id)
        before = self.tokenizer.decode(self.ids[self.prefix_offset : self.read_offset], self.skip)
        now = self.tokenizer.decode(self.ids[self.prefix_offset :], self.skip)
        if len(now) > len(before) and not now.endswith("\ufffd"):
            delta = now[len(before) :]
            self.prefix_offset = self.read_offset
            self.read_offset = len(self.ids)
            self.text += delta
            return delta
        return ""


def find_stop(text: str, stops: Sequence[str], new_text_len: int) -> int | None:
    """Where the earliest stop string starts, looking only where the last ``new_text_len`` characters could complete one."""
    if not stops:
        return None
    start = max(0, len(text) - new_text_len - max(len(s) for s in stops) + 1)
    hits = [i for i in (text.find(s, start) for s in stops) if i != -1]
    return min(hits) if hits else None
