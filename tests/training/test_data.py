"""Training rows: a stage's own retrieval mix decides which documents its rows hold, every document carries
the answer it asks for, and a mix that cannot generate documents is refused by name."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from tokenizers import Tokenizer

from kvtier.errors import InvalidArgumentError
from kvtier.training.bpe import EOS_ID
from kvtier.training.data import BatchMaker, RetrievalMix
from kvtier.training.recipes import KVTIER_TINY, KVTIER_TINY_HYBRID

TOKENIZER = Path(__file__).resolve().parents[2] / "kvtier" / "embedded" / "kvtier-tiny" / "tokenizer.json"
NEEDLE = re.compile(r"The special magic number for (\S+) is (\d+)\.")
QUESTION = re.compile(r"\nWhat is the special magic number for (\S+)\? The special magic number for \1 is (\d+)\.")


def _documents(min_tokens: int, rows: int = 6, seq_len: int = 1024, followups: bool = False) -> list[list[int]]:
    """The EOS-terminated documents of ``rows`` rows drawn from a multi-key-only mix."""
    tok = Tokenizer.from_file(str(TOKENIZER))
    maker = BatchMaker(tok, np.arange(3, 4000, dtype=np.int32), seed=5)
    mix = RetrievalMix(retrieval_fraction=1.0, copy_fraction=0.0, passkey=0.0, multikey=1.0, vartrack=0.0, min_tokens=min_tokens,
                       followups=followups)
    docs = []
    for _ in range(rows):
        row = maker.row(seq_len, mix)
        assert len(row) == seq_len
        ends = [i for i, t in enumerate(row) if t == EOS_ID]
        docs += [row[start + 1:end] for start, end in zip([-1] + ends, ends)]
    return docs


@pytest.mark.parametrize("min_tokens, followups", [(128, False), (400, False), (128, True)])
def test_every_document_answers_its_questions_with_the_hidden_values(min_tokens, followups):
    tok = Tokenizer.from_file(str(TOKENIZER))
    docs = _documents(min_tokens, followups=followups)
    assert docs
    asked = 0
    for doc in docs:
        text = tok.decode(doc)
        haystack, _, tail = text.partition("\nWhat is")
        needles = dict(NEEDLE.findall(haystack))
        questions = QUESTION.findall("\nWhat is" + tail)
        expected_tail = "".join(f"\nWhat is the special magic number for {k}? The special magic number for {k} is {v}." for k, v in questions)
        assert questions and expected_tail == "\nWhat is" + tail
        assert all(needles[key] == answer for key, answer in questions)
        assert len({key for key, _ in questions}) == len(questions) <= len(needles)
        asked += len(questions)
    assert (asked > len(docs)) == followups  # follow-ups ask about the distractors too


def test_a_higher_min_tokens_gives_fewer_longer_documents():
    short, long = _documents(128), _documents(400)
    assert min(map(len, long)) >= 400 - 16  # 16 tokens of each drawn length are left for the answer and </s>
    assert min(map(len, short)) < 400 - 16
    assert len(short) > len(long)


def test_each_stage_of_kvtier_tiny_draws_its_own_mix_and_the_hybrid_draws_the_same():
    steps = 4000
    first, second, last = (KVTIER_TINY.mix_at(step, steps) for step in (0, steps // 2, steps - 1))
    assert (first, second, last) == tuple(stage.mix for stage in KVTIER_TINY.stages)
    assert [m.vartrack_hops for m in (first, second, last)] == [(1, 1), (1, 2), (1, 4)], "variable tracking is a curriculum"
    assert all(m.vary_phrasing and "heldout" not in dict(m.haystacks) and len(m.haystacks) > 1 for m in (first, second, last))
    assert all(KVTIER_TINY_HYBRID.mix_at(step, steps) == KVTIER_TINY.mix_at(step, steps) for step in range(0, steps, 97))


@pytest.mark.parametrize("field, value", [("retrieval_fraction", 1.5), ("copy_fraction", -0.1), ("multikey", 2.0), ("min_tokens", 64),
                                          ("followups", "yes"), ("haystacks", (("heldout", 1.0),)), ("haystacks", (("poetry", 1.0),)),
                                          ("haystacks", (("code", -1.0),)), ("haystacks", (("code", 0.0),)), ("vartrack_hops", (0, 2)),
                                          ("vartrack_hops", (3, 2))])
def test_a_mix_out_of_range_is_refused_naming_the_field(field, value):
    with pytest.raises(InvalidArgumentError, match=field):
        RetrievalMix(**{field: value})


def test_fractions_that_overfill_a_row_are_refused():
    with pytest.raises(InvalidArgumentError, match="retrieval_fraction"):
        RetrievalMix(retrieval_fraction=0.9, copy_fraction=0.2)


def test_documents_hide_their_needles_in_each_training_haystack_of_the_train_split_in_every_training_phrasing():
    from kvtier.eval.haystacks import source_texts
    from kvtier.eval.retrieval import PHRASINGS

    tok = Tokenizer.from_file(str(TOKENIZER))
    maker = BatchMaker(tok, np.arange(3, 4000, dtype=np.int32), seed=3)
    mix = RetrievalMix(retrieval_fraction=1.0, copy_fraction=0.0, passkey=0.5, multikey=0.5, vartrack=0.0, haystacks=(("code", 1.0),),
                       vary_phrasing=True)
    rows = [maker.row(512, mix) for _ in range(12)]
    text = "\n".join(tok.decode(row[:len(row) - row[::-1].index(EOS_ID)]) for row in rows)  # the documents, not the stream's tail
    train_lines, validation_lines = ({line for t in source_texts("code", split) for line in t.splitlines()} for split in ("train", "validation"))
    lines = [line for line in text.splitlines() if line.strip()]
    task_text = re.compile(r"magic number|pass key|important info|mentioned .*in the text below|^(What is )?[Tt]he [a-z]+ [a-z]+( for [a-z]+-[a-z]+)?( is|\?)")
    assert not [line for line in lines if line not in train_lines and not task_text.search(line)], "the rest is train-split code"
    assert sum(line in train_lines for line in lines) > len(lines) // 2
    assert not [line for line in lines if line in validation_lines - train_lines], "never a line only the validation files have"
    headers = {say.header.strip() for table in PHRASINGS.values() for say in table.values() if not say.held_out}
    assert len({h for h in headers if h in text}) >= 2, "more than one training wording"
    assert mix.phrasings("passkey") == ("landmark", "ruler", "named") and mix.phrasings("vartrack") == (None,)
    assert RetrievalMix().phrasings("multikey") == (None,), "without vary_phrasing, the default wording"
