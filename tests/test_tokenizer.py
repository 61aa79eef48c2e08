"""kvtier.tokenizer against transformers' AutoTokenizer on the same folders, plus hand-worked stop-string cases."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import transformers
from hypothesis import given, settings
from hypothesis import strategies as st

from kvtier.errors import InvalidArgumentError, ModelNotFoundError
from kvtier.models.checkpoint_builder import build_random_checkpoint
from kvtier.tokenizer import IncrementalDetokenizer, Tokenizer, find_stop

TEXTS = [
    "",
    "Hello, world!",
    "  leading spaces\n\ttabs and\r\nnewlines  ",
    "def add(a: int, b: int) -> int:\n    return a + b  # sum\n",
    "naïve café – Ünïcödé “quotes”",
    "日本語のテキストと中文字符",
    "emoji 🎉👩‍👩‍👧 flags 🇯🇵 and 🤖!",
    "specials inline: <s> x </s> y <pad>",
]
CONVERSATIONS = [
    [{"role": "user", "content": "Hi there"}],
    [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "2+2? 🤔"},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": "  and 日本?\n"},
    ],
]


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return build_random_checkpoint(
        tmp_path_factory.mktemp("tokckpt"), hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=128, vocab_size=4096,
    )


@pytest.fixture(scope="module")
def tok(folder) -> Tokenizer:
    return Tokenizer.from_pretrained(folder)


@pytest.fixture(scope="module")
def hf(folder):
    return transformers.AutoTokenizer.from_pretrained(folder)


def variant(src: Path, dst: Path, *, config: dict | None = None, drop_config: tuple[str, ...] = (), tokenizer_json: dict | None = None,
            files: dict[str, str] | None = None) -> Path:
    """A copy of ``src`` with tokenizer_config keys changed/dropped, tokenizer.json keys replaced and extra files written."""
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "tokenizer_config.json").read_text())
    cfg.update(config or {})
    for key in drop_config:
        cfg.pop(key, None)
    (dst / "tokenizer_config.json").write_text(json.dumps(cfg))
    if tokenizer_json:
        tj = json.loads((dst / "tokenizer.json").read_text())
        tj.update(tokenizer_json)
        (dst / "tokenizer.json").write_text(json.dumps(tj))
    for name, text in (files or {}).items():
        (dst / name).write_text(text)
    return dst


# --- encode / decode parity -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("text", TEXTS)
def test_encode_matches_transformers(tok, hf, text):
    assert tok.encode(text) == hf(text)["input_ids"]
    assert tok.encode(text, add_special_tokens=False) == hf(text, add_special_tokens=False)["input_ids"]
    assert tok.encode(text)[0] == tok.bos_token_id == 0  # the builder's post-processor prepends <s>


@pytest.mark.parametrize("text", TEXTS)
@pytest.mark.parametrize("skip", [True, False])
def test_decode_matches_transformers(tok, hf, text, skip):
    ids = hf(text)["input_ids"] + [1, 2]  # + </s> <pad>
    assert tok.decode(ids, skip_special_tokens=skip) == hf.decode(ids, skip_special_tokens=skip)
    assert tok.decode(tok.encode(text), skip_special_tokens=True) == text.replace("<s>", "").replace("</s>", "").replace("<pad>", "")


def test_vocab_matches_transformers(tok, hf):
    assert tok.vocab_size == len(hf) == 4096
    for i in (0, 1, 2, 3, 100, 4095):
        assert tok.id_to_token(i) == hf.convert_ids_to_tokens(i)
    assert [tok.id_to_token(i) for i in range(3)] == ["<s>", "</s>", "<pad>"]
    assert tok.id_to_token(4096) is None
    assert tok.bos_token_id == hf.bos_token_id
    assert tok.eos_token_ids == {hf.eos_token_id} == {1}


@pytest.mark.parametrize(
    "name, kwargs",
    [
        # transformers 5 ignores add_bos_token / add_eos_token when tokenizer.json exists: the post-processor alone decides
        ("no_post_processor_add_bos", dict(tokenizer_json={"post_processor": None}, config={"add_bos_token": True})),
        ("no_post_processor_add_eos", dict(tokenizer_json={"post_processor": None}, config={"add_bos_token": True, "add_eos_token": True})),
        ("post_processor_add_bos_false", dict(config={"add_bos_token": False})),
        ("post_processor_no_flags", dict(drop_config=("add_bos_token", "add_eos_token"))),
    ],
)
def test_special_token_insertion_follows_transformers(folder, tmp_path, name, kwargs):
    path = variant(folder, tmp_path / name, **kwargs)
    ours, ref = Tokenizer.from_pretrained(path), transformers.AutoTokenizer.from_pretrained(path)
    for text in TEXTS:
        assert ours.encode(text) == ref(text)["input_ids"], (name, text)


# --- chat template ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("messages", CONVERSATIONS)
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_chat_template_matches_transformers(tok, hf, messages, add_generation_prompt):
    ours = tok.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
    assert ours == hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    assert ours.endswith("<|assistant|>\n") == add_generation_prompt


# A template exercising what real checkpoints use: special-token variables, loop controls, namespace, tojson,
# `tools is none`, whitespace control and transformers' {% generation %} tag.
RICH_TEMPLATE = """{{ bos_token }}
{% set ns = namespace(n=0) %}
{% for m in messages %}
    {% if m['role'] == 'system' %}{% continue %}{% endif %}
    {% set ns.n = ns.n + 1 %}
    {% if m['role'] == 'assistant' %}
        {% generation %}[A{{ ns.n }}] {{ m['content'] | trim }}{{ eos_token }}{% endgeneration %}
    {% else %}
        [{{ m['role'] | upper }}{{ ns.n }}] {{ m['content'] | tojson }}
    {% endif %}
    {%- if loop.last and tools is none %}(no tools){% endif %}
{% endfor %}
{% if add_generation_prompt %}[A]{% endif %}"""


def test_chat_template_jinja_file_wins_and_matches_transformers(folder, tmp_path):
    path = variant(folder, tmp_path / "jinja", files={"chat_template.jinja": RICH_TEMPLATE})
    ours, ref = Tokenizer.from_pretrained(path), transformers.AutoTokenizer.from_pretrained(path)
    for messages in CONVERSATIONS:
        rendered = ours.apply_chat_template(messages)
        assert rendered == ref.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        assert rendered.startswith("<s>") and "(no tools)" in rendered and "<|assistant|>" not in rendered
    assert '"2+2? 🤔"' in ours.apply_chat_template(CONVERSATIONS[1])  # tojson does not escape non-ASCII


def test_chat_template_list_uses_default(folder, tmp_path):
    templates = [{"name": "tool_use", "template": "TOOLS"}, {"name": "default", "template": "{{ messages[0]['content'] }}!"}]
    path = variant(folder, tmp_path / "list", config={"chat_template": templates})
    ours, ref = Tokenizer.from_pretrained(path), transformers.AutoTokenizer.from_pretrained(path)
    assert ours.apply_chat_template(CONVERSATIONS[0]) == ref.apply_chat_template(CONVERSATIONS[0], tokenize=False, add_generation_prompt=True) == "Hi there!"


def test_missing_chat_template_is_invalid_argument(folder, tmp_path):
    path = variant(folder, tmp_path / "none", drop_config=("chat_template",))
    with pytest.raises(InvalidArgumentError) as err:
        Tokenizer.from_pretrained(path).apply_chat_template(CONVERSATIONS[0])
    assert err.value.field == "chat_template" and "no default chat template" in str(err.value)
    with pytest.raises(ValueError):  # transformers refuses too
        transformers.AutoTokenizer.from_pretrained(path).apply_chat_template(CONVERSATIONS[0], tokenize=False)


def test_template_raise_exception_is_invalid_messages(folder, tmp_path):
    template = "{% if messages[0]['role'] != 'user' %}{{ raise_exception('first message must be from the user') }}{% endif %}ok"
    path = variant(folder, tmp_path / "raise", config={"chat_template": template})
    tok = Tokenizer.from_pretrained(path)
    assert tok.apply_chat_template(CONVERSATIONS[0]) == "ok"
    with pytest.raises(InvalidArgumentError) as err:
        tok.apply_chat_template([{"role": "assistant", "content": "x"}])
    assert err.value.field == "messages" and "first message must be from the user" in str(err.value)


@pytest.mark.parametrize(
    "messages",
    [[], "hi", [{"role": "user"}], [{"content": "x"}], ["hi"], [{"role": 1, "content": "x"}], [{"role": "user", "content": None}]],
)
def test_bad_messages_rejected(tok, messages):
    with pytest.raises(InvalidArgumentError) as err:
        tok.apply_chat_template(messages)
    assert err.value.field == "messages"


def test_chat_template_is_sandboxed(folder, tmp_path):
    path = variant(folder, tmp_path / "sandbox", config={"chat_template": "{{ messages.__class__.__mro__ }}"})
    with pytest.raises(Exception, match="unsafe|attribute"):
        Tokenizer.from_pretrained(path).apply_chat_template(CONVERSATIONS[0])


# --- eos resolution and loading errors ----------------------------------------------------------------------------------


def test_eos_ids_union_of_all_sources(folder, tmp_path):
    path = variant(folder, tmp_path / "eos", config={"eos_token": {"content": "<pad>", "special": True}, "bos_token": {"content": "</s>"}})
    (path / "generation_config.json").write_text(json.dumps({"eos_token_id": [1, 7]}))
    (path / "config.json").write_text(json.dumps({**json.loads((path / "config.json").read_text()), "eos_token_id": 9}))
    tok = Tokenizer.from_pretrained(path)
    assert tok.eos_token_ids == {2, 1, 7, 9}  # "<pad>" from tokenizer_config, [1, 7] generation_config, 9 config
    assert tok.bos_token_id == 1 and tok.bos_token == "</s>" and tok.eos_token == "<pad>"


def test_only_tokenizer_json_needed(folder, tmp_path):
    path = tmp_path / "bare"
    path.mkdir()
    shutil.copy(folder / "tokenizer.json", path / "tokenizer.json")
    tok = Tokenizer.from_pretrained(path)
    assert tok.eos_token_ids == set() and tok.bos_token_id is None and tok.chat_template is None
    assert tok.encode("hi")[0] == 0  # the post-processor still adds <s>


def test_missing_folder_and_file_errors(tmp_path):
    with pytest.raises(ModelNotFoundError) as err:
        Tokenizer.from_pretrained(tmp_path / "nope")
    assert str(tmp_path / "nope") in str(err.value) and "tokenizer.json" in str(err.value)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelNotFoundError) as err:
        Tokenizer.from_pretrained(tmp_path / "empty")
    assert str(tmp_path / "empty") in str(err.value) and "tokenizer.json" in str(err.value)


# --- incremental detokenizer ------------------------------------------------------------------------------------------

# Printable text heavy in multi-byte characters; U+FFFD itself is excluded since the detokenizer reads it as "incomplete".
unicode_text = st.text(
    alphabet=st.one_of(
        st.characters(blacklist_categories=("Cs",), blacklist_characters="\ufffd"),
        st.sampled_from("日本語中文한국어éüß€😀🎉👩‍👧🇯🇵 \n\t"),
    ),
    max_size=40,
)


def stream(tok: Tokenizer, prompt: list[int], ids: list[int], skip: bool) -> tuple[IncrementalDetokenizer, list[str]]:
    detok = IncrementalDetokenizer(tok, prompt, skip)
    return detok, [detok.append(t) for t in ids]


@settings(max_examples=150, deadline=None)
@given(prompt_text=unicode_text, text=unicode_text, skip=st.booleans())
def test_detokenizer_streams_whole_characters(tok, prompt_text, text, skip):
    prompt, ids = tok.encode(prompt_text), tok.encode(text, add_special_tokens=False)
    detok = IncrementalDetokenizer(tok, prompt, skip)
    for k, token in enumerate(ids, 1):
        delta = detok.append(token)
        assert "\ufffd" not in delta
        so_far = tok.decode(ids[:k], skip)
        if not so_far.endswith("\ufffd"):  # the prefix ends on a whole character: everything is out
            assert detok.text == so_far
        else:
            assert so_far.startswith(detok.text)
    assert detok.text == tok.decode(ids, skip)
    assert tok.decode(ids, skip_special_tokens=False) == text  # text spelling a special token ("<pad>") is skipped only when asked


@settings(max_examples=150, deadline=None)
@given(prompt=st.lists(st.integers(0, 4095), max_size=8), ids=st.lists(st.integers(0, 4095), max_size=30), skip=st.booleans())
def test_detokenizer_random_ids_concatenate_to_decode(tok, prompt, ids, skip):
    ids = ids + tok.encode("a", add_special_tokens=False)  # end on a whole character
    detok, deltas = stream(tok, prompt, ids, skip)
    assert "".join(deltas) == detok.text == tok.decode(ids, skip)


def test_detokenizer_holds_split_character(tok):
    ids = tok.encode("🎉", add_special_tokens=False)
    assert len(ids) == 4  # four bytes, none merged in the ASCII-trained vocabulary
    detok, deltas = stream(tok, [], ids, True)
    assert deltas == ["", "", "", "🎉"]


def test_detokenizer_decodes_in_prompt_context(tmp_path):
    """SentencePiece-style decoders drop the word-start space of a text's first token; mid-text it is a real space."""
    from tokenizers import Tokenizer as Backend
    from tokenizers import decoders, models, pre_tokenizers

    backend = Backend(models.WordLevel({"<unk>": 0, "▁Hello": 1, "▁big": 2, "▁world": 3}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="always")
    backend.decoder = decoders.Metaspace(prepend_scheme="always")
    backend.save(str(tmp_path / "tokenizer.json"))
    tok = Tokenizer.from_pretrained(tmp_path)
    prompt, out = tok.encode("Hello"), tok.encode(" big world", add_special_tokens=False)
    assert (prompt, out) == ([1], [2, 3]) and tok.decode(out) == "big world"
    detok, deltas = stream(tok, prompt, out, True)
    assert deltas == [" big", " world"]
    assert detok.text == tok.decode(prompt + out)[len(tok.decode(prompt)) :]


# --- find_stop ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, stops, new_len, expected",
    [
        ("hello world", ["wor"], 5, 6),  # inside the new text
        ("abcSTOP", ["STOP"], 2, 3),  # started in old text, completed by the new "OP"
        ("xxSTOP", ["STOP"], 1, 2),  # the furthest back a 4-char stop can start when 1 char is new
        ("STOPxxxxx", ["STOP"], 1, None),  # wholly in old text: already searched earlier
        ("a<end>b</s>", ["</s>", "<end>"], 11, 1),  # the earliest of several wins, not the first listed
        ("xxabc", ["bc", "abc"], 1, 2),  # overlapping stops: the one starting first
        ("no stop here", ["STOP"], 12, None),
        ("anything", [], 8, None),
        ("STOP", ["STOP"], 0, None),  # nothing new, nothing to find
    ],
)
def test_find_stop(text, stops, new_len, expected):
    assert find_stop(text, stops, new_len) == expected
