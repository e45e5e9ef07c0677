"""What the edge asks of the cloud and what it gets back, as plain numpy types (no torch).

Both the in-process cloud (`--cloud local`) and the WebSocket link speak these; the wire protocol
(`offramp.shared.protocol`) is their serialised form. Keeping them here lets an edge run without torch.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from offramp.shared import protocol as p
from offramp.shared.errors import OfframpError
from offramp.shared.sampling import SamplingParams


class SessionError(OfframpError):
    """Base of session-level refusals; the cloud turns each into an error frame carrying `code`."""

    code = p.INTERNAL  # subclasses name the refusal


class ContextMismatchError(SessionError):
    """The edge sent positions from `start` but the cloud holds fewer; the edge must re-upload from `have`."""

    code = p.CONTEXT_MISSING

    def __init__(self, session_id: str, start: int, have: int) -> None:
        super().__init__(f"session {session_id!r}: upload starts at position {start} but the cloud holds {have}")
        self.have = have


@dataclass
class ExtendRequest:
    session_id: str
    start: int
    hidden: np.ndarray  # [n, H] float32, positions start..start+n-1
    owner: str = ""
    want_token: bool = True  # an escalation: pick the next token at the last position
    sampling: SamplingParams = field(default_factory=SamplingParams)
    u: float = 0.0  # the edge's uniform draw for sampling


@dataclass
class DeepResult:
    start: int
    predicted: list[int]  # the full model's argmax next token at each position
    logprobs: list[float]  # log-prob of that argmax
    token: int | None  # the chosen next token after the last position (escalations only)
    length: int  # positions the cloud now holds for the session
