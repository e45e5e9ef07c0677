"""Judge an exit head + exit rule on held-out text: teacher-forced sweeps and free-running collaborative greedy.

Teacher-forced: at every held-out position the collaborative token is the edge's argmax if the rule exits, else
the full model's; we report exit rate, top-1 agreement with the full model and perplexity (collaborative, full,
edge-only) over a sweep of thresholds. Free-running: greedy decoding where exited tokens come from the edge and
the cloud catches up on their hidden states at its next turn (so its KV stays exact), compared with the full
model's own greedy output: common-prefix fraction and fraction of tokens the edge produced.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import PreTrainedModel

from offramp.models.attention_head import exit_logits
from offramp.models.corpus import TextSequence
from offramp.models.fingerprint import model_fingerprint
from offramp.shared.exit_rule import NEVER, ExitRule, logit_features
from offramp.models.split import CloudPart, EdgePart
from offramp.models.teacher import HUMAN_SOURCES, SERVING_SOURCES, TeacherData
from offramp.shared.errors import SplitConfigError
from offramp.shared.paths import offramp_home

EXIT_RATE_GRID = (0.0, 0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.35, 0.4, 0.45, 0.5, 0.55, 0.6, 0.65, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95, 1.0)


@dataclass
class ExitStats:
    """Per-position numpy arrays over a set of held-out positions."""

    features: np.ndarray  # [N, F] router features of the exit logits
    agree: np.ndarray  # [N] bool: edge argmax == full model argmax
    edge_logprob: np.ndarray  # [N] edge log-prob of the actual next token
    full_logprob: np.ndarray  # [N] full model log-prob of the actual next token

    def __len__(self) -> int:
        return len(self.agree)


@torch.no_grad()
def exit_stats(head: nn.Module, data: TeacherData, mask: torch.Tensor, exit_layer: int, chunk: int = 256) -> ExitStats:
    """Run the head over the cached layer-K states of the masked positions and collect what rules and sweeps need."""
    idx = mask.nonzero()[:, 0]
    feats, agree, edge_lp = [], [], []
    for sel, logits in exit_logits(head, data, exit_layer, idx, chunk):
        logits = logits.float()
        agree.append((logits.argmax(-1) == data.top1[sel]).numpy())
        edge_lp.append(torch.log_softmax(logits, -1).gather(-1, data.next_token[sel][:, None])[:, 0].numpy())
        feats.append(logit_features(logits.numpy()))
    n_feat = len(logit_features(np.zeros((1, 2))).T)
    return ExitStats(
        features=np.concatenate(feats) if feats else np.zeros((0, n_feat)),
        agree=np.concatenate(agree) if agree else np.zeros(0, bool),
        edge_logprob=np.concatenate(edge_lp) if edge_lp else np.zeros(0),
        full_logprob=data.full_logprob[idx].numpy().astype(np.float64),
    )


def point(stats: ExitStats, confidence: np.ndarray, threshold: float) -> dict:
    """Exit rate, collaborative agreement and perplexities at one threshold."""
    exits = confidence >= threshold
    n = max(1, len(stats))
    collab_lp = np.where(exits, stats.edge_logprob, stats.full_logprob)
    return {
        "threshold": float(threshold),
        "exit_rate": float(exits.mean()) if len(stats) else 0.0,
        "agreement": float(1.0 - (exits & ~stats.agree).sum() / n),
        "precision_of_exits": float(stats.agree[exits].mean()) if exits.any() else 1.0,
        "ppl": float(math.exp(-collab_lp.mean())) if len(stats) else float("nan"),
    }


def sweep(stats: ExitStats, rule: ExitRule, extra_thresholds: Sequence[float] = ()) -> dict:
    """Points at thresholds spread over exit rates 0..1 (+ extras), and the reference perplexities."""
    conf = rule.from_features(stats.features)
    thresholds = {NEVER}
    for rate in EXIT_RATE_GRID[1:]:
        thresholds.add(float(np.quantile(conf, 1 - rate, method="higher")) if len(conf) else NEVER)
    thresholds.update(float(t) for t in extra_thresholds)
    points = sorted((point(stats, conf, t) for t in thresholds), key=lambda p: p["exit_rate"])
    return {
        "positions": len(stats),
        "points": points,
        "full_ppl": float(math.exp(-stats.full_logprob.mean())) if len(stats) else float("nan"),
        "edge_ppl": float(math.exp(-stats.edge_logprob.mean())) if len(stats) else float("nan"),
        "edge_top1_agreement": float(stats.agree.mean()) if len(stats) else float("nan"),
    }


def best_exit_rate_at(stats: ExitStats, rule: ExitRule, target: float, level: float = 0.95) -> dict:
    """Oracle view on the evaluated split itself: the largest exit rate whose agreement >= target, and the largest
    whose one-sided `level` Clopper-Pearson lower bound on agreement >= target (`certified_*`)."""
    from offramp.models.router import certified_threshold, pick_threshold

    conf = rule.from_features(stats.features)
    t, rate, agr = pick_threshold(conf, stats.agree, target)
    ct, crate, cagr, bound = certified_threshold(conf, stats.agree, target, level)
    return {"target": target, "threshold": t, "exit_rate": rate, "agreement": agr, "certified_threshold": ct,
            "certified_exit_rate": crate, "certified_agreement": cagr, "agreement_lower_bound": bound, "level": level}


def lossless_drafting(agree: np.ndarray, seq: np.ndarray, drafts: Sequence[int] = (2, 4, 8)) -> list[dict]:
    """Lossless mode's yield at each draft length, from teacher-forced agreement along whole held-out texts.

    A round trip verifies up to `n` drafts: the edge's tokens are kept while they equal the full model's (then
    they *are* its tokens, so the next draft sees the true prefix, and the teacher-forced agreement there is the
    real one), and the cloud adds one token: the correction at the first wrong draft, or the next token after n
    right ones. On serving text (the full model's own greedy continuations) this is exactly greedy lossless
    decoding with blocks of n; the live loop pipelines blocks, which changes time, not these counts.
    """
    a = np.asarray(agree, dtype=bool)
    bounds = np.r_[0, np.nonzero(np.diff(np.asarray(seq)))[0] + 1, len(a)]
    out = []
    for n in drafts:
        tokens = trips = verified = accepted = 0
        for lo, hi in zip(bounds[:-1], bounds[1:]):
            t = lo
            while t < hi:
                block = a[t : min(t + n, hi)]
                run = int(np.argmin(block)) if not block.all() else len(block)
                trips += 1
                verified += run + (run < len(block))  # drafts after the first wrong one are never checked
                accepted += run
                tokens += min(run + 1, hi - t)  # the cloud's token, unless the text ended
                t += run + 1
        out.append({"drafts": n, "tokens_per_round_trip": tokens / max(trips, 1),
                    "acceptance_rate": accepted / max(verified, 1), "round_trips": trips})
    return out


# --- free-running collaborative greedy ------------------------------------------------------------------------


@torch.no_grad()
def collaborative_greedy(
    edge: EdgePart, cloud: CloudPart, rule: ExitRule | None, prompt: Sequence[int], max_new_tokens: int, eos: int | None
) -> tuple[list[int], list[bool]]:
    """Greedy decode where the edge keeps a token when the rule is confident; rule None = always the cloud.

    The cloud is only called on a non-exit and then processes every hidden state the edge produced since its last
    call, so its KV cache is exactly the full model's. Returns (tokens, from_edge flags).
    """
    tokens, from_edge = [], []
    edge_past, cloud_past = None, None
    pending: list[torch.Tensor] = []
    ids = torch.tensor([list(prompt)])
    pos = 0
    for _ in range(max_new_tokens):
        q = ids.shape[1]
        position_ids = torch.arange(pos, pos + q)[None]
        out = edge(ids, position_ids, edge_past)
        edge_past = out.present
        pending.append(out.hidden)
        logits = out.exit_logits[0, -1]
        if rule is not None and rule.should_exit(logits.float().numpy(), out.hidden[0, -1].numpy()):
            tok, edged = int(logits.argmax()), True
        else:
            hidden = torch.cat(pending, dim=1)
            start = pos + q - hidden.shape[1]
            cl_logits, cloud_past = cloud(hidden, torch.arange(start, pos + q)[None], cloud_past)
            pending = []
            tok, edged = int(cl_logits[0, -1].argmax()), False
        tokens.append(tok)
        from_edge.append(edged)
        pos += q
        ids = torch.tensor([[tok]])
        if eos is not None and tok == eos:
            break
    return tokens, from_edge


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def reference_greedy(
    model: PreTrainedModel, prompts: Sequence[tuple[str, list[int]]], max_new_tokens: int, eos: int | None
) -> dict[str, list[int]]:
    """The full model's greedy continuations of the prompts (same code path, never exiting), cached per model."""
    key = hashlib.sha256(json.dumps([max_new_tokens, eos, list(prompts)]).encode()).hexdigest()[:12]
    cache = offramp_home() / "corpus" / model_fingerprint(model)[:16] / f"reference-{key}.json"
    if cache.is_file():
        return json.loads(cache.read_text())
    edge, cloud = EdgePart(model, 1), CloudPart(model, 1)
    ref = {}
    for pid, ids in tqdm(prompts, desc="reference greedy", unit="prompt"):
        ref[pid] = collaborative_greedy(edge, cloud, None, ids, max_new_tokens, eos)[0]
    cache.parent.mkdir(parents=True, exist_ok=True)
    cache.write_text(json.dumps(ref))
    return ref


def free_running(
    model: PreTrainedModel,
    edge: EdgePart,
    rule: ExitRule,
    prompts: Sequence[tuple[str, list[int]]],
    max_new_tokens: int,
    eos: int | None,
    desc: str = "free-running",
) -> dict:
    """Collaborative greedy vs the full model's greedy on each prompt: mean common-prefix fraction, edge fraction."""
    ref = reference_greedy(model, prompts, max_new_tokens, eos)
    cloud = CloudPart(model, edge.exit_layer)
    prefix, edge_frac, exact, edge_tokens, total = [], [], 0, 0, 0
    for pid, ids in tqdm(prompts, desc=desc, unit="prompt"):
        toks, flags = collaborative_greedy(edge, cloud, rule, ids, max_new_tokens, eos)
        r = ref[pid]
        lcp = common_prefix(toks, r)
        prefix.append(lcp / max(1, len(r)))
        exact += int(toks == r)
        edge_frac.append(sum(flags) / max(1, len(flags)))
        edge_tokens += sum(flags)
        total += len(flags)
    n = max(1, len(prompts))
    return {
        "prompts": len(prompts),
        "max_new_tokens": max_new_tokens,
        "common_prefix_fraction": float(sum(prefix) / n),
        "exact_match_fraction": exact / n,
        "edge_fraction": edge_tokens / max(1, total),
        "edge_fraction_mean_per_prompt": float(sum(edge_frac) / n),
    }


def heldout_prompts(seqs: Sequence[TextSequence], sources: Sequence[str], limit: int, prompt_tokens: int = 48) -> list[tuple[str, list[int]]]:
    """Test-split prompts: the built-in prompt itself for self-generated text, the opening of a human document."""
    out = []
    for s in seqs:
        if s.split != "test" or s.source not in sources:
            continue
        ids = s.input_ids[: s.score_from] if s.score_from > 1 else s.input_ids[:prompt_tokens]
        out.append((s.doc_id, ids))
    return out[:limit]


def pareto_plot(curves: dict[str, list[dict]], path: Path, title: str) -> Path:
    """Exit rate vs agreement, one curve per label (e.g. per exit layer)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for label, points in curves.items():
        pts = sorted(points, key=lambda p: p["exit_rate"])
        ax.plot([p["exit_rate"] for p in pts], [p["agreement"] for p in pts], marker=".", label=label)
    ax.axhline(0.99, color="grey", lw=0.8, ls="--")
    ax.set_xlabel("exit rate (tokens decided at the edge)")
    ax.set_ylabel("top-1 agreement with the full model")
    ax.set_title(title)
    ax.set_xlim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)


# --- calibration and the full evaluation, as run by the CLI ---------------------------------------------------


def calibrate_head(
    data: TeacherData,
    head: nn.Module,
    exit_layer: int,
    target: float,
    router: str = "logistic",
    sources: Sequence[str] = SERVING_SOURCES,
    level: float = 0.95,
) -> ExitRule:
    """Fit the rule (logistic or max-prob) on the calib split and pick the lowest threshold whose one-sided `level`
    Clopper-Pearson lower bound on agreement there meets `target` (a point estimate would miss it half the time)."""
    from offramp.models.router import certified_threshold, fit_logistic

    stats = exit_stats(head, data, data.mask("calib", sources), exit_layer)
    if len(stats) == 0:
        raise SplitConfigError(f"no calib-split positions from sources {list(sources)} to calibrate on")
    if router == "logistic":
        rule = fit_logistic(stats.features, stats.agree)
    elif router == "max_prob":
        rule = ExitRule(kind="max_prob")
    else:
        raise SplitConfigError(f"unknown router {router!r}; choose 'logistic' or 'max_prob'")
    conf = rule.from_features(stats.features)
    rule.threshold, rate, agr, bound = certified_threshold(conf, stats.agree, target, level)
    rule.meta = {
        "exit_layer": exit_layer, "target_agreement": target, "calib_sources": list(sources),
        "calib_positions": len(stats), "calib_exit_rate": rate, "calib_agreement": agr,
        "calib_agreement_lower_bound": bound, "confidence_level": level,
        "calib_edge_top1_agreement": float(stats.agree.mean()),
    }
    return rule


def evaluate_layer(
    model: PreTrainedModel,
    tok: object,
    seqs: Sequence[TextSequence],
    data: TeacherData,
    head: nn.Module,
    rule: ExitRule,
    exit_layer: int,
    free_prompts: int = 24,
    max_new_tokens: int = 64,
    targets: Sequence[float] = (0.99, 0.98, 0.95),
) -> dict:
    """Teacher-forced sweeps on the test split (serving and human text) plus free-running greedy at rule.threshold."""
    result: dict = {"exit_layer": exit_layer, "calibrated_threshold": rule.threshold, "rule": rule.kind}
    groups = {"serving": SERVING_SOURCES, "human": HUMAN_SOURCES}
    for name, sources in groups.items():
        stats = exit_stats(head, data, data.mask("test", sources), exit_layer)
        if len(stats) == 0:
            continue
        sw = sweep(stats, rule, [rule.threshold])
        sw["at_calibrated"] = point(stats, rule.from_features(stats.features), rule.threshold)
        sw["oracle_on_test"] = [best_exit_rate_at(stats, rule, t) for t in targets]
        sw["lossless"] = lossless_drafting(stats.agree, data.seq[data.mask("test", sources)].numpy())
        if rule.kind != "max_prob":  # what the trained router buys over raw max-prob
            sw["oracle_on_test_max_prob"] = [best_exit_rate_at(stats, ExitRule(kind="max_prob"), t) for t in targets]
        result[name] = sw
    main = result.get("serving") or result.get("human")
    result["points"] = [{k: p[k] for k in ("threshold", "exit_rate", "agreement", "ppl")} for p in main["points"]] if main else []
    edge = EdgePart(model, exit_layer, head)
    eos = getattr(tok, "eos_token_id", None)
    result["free_running"] = {}
    for name, sources in groups.items():
        prompts = heldout_prompts(seqs, sources, free_prompts)
        if prompts:
            result["free_running"][name] = free_running(
                model, edge, rule, prompts, max_new_tokens, eos, desc=f"free-running {name} K={exit_layer}"
            )
    return result
