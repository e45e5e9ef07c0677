"""LLM.int8() weights (bitsandbytes) for the cloud's decoder layers: `offramp cloud serve --load-in-8bit`.

A cloud GPU holds many tenants' models and KV caches; int8 linear weights take a quarter of fp32's memory (half
of bf16's) for a small accuracy cost (bitsandbytes keeps outlier features in 16-bit). Only the decoder layers'
linear projections are replaced: embeddings, norms and the LM head (tied to the embeddings) stay as they are.
bitsandbytes also runs these layers on CPU (slowly), which is how the tests check the numbers here.
"""

from __future__ import annotations

import torch
from torch import nn

from offramp.shared.errors import OfframpError


class Int8WeightsError(OfframpError, RuntimeError):
    """bitsandbytes is missing or cannot quantize on this device."""


def quantize_linear_layers(layers: nn.ModuleList, device: torch.device | str) -> int:
    """Replace every nn.Linear inside `layers` by a bitsandbytes Linear8bitLt on `device`; returns how many."""
    try:
        import bitsandbytes as bnb
    except ImportError:
        raise Int8WeightsError("--load-in-8bit needs bitsandbytes: pip install 'offramp[gpu]'") from None
    replaced = 0
    for parent in layers.modules():
        for name, child in list(parent.named_children()):
            if type(child) is not nn.Linear:
                continue
            q = bnb.nn.Linear8bitLt(child.in_features, child.out_features, bias=child.bias is not None,
                                    has_fp16_weights=False, threshold=6.0)
            q.weight = bnb.nn.Int8Params(child.weight.data.detach().float().cpu(), requires_grad=False, has_fp16_weights=False)
            if child.bias is not None:
                q.bias = nn.Parameter(child.bias.data.detach().clone(), requires_grad=False)
            try:
                q = q.to(device)  # bitsandbytes quantizes the weight when it is moved to the device
            except (RuntimeError, NotImplementedError) as exc:
                raise Int8WeightsError(f"bitsandbytes cannot quantize on device {str(device)!r}: {exc}") from None
            setattr(parent, name, q)
            replaced += 1
    return replaced


def weight_bytes(module: nn.Module) -> int:
    """Bytes held by the module's parameters (int8 weights count one byte per element)."""
    return sum(p.numel() * p.element_size() for p in module.parameters())
