"""Signed, expiring, token-free URLs, and the S3-style XML errors of the store.

The RSP's ``#this`` links are S3 presigned GET URLs (``X-Amz-*``) and its SODA
results GCS V4 signed URLs (``X-Goog-*``). Here both are HMAC-SHA256 over the
path, the signing date and the lifetime with a per-server secret; they need no
token and expire. Errors are S3-style XML (:func:`s3_error`).

Dependency rule: aiohttp, the standard library and :mod:`._votable`.
"""

from __future__ import annotations

import calendar
import functools
import hashlib
import hmac
import math
import time
from collections.abc import Callable, Mapping
from urllib.parse import quote

from aiohttp import web

from ._votable import xml_text

__all__ = ["MAX_EXPIRES", "MAX_SKEW", "AccessDenied", "Signer", "s3_error"]

#: Longest lifetime a signature may claim (S3's limit, 7 days).
MAX_EXPIRES = 7 * 24 * 3600
#: Tolerated clock skew for a signing date in the future.
MAX_SKEW = 15 * 60

_STYLES = {
    "s3": ("X-Amz", "AWS4-HMAC-SHA256", "s3"),
    "gcs": ("X-Goog", "GOOG4-HMAC-SHA256", "storage"),
}


class AccessDenied(Exception):
    """A signed URL that does not authorise the request."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.status = status
        self.code = code
        self.message = message


def s3_error(status: int, code: str, message: str, **extra: str) -> web.Response:
    """An S3-style XML error answer."""
    fields = "".join(f"<{k}>{xml_text(v)}</{k}>" for k, v in extra.items())
    body = (
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        f"<Error><Code>{code}</Code><Message>{xml_text(message)}</Message>{fields}</Error>\n"
    )
    return web.Response(status=status, text=body, content_type="application/xml")


def _amz_date(t: float) -> str:
    return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(t))


@functools.lru_cache(maxsize=1024)
def _parse_date(text: str) -> float:
    """``YYYYMMDDTHHMMSSZ`` (or plain epoch seconds) to epoch seconds."""
    if text.isdigit():
        return float(text)
    return float(calendar.timegm(time.strptime(text, "%Y%m%dT%H%M%SZ")))


class Signer:
    """Makes and checks signed storage URLs (see the module docstring)."""

    def __init__(self, secret: bytes, clock: Callable[[], float]) -> None:
        self._secret = secret
        self._clock = clock

    def _signature(self, path: str, date: str, expires: str, prefix: str) -> str:
        message = f"GET\n{path}\n{prefix}\n{date}\n{expires}".encode()
        return hmac.new(self._secret, message, hashlib.sha256).hexdigest()

    def sign(self, path: str, lifetime: float, style: str = "s3") -> str:
        """The query string that makes ``path`` readable for ``lifetime`` seconds."""
        prefix, algorithm, service = _STYLES[style]
        now = self._clock()
        date = _amz_date(now)
        expires = str(max(1, math.ceil(lifetime)))
        scheme = "goog4" if style == "gcs" else "aws4"
        credential = f"harvester/{date[:8]}/local/{service}/{scheme}_request"
        params = [
            (f"{prefix}-Algorithm", algorithm),
            (f"{prefix}-Credential", credential),
            (f"{prefix}-Date", date),
            (f"{prefix}-Expires", expires),
            (f"{prefix}-SignedHeaders", "host"),
            (f"{prefix}-Signature", self._signature(path, date, expires, prefix)),
        ]
        return "&".join(f"{k}={quote(v, safe='')}" for k, v in params)

    def verify(self, path: str, query: Mapping[str, str], style: str = "s3") -> None:
        """Check a request's signature and expiry.

        Raises
        ------
        AccessDenied
            403 for a missing or wrong signature and for an expired URL.
        """
        prefix = _STYLES[style][0]
        date, expires, signature = (
            query.get(f"{prefix}-Date"),
            query.get(f"{prefix}-Expires"),
            query.get(f"{prefix}-Signature"),
        )
        if not date or not expires or not signature:
            raise AccessDenied(
                403,
                "AccessDenied",
                "Query-string authentication requires the Signature, Date and Expires parameters",
            )
        expected = self._signature(path, date, expires, prefix)
        if not hmac.compare_digest(expected, signature.lower()):
            raise AccessDenied(
                403,
                "SignatureDoesNotMatch",
                "The request signature we calculated does not match the signature you provided.",
            )
        try:
            signed_at = _parse_date(date)
            lifetime = int(expires)
        except ValueError:
            raise AccessDenied(403, "AccessDenied", "Invalid date or expiry") from None
        if not 0 < lifetime <= MAX_EXPIRES:
            raise AccessDenied(403, "AccessDenied", "X-Amz-Expires must be between 1 and 604800")
        now = self._clock()
        if now > signed_at + lifetime:
            raise AccessDenied(403, "AccessDenied", "Request has expired")
        if signed_at > now + MAX_SKEW:
            raise AccessDenied(403, "AccessDenied", "Request is not yet valid")
