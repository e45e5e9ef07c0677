"""How faithfully an edge graph's layer-K states keep the cloud's tokens: teacher-forced agreement on held-out text.

For every scored position of real text, the full model's argmax given the exact prefix is compared with the
argmax of the deep layers K..N-1 + final norm + LM head (PyTorch, fp32) run on the graph's layer-K states of that
prefix. The graph runs as it serves: the prompt as one prefill chunk, each later token as a decode step.
Teacher forcing scores every position on the same prefix, so one early difference does not decide the rest of a
reply (it does in a free-running common-prefix measure, which is why int8's 96% here was 44% there); it is
what lossless collaboration's acceptance and exit mode's agreement rest on.

The text is held out from exit-head training: the model's own greedy replies to the built-in prompts of the
corpus `test` split (the serving case) and `test`-split human prose shipped with the installation.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from offramp.models.corpus import (
    TextSequence,
    builtin_prompts,
    encode_prompt,
    generate_batched,
    readme_documents,
    split_of,
    stdlib_docstring_documents,
    tokenize_documents,
)
from offramp.models.fingerprint import model_fingerprint
from offramp.models.split import CloudPart, EdgePart
from offramp.models.teacher import scored_range
from offramp.shared.paths import offramp_home

HELDOUT_VERSION = 1


def heldout_sequences(
    model: PreTrainedModel,
    tok: PreTrainedTokenizerBase,
    max_prompts: int | None = None,
    max_new_tokens: int = 64,
    human_tokens: int = 4800,
) -> list[TextSequence]:
    """Test-split text: greedy replies to the built-in test prompts, then human prose; cached per model.

    Defaults: 34 prompts x 64 tokens (~2,100 scored positions) and ~4,800 tokens of stdlib docstrings and
    package READMEs (~4,800 positions).
    """
    prompts = [p for p in builtin_prompts() if split_of(p[0]) == "test"][:max_prompts]
    key = hashlib.sha256(json.dumps([HELDOUT_VERSION, max_new_tokens, human_tokens, [p[0] for p in prompts]]).encode()).hexdigest()[:12]
    cache = offramp_home() / "fidelity" / model_fingerprint(model)[:16] / f"heldout-{key}.json"
    if cache.is_file():
        return [TextSequence(**row) for row in json.loads(cache.read_text())]
    encoded = [encode_prompt(tok, source, text) for _, source, text in prompts]
    replies = generate_batched(model, tok, encoded, max_new_tokens, batch_size=16, desc="held-out greedy replies") if prompts else []
    seqs = [TextSequence(doc_id, source, "test", enc + reply, len(enc))
            for (doc_id, source, _), enc, reply in zip(prompts, encoded, replies) if reply]
    for source, docs in (("stdlib", stdlib_docstring_documents()), ("readme", readme_documents())):
        test_docs = [d for d in docs if split_of(d[0]) == "test"]
        seqs += tokenize_documents(tok, test_docs, source, 256, human_tokens // 2)
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_suffix(".tmp")
    tmp.write_text(json.dumps([asdict(s) for s in seqs]))
    tmp.replace(cache)
    return seqs


@dataclass
class Reference:
    """The fp32 PyTorch side, computed once per (model, K, text) and shared by every graph measured against it."""

    exit_layer: int
    full_top1: list[np.ndarray]  # per sequence, [T]: the full model's argmax at each position
    edge_top1: list[np.ndarray]  # per sequence, [T]: the fp32 edge part's exit-head argmax
    hidden: list[np.ndarray]  # per sequence, [T, H]: fp32 layer-K states


@torch.no_grad()
def reference(model: PreTrainedModel, exit_layer: int, seqs: Sequence[TextSequence]) -> Reference:
    """Full-model and fp32 edge-part outputs for every position (one forward per sequence)."""
    edge = EdgePart(model, exit_layer).eval()
    full, exits, hidden = [], [], []
    for s in seqs:
        ids = torch.tensor([s.input_ids])
        positions = torch.arange(ids.shape[1])[None]
        full.append(model(ids).logits[0].argmax(-1).numpy())
        out = edge(ids, positions)
        exits.append(out.exit_logits[0].argmax(-1).numpy())
        hidden.append(out.hidden[0].numpy())
    return Reference(exit_layer, full, exits, hidden)


@dataclass
class Fidelity:
    """What one edge graph's states and exit logits keep, over the scored positions of the text."""

    agreement: float  # deep-layer argmax on the graph's states == full model's argmax
    agreement_by_source: dict[str, float]
    positions: int
    exit_top1: float  # graph's exit-head argmax == the fp32 edge part's
    hidden_rel_error: float  # median over positions of |h - h_fp32| / |h_fp32|

    def row(self) -> dict:
        return {"agreement": round(self.agreement, 5), "serving_agreement": round(self.agreement_by_source.get("serving", float("nan")), 5),
                "human_agreement": round(self.agreement_by_source.get("human", float("nan")), 5),
                "exit_top1_vs_fp32": round(self.exit_top1, 5), "hidden_rel_err": float(f"{self.hidden_rel_error:.3g}"),
                "positions": self.positions}


