"""Exit heads: map the layer-K hidden state to next-token logits at the edge.

The baseline reuses the model's final norm + LM head (no training). Trained heads (see `train_exits`) register a
kind here so that splitting, export and loading take them without code changes.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import PreTrainedModel

from offramp.shared.errors import ArtifactError

HEAD_MANIFEST = "head.json"
HEAD_WEIGHTS = "head.safetensors"


class FinalNormHead(nn.Module):
    """The untrained baseline: the model's own final norm and LM head applied at layer K."""

    kind = "final_norm"

    def __init__(self, model: PreTrainedModel) -> None:
        super().__init__()
        self.norm = model.model.norm
        self.lm_head = model.lm_head

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.norm(hidden))

    def config(self) -> dict:
        return {}


def head_kv_layers(head: nn.Module | None) -> int:
    """How many KV layers a head keeps in the edge graph's cache: 0 for position-wise heads, 1 for a head with its
    own attention layer (`offramp.models.attention_head`)."""
    return int(getattr(head, "kv_layers", 0)) if head is not None else 0


HeadBuilder = Callable[[PreTrainedModel, dict], nn.Module]
_BUILDERS: dict[str, HeadBuilder] = {FinalNormHead.kind: lambda model, cfg: FinalNormHead(model)}


def register_head(kind: str, builder: HeadBuilder) -> None:
    """Make a head kind loadable by name (called by the modules that define trained heads)."""
    _BUILDERS[kind] = builder


def build_head(kind: str, model: PreTrainedModel, config: dict | None = None) -> nn.Module:
    """A fresh head of `kind` for `model`."""
    if kind not in _BUILDERS:
        import offramp.models.heads  # noqa: F401  (registers the trained head kinds)
    if kind not in _BUILDERS:
        raise ArtifactError(f"unknown exit head kind {kind!r}; known: {sorted(_BUILDERS)}")
    return _BUILDERS[kind](model, config or {})


def trainable_state(head: nn.Module) -> dict[str, torch.Tensor]:
    """Only the head's own trained tensors (shared frozen LM-head weights are not copied into the file)."""
    return {k: v.detach().contiguous() for k, v in head.named_parameters() if v.requires_grad}


def save_head(head: nn.Module, out_dir: Path, meta: dict) -> Path:
    """Write head.safetensors + head.json (kind, config, meta such as exit layer and model fingerprint)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(trainable_state(head), str(out_dir / HEAD_WEIGHTS))
    manifest = {"kind": head.kind, "config": head.config(), **meta}
    (out_dir / HEAD_MANIFEST).write_text(json.dumps(manifest, indent=2))
    return out_dir


def load_head(head_dir: Path, model: PreTrainedModel) -> tuple[nn.Module, dict]:
    """Rebuild a saved head for `model`; returns (head, manifest)."""
    manifest_path = Path(head_dir) / HEAD_MANIFEST
    if not manifest_path.is_file():
        raise ArtifactError(f"no {HEAD_MANIFEST} in {head_dir}")
    manifest = json.loads(manifest_path.read_text())
    head = build_head(manifest["kind"], model, manifest.get("config"))
    weights = Path(head_dir) / HEAD_WEIGHTS
    if weights.is_file():
        state = load_file(str(weights))
        missing, unexpected = head.load_state_dict(state, strict=False)
        if unexpected:
            raise ArtifactError(f"head weights in {weights} have unexpected tensors {unexpected}")
    head.eval()
    return head, manifest


def detached_copy(module: nn.Module) -> nn.Module:
    """A deep copy, for when a head must not share parameters with the model it was built from."""
    return copy.deepcopy(module)
