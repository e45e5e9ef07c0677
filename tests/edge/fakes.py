"""A scripted edge runtime and cloud link, so the decode loop's state machine is tested without weights.

As nanochat tests its engine with a mock model: the runtime's "exit head" and the cloud's "full model" are plain
functions of the token sequence, so a test says exactly where they agree, where the edge is confident, when the
cloud loses a session or drops off, and then checks what the loop emitted and what it sent.

The runtime writes each position's token and position into its hidden-state row, so the fake cloud rebuilds
the sequence from what it was uploaded alone, as the real one does: a row that never went up (a missing
catch-up) or a stale one (a missed rollback) changes the cloud's answers, and the test sees it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from offramp.edge.link import CloudRefusedError, CloudUnavailableError, LinkStats
from offramp.edge.runtime import EdgeStep
from offramp.shared.contract import ContextMismatchError, DeepResult, ExtendRequest, StaleRequestError

VOCAB = 64
HIDDEN = 4
Predictor = Callable[[Sequence[int]], int]  # tokens at positions 0..i -> the next token


def edge_guess(tokens: Sequence[int]) -> int:
    """The default exit head: a fixed function of the sequence."""
    return (3 * tokens[-1] + len(tokens)) % VOCAB


def truth_agreeing_except(positions: set[int], edge: Predictor = edge_guess) -> Predictor:
    """A full model that agrees with `edge` except when predicting the token at one of `positions`."""

    def truth(tokens: Sequence[int]) -> int:
        guess = edge(tokens)
        return (guess + 1) % VOCAB if len(tokens) in positions else guess

    return truth


class ScriptedRuntime:
    """Implements `EdgeRuntime`: logits one-hot on `edge(tokens)`, hidden row = (token, position, 0, 0)."""

    exit_layer = 2
    hidden_size = HIDDEN
    vocab_size = VOCAB

    def __init__(self, edge: Predictor = edge_guess, max_positions: int = 512) -> None:
        self.edge = edge
        self.max_positions = max_positions
        self.tokens: list[int] = []
        self.runs: list[list[int]] = []  # every run() call's input ids, in order
        self.truncations: list[int] = []
        self.manifest = {"model_fingerprint": "f" * 64, "exit_layer": self.exit_layer, "hidden_size": HIDDEN, "num_layers": 4}

    @property
    def length(self) -> int:
        return len(self.tokens)

    def run(self, input_ids: list[int]) -> EdgeStep:
        if not input_ids:
            raise ValueError("run() needs at least one token id")
        start = len(self.tokens)
        self.tokens.extend(int(t) for t in input_ids)
        self.runs.append(list(input_ids))
        logits = np.full(VOCAB, -10.0, dtype=np.float32)
        logits[self.edge(self.tokens)] = 10.0
        hidden = np.array([[t, start + i, 0.0, 0.0] for i, t in enumerate(input_ids)], dtype=np.float32)
        return EdgeStep(logits=logits, hidden=hidden)

    def truncate(self, length: int) -> None:
        if not 0 <= length <= len(self.tokens):
            raise ValueError(f"cannot truncate to {length}: cache holds {len(self.tokens)} positions")
        self.truncations.append(length)
        del self.tokens[length:]

    def reset(self) -> None:
        self.tokens = []


def confident_unless(positions: set[int]) -> Callable[[np.ndarray, np.ndarray], float]:
    """A confidence for the token at position p+1 (the row of position p is what it sees): low at `positions`."""
    return lambda logits, hidden: 0.0 if int(hidden[1]) + 1 in positions else 1.0


def never_confident(logits: np.ndarray, hidden: np.ndarray) -> float:
    return 0.0


@dataclass
class Call:
    kind: str  # open | extend | close
    session: str
    start: int = 0
    rows: int = 0
    want_token: bool = False
    positions: list[int] = field(default_factory=list)  # the positions the uploaded rows say they are
    drafts: list[int] = field(default_factory=list)
    epoch: int = 0


class FakeCloudLink:
    """Implements `CloudLink`: holds each session's uploaded rows and answers as the real cloud does, with
    `truth` as the full model (greedy): drafts are verified in order, the first wrong one is replaced and what
    followed it dropped (the session's epoch moves on), requests of an older epoch are stale.

    Scripting: `evict_at` (extend call numbers, 1-based, before which the session is forgotten down to
    `evict_to` positions), `down` (every call raises CloudUnavailableError), `refuse` (every call raises
    CloudRefusedError with that code), `before_answer` (awaited inside each extend: hold an answer back).
    """

    codec = "fp32"
    deep_layers = 2

    def __init__(self, truth: Predictor = edge_guess, evict_at: Sequence[int] = (), evict_to: int = 0, scripted_rows: bool = True) -> None:
        """`scripted_rows=False` takes rows from a real runtime (their first value is then not a token)."""
        self.truth = truth
        self.scripted_rows = scripted_rows
        self.evict_at = set(evict_at)
        self.evict_to = evict_to
        self.down = False
        self.refuse: str | None = None
        self.before_answer: Callable[[], Awaitable[None]] | None = None
        self.held: dict[str, list[int]] = {}
        self.epochs: dict[str, int] = {}
        self.calls: list[Call] = []
        self.extends = 0
        self.stats = LinkStats()

    def _check(self) -> None:
        if self.refuse is not None:
            raise CloudRefusedError(self.refuse, "refused by the test")
        if self.down:
            raise CloudUnavailableError("cloud unreachable (test)")

    async def open_session(self, session_id: str, stats: LinkStats | None = None) -> None:
        self._check()
        self.calls.append(Call("open", session_id))
        self.held.setdefault(session_id, [])

    async def extend(self, request: ExtendRequest, stats: LinkStats | None = None) -> DeepResult:
        self._check()
        self.extends += 1
        session, start = request.session_id, request.start
        rows = [(int(r[0]) % VOCAB, int(r[1])) if self.scripted_rows else (0, start + i) for i, r in enumerate(np.asarray(request.hidden))]
        self.calls.append(Call("extend", session, start, len(rows), request.want_token, [p for _, p in rows], list(request.drafts), request.epoch))
        await asyncio.sleep(0)  # an answer is never instant: the loop may draft meanwhile
        if self.before_answer is not None:
            await self.before_answer()
        self._check()
        held = self.held.setdefault(session, [])
        epoch = self.epochs.setdefault(session, 0)
        if self.extends in self.evict_at:
            del held[self.evict_to:]
        if request.epoch < epoch:
            raise StaleRequestError(session, request.epoch, epoch, len(held))
        if request.epoch > epoch and not (request.rebase and request.base_epoch == epoch):
            raise ContextMismatchError(session, start, len(held), epoch, "held at an older epoch")
        if start > len(held):
            raise ContextMismatchError(session, start, len(held), epoch)
        assert [p for _, p in rows] == list(range(start, start + len(rows))), f"rows say positions {[p for _, p in rows]}, frame says {start}"
        self.epochs[session] = epoch = request.epoch
        del held[start:]  # an upload from `start` replaces what followed (the edge rolled back)
        held.extend(t for t, _ in rows)
        predicted = [self.truth(held[: start + i + 1]) for i in range(len(rows))]
        first = request.first_checked_row
        accepted, token = len(request.drafts), None
        for j, draft in enumerate(request.drafts):
            if predicted[first + j] != draft:
                accepted, token = j, predicted[first + j]
                del held[start + first + j + 1:]
                self.epochs[session] = epoch = epoch + 1
                break
        else:
            if request.want_token:
                token = predicted[-1]
        for s in (self.stats, stats):
            if s is not None:
                s.add_frame(up=16 * len(rows), down=8 * len(rows))
                s.round_trips += 1
        decided = accepted + (token is not None)
        return DeepResult(start, predicted, [0.0] * len(rows), token, len(held), accepted, epoch, [0.0] * decided)

    async def close_session(self, session_id: str, stats: LinkStats | None = None) -> None:
        self._check()
        self.calls.append(Call("close", session_id))
        self.held.pop(session_id, None)

    async def aclose(self) -> None:
        return None

    def extend_calls(self) -> list[Call]:
        return [c for c in self.calls if c.kind == "extend"]


def greedy(predict: Predictor, prompt: Sequence[int], n: int, stop: Sequence[int] = ()) -> list[int]:
    """What a model that is `predict` would generate: the reference for exactness."""
    tokens, out = list(prompt), []
    for _ in range(n):
        out.append(predict(tokens))
        tokens.append(out[-1])
        if out[-1] in stop:
            break
    return out
