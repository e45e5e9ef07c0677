"""Exit heads that ship with offramp: a fresh install drafts and exits with a trained head, not the final norm.

Made with a fixed seed and step count on the large self-generated corpus (README, "Exit heads"):
`offramp train-exits --model default --corpus-preset large --exit-layer 15 --steps 1500 --seed 0 --time-budget 0`
(and `--exit-layer 10 --steps 1200`), `offramp calibrate --model default --exit-layer 15 10 --target-agreement
0.99`, then `offramp ship-heads --exit-layer 15 10`, which copies each K's trained head from the artifacts cache
into `models/shipped_heads/<model fingerprint>/k<K>/`, as fp16 safetensors (half the bytes; the head computes in
fp32 once loaded) with its calibrated rule, and records what it achieves in `eval.json`, measured on
`eval_texts.json` beside it: the full model's greedy continuations of held-out prompts (the corpus's test split,
never trained on), so the figures can be checked again on any machine with the model
(tests/models/test_shipped_heads.py). `find_trained_head` (offramp.models.edge_dir) takes a head `train-exits`
left in the cache first, else the shipped one for that model and K.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from offramp.models.exit_heads import HEAD_MANIFEST, HEAD_WEIGHTS
from offramp.shared.errors import ArtifactError
from offramp.shared.exit_rule import ROUTER_FILE, load_exit_rule

SHIPPED_ROOT = Path(__file__).resolve().parent / "shipped_heads"
EVAL_TEXTS = "eval_texts.json"
EVAL_FILE = "eval.json"
EVAL_PROMPTS = 32  # held-out prompts whose continuations the figures are measured on (~1,500 positions)
EVAL_NEW_TOKENS = 48


def shipped_head_dir(fingerprint: str, exit_layer: int, root: Path = SHIPPED_ROOT) -> Path | None:
    """The shipped head for this model (by fingerprint) and K, if the package carries one."""
    candidate = root / fingerprint[:16] / f"k{exit_layer}"
    if not (candidate / HEAD_MANIFEST).is_file():
        return None
    manifest = json.loads((candidate / HEAD_MANIFEST).read_text())
    if manifest.get("model_fingerprint") != fingerprint:
        raise ArtifactError(f"{candidate} holds a head for model {manifest.get('model_fingerprint')!r}, not {fingerprint!r}")
    return candidate


def eval_sequences(model: Any, tokenizer: Any, count: int = EVAL_PROMPTS, max_new_tokens: int = EVAL_NEW_TOKENS) -> list:
    """The full model's greedy continuations of `count` held-out prompts (half chat, half plain), as TextSequences."""
    from offramp.models.corpus import TextSequence, builtin_prompts, encode_prompt, generate_batched, split_of

    pool = [(doc_id, source, text) for doc_id, source, text in builtin_prompts() if split_of(doc_id) == "test"]
    by_source = {s: [p for p in pool if p[1] == s] for s in ("chat", "plain")}
    picked = [by_source[("chat", "plain")[i % 2]].pop(0) for i in range(count) if by_source[("chat", "plain")[i % 2]]]
    prompts = [encode_prompt(tokenizer, source, text) for _, source, text in picked]
    continuations = generate_batched(model, tokenizer, prompts, max_new_tokens, desc="held-out continuations")
    return [TextSequence(doc_id, source, "test", list(p) + list(c), len(p))
            for (doc_id, source, _), p, c in zip(picked, prompts, continuations)]


def head_figures(model: Any, head: torch.nn.Module, exit_layer: int, sequences: list, rule: Any = None) -> dict:
    """Top-1 agreement with the full model, lossless yield at 2/4/8 drafts, and (with a rule) the exit rate and
    agreement at its threshold, teacher-forced over `sequences`."""
    from offramp.models.evaluate import exit_stats, lossless_drafting, point
    from offramp.models.exit_heads import head_kv_layers
    from offramp.models.teacher import add_context, teacher_data

    data = teacher_data(model, sequences, [exit_layer])
    if head_kv_layers(head):  # a head that attends over past positions needs every position's state, not just scored ones
        add_context(model, sequences, data, [exit_layer])
    mask = data.mask("test")
    stats = exit_stats(head, data, mask, exit_layer)
    figures = {"positions": len(stats), "top1_agreement": float(stats.agree.mean()),
               "lossless": lossless_drafting(stats.agree, data.seq[mask].numpy())}
    if rule is not None:
        at = point(stats, rule.from_features(stats.features), rule.threshold)
        figures["at_threshold"] = {"threshold": rule.threshold, "exit_rate": at["exit_rate"], "agreement": at["agreement"]}
    return figures


def sequences_to_json(sequences: list) -> list[dict]:
    return [{"doc_id": s.doc_id, "source": s.source, "input_ids": s.input_ids, "score_from": s.score_from} for s in sequences]


def sequences_from_json(rows: list[dict]) -> list:
    from offramp.models.corpus import TextSequence

    return [TextSequence(r["doc_id"], r["source"], "test", list(r["input_ids"]), int(r["score_from"])) for r in rows]


def ship_head(model: Any, tokenizer: Any, head_dir: Path, exit_layer: int, root: Path = SHIPPED_ROOT) -> Path:
    """Copy a trained (and calibrated) head into the package folder as fp16, with its figures; returns the dir."""
    from offramp.models.exit_heads import load_head
    from offramp.models.fingerprint import model_fingerprint

    head_dir = Path(head_dir)
    if not (head_dir / ROUTER_FILE).is_file():
        raise ArtifactError(f"{head_dir} has no {ROUTER_FILE}: calibrate the head before shipping it (offramp calibrate)")
    fingerprint = model_fingerprint(model)
    out = root / fingerprint[:16] / f"k{exit_layer}"
    out.parent.mkdir(parents=True, exist_ok=True)
    texts = out.parent / EVAL_TEXTS
    if not texts.is_file():
        texts.write_text(json.dumps(sequences_to_json(eval_sequences(model, tokenizer))))
    staging = Path(tempfile.mkdtemp(prefix=f".k{exit_layer}-", dir=out.parent))  # never a half-shipped head in `out`
    try:
        state = load_file(str(head_dir / HEAD_WEIGHTS))
        save_file({name: t.to(torch.float16) if t.is_floating_point() else t for name, t in state.items()}, str(staging / HEAD_WEIGHTS))
        for name in (HEAD_MANIFEST, ROUTER_FILE):
            shutil.copyfile(head_dir / name, staging / name)
        head, _ = load_head(staging, model)  # the fp16 copy, as users will load it
        figures = head_figures(model, head, exit_layer, sequences_from_json(json.loads(texts.read_text())), load_exit_rule(staging))
        (staging / EVAL_FILE).write_text(json.dumps({"exit_layer": exit_layer, "eval_texts": EVAL_TEXTS, **figures}, indent=2))
        if out.exists():
            shutil.rmtree(out)
        staging.rename(out)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    return out
