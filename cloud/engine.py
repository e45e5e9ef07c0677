"""The cloud's deep-layer engine: continue sessions from their uploaded layer-K hidden states, many at once.

Catch-up (tokens that exited at the edge), escalation (a token the edge was unsure of) and verification (edge
drafts in lossless mode) are one operation: run layers K..N-1 over positions [start, start + n) of a session,
write their KV, predict the next token at each row, and decide the request's tokens (`offramp.cloud.verify`).

A batch is ragged, not padded: the rows of every request go through each layer's projections and MLP as one
matrix (the weight-bound part, where batching pays), and each session attends over its own preallocated KV
(`SessionKV`) with no copy of its past. A request with fewer rows costs nothing for the others.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from offramp.cloud.context import ContextManager, SessionContext, SessionKV, UnknownSessionError
from offramp.cloud.verify import argmax_logprobs, decide, token_logprobs
from offramp.models.split import CloudPart
from offramp.shared.contract import ContextMismatchError, DeepResult, ExtendRequest, SessionError, StaleRequestError
from offramp.shared.protocol import BAD_HIDDEN, BAD_POSITIONS


class PositionError(SessionError):
    code = BAD_POSITIONS


class BadHiddenError(SessionError):
    """Hidden states that are not finite, or drive the deep layers to non-finite logits: refused, and none of
    their rows enters the session's KV (a rollback the request asked for, start < held, still happens)."""

    code = BAD_HIDDEN


def device_for(device: str | None) -> torch.device:
    """The named torch device, else CUDA when present, else CPU."""
    return torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))


class DeepEngine:
    """Layers K..N-1 for many sessions, on CUDA in half precision when present, else CPU fp32."""

    def __init__(self, cloud: CloudPart, contexts: ContextManager, device: str | None = None, dtype: torch.dtype | None = None) -> None:
        self.device = device_for(device)
        self.dtype = dtype or (torch.bfloat16 if self.device.type == "cuda" else torch.float32)
        self.cloud = cloud.to(device=self.device, dtype=self.dtype).eval()
        self.contexts = contexts
        g = cloud.geometry
        self.hidden_size = g.hidden_size
        self.max_positions = g.max_positions
        self._kv_geometry = (self.cloud.num_layers, g.num_kv_heads, g.head_dim)
        self.layer_tokens = 0  # deep-layer evaluations done: one per layer per position

    def prepare(self, req: ExtendRequest) -> SessionContext:
        """Validate a request against its session: epoch, positions; roll the session back if the edge did."""
        if req.hidden.ndim != 2 or req.hidden.shape[1] != self.hidden_size:
            raise PositionError(f"hidden states must be [n, {self.hidden_size}], got {list(req.hidden.shape)}")
        if not np.isfinite(req.hidden).all():
            raise BadHiddenError(f"session {req.session_id!r}: hidden states contain NaN or inf")
        n = req.rows
        if n == 0 and req.want_token:
            raise PositionError("an escalation needs at least one position")
        if req.start < 0 or req.start + n > self.max_positions:
            raise PositionError(f"positions {req.start}..{req.start + n - 1} are outside 0..{self.max_positions - 1}")
        try:
            ctx = self.contexts.get(req.session_id, req.owner)
        except UnknownSessionError:
            raise ContextMismatchError(req.session_id, req.start, 0, 0, "unknown session: never opened here, closed, evicted or restarted") from None
        if req.epoch < ctx.epoch:
            raise StaleRequestError(req.session_id, req.epoch, ctx.epoch, ctx.length)
        if req.epoch > ctx.epoch and not (req.rebase and req.base_epoch == ctx.epoch):
            # the edge rolled back elsewhere since this copy was made, and its rebase (if any) was worked out
            # against another copy (the session moved between replicas and came back): say what this one holds
            raise ContextMismatchError(req.session_id, req.start, ctx.length, ctx.epoch, "held at an older epoch")
        if req.start > ctx.length:
            raise ContextMismatchError(req.session_id, req.start, ctx.length, ctx.epoch)
        if req.start < ctx.length:
            ctx.truncate(req.start)
        ctx.epoch = req.epoch
        return ctx

    def extend(self, req: ExtendRequest) -> DeepResult:
        """One request, unbatched; raises its SessionError."""
        (out,) = self.extend_batch([req])
        if isinstance(out, SessionError):
            raise out
        return out

    def extend_batch(self, reqs: Sequence[ExtendRequest]) -> list[DeepResult | SessionError]:
        """Many sessions' requests as one ragged forward pass; a refused request gets its error in its slot.

        Requests for the same session go in separate rounds, in order, so one session never races itself.
        """
        out: list[DeepResult | SessionError | None] = [None] * len(reqs)
        rounds: list[list[int]] = []
        seen: dict[str, int] = {}
        for i, req in enumerate(reqs):
            r = seen.get(req.session_id, -1) + 1
            seen[req.session_id] = r
            if r == len(rounds):
                rounds.append([])
            rounds[r].append(i)
        for indices in rounds:
            self._extend_round([reqs[i] for i in indices], indices, out)
        return out  # type: ignore[return-value]

    @torch.inference_mode()
    def _extend_round(self, reqs: list[ExtendRequest], indices: list[int], out: list) -> None:
        ready: list[tuple[int, ExtendRequest, SessionContext]] = []
        for i, req in zip(indices, reqs):
            try:
                ctx = self.prepare(req)
            except SessionError as exc:
                out[i] = exc
                continue
            if req.rows == 0:
                out[i] = DeepResult(req.start, [], [], None, ctx.length, epoch=ctx.epoch)
            else:
                ready.append((i, req, ctx))
        if not ready:
            return
        logits = self._forward([(req, ctx) for _, req, ctx in ready])
        for (i, req, ctx), rows in zip(ready, logits):
            if not bool(torch.isfinite(rows).all()):  # finite inputs can still overflow in the deep layers
                ctx.truncate(req.start)  # the rows written from start on are not trusted
                out[i] = BadHiddenError(f"session {req.session_id!r}: these hidden states drive the deep layers to non-finite logits")
                continue
            out[i] = self._result(req, ctx, rows)
        self.contexts.enforce_budget(keep={req.session_id for _, req, _ in ready})

    def _result(self, req: ExtendRequest, ctx: SessionContext, logits: torch.Tensor) -> DeepResult:
        verdict = decide(req, logits)
        if verdict.rejected:
            ctx.epoch += 1
        self.contexts.commit(ctx, req.start + verdict.rows_kept, enforce=False)
        self.layer_tokens += req.rows * self.cloud.num_layers
        predicted, logprobs = argmax_logprobs(logits)
        decided = list(req.drafts[: verdict.accepted]) + ([verdict.token] if verdict.token is not None else [])
        chosen, top_ids, top_lp = token_logprobs(logits, verdict.decided_rows, decided, req.top_logprobs)
        return DeepResult(req.start, predicted, logprobs, verdict.token, ctx.length, verdict.accepted, ctx.epoch, chosen, top_ids, top_lp)

    def _forward(self, items: list[tuple[ExtendRequest, SessionContext]]) -> list[torch.Tensor]:
        """Layers K..N-1 over every request's rows at once; returns each request's logits [n, V]."""
        dev, dt = self.device, self.dtype
        sizes = [req.rows for req, _ in items]
        hidden = torch.from_numpy(np.ascontiguousarray(np.concatenate([req.hidden for req, _ in items]))).to(dev, dt)[None]
        positions = torch.cat([torch.arange(req.start, req.start + req.rows, device=dev) for req, _ in items])[None]
        for req, ctx in items:
            if ctx.kv is None:
                ctx.kv = SessionKV(*self._kv_geometry, self.max_positions, dev, dt)
        extra = sum(ctx.kv.growth(req.start + req.rows) for req, ctx in items)
        self.contexts.make_room(extra, keep={req.session_id for req, _ in items})
        caches: list[SessionKV] = []
        for req, ctx in items:
            ctx.kv.reserve(req.start + req.rows, keep=req.start)
            caches.append(ctx.kv)
        starts = [req.start for req, _ in items]
        cloud = self.cloud
        cos_sin = cloud.rotary_emb(hidden, positions)
        for index, layer in enumerate(cloud.layers):
            hidden = _layer_ragged(layer, index, hidden, cos_sin, caches, starts, sizes)
        logits = cloud.lm_head(cloud.norm(hidden))[0]
        return list(torch.split(logits, sizes))


