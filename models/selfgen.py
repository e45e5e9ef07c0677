"""The model's own continuations of thousands of prompts: the large training corpus for exit heads (issue 12).

A head learns what the full model says next, so its best training text is what the model says when served: greedy
and sampled (at serving temperatures) continuations of chat questions and plain-text openings. The prompt catalog
crosses ~200 topics with ~30 chat and ~8 plain templates (the built-in prompts of `offramp.models.corpus` are its
first part, with the same ids, so their train/calib/test split is unchanged); every continuation of a prompt lands
in that prompt's split, so held-out prompts are never trained on.

Generation is a batched decode loop in bfloat16 (3x faster than `model.generate` in fp32 on this CPU; AMX does the
matmuls) that drops finished rows from the batch. It writes a shard of prompts at a time, so an interrupted build
resumes where it stopped, with a progress bar over prompts. The teacher targets (layer-K states, top-k ids, the
full model's argmax) are computed afterwards per shard, in fp32 for held-out shards of text (see `teacher.py`).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import DynamicCache, PreTrainedModel, PreTrainedTokenizerBase

from offramp.models.corpus import (
    CHAT_TEMPLATES,
    PLAIN_TEMPLATES,
    TOPICS,
    CorpusError,
    TextSequence,
    encode_prompt,
    left_padded,
    split_of,
)
from offramp.models.checkpoints import bfloat16_copy
from offramp.models.fingerprint import model_fingerprint
from offramp.shared.paths import offramp_home

SELFGEN_VERSION = 2
SHARD_PROMPTS = 256  # prompts per shard: the unit of resumption and of the teacher cache
SAMPLED_TEMPERATURES = (0.7, 1.0)  # serving temperatures; each prompt's sampled continuation takes one in turn
TOP_P = 0.95
TOP_K = 256  # the nucleus is drawn from the 256 likeliest tokens (a full-vocabulary sort a step cost more than the model)
BATCH_ROWS = 2 * SHARD_PROMPTS  # rows decoded together (a shard's greedy and sampled rows): a decode step is mostly per-op overhead on CPU, so wide batches pay

MORE_TOPICS = (
    "quantum computing", "the Silk Road", "octopuses", "meditation", "the Eiffel Tower", "nuclear energy",
    "the Cold War", "artificial intelligence ethics", "wind turbines", "the human skeleton", "bread yeast",
    "photography", "the Sahara desert", "the Pacific Ocean", "the Nile", "ancient Egypt", "the Maya civilization",
    "the theory of evolution", "vitamins", "the common cold", "smartphones", "social media", "electric guitars",
    "classical music", "ballet", "the Mona Lisa", "origami", "knitting", "marathon running", "yoga",
    "football", "basketball", "tennis", "cricket", "the Tour de France", "hiking", "camping", "birdwatching",
    "butterflies", "whales", "elephants", "wolves", "sharks", "ants", "coral reefs", "mushrooms", "oak trees",
    "cactus plants", "tomatoes", "chocolate", "cheese making", "pizza", "sushi", "spices", "vegetarian diets",
    "drinking water", "air pollution", "plastic waste", "composting", "electric grids", "batteries",
    "semiconductors", "the transistor", "3D printing", "robots", "self-driving cars", "trains", "ships",
    "rockets", "the International Space Station", "Mars", "Jupiter", "comets", "the Sun", "eclipses",
    "telescopes", "microscopes", "bacteria", "viruses", "the lungs", "blood", "muscles", "memory", "dreams",
    "happiness", "stress", "habits", "motivation", "leadership", "teamwork", "negotiation", "public speaking",
    "writing an essay", "reading books", "poetry", "novels", "newspapers", "podcasts", "movies", "animation",
    "museums", "architecture", "bridges", "skyscrapers", "castles", "cities", "villages", "farming",
    "irrigation", "rice", "wheat", "cotton", "silk", "wool", "fashion", "shoes", "money", "banks", "taxes",
    "budgeting", "saving for retirement", "small businesses", "marketing", "customer service", "email etiquette",
    "password security", "encryption", "databases", "spreadsheets", "operating systems", "open source software",
    "web browsers", "search engines", "JavaScript", "SQL queries", "sorting algorithms", "recursion",
    "unit testing", "version control with git", "the metric system", "prime numbers", "probability",
    "statistics", "geometry", "fractions", "the Pythagorean theorem", "calculus", "maps", "compasses",
    "weather forecasting", "hurricanes", "tornadoes", "snow", "rainbows", "thunderstorms", "deserts",
    "islands", "rivers", "lakes", "forests", "wetlands", "soil", "rocks and minerals", "gold", "diamonds",
    "iron", "glass", "paper", "the telephone", "radio", "television", "photosynthesis in algae", "kindness",
    "family traditions", "holidays", "birthdays", "weddings", "pets", "dogs", "cats", "horses", "chickens",
)

MORE_CHAT_TEMPLATES = (
    "List five tips about {t}.",
    "Write a haiku about {t}.",
    "Explain how {t} works, step by step.",
    "What is the history of {t}?",
    "What are common misconceptions about {t}?",
    "Write an email to a friend about {t}.",
    "Summarize what everyone should know about {t} in two sentences.",
    "What questions would a student ask about {t}?",
    "How has {t} changed over the last hundred years?",
    "Describe a day in the life of someone who works with {t}.",
    "What would happen if {t} did not exist?",
    "Give a beginner's guide to {t}.",
    "Write a short poem about {t}.",
    "What is the future of {t}?",
    "Explain {t} using an analogy.",
    "Write a news headline and a short article about {t}.",
    "What are the key terms related to {t}? Define each briefly.",
    "Tell me a fun fact about {t}.",
    "Hi! I'm curious about {t}. Where should I start?",
    "Is {t} good or bad? Give a balanced answer.",
    "Write a dialogue between two people discussing {t}.",
    "Create a quiz with three questions about {t}.",
)

MORE_PLAIN_TEMPLATES = (
    "In this article, we will discuss {t}",
    "One of the most fascinating things about {t} is",
    "{t} has been studied for many years, and",
    "If you want to learn about {t}, the first thing to know is",
    "Chapter 1: An introduction to {t}\n\n",
)

ALL_TOPICS = TOPICS + MORE_TOPICS
ALL_CHAT_TEMPLATES = CHAT_TEMPLATES + MORE_CHAT_TEMPLATES  # the built-in templates keep their indices (and ids)
ALL_PLAIN_TEMPLATES = PLAIN_TEMPLATES + MORE_PLAIN_TEMPLATES


def prompt_catalog() -> list[tuple[str, str, str]]:
    """(doc_id, source, text) for every topic x template, interleaved so any prefix spans all topics and templates."""
    chat, plain = [], []
    for n, t in enumerate(ALL_TOPICS):
        for j in range(len(ALL_CHAT_TEMPLATES)):
            i = (n + j) % len(ALL_CHAT_TEMPLATES)
            chat.append((j, f"chat:{t}:{i}", "chat", ALL_CHAT_TEMPLATES[i].format(t=t)))
        for j in range(len(ALL_PLAIN_TEMPLATES)):
            i = (n + j) % len(ALL_PLAIN_TEMPLATES)
            text = ALL_PLAIN_TEMPLATES[i].format(t=t)
            plain.append((j, f"plain:{t}:{i}", "plain", text[0].upper() + text[1:]))
    # Round j holds every topic's j-th template: taking a prefix takes whole rounds (all topics), chat 4 : plain 1.
    chat.sort(key=lambda p: p[0])
    plain.sort(key=lambda p: p[0])
    out, ci, pi = [], 0, 0
    while ci < len(chat) or pi < len(plain):
        for _ in range(4):
            if ci < len(chat):
                out.append(chat[ci][1:])
                ci += 1
        if pi < len(plain):
            out.append(plain[pi][1:])
            pi += 1
    return out


def sampled_temperature(doc_id: str) -> float:
    """The serving temperature of this prompt's sampled continuation (a hash of its id picks one)."""
    return SAMPLED_TEMPERATURES[int(hashlib.sha256(doc_id.encode()).hexdigest()[12:16], 16) % len(SAMPLED_TEMPERATURES)]


