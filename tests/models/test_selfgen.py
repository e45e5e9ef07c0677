"""The large self-generated corpus: a catalog split by prompt, a batched decode loop equal to one-by-one decoding,
shards that resume, and teacher targets whose held-out part stays exact when the train part runs in bfloat16."""

from __future__ import annotations

import json
from collections import Counter

import pytest
import torch

from offramp.models import selfgen
from offramp.models.corpus import CorpusError, CorpusSpec, builtin_prompts, split_of
from offramp.models.selfgen import continue_prompts, large_selfgen_sequences, prompt_catalog
from offramp.shared.errors import SplitConfigError


@pytest.fixture()
def tiny(tmp_path, monkeypatch):
    monkeypatch.setenv("OFFRAMP_HOME", str(tmp_path / "home"))  # corpus and teacher caches land here
    from offramp.models import load_model
    from offramp.models.tiny import save_tiny_checkpoint

    return load_model(str(save_tiny_checkpoint(tmp_path / "tiny", num_layers=4)))


def test_the_catalog_holds_the_builtin_prompts_with_their_splits_and_any_prefix_spans_every_topic():
    catalog = prompt_catalog()
    ids = [doc_id for doc_id, _, _ in catalog]
    assert len(ids) == len(set(ids)) > 30 * len(builtin_prompts())
    by_id = {doc_id: (source, text) for doc_id, source, text in catalog}
    for doc_id, source, text in builtin_prompts():  # same id, same text: the same train/calib/test split
        assert by_id[doc_id] == (source, text)
    prefix = catalog[: len(selfgen.ALL_TOPICS) * 5]
    assert {doc_id.split(":")[1] for doc_id, _, _ in prefix} == set(selfgen.ALL_TOPICS)
    sources = Counter(source for _, source, _ in prefix)
    assert sources["chat"] == 4 * sources["plain"]


def test_batched_left_padded_decoding_equals_one_prompt_at_a_time(tiny_model):
    prompts = [[5, 9, 11], [7], [3, 4, 5, 6, 8, 10, 12], [9, 9]]
    batched = continue_prompts(tiny_model, prompts, 12, stop_ids=[], pad_id=0)
    alone = [continue_prompts(tiny_model, [p], 12, stop_ids=[], pad_id=0)[0] for p in prompts]
    assert batched == alone and all(len(c) == 12 for c in batched)
    reference = tiny_model.generate(input_ids=torch.tensor([prompts[2]]), max_new_tokens=12, do_sample=False, pad_token_id=0)
    assert batched[2] == reference[0, len(prompts[2]) :].tolist()


def test_a_row_leaves_the_batch_at_a_stop_token_and_the_others_go_on_unchanged(tiny_model):
    prompts = [[5, 9, 11], [7], [3, 4, 5, 6, 8, 10, 12], [9, 9]]
    free = continue_prompts(tiny_model, prompts, 16, stop_ids=[], pad_id=0)
    stop = free[1][3]  # row 1 stops at its 4th token; rows that never produce it run to the end
    stopped = continue_prompts(tiny_model, prompts, 16, stop_ids=[stop], pad_id=0)
    for full, cut in zip(free, stopped):
        end = full.index(stop) + 1 if stop in full else len(full)
        assert cut == full[:end]
    assert len(stopped[1]) <= 4


def test_sampling_follows_the_generator_and_differs_from_greedy(tiny_model):
    prompts = [[5, 9, 11], [7, 3]]
    greedy = continue_prompts(tiny_model, prompts, 20, stop_ids=[], pad_id=0)
    one = continue_prompts(tiny_model, prompts, 20, [], 0, temperature=1.0, generator=torch.Generator().manual_seed(3))
    two = continue_prompts(tiny_model, prompts, 20, [], 0, temperature=1.0, generator=torch.Generator().manual_seed(3))
    assert one == two and one != greedy


