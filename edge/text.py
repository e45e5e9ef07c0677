"""Token ids to text for one request: incremental, never splitting a character, cut at the first stop string."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


class TextAssembler:
    """Token ids in, text out: never splits a multi-byte character, and cuts at the first stop string.

    Decodes a short window of recent tokens rather than the whole sequence (as vLLM does), so a long generation
    costs O(n), and holds back a tail that could still become a stop string.
    """

    def __init__(self, tokenizer: Any, stop: Sequence[str] = ()) -> None:
        self.tokenizer = tokenizer
        self.stop = tuple(s for s in stop if s)
        self._longest_stop = max((len(s) for s in self.stop), default=0)
        self.ids: list[int] = []
        self._prefix = 0  # window start
        self._read = 0  # tokens whose text is in self.text
        self.text = ""
        self.emitted = 0  # characters of self.text already handed out
        self.stopped = False  # a stop string was found; nothing more comes out

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def _absorb(self, final: bool) -> None:
        window = self.ids[self._prefix :]
        prefix_text = self._decode(self.ids[self._prefix : self._read])
        new_text = self._decode(window)
        if len(new_text) > len(prefix_text) and (final or not new_text.endswith("\ufffd")):
            self.text += new_text[len(prefix_text) :]
            self._prefix, self._read = self._read, len(self.ids)

    def add(self, token_id: int) -> str:
        """Take one token; return the text that is now safe to show (may be empty)."""
        self.ids.append(token_id)
        if self.stopped:
            return ""
        self._absorb(final=False)
        return self._release(final=False)

    def finish(self) -> str:
        """No more tokens: return whatever was held back."""
        if self.stopped:
            return ""
        self._absorb(final=True)
        return self._release(final=True)

    def _release(self, final: bool) -> str:
        end = len(self.text)
        if self.stop:
            start = max(0, self.emitted - self._longest_stop + 1)
            hits = [i for i in (self.text.find(s, start) for s in self.stop) if i >= 0]
            if hits:
                cut = min(hits)
                self.stopped = True
                self.text = self.text[:cut]
                end = cut
            elif not final:
                end -= self._held_tail()
        piece = self.text[self.emitted : max(end, self.emitted)]
        self.emitted += len(piece)
        return piece

    def _held_tail(self) -> int:
        """Length of the longest unreleased suffix that is a proper prefix of a stop string."""
        pending = self.text[self.emitted :]
        for size in range(min(len(pending), self._longest_stop - 1), 0, -1):
            tail = pending[-size:]
            if any(s.startswith(tail) for s in self.stop):
                return size
        return 0
