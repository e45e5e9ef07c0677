"""Exit rules: decide at the edge, from the exit logits of the newest position, whether the token can stay local.

`ExitRule.confidence(logits, hidden)` estimates P(edge token == full model token); the edge exits when it is
>= `threshold`. The default rule is the max softmax probability. A trained rule is a logistic regression over a
few cheap logit statistics (max-prob, its log-odds, entropy, top-2 margins, max logit), fitted on the calib split
by `offramp calibrate` (`offramp.models.router`) and stored as `router.json` in the head directory with the
threshold it chose. Everything here is numpy: the edge evaluates rules without torch.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from offramp.shared.errors import ArtifactError

ROUTER_FILE = "router.json"
NEVER = 2.0  # a threshold above every confidence: never exit
DEFAULT_MAX_PROB_THRESHOLD = 0.9  # used only when no calibration has been run
FEATURES = ("max_prob", "logit_maxprob", "entropy", "margin_prob", "margin_logit", "max_logit_centered")


def logit_features(logits: np.ndarray) -> np.ndarray:
    """[..., V] logits -> [..., len(FEATURES)] float64 features (the edge computes these for one position)."""
    z = np.asarray(logits, dtype=np.float64)
    top2 = np.partition(z, -2, axis=-1)[..., -2:]
    z1, z2 = top2[..., 1], top2[..., 0]
    shifted = z - z1[..., None]
    e = np.exp(shifted)
    s = e.sum(-1)
    p1 = 1.0 / s
    p2 = np.exp(z2 - z1) / s
    entropy = np.log(s) - (e * shifted).sum(-1) / s
    eps = 1e-7
    p1c = np.clip(p1, eps, 1 - eps)
    return np.stack(
        [p1, np.log(p1c) - np.log1p(-p1c), entropy, p1 - p2, z1 - z2, z1 - z.mean(-1)], axis=-1
    )


@dataclass
class ExitRule:
    """Confidence that the edge's argmax equals the full model's, and the threshold to exit at."""

    kind: str = "max_prob"  # max_prob | logistic
    threshold: float = DEFAULT_MAX_PROB_THRESHOLD
    weights: list[float] = field(default_factory=list)
    bias: float = 0.0
    mean: list[float] = field(default_factory=list)
    scale: list[float] = field(default_factory=list)
    meta: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.kind not in ("max_prob", "logistic"):
            raise ArtifactError(f"unknown exit rule kind {self.kind!r}; known: ['logistic', 'max_prob']")
        if self.kind == "logistic" and not (len(self.weights) == len(self.mean) == len(self.scale) == len(FEATURES)):
            raise ArtifactError(f"logistic exit rule needs {len(FEATURES)} weights/mean/scale, got {len(self.weights)}")

    def confidences(self, logits: np.ndarray) -> np.ndarray:
        """Batched confidence for [N, V] logits."""
        return self.from_features(logit_features(logits))

    def from_features(self, features: np.ndarray) -> np.ndarray:
        """Confidence from precomputed `logit_features` (evaluation computes features once per position)."""
        if self.kind == "max_prob":
            return features[..., 0]
        x = (features - np.asarray(self.mean)) / np.asarray(self.scale)
        return 1.0 / (1.0 + np.exp(-np.clip(x @ np.asarray(self.weights) + self.bias, -50, 50)))

    def confidence(self, logits: np.ndarray, hidden: np.ndarray | None = None) -> float:
        """Confidence for the newest position's exit logits [V] (hidden [H] is accepted but not needed)."""
        return float(self.confidences(np.asarray(logits)[None])[0])

    def should_exit(self, logits: np.ndarray, hidden: np.ndarray | None = None) -> bool:
        return self.confidence(logits, hidden) >= self.threshold

    def to_dict(self) -> dict:
        return {
            "kind": self.kind, "threshold": self.threshold, "features": list(FEATURES), "weights": self.weights,
            "bias": self.bias, "mean": self.mean, "scale": self.scale, "meta": self.meta,
        }

    @classmethod
    def from_dict(cls, d: dict) -> "ExitRule":
        if d.get("kind") == "logistic" and list(d.get("features", FEATURES)) != list(FEATURES):
            raise ArtifactError(f"router features {d.get('features')} differ from this version's {list(FEATURES)}")
        return cls(
            kind=d.get("kind", "max_prob"), threshold=float(d.get("threshold", DEFAULT_MAX_PROB_THRESHOLD)),
            weights=list(d.get("weights", [])), bias=float(d.get("bias", 0.0)), mean=list(d.get("mean", [])),
            scale=list(d.get("scale", [])), meta=dict(d.get("meta", {})),
        )


def save_exit_rule(rule: ExitRule, head_dir: Path) -> Path:
    path = Path(head_dir) / ROUTER_FILE
    path.write_text(json.dumps(rule.to_dict(), indent=2))
    return path


def load_exit_rule(head_dir: Path | None) -> ExitRule:
    """The rule stored with a head (`router.json`), else the default max-prob rule."""
    if head_dir is None or not (Path(head_dir) / ROUTER_FILE).is_file():
        return ExitRule()
    try:
        data = json.loads((Path(head_dir) / ROUTER_FILE).read_text())
    except json.JSONDecodeError as exc:
        raise ArtifactError(f"{Path(head_dir) / ROUTER_FILE} is not valid JSON: {exc}") from exc
    rule = ExitRule.from_dict(data)
    if not math.isfinite(rule.threshold):
        raise ArtifactError(f"router threshold {rule.threshold!r} in {head_dir} is not finite")
    return rule
