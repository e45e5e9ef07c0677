"""What the edge service runs, as one validated dataclass shared by `offramp generate`, the daemon, the SDK and the bench.

The edge runs an exported edge directory (`edge=DIR`, no torch needed), or, on a full install, a model spec that
is exported into the cache first (`model=SPEC`). The cloud's bearer token is read the same way everywhere:
`--cloud-token-file`, else $OFFRAMP_CLOUD_TOKEN, else $OFFRAMP_TOKEN.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

from offramp.edge.decode_loop import CATCH_UP_MODES
from offramp.edge.precision import EDGE_PRECISIONS
from offramp.shared.codecs import CODECS, DEFAULT_CODEC
from offramp.shared.errors import OfframpError, SplitConfigError
from offramp.shared.exit_layers import check_exit_layers

CLOUD_NONE, CLOUD_LOCAL = "none", "local"
DEFAULT_EXIT_LAYER = 15
CLOUD_TOKEN_ENVS = ("OFFRAMP_CLOUD_TOKEN", "OFFRAMP_TOKEN")  # the cloud's own name first, then the edge's


class ServiceConfigError(OfframpError, ValueError):
    """An edge setting (cloud spec, codec, session limit, head with an edge dir, ...) that cannot work."""


def cloud_token(path: Path | str | None = None) -> str | None:
    """The cloud's bearer token: from `path` (one token, whitespace stripped), else $OFFRAMP_CLOUD_TOKEN, else $OFFRAMP_TOKEN.

    Both variables so one exported token serves `offramp cloud serve` and every edge command on a dev machine.
    """
    from offramp.shared.auth import read_token_file

    if path is not None:
        return read_token_file(path)
    for env in CLOUD_TOKEN_ENVS:
        value = os.environ.get(env, "").strip()
        if value:
            return value
    return None


@dataclass(frozen=True)
class EdgeConfig:
    """Where the edge's files come from, how it decides, and where the cloud is."""

    edge: Path | None = None  # an exported edge directory (`offramp export --out DIR`); None: export `model` (cloud extra)
    model: str = "default"  # the model spec to export when `edge` is None; what `--cloud local` loads
    exit_layer: int | None = None  # K when exporting (default 15); with `edge`, must match the directory's if given
    early_exits: tuple[int, ...] | None = None  # exits before K (`--exit-layers 8 15`: (8,)); None: none, or the directory's
    precision: str = "auto"  # auto | fp32 | int8 (see offramp.edge.precision)
    cloud: str = CLOUD_NONE  # none | local | ws://host:port[/path] | wss://...
    codec: str = DEFAULT_CODEC
    threshold: float | None = None  # exit when confidence >= threshold (> 1 never exits); None: calibrated, else 0.9
    max_sessions: int = 16  # concurrent requests; one more gets BusyError
    workers: int | None = None  # compute threads; None = the machine's cores
    edge_threads: int | None = None  # ONNX Runtime intra-op threads per step; None: its default for this machine
    head: Path | None = None  # export with this trained head dir (only without `edge`)
    trained_head: bool = True  # export with the head train-exits left, when present (only without `edge`)
    cloud_token: str | None = None  # bearer token for a ws:// cloud; None: $OFFRAMP_CLOUD_TOKEN, then $OFFRAMP_TOKEN
    lossless: bool = True  # every token confirmed by the cloud before it is sent (False: exit mode)
    catch_up: str = "lazy"  # exit mode: lazy | eager (see DecodeOptions)
    max_draft: int = 16  # drafts ahead of the last confirmed token, at most (the controller adapts below it)
    fixed_draft: int = 0  # > 0: speculate exactly this deep (benchmarks)
    cloud_timeout_s: float = 10.0  # an escalation unanswered this long falls back to the edge
    verify_tls: bool = True  # wss:// certificates are checked unless this is False
    cloud_ca_file: Path | None = None  # a CA bundle for a wss:// cloud with a private certificate
    kv_budget_mb: float | None = None  # --cloud local: the in-process cloud's KV budget (None: unlimited)

    def __post_init__(self) -> None:
        if self.codec not in CODECS:
            raise ServiceConfigError(f"unknown codec {self.codec!r}; known: {sorted(CODECS)}")
        if not (self.cloud in (CLOUD_NONE, CLOUD_LOCAL) or self.cloud.startswith(("ws://", "wss://"))):
            raise ServiceConfigError(f"cloud {self.cloud!r} is not 'none', 'local', or a ws:// / wss:// URL")
        if self.precision not in EDGE_PRECISIONS:
            raise ServiceConfigError(f"edge precision {self.precision!r} is not one of {EDGE_PRECISIONS}")
        if self.catch_up not in CATCH_UP_MODES:
            raise ServiceConfigError(f"catch_up must be one of {CATCH_UP_MODES}, got {self.catch_up!r}")
        for name in ("max_sessions", "max_draft"):
            if getattr(self, name) < 1:
                raise ServiceConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("workers", "edge_threads"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ServiceConfigError(f"{name} must be >= 1, got {value}")
        if not 0 <= self.fixed_draft <= self.max_draft:
            raise ServiceConfigError(f"fixed_draft must be in 0..max_draft ({self.max_draft}), got {self.fixed_draft}")
        if self.exit_layer is not None and self.exit_layer < 1:
            raise ServiceConfigError(f"exit_layer must be >= 1, got {self.exit_layer}")
        if self.early_exits:
            try:
                check_exit_layers([*self.early_exits, self.export_exit_layer])
            except SplitConfigError as exc:
                raise ServiceConfigError(str(exc)) from exc
        if self.threshold is not None and not math.isfinite(self.threshold):
            raise ServiceConfigError(f"threshold must be a finite number, got {self.threshold!r}")
        if not (math.isfinite(self.cloud_timeout_s) and self.cloud_timeout_s > 0):
            raise ServiceConfigError(f"cloud_timeout_s must be > 0, got {self.cloud_timeout_s!r}")
        if self.edge is not None and (self.head is not None or not self.trained_head):
            raise ServiceConfigError(
                f"the exit head is chosen at export: {str(self.edge)!r} runs the head exported into it, so --head / "
                "--no-trained-head apply only to --model (or to `offramp export`)"
            )

    @property
    def cloud_kind(self) -> str:
        return self.cloud if self.cloud in (CLOUD_NONE, CLOUD_LOCAL) else "ws"

    @property
    def export_exit_layer(self) -> int:
        """K for exporting `model` (the flag, else 15)."""
        return self.exit_layer if self.exit_layer is not None else DEFAULT_EXIT_LAYER
