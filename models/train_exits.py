"""Distil the full model's next-token distribution into a small exit head at layer K (base model frozen).

The loss is KL(teacher || head) over the training vocabulary (every id in the teacher's top-k anywhere in the train
split, which covers nearly all of its probability mass at a fraction of the 49k-way softmax cost), optionally plus
a cosine loss pulling the head's normed features toward the final layer's. Inputs and targets come from the
teacher cache, so a step costs one head forward/backward and two vocabulary matmuls.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm
from transformers import PreTrainedModel

from offramp.models.attention_head import SequenceRows, exit_logits, run_sequences, sample_groups
from offramp.models.exit_heads import build_head, head_kv_layers, save_head
from offramp.models.fingerprint import model_fingerprint
from offramp.models.heads import default_head_config
from offramp.models.corpus import CorpusSpec
from offramp.models.teacher import TeacherData
from offramp.shared.errors import ArtifactError, SplitConfigError

TRAIN_STATE = "train_state.pt"


@dataclass
class TrainConfig:
    """Everything that determines a training run (a resumed run must match it)."""

    exit_layer: int
    kind: str = "residual_mlp"
    head_config: dict = field(default_factory=dict)
    steps: int = 2000
    batch_tokens: int = 1024
    lr: float = 1e-3
    warmup: int = 50
    weight_decay: float = 0.01
    hidden_weight: float = 0.0
    seed: int = 0
    checkpoint_every: int = 100

    def __post_init__(self) -> None:
        if not self.head_config:
            self.head_config = default_head_config(self.kind, self.exit_layer)
        if self.steps < 1 or self.batch_tokens < 1:
            raise SplitConfigError(f"steps {self.steps!r} and batch_tokens {self.batch_tokens!r} must be positive")

    def key(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:12]


def training_vocab(data: TeacherData, train: torch.Tensor) -> torch.Tensor:
    """Sorted ids of every token in the teacher's top-k (or a next token) at some train position."""
    ids = torch.cat([data.topk[train].reshape(-1), data.next_token[train], data.top1[train]])
    return torch.unique(ids)


def distill_loss(
    head: nn.Module, hidden: torch.Tensor, final: torch.Tensor, vocab_weight: torch.Tensor, hidden_weight: float
) -> torch.Tensor:
    """KL(teacher || head) over the training vocabulary (+ optional feature cosine loss)."""
    return feature_loss(head.features(hidden), final, vocab_weight, hidden_weight)


def feature_loss(feats: torch.Tensor, final: torch.Tensor, vocab_weight: torch.Tensor, hidden_weight: float) -> torch.Tensor:
    """distill_loss from the head's normed features (a context head computes them over whole sequences)."""
    student = F.log_softmax(feats @ vocab_weight.T, -1)
    with torch.no_grad():
        teacher = F.log_softmax(final @ vocab_weight.T, -1)
    loss = F.kl_div(student, teacher, log_target=True, reduction="batchmean")
    if hidden_weight:
        loss = loss + hidden_weight * (1 - F.cosine_similarity(feats, final, dim=-1)).mean()
    return loss


@torch.no_grad()
def agreement(head: nn.Module, data: TeacherData, mask: torch.Tensor, exit_layer: int, chunk: int = 1024) -> float:
    """Top-1 agreement of the head (full vocabulary) with the full model over the masked positions."""
    idx = mask.nonzero()[:, 0]
    if len(idx) == 0:
        return float("nan")
    hits = 0
    for sel, logits in exit_logits(head, data, exit_layer, idx, chunk):
        hits += (logits.argmax(-1) == data.top1[sel]).sum().item()
    return hits / len(idx)


