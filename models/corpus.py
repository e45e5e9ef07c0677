"""Text for training and judging exit heads, available offline on every machine.

Two default sources: (a) the model's own continuations of a built-in, varied prompt set (chat-templated questions
and plain-text openings) — the serving distribution — and (b) human-written prose that ships inside the Python
installation (stdlib docstrings, package READMEs). Any plain-text files can be added. Every document is assigned
to train / calib / test by a hash of its id, so the held-out splits are whole prompts or documents, never tokens.
"""

from __future__ import annotations

import ast
import hashlib
import importlib.metadata
import json
import sysconfig
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from offramp.models.fingerprint import model_fingerprint
from offramp.shared.errors import OfframpError
from offramp.shared.paths import offramp_home

SPLITS = ("train", "calib", "test")
CORPUS_VERSION = 1
SELFGEN_SOURCES = ("chat", "plain", "sampled")  # the model's own text; "sampled" is train-only in the default corpus
TEACHER_DTYPES = ("float32", "bfloat16")


class CorpusError(OfframpError, ValueError):
    """A corpus file or setting that cannot be used."""


def split_of(doc_id: str) -> str:
    """Deterministic 70/15/15 assignment of a whole document to train / calib / test."""
    bucket = int(hashlib.sha256(doc_id.encode()).hexdigest()[:8], 16) % 100
    return "train" if bucket < 70 else "calib" if bucket < 85 else "test"


@dataclass
class TextSequence:
    """One tokenised document; positions >= score_from - 1 predict a scored next token."""

    doc_id: str
    source: str  # chat | plain | sampled | stdlib | readme | file
    split: str
    input_ids: list[int]
    score_from: int  # first token that is a prediction target (the continuation, for self-generated text)
    shard: str = ""  # the large self-generated corpus's shard (offramp.models.selfgen): its own teacher cache


# --- built-in prompt set --------------------------------------------------------------------------------------

TOPICS = (
    "photosynthesis", "the water cycle", "black holes", "the French Revolution", "machine learning", "volcanoes",
    "the immune system", "climate change", "the Roman Empire", "electric cars", "the stock market", "vaccines",
    "plate tectonics", "the internet", "renewable energy", "the human brain", "coffee", "chess", "jazz music",
    "the Moon", "bees", "sleep", "the printing press", "recycling", "earthquakes", "DNA", "inflation",
    "the Olympic Games", "rainforests", "Shakespeare", "the Great Wall of China", "antibiotics", "solar panels",
    "honey", "the ocean tides", "gravity", "the Renaissance", "bread baking", "blockchain", "dinosaurs",
    "the heart", "public libraries", "bicycles", "tea", "the periodic table", "democracy", "mountains",
    "the Amazon river", "friendship", "time management", "healthy eating", "the speed of light", "glaciers",
    "the piano", "video games", "cloud computing", "airplanes", "penguins", "the Industrial Revolution",
    "mathematics", "a job interview", "learning a new language", "gardening", "Python programming",
)

CHAT_TEMPLATES = (
    "What is {t}?",
    "Can you explain {t} in simple terms?",
    "Why is {t} important?",
    "Write a short paragraph about {t}.",
    "Give me three interesting facts about {t}.",
    "How would you describe {t} to a ten-year-old?",
    "What are the main advantages and disadvantages of {t}?",
    "Write a short story that involves {t}.",
)

CHAT_PER_TOPIC = 3

PLAIN_TEMPLATES = (
    "The history of {t} is",
    "Here is a short introduction to {t}.",
    "Many people do not know that {t}",
)


