"""Bearer-token auth for the cloud: one or more client tokens, compared in constant time, never logged.

Each token is one client identity. Sessions belong to the client that opened them; a client's identity is a hash
of its token (so a reconnecting edge finds its sessions again, and another token cannot touch them) and, without
auth, one anonymous identity on a loopback-only server.

The token file holds one token per line (blank lines and lines starting with '#' are skipped); each line is a
client. $OFFRAMP_CLOUD_TOKEN holds one token. The edge's own token file holds the single token it sends.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from collections.abc import Sequence
from pathlib import Path

from offramp.shared.auth import AuthConfigError, is_loopback, read_token_list

__all__ = ["ANONYMOUS", "TOKEN_ENV", "AuthConfigError", "BearerAuth", "check_bind", "is_loopback", "read_tokens"]

TOKEN_ENV = "OFFRAMP_CLOUD_TOKEN"
ANONYMOUS = "anonymous"


def read_tokens(path: Path | str | None, env: str = TOKEN_ENV) -> list[str] | None:
    """The client tokens in `path` (one a line), else the one in $OFFRAMP_CLOUD_TOKEN, else None."""
    if path is not None:
        return read_token_list(path)
    value = os.environ.get(env, "").strip()
    return [value] if value else None


def check_bind(host: str, token: str | Sequence[str] | None) -> None:
    """Without a token, only loopback: an open port on the internet would serve anyone."""
    if not token and not is_loopback(host):
        raise AuthConfigError(f"refusing to bind {host!r} without a token: pass --token-file (or set {TOKEN_ENV}) or bind 127.0.0.1")


class BearerAuth:
    """Checks `Authorization: Bearer <token>` headers; `identity()` names the client for session ownership."""

    def __init__(self, tokens: str | Sequence[str] | None) -> None:
        if isinstance(tokens, str):
            tokens = [tokens]
        self._tokens = [t.encode() for t in tokens or () if t]

    @property
    def enabled(self) -> bool:
        return bool(self._tokens)

    @property
    def clients(self) -> int:
        return len(self._tokens)

    def identity(self, header: str | None) -> str | None:
        """The client's identity, or None if the header does not carry one of the tokens.

        Every token is compared (hmac.compare_digest, no early exit), so timing says nothing about which
        token, or how much of one, matched."""
        if not self._tokens:
            return ANONYMOUS
        if not header or not header.startswith("Bearer "):
            return None
        given = header[len("Bearer "):].strip().encode()
        match = None
        for token in self._tokens:
            if hmac.compare_digest(given, token):
                match = token
        if match is None:
            return None
        return hashlib.sha256(match).hexdigest()[:16]

    def __repr__(self) -> str:  # never show a secret
        return f"BearerAuth(enabled={self.enabled}, clients={self.clients})"
