"""The one place that wires the edge: edge directory, runtime pool, exit rule, cloud link, stop ids, text.

`offramp generate`, the daemon (`offramp edge serve`), the SDK's `LocalEngine` and the bench all build their
edge with `EdgeService.open(EdgeConfig)`, so they run the same graph with the same rule, stop on the same ids
(EOS plus the end-of-turn tokens the vocabulary has) and decode text the same incremental way.

Nothing here imports torch, transformers or the cloud: an exported edge directory is enough (`edge=DIR`).
`model=SPEC` (the full install) exports the model into the cache first, and `--cloud local` finds the
in-process cloud through the `offramp.cloud_links` entry point; both fail with a clear error naming the
`cloud` extra where it is not installed.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from offramp.edge.config import CLOUD_LOCAL, CLOUD_NONE, EdgeConfig, ServiceConfigError, cloud_token
from offramp.edge.exit_setup import resolve_early_exits, resolve_exit_setup
from offramp.edge.decode_loop import DecodeOptions
from offramp.edge.link import CLOUD_EXTRA_HINT, CloudLink, CloudUnavailableError, LocalLinkSpec, open_local_link
from offramp.edge.multi_exit import ExitGate, open_edge_runtime
from offramp.edge.precision import resolve_precision
from offramp.edge.request_link import LinkHealth
from offramp.edge.runtime import EdgeRuntime
from offramp.edge.runtime_pool import BusyError, RuntimePool
from offramp.edge.text_stream import TextRequest, TextStream
from offramp.edge.tokenizer import EdgeTokenizer
from offramp.shared.edge_dir import TOKENIZER_DIR, EdgeDirManifest
from offramp.shared.tokens import stop_token_ids

RuntimeWrapper = Callable[[EdgeRuntime], EdgeRuntime]


def resolve_edge_dir(config: EdgeConfig, loaded: tuple[Any, Any] | None = None, progress: bool = True) -> tuple[Path, Any]:
    """The edge directory to run, and the model loaded to make it (None with `edge=DIR`).

    `model=SPEC` exports into the artifacts cache (only the precision this run needs), which takes torch: on an
    edge-only install that is an error naming the `cloud` extra.
    """
    if config.edge is not None:
        return Path(config.edge), loaded[0] if loaded is not None else None
    try:
        from offramp.models.edge_dir import ensure_edge_dir
    except ImportError as exc:
        raise ServiceConfigError(
            f"--model {config.model} exports the model first, which needs {exc.name or 'torch'}: {CLOUD_EXTRA_HINT}, "
            "or run an exported edge directory with --edge DIR (`offramp export --out DIR` on a full install)"
        ) from exc
    precision = resolve_precision(config.precision, config.cloud)
    return ensure_edge_dir(config.model, config.export_exit_layer, [precision], config.head, config.trained_head, loaded, progress,
                           early_exits=config.early_exits or ())


def public_url(url: str) -> str:
    """A URL fit for /healthz and logs: no user info, no query (either could carry a credential)."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    netloc = f"[{host}]" if ":" in host else host
    if parts.port:
        netloc += f":{parts.port}"
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


