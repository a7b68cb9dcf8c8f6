"""The exception hierarchy. Each type says whether retrying can help.

::

    HarvesterError                 (retryable = False)
    ├── ConfigError                a configuration key has a bad value
    ├── TargetError                a target list or a row of it is unusable
    ├── RepositoryError            a repository index or file is missing or broken
    ├── UsageError                 a request can never succeed (no overlap, 404, 422)
    ├── OutageError                a service stopped answering: the run stops starting work
    └── TransientError             (retryable = True) may succeed if tried again

Only these (and ``OSError``) become a target's ``failed`` record; any other
exception is a bug and propagates.
"""

from __future__ import annotations

__all__ = [
    "ConfigError",
    "HarvesterError",
    "OutageError",
    "RepositoryError",
    "TargetError",
    "TransientError",
    "UsageError",
]


class HarvesterError(Exception):
    """Base of every error harvester raises on purpose."""

    retryable: bool = False


class ConfigError(HarvesterError, ValueError):
    """A configuration key has a bad value; the message names the key and value."""


class TargetError(HarvesterError, ValueError):
    """A target list is unusable, or one of its rows is; names file, row and column."""


class RepositoryError(HarvesterError):
    """A repository index or one of its files is missing or broken."""


class UsageError(HarvesterError):
    """A request that will fail however often it is tried."""


class OutageError(HarvesterError):
    """A service has stopped answering: every request to it failed for a while.

    Raised by the remote client's circuit breaker. The run records every target it
    has not done as ``failed`` with this message, starts no new work and exits
    non-zero; re-running once the service is back does what is left.
    """


class TransientError(HarvesterError):
    """A failure that may go away (timeouts, resets, 5xx, 429).

    ``retry_after`` is the server's own advice in seconds (Retry-After or
    X-RateLimit-Reset), when it gave one.
    """

    retryable = True

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after
