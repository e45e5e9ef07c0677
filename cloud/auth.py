"""Bearer-token auth for the cloud: one shared secret, compared in constant time, never logged.

Sessions belong to the client that opened them; a client's identity is a hash of its token (so a reconnecting
edge finds its sessions again) and, without auth, one anonymous identity on a loopback-only server.
"""

from __future__ import annotations

import hashlib
import hmac
from pathlib import Path

from offramp.shared.auth import AuthConfigError, is_loopback
from offramp.shared.auth import read_token as shared_read_token

__all__ = ["ANONYMOUS", "TOKEN_ENV", "AuthConfigError", "BearerAuth", "check_bind", "is_loopback", "read_token"]

TOKEN_ENV = "OFFRAMP_CLOUD_TOKEN"
ANONYMOUS = "anonymous"


def read_token(path: Path | str | None, env: str = TOKEN_ENV) -> str | None:
    """The cloud's token from `path`, else from $OFFRAMP_CLOUD_TOKEN, else None."""
    return shared_read_token(path, env)


def check_bind(host: str, token: str | None) -> None:
    """Without a token, only loopback: an open port on the internet would serve anyone."""
    if token is None and not is_loopback(host):
        raise AuthConfigError(f"refusing to bind {host!r} without a token: pass --token-file (or set {TOKEN_ENV}) or bind 127.0.0.1")


class BearerAuth:
    """Checks `Authorization: Bearer <token>` headers; `identity()` names the client for session ownership."""

    def __init__(self, token: str | None) -> None:
        self._token = token.encode() if token else None

    @property
    def enabled(self) -> bool:
        return self._token is not None

    def identity(self, header: str | None) -> str | None:
        """The client's identity, or None if the header does not carry the right token."""
        if self._token is None:
            return ANONYMOUS
        if not header or not header.startswith("Bearer "):
            return None
        given = header[len("Bearer "):].strip().encode()
        if not hmac.compare_digest(given, self._token):
            return None
        return hashlib.sha256(given).hexdigest()[:16]

    def __repr__(self) -> str:  # never show the secret
        return f"BearerAuth(enabled={self.enabled})"