class EdgeService:
    """Edge directory + runtime pool + exit rule + cloud link + tokenizer: what every edge entry point generates with."""

    def __init__(
        self,
        edge_dir: Path,
        config: EdgeConfig,
        *,
        link: CloudLink | None = None,
        loaded_model: Any = None,
        wrap_runtime: RuntimeWrapper | None = None,
        wrap_link: Callable[[CloudLink], CloudLink] | None = None,
    ) -> None:
        """Build from an edge directory. `link` replaces the one `config.cloud` names (tests inject faulty ones);
        `loaded_model` lets `--cloud local` reuse weights this process already holds; `wrap_runtime`/`wrap_link`
        let a benchmark time edge steps and round trips without another way of wiring."""
        self.edge_dir = Path(edge_dir)
        self.config = config
        self.manifest = EdgeDirManifest.read(self.edge_dir)
        m = self.manifest
        if config.exit_layer is not None and config.exit_layer != m.exit_layer:
            raise ServiceConfigError(f"--exit-layer {config.exit_layer} does not match the edge directory {str(self.edge_dir)!r}, exported at K={m.exit_layer}")
        if config.early_exits is not None and tuple(config.early_exits) != m.exit_layers[:-1]:
            asked = [*config.early_exits, config.export_exit_layer]
            raise ServiceConfigError(f"--exit-layers {' '.join(map(str, asked))} does not match the edge directory {str(self.edge_dir)!r}, "
                                     f"exported with exits at {list(m.exit_layers)}")
        self.exit_layer = m.exit_layer
        self.exit_layers = m.exit_layers
        self.total_layers = m.num_layers
        self.max_positions = m.max_positions
        self.vocab_size = m.vocab_size
        self.model_name = m.model_name
        self.precision = resolve_precision(config.precision, config.cloud, m.precisions)
        self.executor = ThreadPoolExecutor(config.workers or os.cpu_count() or 1, thread_name_prefix="offramp-edge")
        self.exit_setup = resolve_exit_setup(self.edge_dir, m, config.threshold)
        self.early_exits = resolve_early_exits(self.edge_dir, m)
        self.threshold = self.exit_setup.threshold
        self.confidence = self.exit_setup.rule.confidence
        self.tokenizer = EdgeTokenizer.from_dir(self.edge_dir / TOKENIZER_DIR)
        self.stop_ids: tuple[int, ...] = stop_token_ids(self.tokenizer)
        gates = [ExitGate(setup.rule.confidence, setup.threshold) for _, setup in self.early_exits]
        first = open_edge_runtime(self.edge_dir / m.graphs[self.precision], gates, intra_op_threads=config.edge_threads)
        self.runtime_manifest = first.manifest
        self.pool = RuntimePool(first, config.max_sessions)
        self._wrap_runtime = wrap_runtime
        self.health = LinkHealth(config.cloud_kind, public_url(config.cloud) if config.cloud_kind == "ws" else None)
        self.link: CloudLink | None
        if link is not None:
            self.link = link
        elif config.cloud == CLOUD_NONE:
            self.link = None
            self.health.state = "disabled"
        elif config.cloud == CLOUD_LOCAL:
            kv = int(config.kv_budget_mb * 2**20) if config.kv_budget_mb is not None else None
            self.link = open_local_link(LocalLinkSpec(m.model_spec if config.edge is not None else config.model, m.exit_layer,
                                                      config.codec, m.model_fingerprint, self.executor, kv, loaded_model))
            self.health.state = "up"
        else:
            self.link = self._ws_link()
        if self.link is not None and wrap_link is not None:
            self.link = wrap_link(self.link)
        self.closed = False

    @classmethod
    def open(
        cls,
        config: EdgeConfig,
        *,
        loaded: tuple[Any, Any] | None = None,
        link: CloudLink | None = None,
        progress: bool = True,
        wrap_runtime: RuntimeWrapper | None = None,
        wrap_link: Callable[[CloudLink], CloudLink] | None = None,
    ) -> "EdgeService":
        """The service `config` describes: its edge directory (exported first for `model=SPEC`), then everything else.

        `loaded=(model, tokenizer)` reuses a model already in memory for `model=SPEC` (export and `--cloud local`).
        """
        edge_dir, model = resolve_edge_dir(config, loaded, progress)
        return cls(edge_dir, config, link=link, loaded_model=model, wrap_runtime=wrap_runtime, wrap_link=wrap_link)

    def _ws_link(self) -> CloudLink:
        from offramp.edge.ws_link import WebSocketCloudLink

        c = self.config
        token = c.cloud_token if c.cloud_token is not None else cloud_token()
        return WebSocketCloudLink(
            c.cloud, codec=c.codec, manifest=self.runtime_manifest, token=token, timeout_s=c.cloud_timeout_s,
            verify_tls=c.verify_tls, ca_file=str(c.cloud_ca_file) if c.cloud_ca_file else None,
        )

    async def check_cloud(self) -> None:
        """Say hello to a ws:// cloud now, so a refusal (wrong token, another model) fails start-up with the
        cloud's message; an unreachable cloud is only noted (requests fall back until it is back)."""
        connect = getattr(self.link, "connect", None)
        if connect is None:
            return
        try:
            await connect()
        except CloudUnavailableError as exc:
            self.health.failed(str(exc))
            return
        self.health.succeeded()

    def instrument_runtime(self, runtime: EdgeRuntime) -> EdgeRuntime:
        return self._wrap_runtime(runtime) if self._wrap_runtime is not None else runtime

    @property
    def mode(self) -> str:
        return "collaborative" if self.link is not None else "edge-standalone"

    # -- prompts --------------------------------------------------------------------------------------------

    def encode_text(self, prompt: str) -> list[int]:
        """A completion prompt: plain text with the tokenizer's special tokens (BOS where the model has one)."""
        return self.tokenizer.encode(prompt, add_special_tokens=True)

    def encode_chat(self, messages: Sequence[dict[str, Any]]) -> list[int]:
        """Messages through the model's chat template, ending with the assistant's generation prompt."""
        return self.tokenizer.encode_chat(messages, add_generation_prompt=True)

    async def run_in_pool(self, fn: Any, *args: Any) -> Any:
        """Run a blocking call (tokenizing a big prompt, say) in the compute pool."""
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)

    # -- generation ----------------------------------------------------------------------------------------

    def decode_options(self, request: TextRequest) -> DecodeOptions:
        c = self.config
        return DecodeOptions(request.max_tokens, self.threshold, request.sampling, request.seed, self.stop_ids,
                             lossless=c.lossless, catch_up=c.catch_up, max_draft=c.max_draft, fixed_draft=c.fixed_draft,
                             top_logprobs=request.top_logprobs)

    def generate(self, request: TextRequest) -> TextStream:
        """Start one generation; raises BusyError when every session slot is taken."""
        if self.closed:
            raise BusyError("the edge service is shutting down")
        return TextStream(self, request)

    def describe(self) -> dict[str, Any]:
        """Edge state for /healthz (no secrets: no token, no URL credentials)."""
        return {
            "model": self.model_name,
            "edge_dir": str(self.edge_dir),
            "exit_layer": self.exit_layer,
            "precision": self.precision,
            "threshold": self.threshold,
            "exit_rule": self.exit_setup.describe(),
            **self.describe_early_exits(),
            "catch_up": self.config.catch_up,
            "lossless": self.config.lossless,
            "max_draft": self.config.max_draft,
            "codec": self.config.codec,
            "mode": self.mode,
            "sessions_active": self.pool.active,
            "sessions_max": self.pool.limit,
            "context_length": self.max_positions,
        }

    def describe_early_exits(self) -> dict[str, Any]:
        """A multi-exit edge's exits and each early exit's rule (for /healthz and `generate --json`); {} for one exit."""
        if not self.early_exits:
            return {}
        return {"exit_layers": list(self.exit_layers),
                "early_exits": [{"exit_layer": k, **setup.describe()} for k, setup in self.early_exits]}

    def link_state(self) -> dict[str, Any]:
        """Cloud link state for /healthz: what requests last saw, plus the link's own view when it has one."""
        state = self.health.to_dict()
        for attr in ("state", "connected"):
            value = getattr(self.link, attr, None)
            if isinstance(value, (str, bool)):
                state[f"link_{attr}"] = value
        return state

    async def aclose(self) -> None:
        """Close the cloud link and the thread pool (in-flight generations should be finished or closed first)."""
        if self.closed:
            return
        self.closed = True
        if self.link is not None:
            try:
                await self.link.aclose()
            except Exception:  # noqa: BLE001 - a dead link must not stop a shutdown
                pass
        self.executor.shutdown(wait=False, cancel_futures=True)
