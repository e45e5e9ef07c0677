"""A stable identity for a set of weights, so edge and cloud can refuse to pair different models."""

from __future__ import annotations

import hashlib
import json

import torch
from transformers import PreTrainedModel


def model_fingerprint(model: PreTrainedModel) -> str:
    """sha256 over the config and a strided sample of every parameter: cheap, and changes with any real edit."""
    digest = hashlib.sha256()
    config = model.config.to_dict()
    keep = {k: v for k, v in config.items() if not k.startswith("_") and k not in {"transformers_version", "dtype", "torch_dtype"}}
    digest.update(json.dumps(keep, sort_keys=True, default=str).encode())
    for name, param in sorted(model.state_dict().items()):
        flat = param.detach().reshape(-1).to(torch.float32)
        sample = flat[:: max(1, flat.numel() // 4096)][:4096]
        digest.update(name.encode())
        digest.update(sample.cpu().numpy().tobytes())
    return digest.hexdigest()


def edge_identity(model: PreTrainedModel, exit_layer: int) -> dict:
    """What the edge tells the cloud about itself in its hello (the exported graph's manifest carries the same)."""
    return {
        "model_fingerprint": model_fingerprint(model),
        "exit_layer": exit_layer,
        "hidden_size": model.config.hidden_size,
        "num_layers": model.config.num_hidden_layers,
    }