def _layer_ragged(
    layer: torch.nn.Module,
    index: int,
    hidden: torch.Tensor,
    cos_sin: tuple[torch.Tensor, torch.Tensor],
    caches: list[SessionKV],
    starts: list[int],
    sizes: list[int],
) -> torch.Tensor:
    """One pre-norm decoder layer over the concatenated rows of several sessions (hidden [1, T, H])."""
    attn = layer.self_attn
    total = hidden.shape[1]
    normed = layer.input_layernorm(hidden)
    q = attn.q_proj(normed).view(1, total, -1, attn.head_dim).transpose(1, 2)
    k = attn.k_proj(normed).view(1, total, -1, attn.head_dim).transpose(1, 2)
    v = attn.v_proj(normed).view(1, total, -1, attn.head_dim).transpose(1, 2)
    q, k = apply_rotary_pos_emb(q, k, *cos_sin)
    outs = []
    offset = 0
    for cache, start, n in zip(caches, starts, sizes):
        keys, values = cache.write(index, start, k[0, :, offset : offset + n], v[0, :, offset : offset + n])
        query = q[:, :, offset : offset + n]
        if n == 1:
            mask, causal = None, False
        elif start == 0:
            mask, causal = None, True
        else:  # row i (at position start + i) sees keys 0..start + i
            mask = torch.arange(start + n, device=q.device)[None, :] <= torch.arange(start, start + n, device=q.device)[:, None]
            causal = False
        outs.append(F.scaled_dot_product_attention(query, keys[None], values[None], attn_mask=mask, is_causal=causal,
                                                   scale=attn.scaling, enable_gqa=True))
        offset += n
    out = torch.cat(outs, dim=2).transpose(1, 2).reshape(1, total, -1)
    hidden = hidden + attn.o_proj(out)
    return hidden + layer.mlp(layer.post_attention_layernorm(hidden))
