"""The cloud's deep-layer engine: continue sessions from their uploaded layer-K hidden states.

Catch-up (tokens that exited at the edge) and escalation (a token the edge was unsure of) are one operation:
run layers K..N-1 over the positions [start, start + n) of a session, append their KV, and return the full
model's prediction at each position. The edge takes the last one as its token and can check the others
against what it emitted (agreement online; rollback in lossless mode).
"""

from __future__ import annotations

import numpy as np
import torch

from offramp.cloud.context import ContextManager, SessionContext
from offramp.models.split import CloudPart
from offramp.shared.contract import ContextMismatchError, DeepResult, ExtendRequest, SessionError
from offramp.shared.protocol import BAD_HIDDEN, BAD_POSITIONS
from offramp.shared.sampling import SamplingParams, pick_token


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
        self.hidden_size = cloud.geometry.hidden_size
        self.max_positions = cloud.geometry.max_positions
        self.layer_tokens = 0  # deep-layer evaluations done: one per layer per position

    def prepare(self, req: ExtendRequest) -> SessionContext:
        """Validate a request against its session; roll the session back if the edge did."""
        if req.hidden.ndim != 2 or req.hidden.shape[1] != self.hidden_size:
            raise PositionError(f"hidden states must be [n, {self.hidden_size}], got {list(req.hidden.shape)}")
        if not np.isfinite(req.hidden).all():
            raise BadHiddenError(f"session {req.session_id!r}: hidden states contain NaN or inf")
        n = req.hidden.shape[0]
        if n == 0 and req.want_token:
            raise PositionError("an escalation needs at least one position")
        if req.start < 0 or req.start + n > self.max_positions:
            raise PositionError(f"positions {req.start}..{req.start + n - 1} are outside 0..{self.max_positions - 1}")
        ctx = self.contexts.lookup(req.session_id, req.owner)
        if req.start > ctx.length:
            raise ContextMismatchError(req.session_id, req.start, ctx.length)
        if req.start < ctx.length:
            ctx.truncate(req.start)
        return ctx

    @torch.inference_mode()
    def extend(self, req: ExtendRequest) -> DeepResult:
        """One session's catch-up and/or escalation, unbatched."""
        ctx = self.prepare(req)
        n = req.hidden.shape[0]
        if n == 0:
            return DeepResult(req.start, [], [], None, ctx.length)
        hidden = torch.from_numpy(np.ascontiguousarray(req.hidden)).to(self.device, self.dtype)[None]
        positions = torch.arange(req.start, req.start + n, device=self.device)[None]
        logits, present = self.cloud(hidden, positions, ctx.kv)
        self.layer_tokens += n * self.cloud.num_layers
        _check_logits(req, logits[0])  # before the commit: a refused request adds nothing to the session
        self.contexts.commit(ctx, present, req.start + n)
        return self.result(req, logits[0], ctx.length)

    def extend_batch(self, reqs: list[ExtendRequest]) -> list[DeepResult | SessionError]:
        """Many sessions' requests as one padded forward pass; a refused request gets its error in its slot.

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
            if req.hidden.shape[0] == 0:
                out[i] = DeepResult(req.start, [], [], None, ctx.length)
            else:
                ready.append((i, req, ctx))
        if len(ready) == 1:
            i, req, _ = ready[0]
            try:
                out[i] = self.extend(req)
            except SessionError as exc:
                out[i] = exc
        elif ready:
            for i, result in zip((i for i, _, _ in ready), self._forward_padded([(r, c) for _, r, c in ready])):
                out[i] = result

    def _forward_padded(self, items: list[tuple[ExtendRequest, SessionContext]]) -> list[DeepResult | SessionError]:
        """Pad caches to the longest past P and new rows to the longest n; a mask hides the padding."""
        dev, dt = self.device, self.dtype
        pasts = [ctx.length for _, ctx in items]
        news = [req.hidden.shape[0] for req, _ in items]
        B, P, Q = len(items), max(pasts), max(news)
        hidden = torch.zeros(B, Q, self.hidden_size, device=dev, dtype=dt)
        for b, (req, _) in enumerate(items):
            hidden[b, : news[b]] = torch.from_numpy(np.ascontiguousarray(req.hidden)).to(dev, dt)
        past_len = torch.tensor(pasts, device=dev)
        new_len = torch.tensor(news, device=dev)
        positions = past_len[:, None] + torch.arange(Q, device=dev)[None]
        key = torch.arange(P + Q, device=dev)[None, None, :]  # [1, 1, P+Q]
        query = torch.arange(Q, device=dev)[None, :, None]  # [1, Q, 1]
        in_past = key < past_len[:, None, None]
        new_index = key - P
        in_new = (new_index >= 0) & (new_index <= query) & (new_index < new_len[:, None, None])
        mask = (in_past | in_new)[:, None]  # [B, 1, Q, P+Q]
        past = None
        if P > 0:
            past = []
            for layer in range(self.cloud.num_layers):
                k0 = next(ctx.kv[layer][0] for _, ctx in items if ctx.kv is not None)
                shape = (B, k0.shape[1], P, k0.shape[3])
                keys, values = torch.zeros(shape, device=dev, dtype=dt), torch.zeros(shape, device=dev, dtype=dt)
                for b, (_, ctx) in enumerate(items):
                    if pasts[b]:
                        keys[b, :, : pasts[b]] = ctx.kv[layer][0][0]
                        values[b, :, : pasts[b]] = ctx.kv[layer][1][0]
                past.append((keys, values))
        logits, present = self.cloud(hidden, positions, past, attn_mask=mask)
        results: list[DeepResult | SessionError] = []
        for b, (req, ctx) in enumerate(items):
            p, n = pasts[b], news[b]
            try:  # rows of a batch never mix, so one bad request is refused alone
                _check_logits(req, logits[b, :n])
            except BadHiddenError as exc:
                results.append(exc)
                continue
            kv = [
                (torch.cat([k[b : b + 1, :, :p], k[b : b + 1, :, P : P + n]], dim=2),
                 torch.cat([v[b : b + 1, :, :p], v[b : b + 1, :, P : P + n]], dim=2))
                for k, v in present
            ]
            self.contexts.commit(ctx, kv, p + n, enforce=False)
            self.layer_tokens += n * self.cloud.num_layers
            results.append(self.result(req, logits[b, :n], p + n))
        self.contexts.enforce_budget()
        return results

    def result(self, req: ExtendRequest, logits: torch.Tensor, length: int) -> DeepResult:
        """Predictions and log-probs at every position; the chosen token at the last one."""
        logits = logits.float()
        logprobs = torch.log_softmax(logits, dim=-1)
        predicted = logits.argmax(dim=-1)
        chosen = logprobs.gather(-1, predicted[:, None])[:, 0]
        token = None
        if req.want_token:
            token = pick_token(logits[-1].cpu().numpy(), req.sampling, req.u)
        return DeepResult(req.start, predicted.tolist(), chosen.tolist(), token, length)


def _check_logits(req: ExtendRequest, logits: torch.Tensor) -> None:
    """Finite inputs can still overflow in the deep layers (huge values); such a result must not reach the KV."""
    if not bool(torch.isfinite(logits).all()):
        raise BadHiddenError(f"session {req.session_id!r}: these hidden states drive the deep layers to non-finite logits")
