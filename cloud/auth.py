"""Bearer-token auth for the cloud: one shared secret, compared in constant time, never logged.

Sessions belong to the client that opened them; a client's identity is a hash of its token (so a reconnecting
edge finds its sessions again) and, without auth, one anonymous identity on a loopback-only server.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import os
from pathlib import Path

from offramp.shared.errors import OfframpError

TOKEN_ENV = "OFFRAMP_CLOUD_TOKEN"
ANONYMOUS = "anonymous"


class AuthConfigError(OfframpError, ValueError):
    """A token file that cannot be used, or an unsafe bind without a token."""


def read_token(path: Path | str | None, env: str = TOKEN_ENV) -> str | None:
    """The token from `path` (whitespace stripped), else from the environment variable, else None."""
    if path is not None:
        try:
            token = Path(path).read_text().strip()
        except OSError as exc:
            raise AuthConfigError(f"cannot read token file {str(path)!r}: {exc.strerror}") from None
        if not token:
            raise AuthConfigError(f"token file {str(path)!r} is empty")
        return token
    value = os.environ.get(env, "").strip()
    return value or None


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


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
