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


def _read_text(path: Path | str) -> str:
    try:
        return Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise AuthConfigError(f"cannot read token file {str(path)!r}: {exc.__class__.__name__}") from None


def read_token_file(path: Path | str) -> str:
    """The one token in `path`, whitespace stripped (what a client sends); the token never appears in errors."""
    token = _read_text(path).strip()
    if not token:
        raise AuthConfigError(f"token file {str(path)!r} is empty")
    if any(c.isspace() for c in token):
        raise AuthConfigError(f"token file {str(path)!r} holds more than one word; a client's token file holds one token")
    return token


def read_token_list(path: Path | str) -> list[str]:
    """The tokens in `path`, one a line, for a server with several clients (blank and '#' lines skipped).

    Errors name the file and the line, never a token."""
    tokens: list[str] = []
    for number, line in enumerate(_read_text(path).splitlines(), 1):
        token = line.strip()
        if not token or token.startswith("#"):
            continue
        if any(c.isspace() for c in token):
            raise AuthConfigError(f"token file {str(path)!r} line {number}: a token cannot contain whitespace")
        if token in tokens:
            raise AuthConfigError(f"token file {str(path)!r} line {number}: the same token appears twice")
        tokens.append(token)
    if not tokens:
        raise AuthConfigError(f"token file {str(path)!r} is empty")
    return tokens


def read_token(path: Path | str | None, env: str) -> str | None:
    """The token from `path`, else from the environment variable `env`, else None."""
    if path is not None:
        return read_token_file(path)
    value = os.environ.get(env, "").strip()
    return value or None
