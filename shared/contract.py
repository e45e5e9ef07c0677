"""What the edge asks of the cloud and what it gets back, as plain numpy types (no torch).

Both the in-process cloud (`--cloud local`) and the WebSocket link speak these; the wire protocol
(`offramp.shared.protocol`) is their serialised form. Keeping them here lets an edge run without torch.

One request covers positions start..start+n-1 of a session (their layer-K states). The cloud runs its layers
over them and predicts the next token at each. Some of those predictions can be checked against edge drafts:
with `want_token` the last row's prediction is the cloud's own pick and the `len(drafts)` rows before it carry
drafts; without it the drafts end at the last row. Drafts are verified in order (greedy: the full model's argmax
must match; sampled: speculative sampling against the sparse `draft_q`); the first rejected one is replaced by
the cloud's token and the rows after it are dropped. A rejection bumps the session's epoch, so blocks the edge
pipelined after the rejected draft are answered `StaleRequestError` without any compute.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from offramp.shared import protocol as p
from offramp.shared.errors import OfframpError
from offramp.shared.sampling import SamplingParams, SparseDistribution


class SessionError(OfframpError):
    """Base of session-level refusals; the cloud turns each into an error frame carrying `code`."""

    code = p.INTERNAL  # subclasses name the refusal


class ContextMismatchError(SessionError):
    """The cloud cannot continue from `start`: it holds `have` positions (fewer, or at another epoch).

    The edge re-uploads from what it knows both sides agree on: `have` when `epoch` is its own, else the first
    position it rolled back since `epoch` (see `RollbackLog.valid_prefix`).
    """

    code = p.CONTEXT_MISSING

    def __init__(self, session_id: str, start: int, have: int, epoch: int = 0, reason: str = "") -> None:
        why = f" ({reason})" if reason else ""
        super().__init__(f"session {session_id!r}: cannot continue from position {start}, the cloud holds {have} at epoch {epoch}{why}")
        self.have = have
        self.epoch = epoch
        self.reason = reason


class StaleRequestError(SessionError):
    """The request was sent before the cloud rejected an earlier draft of the session (its epoch is older)."""

    code = p.STALE

    def __init__(self, session_id: str, epoch: int, current: int, length: int) -> None:
        super().__init__(f"session {session_id!r}: request of epoch {epoch} is stale, the session is at epoch {current}")
        self.epoch = current
        self.length = length


@dataclass
class ExtendRequest:
    session_id: str
    start: int
    hidden: np.ndarray  # [n, H] float32, positions start..start+n-1
    owner: str = ""
    epoch: int = 0  # the edge's epoch for the session (see the module docstring)
    want_token: bool = True  # the last row's prediction is the cloud's pick (an escalation)
    drafts: list[int] = field(default_factory=list)  # edge tokens for the positions the rows before the pick predict
    draft_q: list[SparseDistribution] | None = None  # sampled drafts: the edge's q at each (None: greedy)
    sampling: SamplingParams = field(default_factory=SamplingParams)
    seed: int = 0  # randomness of position i is position_uniforms(seed, i)
    top_logprobs: int = 0  # alternatives to return per decided position
    rebase: bool = False  # the edge resumes a session it last held at an older epoch, from a prefix it knows valid
    base_epoch: int = 0  # ... valid in the copy held at this epoch (a copy at any other epoch refuses the rebase)

    def __post_init__(self) -> None:
        rows = int(self.hidden.shape[0]) if self.hidden.ndim >= 1 else 0
        if len(self.drafts) + int(self.want_token) > rows:
            raise ValueError(f"{len(self.drafts)} drafts{' + a pick' if self.want_token else ''} need more than {rows} rows")
        if self.draft_q is not None and len(self.draft_q) != len(self.drafts):
            raise ValueError(f"{len(self.draft_q)} draft distributions for {len(self.drafts)} drafts")

    @property
    def rows(self) -> int:
        return int(self.hidden.shape[0])

    @property
    def first_checked_row(self) -> int:
        """The row whose prediction is compared with drafts[0] (rows before it are plain catch-up)."""
        return self.rows - len(self.drafts) - int(self.want_token)


@dataclass
class DeepResult:
    start: int
    predicted: list[int]  # the full model's argmax next token at each row
    logprobs: list[float]  # log-prob of that argmax
    token: int | None  # the cloud's token: the replacement of a rejected draft, or its pick after the last row
    length: int  # positions the cloud now holds for the session
    accepted: int = 0  # drafts accepted, in order
    epoch: int = 0  # the session's epoch after this request
    token_logprobs: list[float] = field(default_factory=list)  # log-prob (temperature 1) of each decided token
    top_ids: list[list[int]] = field(default_factory=list)  # per decided token, when top_logprobs was asked
    top_logprobs: list[list[float]] = field(default_factory=list)


def decided_tokens(request: ExtendRequest, result: DeepResult) -> list[int]:
    """The tokens a result settles for positions first_checked_row+start+1 on: accepted drafts then the token."""
    out = list(request.drafts[: result.accepted])
    if result.token is not None:
        out.append(int(result.token))
    return out


def extend_frame(request_id: int, request: ExtendRequest, payload: bytes) -> p.Extend:
    """The wire form of a request (its hidden states already encoded by the session's codec)."""
    q_ids = q_probs = b""
    support = 0
    if request.draft_q is not None and request.drafts and not request.sampling.greedy:
        support = max(len(q.ids) for q in request.draft_q)
        ids = np.zeros((len(request.drafts), support), dtype="<i4")
        probs = np.zeros((len(request.drafts), support), dtype="<f4")
        for row, q in enumerate(request.draft_q):
            ids[row, : len(q.ids)] = q.ids
            probs[row, : len(q.ids)] = q.probs
        q_ids, q_probs = ids.tobytes(), probs.tobytes()
    return p.Extend(
        request_id, request.session_id, int(request.epoch), int(request.start), request.rows, payload,
        bool(request.want_token), [int(d) for d in request.drafts], support, q_ids, q_probs,
        float(request.sampling.temperature), float(request.sampling.top_p), int(request.seed),
        int(request.top_logprobs), bool(request.rebase), int(request.base_epoch),
    )


def result_frame(request_id: int, session_id: str, result: DeepResult) -> p.Result:
    return p.Result(request_id, session_id, result.epoch, result.start, list(result.predicted), list(result.logprobs),
                    result.accepted, result.token, result.length, list(result.token_logprobs), list(result.top_ids),
                    list(result.top_logprobs))


def from_result_frame(frame: p.Result) -> DeepResult:
    return DeepResult(frame.start, frame.predicted, frame.logprobs, frame.token, frame.length, frame.accepted, frame.epoch,
                      frame.token_logprobs, frame.top_ids, frame.top_logprobs)