def test_the_corpus_is_split_by_prompt_and_resumes_shard_by_shard(tiny, monkeypatch):
    model, tok = tiny
    monkeypatch.setattr(selfgen, "SHARD_PROMPTS", 8)
    seqs = large_selfgen_sequences(model, tok, 20, max_new_tokens=6)
    assert len(seqs) == 40 and sorted({s.shard for s in seqs}) == ["s0", "s1", "s2"]
    for s in seqs:  # a sampled continuation lands in its prompt's split, and is tagged as sampled
        prompt_id = s.doc_id.split("@")[0]
        assert s.split == split_of(prompt_id)
        assert (s.source == "sampled") == ("@t" in s.doc_id)
        assert 0 < s.score_from < len(s.input_ids) <= s.score_from + 6
    store = next((tiny_path := selfgen._store_dir(model, prompt_catalog()[:20], 6, 0)).glob("shard-00001.json"))
    store.unlink()
    made = []
    real = selfgen._shard_sequences
    monkeypatch.setattr(selfgen, "_shard_sequences", lambda *a, **k: made.append(a[2]) or real(*a, **k))
    again = large_selfgen_sequences(model, tok, 20, max_new_tokens=6)
    assert made == [1] and again == seqs  # only the missing shard ran, and it came out the same
    assert json.loads((tiny_path / "shard-00000.json").read_text())[0]["shard"] == "s0"
    with pytest.raises(CorpusError, match="selfgen_prompts 100000"):
        large_selfgen_sequences(model, tok, 100_000)


def test_a_bfloat16_train_pass_keeps_the_held_out_targets_those_of_the_fp32_model(tiny, monkeypatch):
    from offramp.models.teacher import teacher_data

    model, tok = tiny
    monkeypatch.setattr(selfgen, "SHARD_PROMPTS", 16)
    seqs = large_selfgen_sequences(model, tok, 32, max_new_tokens=8)
    exact = teacher_data(model, seqs, [2])
    from offramp.models import checkpoints

    copies = []
    real_copy = checkpoints.bfloat16_copy
    monkeypatch.setattr(checkpoints, "bfloat16_copy", lambda m: copies.append(1) or real_copy(m))
    fast = teacher_data(model, seqs, [2], train_dtype="bfloat16")
    assert {s.shard for s in seqs} == {"s0", "s1"} and len(copies) == 1  # one bf16 copy serves every shard
    held_out = ~exact.mask("train")
    assert held_out.any() and (~held_out).any()
    assert torch.equal(fast.seq, exact.seq) and torch.equal(fast.top1[held_out], exact.top1[held_out])
    torch.testing.assert_close(fast.hidden[2][held_out], exact.hidden[2][held_out], atol=1e-3, rtol=1e-3)
    # the train part went through bfloat16: close, not equal
    assert not torch.equal(fast.hidden[2][~held_out], exact.hidden[2][~held_out])
    torch.testing.assert_close(fast.hidden[2][~held_out].float(), exact.hidden[2][~held_out].float(), atol=0.1, rtol=0.05)


def test_corpus_spec_refuses_an_unknown_teacher_dtype_and_a_non_positive_prompt_count():
    with pytest.raises(CorpusError, match="float16"):
        CorpusSpec(teacher_train_dtype="float16")
    with pytest.raises(CorpusError, match="selfgen_prompts 0"):
        CorpusSpec(selfgen_prompts=0)
    assert CorpusSpec.large().selfgen_prompts == 2048


def test_the_corpus_preset_flag_picks_the_spec_and_a_trained_head_keeps_its_own(tmp_path):
    import argparse
    from dataclasses import asdict

    from offramp.models.cli import _corpus_spec

    def args(preset=None, quick=False, corpus=None, prompts=None):
        return argparse.Namespace(corpus_preset=preset, quick=quick, corpus=corpus, selfgen_prompts=prompts)

    assert _corpus_spec(args("large")) == CorpusSpec.large()
    assert _corpus_spec(args("large", prompts=9348)).selfgen_prompts == 9348
    with pytest.raises(SplitConfigError, match="--selfgen-prompts 100 needs --corpus-preset large"):
        _corpus_spec(args(prompts=100))
    with pytest.raises(CorpusError, match="selfgen_prompts 0"):
        _corpus_spec(args("large", prompts=0))
    assert _corpus_spec(args(quick=True)) == CorpusSpec.quick()
    assert _corpus_spec(args()) == CorpusSpec()
    (tmp_path / "head.json").write_text(json.dumps({"corpus_spec": asdict(CorpusSpec.large())}))
    assert _corpus_spec(args(), tmp_path) == CorpusSpec.large()  # calibrate/eval judge on the head's own corpus
