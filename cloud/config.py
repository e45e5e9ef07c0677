"""The cloud server's settings, one typed dataclass filled from the command line (or by tests directly)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from offramp.shared.protocol import DEFAULT_MAX_FRAME_BYTES


@dataclass
class CloudConfig:
    model: str = "default"
    exit_layer: int = 15
    host: str = "127.0.0.1"
    port: int = 8700
    token_file: Path | None = None  # bearer token; OFFRAMP_CLOUD_TOKEN is read when this is None
    max_sessions: int = 256  # all clients together
    max_sessions_per_client: int = 64
    kv_budget_mb: float | None = 1024.0  # deep KV of all sessions; LRU eviction above it
    session_ttl_s: float | None = 600.0  # idle sessions expire
    max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES
    max_batch: int = 32
    batch_window_s: float = 0.002  # how long the batcher waits after a first request for others to join
    max_new_tokens: int = 1024  # cap for the cloud-only completions endpoint
    device: str | None = None  # None: CUDA when present, else CPU
    load_in_8bit: bool = False  # bitsandbytes 8-bit deep layers (CUDA only)
    ssl_cert: Path | None = None
    ssl_key: Path | None = None
    metrics_require_token: bool = False  # /metrics answers without a token unless this is set (/healthz always does)

    @property
    def kv_budget_bytes(self) -> int | None:
        return None if self.kv_budget_mb is None else int(self.kv_budget_mb * (1 << 20))