def _lr_at(step: int, cfg: TrainConfig) -> float:
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def train_head(
    model: PreTrainedModel,
    data: TeacherData,
    cfg: TrainConfig,
    out_dir: Path,
    resume: bool = True,
    time_budget_s: float | None = None,
    extra_meta: dict | None = None,
) -> tuple[nn.Module, dict]:
    """Train a head on the train split, checkpointing to out_dir; save it with save_head and return (head, stats)."""
    if cfg.exit_layer not in data.hidden:
        raise SplitConfigError(f"teacher data has no layer-{cfg.exit_layer} states (has {sorted(data.hidden)})")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    model.requires_grad_(False)
    head = build_head(cfg.kind, model, cfg.head_config)
    head.train()
    params = [p for p in head.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    gen = torch.Generator().manual_seed(cfg.seed)

    train = data.mask("train")
    train_idx = train.nonzero()[:, 0]
    if len(train_idx) == 0:
        raise SplitConfigError("the corpus has no train-split positions; give more text")
    vocab = training_vocab(data, train)
    vocab_weight = model.lm_head.weight[vocab].detach()
    hidden_k, final = data.hidden[cfg.exit_layer], data.final
    # A head that attends trains on whole sequences: batch_tokens scored positions of a few random sequences.
    sequences = SequenceRows(data, train_idx, cfg.exit_layer) if head_kv_layers(head) else None

    def batch_loss() -> torch.Tensor:
        if sequences is None:
            sel = train_idx[torch.randint(len(train_idx), (cfg.batch_tokens,), generator=gen)]
            return distill_loss(head, hidden_k[sel].float(), final[sel].float(), vocab_weight, cfg.hidden_weight)
        x, index, sel = sequences.batch(sample_groups(sequences, cfg.batch_tokens, gen), cfg.batch_tokens)
        feats = run_sequences(head, x)[index[:, 0], index[:, 1]]
        return feature_loss(feats, final[sel].float(), vocab_weight, cfg.hidden_weight)

    step, losses, elapsed = 0, [], 0.0
    state_path = out_dir / TRAIN_STATE
    if resume and state_path.is_file():
        state = torch.load(state_path, weights_only=False)
        if state["config_key"] != cfg.key():
            raise ArtifactError(
                f"{state_path} is from a different training config ({state['config']}); use --fresh or another --out"
            )
        head.load_state_dict(state["head"], strict=False)
        opt.load_state_dict(state["optimizer"])
        gen.set_state(state["generator"])
        step, losses, elapsed = state["step"], state["losses"], state.get("elapsed_s", 0.0)

    def checkpoint() -> None:
        tmp = state_path.with_suffix(".tmp")
        torch.save(
            {
                "config_key": cfg.key(), "config": asdict(cfg), "step": step, "losses": losses, "elapsed_s": elapsed,
                "head": {k: v for k, v in head.state_dict().items() if not k.startswith("lm_head.")},
                "optimizer": opt.state_dict(), "generator": gen.get_state(),
            },
            tmp,
        )
        tmp.replace(state_path)

    start_time = time.monotonic() - elapsed
    bar = tqdm(total=cfg.steps, initial=step, desc=f"train {cfg.kind} K={cfg.exit_layer}", unit="step")
    stopped_early = False
    while step < cfg.steps:
        if time_budget_s is not None and time.monotonic() - start_time > time_budget_s:
            stopped_early = True
            break
        for group in opt.param_groups:
            group["lr"] = _lr_at(step, cfg)
        loss = batch_loss()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        step += 1
        losses.append(round(loss.item(), 5))
        bar.update()
        bar.set_postfix(loss=f"{sum(losses[-20:]) / len(losses[-20:]):.3f}")
        elapsed = time.monotonic() - start_time
        if step % cfg.checkpoint_every == 0:
            checkpoint()
    bar.close()
    checkpoint()

    head.eval()
    calib = data.mask("calib")
    stats = {
        "steps": step,
        "stopped_by_time_budget": stopped_early,
        "train_seconds": round(elapsed, 1),
        "train_positions": int(len(train_idx)),
        "train_vocab": int(len(vocab)),
        "loss_first": float(sum(losses[:20]) / max(1, len(losses[:20]))),
        "loss_last": float(sum(losses[-50:]) / max(1, len(losses[-50:]))),
        "calib_agreement": agreement(head, data, calib, cfg.exit_layer),
        "train_agreement_sample": agreement(head, data, train & (torch.rand(len(train), generator=gen) < 0.1), cfg.exit_layer),
    }
    meta = {
        "exit_layer": cfg.exit_layer,
        "model_fingerprint": model_fingerprint(model),
        "training": {"config": asdict(cfg), **stats},
        **(extra_meta or {}),
    }
    save_head(head, out_dir, meta)
    return head, stats


# --- pipeline used by the CLI (train-exits, calibrate, eval) ----------------------------------------------------


@dataclass
class Prepared:
    """A loaded model with its corpus and cached teacher targets."""

    model: PreTrainedModel
    tokenizer: object
    fingerprint: str
    spec: CorpusSpec
    sequences: list
    data: TeacherData

    def add_context(self, layers: list[int]) -> "Prepared":
        """Every position's layer-K state for these layers (cached beside the teacher targets; once per corpus)."""
        from offramp.models.teacher import add_context

        add_context(self.model, self.sequences, self.data, layers)
        return self


def prepare(model_spec: str, spec: CorpusSpec, layers: list[int], context: bool = False) -> Prepared:
    """Load the model, build (or read the cached) corpus and teacher targets for the given exit layers; `context`:
    also every position's layer-K state (`Prepared.add_context`), what heads that attend train and run on."""
    from offramp.models.checkpoints import load_model
    from offramp.models.corpus import build_corpus
    from offramp.models.teacher import teacher_data

    model, tok = load_model(model_spec)
    seqs = build_corpus(model, tok, spec)
    data = teacher_data(model, seqs, layers, train_dtype=spec.teacher_train_dtype)
    prep = Prepared(model, tok, model_fingerprint(model), spec, seqs, data)
    return prep.add_context(layers) if context else prep


def default_head_dir(fingerprint: str, exit_layer: int) -> Path:
    """Where train-exits writes, and calibrate/eval read, the head for one exit layer."""
    from offramp.shared.paths import artifacts_dir

    return artifacts_dir(fingerprint, exit_layer) / "head"


def corpus_spec_from_manifest(head_dir: Path) -> CorpusSpec | None:
    """The corpus a head was trained on (so calibrate/eval judge it on that corpus's held-out splits)."""
    path = Path(head_dir) / "head.json"
    if not path.is_file():
        return None
    spec = json.loads(path.read_text()).get("corpus_spec")
    if not spec:
        return None
    spec["files"] = tuple(spec.get("files", ()))
    return CorpusSpec(**spec)
