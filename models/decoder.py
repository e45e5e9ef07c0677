"""Run a slice of Llama-family decoder layers with an explicit KV cache and explicit positions.

One forward implementation serves the PyTorch edge part, the cloud's deep layers and the ONNX export, so the
three cannot drift apart. It reuses the checkpoint's own modules (projections, norms, MLP, rotary embedding) and
mirrors Hugging Face's sdpa attention, so greedy tokens equal `model.generate`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb, repeat_kv

KV = tuple[torch.Tensor, torch.Tensor]  # each [batch, kv_heads, positions, head_dim]


def causal_mask(q_len: int | torch.Tensor, past_len: int | torch.Tensor, device: torch.device) -> torch.Tensor:
    """Boolean [q_len, past_len + q_len] mask: query i (at position past_len + i) sees keys 0..past_len + i."""
    q_pos = torch.arange(q_len, device=device)[:, None] + past_len
    k_pos = torch.arange(past_len + q_len, device=device)[None, :]
    return k_pos <= q_pos


def attend(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, explicit_mask: bool, attn_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Causal attention of q (the newest positions) over k/v (cache + new); grouped KV heads repeated first.

    `attn_mask` (boolean, broadcastable to [batch, heads, q_len, kv_len]) replaces the causal mask: a batch of
    sessions with padded caches and padded new rows brings its own.
    """
    n_rep = q.shape[1] // k.shape[1]
    k, v = repeat_kv(k, n_rep), repeat_kv(v, n_rep)
    if attn_mask is not None:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, scale=scale)
    q_len, kv_len = q.shape[2], k.shape[2]
    if explicit_mask or (q_len > 1 and kv_len > q_len):
        mask = causal_mask(q_len, kv_len - q_len, q.device)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    return F.scaled_dot_product_attention(q, k, v, is_causal=q_len > 1, scale=scale)


def layer_forward(
    layer: nn.Module,
    hidden: torch.Tensor,
    cos_sin: tuple[torch.Tensor, torch.Tensor],
    past: KV | None,
    explicit_mask: bool = False,
    attn_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, KV]:
    """One pre-norm decoder layer; returns the new hidden state and the layer's full (past + new) KV."""
    attn = layer.self_attn
    batch, q_len, _ = hidden.shape
    head_shape = (batch, q_len, -1, attn.head_dim)
    normed = layer.input_layernorm(hidden)
    q = attn.q_proj(normed).view(head_shape).transpose(1, 2)
    k = attn.k_proj(normed).view(head_shape).transpose(1, 2)
    v = attn.v_proj(normed).view(head_shape).transpose(1, 2)
    q, k = apply_rotary_pos_emb(q, k, *cos_sin)
    if past is not None:
        k = torch.cat([past[0], k], dim=2)
        v = torch.cat([past[1], v], dim=2)
    out = attend(q, k, v, attn.scaling, explicit_mask, attn_mask)
    out = out.transpose(1, 2).reshape(batch, q_len, -1).contiguous()
    hidden = hidden + attn.o_proj(out)
    hidden = hidden + layer.mlp(layer.post_attention_layernorm(hidden))
    return hidden, (k, v)


def run_layers(
    layers: Sequence[nn.Module],
    rotary: nn.Module,
    hidden: torch.Tensor,
    position_ids: torch.Tensor,
    past: Sequence[KV] | None = None,
    explicit_mask: bool = False,
    attn_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, list[KV]]:
    """Run `layers` over `hidden` [batch, q_len, H] at `position_ids` [batch, q_len]; return hidden and present KV."""
    cos_sin = rotary(hidden, position_ids)
    present: list[KV] = []
    for i, layer in enumerate(layers):
        hidden, kv = layer_forward(layer, hidden, cos_sin, None if past is None else past[i], explicit_mask, attn_mask)
        present.append(kv)
    return hidden, present
