"""The default corpus: deterministic document-level splits, built-in prompts, shipped human text, user files."""

from __future__ import annotations

from collections import Counter

import pytest

from offramp.models.corpus import (
    CorpusError,
    builtin_prompts,
    file_documents,
    readme_documents,
    split_of,
    stdlib_docstring_documents,
)


def test_splits_are_deterministic_and_by_document():
    prompts = builtin_prompts()
    assert len({p[0] for p in prompts}) == len(prompts)
    counts = Counter(split_of(doc_id) for doc_id, _, _ in prompts)
    assert counts["test"] > 0 and counts["calib"] > 0 and counts["train"] > counts["test"]
    assert [split_of(d) for d, _, _ in prompts] == [split_of(d) for d, _, _ in builtin_prompts()]


def test_prompts_cover_chat_and_plain_text():
    sources = Counter(src for _, src, _ in builtin_prompts())
    assert sources["chat"] > 100 and sources["plain"] > 30


def test_human_text_ships_with_the_installation():
    docs = stdlib_docstring_documents(max_docs=3)
    assert len(docs) == 3 and all(len(text) >= 400 for _, text in docs)
    assert all(doc_id.startswith("readme:") for doc_id, _ in readme_documents(max_docs=2))


def test_file_documents(tmp_path):
    f = tmp_path / "notes.txt"
    f.write_text("\n\n".join(f"paragraph {i} " * 30 for i in range(20)))
    docs = file_documents([f], chunk_chars=1000)
    assert len(docs) > 1 and docs[0][0] == "file:notes.txt:0"
    with pytest.raises(CorpusError, match="missing.txt"):
        file_documents([tmp_path / "missing.txt"])
