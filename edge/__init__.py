"""The edge: shallow layers + exit head in ONNX Runtime from an exported edge directory, the decode loop, the cloud link.

Nothing here needs torch or transformers (the base install). For apps: `Client` / `AsyncClient` talk to a running
`offramp edge serve`; `LocalEngine` embeds the edge (and, with the cloud extra, the cloud) in-process. They are
imported lazily, so `from offramp.edge import Client` loads neither ONNX Runtime nor the tokenizer.
"""

from __future__ import annotations

from typing import Any

_EXPORTS = {
    "Client": "offramp.edge.client",
    "AsyncClient": "offramp.edge.client",
    "Completion": "offramp.edge.client",
    "ClientError": "offramp.edge.client",
    "GenerateOptions": "offramp.edge.client",
    "LocalEngine": "offramp.edge.local",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'offramp.edge' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(module), name)