def graph_outputs(runtime, seq: TextSequence) -> tuple[np.ndarray, dict[int, int]]:
    """Layer-K states [T, H] for one sequence served as prefill(prompt) + one step per later token, and the
    exit-head argmax at every position that produced logits (the prefill's last and each step)."""
    runtime.reset()
    ids = seq.input_ids
    prefill = max(seq.score_from, 1)
    first = runtime.run(ids[:prefill])
    states, exits = [first.hidden], {prefill - 1: int(first.logits.argmax())}
    for pos in range(prefill, len(ids)):
        step = runtime.run([ids[pos]])
        states.append(step.hidden)
        exits[pos] = int(step.logits.argmax())
    return np.concatenate(states), exits


@torch.no_grad()
def measure(runtime, model: PreTrainedModel, seqs: Sequence[TextSequence], ref: Reference) -> Fidelity:
    """Teacher-forced agreement of `runtime` (any EdgeRuntime at ref.exit_layer) over `seqs`."""
    if getattr(runtime, "exit_layer", ref.exit_layer) != ref.exit_layer:
        raise ValueError(f"runtime exit layer {runtime.exit_layer} != reference exit layer {ref.exit_layer}")
    cloud = CloudPart(model, ref.exit_layer).eval()
    agree: dict[str, list[bool]] = {"serving": [], "human": []}
    exit_agree, rel = [], []
    for i, s in enumerate(seqs):
        states, exits = graph_outputs(runtime, s)
        logits, _ = cloud(torch.from_numpy(states)[None], torch.arange(states.shape[0])[None])
        deep = logits[0].argmax(-1).numpy()
        scored = np.array(list(scored_range(s)))
        family = "serving" if s.source in ("chat", "plain") else "human"
        agree[family] += list(deep[scored] == ref.full_top1[i][scored])
        exit_agree += [exits[p] == ref.edge_top1[i][p] for p in scored if p in exits]
        diff = np.linalg.norm(states[scored] - ref.hidden[i][scored], axis=-1)
        rel += list(diff / np.maximum(np.linalg.norm(ref.hidden[i][scored], axis=-1), 1e-12))
    every = agree["serving"] + agree["human"]
    return Fidelity(
        agreement=float(np.mean(every)) if every else float("nan"),
        agreement_by_source={k: float(np.mean(v)) for k, v in agree.items() if v},
        positions=len(every),
        exit_top1=float(np.mean(exit_agree)) if exit_agree else float("nan"),
        hidden_rel_error=float(np.median(rel)) if rel else float("nan"),
    )


def measure_graph(graph_dir: Path | str, model: PreTrainedModel, seqs: Sequence[TextSequence], ref: Reference, threads: int = 1) -> Fidelity:
    """`measure` for an exported graph dir, run by the ONNX Runtime edge runtime."""
    from offramp.edge.onnx_runtime import OnnxEdgeRuntime

    return measure(OnnxEdgeRuntime(graph_dir, intra_op_threads=threads), model, seqs, ref)
