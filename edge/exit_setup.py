"""Which exit rule the edge uses, and at what threshold: the calibrated one the edge directory carries, else max-prob.

The head itself is baked into the edge graph at export (`offramp export --head`, or the head `offramp
train-exits` left, picked by offramp.models.edge_dir); `offramp calibrate` stores the rule and the threshold
that met its target agreement beside the head (`router.json`), and export copies it into the edge directory.
An explicit threshold wins; without a calibration, the max-prob rule at 0.9 (and an untrained final-norm head
escalates most tokens, as it should).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from offramp.shared.edge_dir import EdgeDirManifest
from offramp.shared.exit_rule import DEFAULT_MAX_PROB_THRESHOLD, ExitRule, load_exit_rule

UNTRAINED_HEAD = "final-norm (untrained)"


@dataclass
class ExitSetup:
    head: str  # where the head came from (its training dir), or UNTRAINED_HEAD
    rule: ExitRule
    threshold: float
    threshold_source: str  # flag | calibrated | default

    def describe(self) -> dict[str, Any]:
        return {"head": self.head, "rule": self.rule.kind, "threshold": self.threshold, "threshold_source": self.threshold_source}


def resolve_early_exits(edge_dir: Path, manifest: EdgeDirManifest) -> list[tuple[int, ExitSetup]]:
    """Each early exit of a multi-exit edge with its rule and threshold: its calibrated one (`exit-k<k>/router.json`),
    else max-prob >= 0.9. `--threshold` sets only the last exit's: an early exit's threshold is its own head's."""
    setups = []
    for entry in manifest.early_exits:
        origin = entry.get("head_source") or UNTRAINED_HEAD
        if entry.get("exit_rule"):
            rule = load_exit_rule(edge_dir / Path(entry["exit_rule"]).parent)
            setups.append((int(entry["exit_layer"]), ExitSetup(origin, rule, rule.threshold, "calibrated")))
        else:
            setups.append((int(entry["exit_layer"]), ExitSetup(origin, ExitRule(), DEFAULT_MAX_PROB_THRESHOLD, "default")))
    return setups


def resolve_exit_setup(edge_dir: Path, manifest: EdgeDirManifest, threshold: float | None = None) -> ExitSetup:
    """The rule in `edge_dir` (router.json) and its threshold, unless `threshold` is given."""
    rule = load_exit_rule(edge_dir) if manifest.exit_rule else ExitRule()
    origin = manifest.head_source or UNTRAINED_HEAD
    if threshold is not None:
        return ExitSetup(origin, rule, float(threshold), "flag")
    if manifest.exit_rule:
        return ExitSetup(origin, rule, rule.threshold, "calibrated")
    return ExitSetup(origin, rule, DEFAULT_MAX_PROB_THRESHOLD, "default")
