"""Bearer-token sources and bind safety, the same for the cloud server and the edge daemon.

Tokens come from a file or an environment variable and never appear in errors or logs. A server without a
token binds loopback only: an open port on a network would serve anyone.
"""

from __future__ import annotations

import ipaddress
import os
from pathlib import Path

from offramp.shared.errors import OfframpError


class AuthConfigError(OfframpError, ValueError):
    """A token file that cannot be used, or an unsafe bind without a token."""


def is_loopback(host: str) -> bool:
    """True for 127.0.0.0/8, ::1 and 'localhost'; everything else (0.0.0.0 included) is reachable from outside."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def read_token_file(path: Path | str) -> str:
    """The token in `path`, whitespace stripped; the token itself never appears in errors."""
    try:
        token = Path(path).read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise AuthConfigError(f"cannot read token file {str(path)!r}: {exc.__class__.__name__}") from None
    if not token:
        raise AuthConfigError(f"token file {str(path)!r} is empty")
    return token


def read_token(path: Path | str | None, env: str) -> str | None:
    """The token from `path`, else from the environment variable `env`, else None."""
    if path is not None:
        return read_token_file(path)
    value = os.environ.get(env, "").strip()
    return value or None
