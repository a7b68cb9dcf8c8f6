"""A Gafaelfawr-like front door: tokens, scopes and per-user quotas.

Tokens come as ``Authorization: Bearer <token>`` or HTTP Basic with the token as
the user name or the password (``x-oauth-basic`` in the other field, or anything).
Missing or unknown token: 401 with ``WWW-Authenticate: Basic realm="..."``; a
token without the route's scope: 403; a malformed header: 400.

Quotas are fixed windows per (service, user): the window opens at a user's first
request and lasts ``window`` seconds. Every answer of a quota'd service carries
``X-RateLimit-Limit``, ``-Remaining``, ``-Reset`` (epoch seconds), ``-Resource`` and
``-Used``; over the limit the answer is 429 with ``Retry-After`` as an HTTP date.

The token's value is never logged or recorded; users are named by a short hash.

Dependency rule: aiohttp and the standard library.
"""

from __future__ import annotations

import base64
import binascii
import email.utils
import hashlib
import math
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from aiohttp import web

from ._http import text_response

__all__ = [
    "AuthResult",
    "QuotaState",
    "QuotaTracker",
    "authenticate",
    "quota_headers",
    "user_name",
]


def user_name(token: str) -> str:
    """A stable, non-secret name for a token (for quotas and records)."""
    return "user-" + hashlib.sha256(token.encode()).hexdigest()[:12]


@dataclass(frozen=True)
class AuthResult:
    """The outcome: ``user`` when allowed, else the ``response`` to send."""

    user: str | None
    response: web.Response | None


def _extract(header: str, tokens: Mapping[str, frozenset[str]]) -> str | None:
    """The token of an Authorization header; ``None`` if the scheme is not ours.

    Raises ValueError for a malformed Bearer or Basic value.
    """
    scheme, _, value = header.strip().partition(" ")
    value = value.strip()
    if scheme.lower() == "bearer":
        if not value or " " in value:
            raise ValueError("malformed Bearer token")
        return value
    if scheme.lower() == "basic":
        try:
            decoded = base64.b64decode(value, validate=True).decode("utf-8")
        except (binascii.Error, UnicodeDecodeError):
            raise ValueError("malformed Basic credentials") from None
        user, sep, password = decoded.partition(":")
        if not sep:
            raise ValueError("malformed Basic credentials")
        if user == "x-oauth-basic":
            return password
        if password == "x-oauth-basic":
            return user
        if password in tokens:
            return password
        return user or password
    return None


def authenticate(
    request: web.Request,
    tokens: Mapping[str, frozenset[str]],
    scope: str,
    realm: str,
) -> AuthResult:
    """Check the request's credentials against ``tokens`` for ``scope``."""
    header = request.headers.get("Authorization")
    challenge = {"WWW-Authenticate": f'Basic realm="{realm}"'}
    try:
        token = _extract(header, tokens) if header else None
    except ValueError as exc:
        return AuthResult(None, text_response(400, f"Invalid Authorization header: {exc}\n"))
    if token is None:
        return AuthResult(None, text_response(401, "Authentication required\n", headers=challenge))
    scopes = tokens.get(token)
    if scopes is None:
        return AuthResult(None, text_response(401, "Invalid token\n", headers=challenge))
    if scope not in scopes:
        headers = {
            "WWW-Authenticate": (
                f'Bearer realm="{realm}", error="insufficient_scope", scope="{scope}"'
            )
        }
        return AuthResult(
            None, text_response(403, f"Token does not have the {scope} scope\n", headers)
        )
    return AuthResult(user_name(token), None)


@dataclass(frozen=True)
class QuotaState:
    """One request's quota accounting."""

    allowed: bool
    limit: int
    used: int
    reset: float
    resource: str

    @property
    def remaining(self) -> int:
        return max(0, self.limit - self.used)


class QuotaTracker:
    """Fixed-window request counts per (service, user); see the module docstring."""

    def __init__(
        self, limits: Mapping[str, int], window: float, clock: Callable[[], float]
    ) -> None:
        self.limits = dict(limits)
        self.window = window
        self._clock = clock
        self._windows: dict[tuple[str, str], tuple[float, int]] = {}
        self._lock = threading.Lock()

    def hit(self, service: str, user: str, resource: str) -> QuotaState | None:
        """Count one request; ``None`` when the service has no quota."""
        limit = self.limits.get(service)
        if limit is None:
            return None
        now = self._clock()
        key = (service, user)
        with self._lock:
            start, count = self._windows.get(key, (now, 0))
            if now >= start + self.window:
                start, count = now, 0
            allowed = count < limit
            if allowed:
                count += 1
            self._windows[key] = (start, count)
            if len(self._windows) > 10000:
                self._windows = {k: v for k, v in self._windows.items() if now < v[0] + self.window}
        return QuotaState(allowed, limit, count, start + self.window, resource)


def quota_headers(q: QuotaState) -> dict[str, str]:
    """The ``X-RateLimit-*`` headers (and ``Retry-After`` when refused)."""
    headers = {
        "X-RateLimit-Limit": str(q.limit),
        "X-RateLimit-Remaining": str(q.remaining),
        "X-RateLimit-Reset": str(math.ceil(q.reset)),
        "X-RateLimit-Resource": q.resource,
        "X-RateLimit-Used": str(q.used),
    }
    if not q.allowed:
        headers["Retry-After"] = email.utils.formatdate(math.ceil(q.reset), usegmt=True)
    return headers
