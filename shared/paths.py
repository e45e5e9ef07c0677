"""Where offramp keeps converted checkpoints, exported graphs and trained heads."""

import os
from pathlib import Path


def offramp_home() -> Path:
    """Root cache dir: `$OFFRAMP_HOME`, else `~/.cache/offramp`; created on first use."""
    root = Path(os.environ.get("OFFRAMP_HOME") or Path.home() / ".cache" / "offramp")
    root.mkdir(parents=True, exist_ok=True)
    return root


def artifacts_dir(fingerprint: str, exit_layer: int) -> Path:
    """Default home of one model's artifacts at one exit layer (edge graphs, heads, calibration)."""
    path = offramp_home() / "artifacts" / fingerprint[:16] / f"k{exit_layer}"
    path.mkdir(parents=True, exist_ok=True)
    return path
