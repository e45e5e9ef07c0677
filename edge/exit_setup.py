"""Which exit head and exit rule the edge uses, and at what threshold: trained and calibrated when present.

`offramp train-exits` writes a head to `artifacts_dir(fingerprint, K)/head` and `offramp calibrate` stores the
rule and the threshold that met its target agreement there (`router.json`). Generate, the daemon and the SDK
pick them up by default; an explicit head dir or threshold wins; without any, the untrained final-norm head
with the max-prob rule at 0.9 (and the edge escalates most tokens, as it should with that head).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from offramp.models.exit_heads import HEAD_MANIFEST
from offramp.shared.exit_rule import DEFAULT_MAX_PROB_THRESHOLD, ROUTER_FILE, ExitRule, load_exit_rule
from offramp.shared.errors import ArtifactError


@dataclass
class ExitSetup:
    head_dir: Path | None  # None: the final norm + LM head
    rule: ExitRule
    threshold: float
    threshold_source: str  # flag | calibrated | default

    def describe(self) -> dict[str, Any]:
        return {
            "head": str(self.head_dir) if self.head_dir else "final-norm (untrained)",
            "rule": self.rule.kind,
            "threshold": self.threshold,
            "threshold_source": self.threshold_source,
        }


def find_trained_head(model: Any, exit_layer: int) -> Path | None:
    """The head `offramp train-exits` left for this model and K, if any."""
    from offramp.models.fingerprint import model_fingerprint
    from offramp.models.train_exits import default_head_dir

    candidate = default_head_dir(model_fingerprint(model), exit_layer)
    return candidate if (candidate / HEAD_MANIFEST).is_file() else None


def resolve_exit_setup(
    model: Any,
    exit_layer: int,
    head_dir: Path | str | None = None,
    use_trained: bool = True,
    threshold: float | None = None,
) -> ExitSetup:
    """An explicit head dir must hold a head; otherwise the trained one is used when present (unless told not to)."""
    if head_dir is not None:
        head_dir = Path(head_dir)
        if not (head_dir / HEAD_MANIFEST).is_file():
            raise ArtifactError(f"--head {str(head_dir)!r} holds no exit head ({HEAD_MANIFEST} missing); train one with `offramp train-exits`")
    elif use_trained:
        head_dir = find_trained_head(model, exit_layer)
    rule = load_exit_rule(head_dir) if head_dir is not None else ExitRule()
    if threshold is not None:
        return ExitSetup(head_dir, rule, float(threshold), "flag")
    if head_dir is not None and (head_dir / ROUTER_FILE).is_file():
        return ExitSetup(head_dir, rule, rule.threshold, "calibrated")
    return ExitSetup(head_dir, rule, DEFAULT_MAX_PROB_THRESHOLD, "default")