def builtin_prompts() -> list[tuple[str, str, str]]:
    """(doc_id, source, text) for every built-in prompt: chat questions and plain-text openings on many topics."""
    prompts = []
    for n, t in enumerate(TOPICS):  # each topic gets a rotating subset of the templates: breadth at a fixed cost
        for j in range(CHAT_PER_TOPIC):
            i = (n + 2 * j) % len(CHAT_TEMPLATES)
            prompts.append((f"chat:{t}:{i}", "chat", CHAT_TEMPLATES[i].format(t=t)))
        i = n % len(PLAIN_TEMPLATES)
        text = PLAIN_TEMPLATES[i].format(t=t)
        prompts.append((f"plain:{t}:{i}", "plain", text[0].upper() + text[1:]))
    return prompts


def encode_prompt(tok: PreTrainedTokenizerBase, source: str, text: str) -> list[int]:
    """Chat prompts go through the chat template (as served); plain openings are raw text."""
    if source == "chat" and tok.chat_template:
        ids = tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True, tokenize=True)
        return list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)
    return list(tok(text)["input_ids"])


def left_padded(prompts: Sequence[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, attention mask) [B, longest]: each prompt right-aligned, so every row's next token is at the end."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, p in enumerate(prompts):
        ids[row, width - len(p) :] = torch.tensor(p)
        mask[row, width - len(p) :] = 1
    return ids, mask


def generate_batched(
    model: PreTrainedModel,
    tok: PreTrainedTokenizerBase,
    prompts: Sequence[list[int]],
    max_new_tokens: int,
    batch_size: int = 32,
    sample_temperature: float | None = None,
    seed: int = 0,
    desc: str = "generating",
) -> list[list[int]]:
    """Continuations of token-id prompts, left-padded in batches (many times faster than one by one on CPU)."""
    pad = next((t for t in (tok.pad_token_id, tok.eos_token_id) if t is not None), 0)  # masked anyway
    eos = tok.eos_token_id
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))  # similar lengths share a batch
    out: list[list[int]] = [[] for _ in prompts]
    torch.manual_seed(seed)
    for start in tqdm(range(0, len(order), batch_size), desc=desc, unit="batch"):
        idx = order[start : start + batch_size]
        ids, mask = left_padded([prompts[i] for i in idx], pad)
        width = ids.shape[1]
        kwargs = {"do_sample": False}
        if sample_temperature:
            kwargs = {"do_sample": True, "temperature": sample_temperature, "top_p": 0.95, "top_k": 0}
        with torch.no_grad():
            gen = model.generate(
                input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, pad_token_id=pad, **kwargs
            )
        for row, i in enumerate(idx):
            cont = gen[row, width:].tolist()
            if eos in cont:
                cont = cont[: cont.index(eos) + 1]
            out[i] = cont
    return out


def selfgen_sequences(
    model: PreTrainedModel,
    tok: PreTrainedTokenizerBase,
    max_new_tokens: int = 64,
    limit: int | None = None,
    batch_size: int = 32,
    sampled_share: int = 4,
) -> list[TextSequence]:
    """The model's own continuations of the built-in prompts, cached per model fingerprint.

    Held-out (calib/test) prompts always get the greedy continuation — the serving case we judge. One train prompt
    in `sampled_share` gets a sampled continuation instead, for variety.
    """
    prompts = builtin_prompts()[:limit] if limit else builtin_prompts()
    key = hashlib.sha256(
        json.dumps([CORPUS_VERSION, max_new_tokens, sampled_share, [p[0] for p in prompts]]).encode()
    ).hexdigest()[:12]
    cache = offramp_home() / "corpus" / model_fingerprint(model)[:16] / f"selfgen-{key}.json"
    if cache.is_file():
        return [TextSequence(**row) for row in json.loads(cache.read_text())]
    encoded = [encode_prompt(tok, src, text) for _, src, text in prompts]
    sampled = [
        split_of(doc_id) == "train" and int(hashlib.sha256(doc_id.encode()).hexdigest()[8:12], 16) % sampled_share == 0
        for doc_id, _, _ in prompts
    ]
    conts: list[list[int]] = [[] for _ in prompts]
    for want_sampled in (False, True):
        idx = [i for i, s in enumerate(sampled) if s == want_sampled]
        if not idx:
            continue
        gen = generate_batched(
            model, tok, [encoded[i] for i in idx], max_new_tokens, batch_size,
            sample_temperature=0.8 if want_sampled else None,
            desc="sampling continuations" if want_sampled else "greedy continuations",
        )
        for i, cont in zip(idx, gen):
            conts[i] = cont
    seqs = [
        TextSequence(doc_id, "sampled" if smp else src, split_of(doc_id), enc + cont, len(enc))
        for (doc_id, src, _), enc, cont, smp in zip(prompts, encoded, conts, sampled)
        if cont
    ]
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_suffix(".tmp")
    tmp.write_text(json.dumps([asdict(s) for s in seqs]))
    tmp.replace(cache)
    return seqs