def _pick(logits: torch.Tensor, temperature: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Per row: greedy (temperature 0) or nucleus sampling at its temperature (top-p TOP_P within the TOP_K
    likeliest tokens), from [B, V] fp32 logits and [B] temperatures."""
    greedy = logits.argmax(-1)
    sampled = temperature > 0
    if not sampled.any():
        return greedy
    top, order = logits[sampled].topk(min(TOP_K, logits.shape[-1]), -1)  # sorted, largest first
    sorted_p = torch.softmax(top / temperature[sampled, None], -1)
    sorted_p[(sorted_p.cumsum(-1) - sorted_p) > TOP_P] = 0.0
    choice = torch.multinomial(sorted_p, 1, generator=generator)
    greedy[sampled] = order.gather(-1, choice)[:, 0]
    return greedy


@torch.no_grad()
def continue_prompts(
    model: PreTrainedModel,
    prompts: Sequence[list[int]],
    max_new_tokens: int,
    stop_ids: Sequence[int],
    pad_id: int,
    temperature: float | Sequence[float] = 0.0,
    generator: torch.Generator | None = None,
) -> list[list[int]]:
    """Continue left-padded prompts in one batch with a KV cache (a temperature per row, 0 = greedy); rows leave
    the batch at a stop token."""
    if not prompts:
        return []
    temps = torch.tensor([temperature] * len(prompts) if isinstance(temperature, (int, float)) else list(temperature),
                         dtype=torch.float32)
    generator = generator or torch.Generator().manual_seed(0)
    ids, mask = left_padded(prompts, pad_id)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    cache = DynamicCache()
    # The base model, then the LM head on [B, H] rows: a 3-D non-contiguous input (what logits_to_keep slices) sends
    # a bf16 linear through a batched matmul that copies the 49k x H weight per row (minutes a step; OOM at 512).
    hidden = model.model(input_ids=ids, attention_mask=mask, position_ids=positions, cache=cache, use_cache=True).last_hidden_state
    alive = torch.arange(len(prompts))
    next_position = mask.sum(-1)
    stops = torch.tensor(list(stop_ids), dtype=torch.long)
    results: list[list[int]] = [[] for _ in prompts]
    for step in range(max_new_tokens):
        token = _pick(model.lm_head(hidden[:, -1].contiguous()).float(), temps, generator)
        for row, t in zip(alive.tolist(), token.tolist()):
            results[row].append(t)
        keep = ~torch.isin(token, stops)
        if step == max_new_tokens - 1 or not keep.any():
            break
        if not keep.all():
            idx = keep.nonzero()[:, 0]
            cache.batch_select_indices(idx)
            alive, mask, token, next_position, temps = alive[idx], mask[idx], token[idx], next_position[idx], temps[idx]
        mask = torch.cat([mask, torch.ones((len(alive), 1), dtype=torch.long)], -1)
        hidden = model.model(input_ids=token[:, None], attention_mask=mask, position_ids=next_position[:, None],
                             cache=cache, use_cache=True).last_hidden_state
        next_position = next_position + 1
    return results


def _store_dir(model: PreTrainedModel, catalog: Sequence[tuple[str, str, str]], max_new_tokens: int, seed: int) -> Path:
    key = hashlib.sha256(json.dumps([SELFGEN_VERSION, max_new_tokens, seed, SAMPLED_TEMPERATURES, TOP_P, TOP_K, BATCH_ROWS,
                                     [p[0] for p in catalog]]).encode()).hexdigest()[:12]
    return offramp_home() / "corpus" / model_fingerprint(model)[:16] / f"selfgen-large-{key}"


def _shard_sequences(
    model: PreTrainedModel, tok: PreTrainedTokenizerBase, shard: int, prompts: Sequence[tuple[str, str, str]],
    max_new_tokens: int, seed: int,
) -> list[TextSequence]:
    """Greedy and one sampled continuation of each prompt of a shard (sequences tagged with the shard)."""
    encoded = [encode_prompt(tok, source, text) for _, source, text in prompts]
    pad = next((t for t in (tok.pad_token_id, tok.eos_token_id) if t is not None), 0)
    stops = [t for t in {tok.eos_token_id, *(tok.convert_tokens_to_ids(["<|im_end|>"]) if "<|im_end|>" in tok.get_vocab() else [])} if t is not None]
    generator = torch.Generator().manual_seed(seed * 100_003 + shard)
    jobs = [(i, 0.0) for i in range(len(prompts))] + [(i, sampled_temperature(prompts[i][0])) for i in range(len(prompts))]
    jobs.sort(key=lambda j: len(encoded[j[0]]))  # similar prompt lengths share a batch
    seqs = []
    for start in range(0, len(jobs), BATCH_ROWS):
        batch = jobs[start : start + BATCH_ROWS]
        conts = continue_prompts(model, [encoded[i] for i, _ in batch], max_new_tokens, stops, pad, [t for _, t in batch], generator)
        for (i, temp), cont in zip(batch, conts):
            doc_id, source, _ = prompts[i]
            seqs.append(TextSequence(doc_id if temp == 0 else f"{doc_id}@t{temp}", source if temp == 0 else "sampled",
                                     split_of(doc_id), encoded[i] + cont, len(encoded[i]), shard=f"s{shard}"))
    seqs.sort(key=lambda s: s.doc_id)
    return seqs


def large_selfgen_sequences(
    model: PreTrainedModel,
    tok: PreTrainedTokenizerBase,
    prompts: int,
    max_new_tokens: int = 160,
    seed: int = 0,
) -> list[TextSequence]:
    """Greedy + sampled continuations of the first `prompts` catalog prompts, built shard by shard (resumable)."""
    catalog = prompt_catalog()
    if not 1 <= prompts <= len(catalog):
        raise CorpusError(f"selfgen_prompts {prompts!r} must be in 1..{len(catalog)} (the catalog's size)")
    catalog = catalog[:prompts]
    store = _store_dir(model, catalog, max_new_tokens, seed)
    store.mkdir(parents=True, exist_ok=True)
    shards = [catalog[i : i + SHARD_PROMPTS] for i in range(0, len(catalog), SHARD_PROMPTS)]
    paths = [store / f"shard-{n:05d}.json" for n in range(len(shards))]
    todo = [n for n, path in enumerate(paths) if not path.is_file()]
    if todo:
        fast = bfloat16_copy(model)
        done = sum(len(shards[n]) for n in range(len(shards)) if n not in todo)
        with tqdm(total=len(catalog), initial=done, desc="self-generated corpus", unit="prompt") as bar:
            for n in todo:
                seqs = _shard_sequences(fast, tok, n, shards[n], max_new_tokens, seed)
                tmp = paths[n].with_suffix(".tmp")
                tmp.write_text(json.dumps([asdict(s) for s in seqs]))
                tmp.replace(paths[n])  # a shard is there whole or not at all
                bar.update(len(shards[n]))
        del fast
    return [TextSequence(**row) for path in paths for row in json.loads(path.read_text())]
