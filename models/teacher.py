"""Teacher targets, computed once per (model, corpus) and cached: training and evaluation then never run the model.

For every scored position we keep the layer-K residual stream (what an exit head reads), the full model's final
normed hidden state (teacher logits = lm_head(final), recomputed cheaply when needed), the full model's argmax and
its log-prob of the actual next token (exact, from fp32 logits), and which split/source the position belongs to.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm
from transformers import PreTrainedModel

from offramp.models.architecture import check_exit_layer
from offramp.models.corpus import SPLITS, TextSequence, corpus_key
from offramp.models.fingerprint import model_fingerprint
from offramp.shared.paths import offramp_home

TOPK = 8  # teacher top-k ids kept per position: the training vocabulary is their union
SOURCES = ("chat", "plain", "sampled", "stdlib", "readme", "file")
SERVING_SOURCES = ("chat", "plain")  # greedy continuations of held-out prompts: the serving case
HUMAN_SOURCES = ("stdlib", "readme", "file")


@dataclass
class TeacherData:
    """Per-position tensors over every scored position of a corpus (N positions)."""

    hidden: dict[int, torch.Tensor]  # K -> [N, H] fp16, layer-K residual stream
    final: torch.Tensor  # [N, H] fp16, full model's normed final hidden state
    top1: torch.Tensor  # [N] int64, full model's argmax
    topk: torch.Tensor  # [N, TOPK] int64
    next_token: torch.Tensor  # [N] int64, the token that actually follows
    full_logprob: torch.Tensor  # [N] fp32, full model's log-prob of next_token
    split: torch.Tensor  # [N] int8, index into SPLITS
    source: torch.Tensor  # [N] int8, index into SOURCES
    seq: torch.Tensor  # [N] int32, index of the sequence
    # Filled by `add_context` for heads that see past positions (offramp.models.attention_head):
    context: dict[int, torch.Tensor] = field(default_factory=dict)  # K -> [T, H] fp16, every position's layer-K state
    context_span: torch.Tensor | None = None  # [sequences, 2] int64: (first row in context, positions) per sequence
    context_row: torch.Tensor | None = None  # [N] int64: the row of each scored position in context

    def mask(self, split: str | None = None, sources: Sequence[str] | None = None) -> torch.Tensor:
        """Boolean [N] selecting one split and/or some sources."""
        m = torch.ones_like(self.top1, dtype=torch.bool)
        if split is not None:
            m &= self.split == SPLITS.index(split)
        if sources is not None:
            m &= torch.isin(self.source, torch.tensor([SOURCES.index(s) for s in sources], dtype=torch.int8))
        return m


def scored_range(seq: TextSequence) -> range:
    """Positions whose next token is a target: from the one predicting token score_from to the second last."""
    return range(max(seq.score_from - 1, 0), len(seq.input_ids) - 1)


class _Teachers:
    """The models a teacher pass runs: the fp32 model, and for the train split (when `train_dtype` asks) a bf16
    copy, made once on first need and shared by every shard of a corpus."""

    def __init__(self, model: PreTrainedModel, train_dtype: str = "float32") -> None:
        self.model, self.train_dtype = model, train_dtype
        self._fast: PreTrainedModel | None = None

    def cache_dir(self, seqs: Sequence[TextSequence]) -> Path:
        suffix = "" if self.train_dtype == "float32" else f"-{self.train_dtype}-train"
        return offramp_home() / "teacher" / model_fingerprint(self.model)[:16] / (corpus_key(seqs) + suffix)

    def split(self, seqs: Sequence[TextSequence]) -> list[tuple[PreTrainedModel, list[int]]]:
        """(model, sequence indices) pairs: train-split sequences through the `train_dtype` copy when asked,
        held-out ones always through the fp32 model, so calibration and evaluation judge against exact targets."""
        if self.train_dtype == "float32":
            return [(self.model, list(range(len(seqs))))]
        if self._fast is None:
            from offramp.models.checkpoints import bfloat16_copy

            self._fast = bfloat16_copy(self.model)
        train = [i for i, s in enumerate(seqs) if s.split == "train"]
        held_out = [i for i, s in enumerate(seqs) if s.split != "train"]
        return [(self._fast, train), (self.model, held_out)]


def _cache_dir(model: PreTrainedModel, seqs: Sequence[TextSequence]) -> Path:
    return _Teachers(model).cache_dir(seqs)


@torch.no_grad()
def _teacher_pass(
    teachers: _Teachers, seqs: Sequence[TextSequence], layers: Sequence[int], batch_tokens: int
) -> dict[str, torch.Tensor]:
    out: dict[str, list[torch.Tensor]] = {k: [] for k in ("final", "top1", "topk", "next_token", "full_logprob", "seq")}
    out.update({f"layer{k}": [] for k in layers})
    pad = 0
    jobs = [
        (runner, [idx[b] for b in batch])
        for runner, idx in teachers.split(seqs)
        for batch in _length_batches([seqs[i] for i in idx], batch_tokens)
    ]
    for runner, batch in tqdm(jobs, desc="teacher pass", unit="batch", leave=len(jobs) > 20):
        width = max(len(seqs[i].input_ids) for i in batch)
        ids = torch.full((len(batch), width), pad, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, i in enumerate(batch):  # right padding: causal attention keeps real positions exact
            n = len(seqs[i].input_ids)
            ids[row, :n] = torch.tensor(seqs[i].input_ids)
            mask[row, :n] = 1
        res = runner.model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
        states = res.hidden_states  # [0]=embeddings, [K]=after K layers, [-1]=normed final
        for row, i in enumerate(batch):
            pos = torch.tensor(list(scored_range(seqs[i])), dtype=torch.long)
            if len(pos) == 0:
                continue
            final = states[-1][row, pos]
            logits = runner.lm_head(final).float()
            logp = torch.log_softmax(logits, -1)
            nxt = ids[row, pos + 1]
            out["final"].append(final.half())
            out["top1"].append(logits.argmax(-1))
            out["topk"].append(logits.topk(TOPK, -1).indices)
            out["next_token"].append(nxt)
            out["full_logprob"].append(logp.gather(-1, nxt[:, None])[:, 0])
            out["seq"].append(torch.full((len(pos),), i, dtype=torch.int32))
            for k in layers:
                out[f"layer{k}"].append(states[k][row, pos].half())
    cat = {k: torch.cat(v) for k, v in out.items()}
    order_back = torch.argsort(cat["seq"], stable=True)  # sequence order, independent of batching
    return {k: v[order_back].contiguous() for k, v in cat.items()}


def _family(seq: TextSequence) -> str:
    if seq.shard:  # a shard of the large self-generated corpus: a teacher cache each, so the pass resumes by shard
        return f"selfgen-{seq.shard}"
    source = seq.source
    return "selfgen" if source in ("chat", "plain", "sampled") else "human" if source in ("stdlib", "readme") else source


def _families(seqs: Sequence[TextSequence]) -> list[list[int]]:
    """Sequence indices per cache family, in first-seen order (the order teacher_data concatenates them)."""
    families: dict[str, list[int]] = {}
    for i, s in enumerate(seqs):
        families.setdefault(_family(s), []).append(i)
    return list(families.values())


def teacher_data(
    model: PreTrainedModel, seqs: Sequence[TextSequence], layers: Sequence[int], batch_tokens: int = 2048,
    train_dtype: str = "float32",
) -> TeacherData:
    """Targets for `seqs` with layer-K states for each K in `layers`; computed once, then read from the cache.

    Self-generated, shipped human and user-file text are cached separately, so corpora sharing a part share its
    (expensive) teacher pass.
    """
    for k in layers:
        check_exit_layer(model, k)
    parts, families, teachers = [], _families(seqs), _Teachers(model, train_dtype)
    for idx in tqdm(families, desc="teacher targets by shard", unit="shard", disable=len(families) < 4):
        part = _teacher_data_cached(teachers, [seqs[i] for i in idx], layers, batch_tokens)
        part.seq = torch.tensor(idx, dtype=torch.int32)[part.seq.long()]
        parts.append(part)
    return TeacherData(
        hidden={k: torch.cat([p.hidden[k] for p in parts]) for k in layers},
        **{f: torch.cat([getattr(p, f) for p in parts]) for f in ("final", "top1", "topk", "next_token", "full_logprob", "split", "source", "seq")},
    )


def _teacher_data_cached(
    teachers: _Teachers, seqs: Sequence[TextSequence], layers: Sequence[int], batch_tokens: int
) -> TeacherData:
    cache = teachers.cache_dir(seqs)
    missing = [k for k in layers if not (cache / f"layer{k}.safetensors").is_file()]
    if not (cache / "targets.safetensors").is_file() or missing:
        cache.mkdir(parents=True, exist_ok=True)
        tensors = _teacher_pass(teachers, seqs, sorted(set(layers)), batch_tokens)
        for k in layers:
            save_file({"hidden": tensors.pop(f"layer{k}")}, str(cache / f"layer{k}.safetensors"))
        if not (cache / "targets.safetensors").is_file():
            save_file(tensors, str(cache / "targets.safetensors"))
            (cache / "corpus.json").write_text(json.dumps({"sequences": len(seqs), "positions": len(tensors["top1"])}))
    targets = load_file(str(cache / "targets.safetensors"))
    seq_idx = targets["seq"].long()
    split = torch.tensor([SPLITS.index(s.split) for s in seqs], dtype=torch.int8)[seq_idx]
    source = torch.tensor([SOURCES.index(s.source) for s in seqs], dtype=torch.int8)[seq_idx]
    hidden = {k: load_file(str(cache / f"layer{k}.safetensors"))["hidden"] for k in layers}
    return TeacherData(
        hidden=hidden,
        final=targets["final"],
        top1=targets["top1"],
        topk=targets["topk"],
        next_token=targets["next_token"],
        full_logprob=targets["full_logprob"],
        split=split,
        source=source,
        seq=targets["seq"],
    )


# --- sequence context: every position's layer-K state, for heads that attend over past positions ----------------


def _length_batches(seqs: Sequence[TextSequence], batch_tokens: int) -> list[list[int]]:
    """Sequence indices in batches of similar length, at most ~batch_tokens padded tokens each."""
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i].input_ids))
    batches, cur = [], []
    for i in order:
        if cur and (len(cur) + 1) * len(seqs[i].input_ids) > batch_tokens:
            batches.append(cur)
            cur = []
        cur.append(i)
    return batches + ([cur] if cur else [])


@torch.no_grad()
def _context_pass(
    model: PreTrainedModel, seqs: Sequence[TextSequence], layers: Sequence[int], batch_tokens: int
) -> dict[int, torch.Tensor]:
    """Layer-K states of positions 0..len-2 of every sequence (the inputs of its predictions), in sequence order."""
    from offramp.models.decoder import run_layers

    inner, out = model.model, {k: [None] * len(seqs) for k in layers}
    for batch in tqdm(_length_batches(seqs, batch_tokens), desc="context pass", unit="batch"):
        width = max(len(seqs[i].input_ids) for i in batch)
        ids = torch.zeros((len(batch), width), dtype=torch.long)
        for row, i in enumerate(batch):  # right padding: causal attention keeps real positions exact
            ids[row, : len(seqs[i].input_ids)] = torch.tensor(seqs[i].input_ids)
        hidden, done = inner.embed_tokens(ids), 0
        positions = torch.arange(width)[None].expand(len(batch), -1)
        for k in sorted(layers):
            hidden, _ = run_layers(inner.layers[done:k], inner.rotary_emb, hidden, positions)
            done = k
            for row, i in enumerate(batch):
                out[k][i] = hidden[row, : max(len(seqs[i].input_ids) - 1, 0)].half()
    return {k: torch.cat(v) if v else torch.zeros(0, model.config.hidden_size, dtype=torch.half) for k, v in out.items()}


def _context_cached(
    model: PreTrainedModel, seqs: Sequence[TextSequence], layers: Sequence[int], batch_tokens: int
) -> dict[int, torch.Tensor]:
    cache = _cache_dir(model, seqs)
    missing = [k for k in layers if not (cache / f"context{k}.safetensors").is_file()]
    if missing:
        cache.mkdir(parents=True, exist_ok=True)
        for k, states in _context_pass(model, seqs, missing, batch_tokens).items():
            tmp = cache / f"context{k}.tmp"
            save_file({"hidden": states}, str(tmp))
            tmp.replace(cache / f"context{k}.safetensors")
    return {k: load_file(str(cache / f"context{k}.safetensors"))["hidden"] for k in layers}


def add_context(
    model: PreTrainedModel, seqs: Sequence[TextSequence], data: TeacherData, layers: Sequence[int], batch_tokens: int = 2048
) -> TeacherData:
    """Fill data.context (layer-K states of every position, cached beside the teacher targets) and the maps from
    sequences and scored rows into it; `data` must be `teacher_data(model, seqs, ...)`."""
    layers = [k for k in layers if k not in data.context]
    if not layers:
        return data
    for k in layers:
        check_exit_layer(model, k)
    lengths = torch.tensor([max(len(s.input_ids) - 1, 0) for s in seqs], dtype=torch.long)
    span = torch.zeros((len(seqs), 2), dtype=torch.long)
    states: dict[int, list[torch.Tensor]] = {k: [] for k in layers}
    offset = 0
    for idx in _families(seqs):
        part = _context_cached(model, [seqs[i] for i in idx], layers, batch_tokens)
        n = lengths[idx]
        span[idx, 0] = offset + torch.cumsum(n, 0) - n
        span[idx, 1] = n
        offset += int(n.sum())
        for k in layers:
            states[k].append(part[k])
    data.context.update({k: torch.cat(v) for k, v in states.items()})
    seq = data.seq.long()
    _, counts = torch.unique_consecutive(seq, return_counts=True)  # each sequence's rows are contiguous, in order
    rank = torch.arange(len(seq)) - torch.repeat_interleave(torch.cumsum(counts, 0) - counts, counts)
    first = torch.tensor([max(s.score_from - 1, 0) for s in seqs], dtype=torch.long)
    data.context_span, data.context_row = span, span[seq, 0] + first[seq] + rank
    return data