# --- human-written text shipped with the installation ---------------------------------------------------------


def _clean(text: str) -> str:
    lines = [line.strip() for line in text.strip().splitlines()]
    return "\n".join(lines).strip()


def stdlib_docstring_documents(max_docs: int = 400, min_chars: int = 400) -> list[tuple[str, str]]:
    """(doc_id, text): each stdlib module's docstrings joined, read with `ast` (nothing is imported)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    docs = []
    for path in sorted(root.glob("*.py")) + sorted(root.glob("*/*.py")):
        if any(part in {"test", "tests", "idlelib", "site-packages", "lib2to3"} for part in path.relative_to(root).parts):
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, OSError):
            continue
        parts = []
        for node in [tree, *ast.walk(tree)]:
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc and len(doc) >= 80 and doc not in parts:
                    parts.append(_clean(doc))
        text = "\n\n".join(parts)
        if len(text) >= min_chars:
            docs.append((f"stdlib:{path.relative_to(root)}", text))
        if len(docs) >= max_docs:
            break
    return docs


def readme_documents(max_docs: int = 300, min_chars: int = 600) -> list[tuple[str, str]]:
    """(doc_id, text): long descriptions (READMEs) of installed distributions, prose paragraphs only."""
    docs = []
    dists = sorted(importlib.metadata.distributions(), key=lambda d: (d.metadata["Name"] or "").lower())
    seen = set()
    for dist in dists:
        name = (dist.metadata["Name"] or "").lower()
        if not name or name in seen:
            continue
        seen.add(name)
        body = dist.metadata.get_payload() or dist.metadata.get("Description") or ""
        paras = [
            " ".join(p.split())
            for p in body.split("\n\n")
            if len(p) > 120 and not p.lstrip().startswith(("|", "```", "..", "<", "!", "[", "#", "$", ">>>", "    "))
        ]
        text = "\n\n".join(paras)
        if len(text) >= min_chars:
            docs.append((f"readme:{name}", text))
        if len(docs) >= max_docs:
            break
    return docs


def file_documents(paths: Iterable[str | Path], chunk_chars: int = 2000) -> list[tuple[str, str]]:
    """(doc_id, text) chunks of user-given plain-text files, cut at paragraph breaks."""
    docs = []
    for path in paths:
        path = Path(path)
        if not path.is_file():
            raise CorpusError(f"corpus file {str(path)!r} does not exist")
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as exc:
            raise CorpusError(f"corpus file {str(path)!r} is not UTF-8 text") from exc
        chunk, n = [], 0
        for para in text.split("\n\n"):
            chunk.append(para)
            if sum(len(c) for c in chunk) >= chunk_chars:
                docs.append((f"file:{path.name}:{n}", "\n\n".join(chunk)))
                chunk, n = [], n + 1
        if any(c.strip() for c in chunk):
            docs.append((f"file:{path.name}:{n}", "\n\n".join(chunk)))
    return docs


def tokenize_documents(
    tok: PreTrainedTokenizerBase, docs: Sequence[tuple[str, str]], source: str, max_len: int, max_tokens: int
) -> list[TextSequence]:
    """Cut each document into sequences of at most max_len tokens (same split for all pieces of a document)."""
    seqs: list[TextSequence] = []
    total = 0
    for doc_id, text in docs:
        ids = tok(text)["input_ids"]
        for piece, start in enumerate(range(0, len(ids), max_len)):
            chunk = ids[start : start + max_len]
            if len(chunk) < 16:
                continue
            seqs.append(TextSequence(f"{doc_id}#{piece}", source, split_of(doc_id), chunk, 1))
            total += len(chunk)
            if piece >= 1:  # at most two pieces per document: breadth over depth
                break
        if total >= max_tokens:
            break
    return seqs


@dataclass
class CorpusSpec:
    """What to put in a corpus; the defaults are the offline default corpus."""

    selfgen: bool = True
    selfgen_limit: int | None = None
    max_new_tokens: int = 64
    human_tokens: int = 40_000  # split between stdlib docstrings and READMEs
    files: tuple[str, ...] = ()
    max_len: int = 256
    selfgen_prompts: int | None = None  # set: the large catalog's first N prompts, greedy + sampled (models/selfgen.py)
    teacher_train_dtype: str = "float32"  # "bfloat16": train-split teacher pass 3.5x faster; held-out stays fp32

    def __post_init__(self) -> None:
        if self.teacher_train_dtype not in TEACHER_DTYPES:
            raise CorpusError(f"teacher_train_dtype {self.teacher_train_dtype!r} is not one of {TEACHER_DTYPES}")
        if self.selfgen_prompts is not None and self.selfgen_prompts < 1:
            raise CorpusError(f"selfgen_prompts {self.selfgen_prompts!r} must be positive")

    @classmethod
    def quick(cls) -> "CorpusSpec":
        return cls(selfgen_limit=48, max_new_tokens=32, human_tokens=6_000)

    @classmethod
    def large(cls) -> "CorpusSpec":
        """The shipped heads' corpus: 2,048 catalog prompts x (greedy + sampled), up to 128 new tokens each (about
        25 min to build on two CPU cores, resumable)."""
        return cls(selfgen_prompts=2048, max_new_tokens=128, teacher_train_dtype="bfloat16")


CORPUS_PRESETS = {"default": CorpusSpec, "quick": CorpusSpec.quick, "large": CorpusSpec.large}


def build_corpus(model: PreTrainedModel, tok: PreTrainedTokenizerBase, spec: CorpusSpec) -> list[TextSequence]:
    """All sequences of the corpus described by `spec` (self-generated text is cached, the rest is cheap)."""
    seqs: list[TextSequence] = []
    if spec.selfgen and spec.selfgen_prompts:
        from offramp.models.selfgen import large_selfgen_sequences

        seqs += large_selfgen_sequences(model, tok, spec.selfgen_prompts, spec.max_new_tokens)
    elif spec.selfgen:
        seqs += selfgen_sequences(model, tok, spec.max_new_tokens, spec.selfgen_limit)
    if spec.human_tokens > 0:
        half = spec.human_tokens // 2
        seqs += tokenize_documents(tok, stdlib_docstring_documents(), "stdlib", spec.max_len, half)
        seqs += tokenize_documents(tok, readme_documents(), "readme", spec.max_len, spec.human_tokens - half)
    if spec.files:
        seqs += tokenize_documents(tok, file_documents(spec.files), "file", spec.max_len, 10**12)
    if not seqs:
        raise CorpusError("the corpus is empty: enable self-generated text, human text or give --corpus files")
    return seqs


def corpus_key(seqs: Sequence[TextSequence]) -> str:
    """A content hash of a corpus, to key caches derived from it."""
    digest = hashlib.sha256()
    for s in seqs:
        digest.update(f"{s.doc_id}|{s.source}|{s.score_from}|{s.shard + '|' if s.shard else ''}".encode())
        digest.update(json.dumps(s.input_ids).encode())
    return digest.hexdigest()[:16]
