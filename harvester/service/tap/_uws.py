"""UWS 1.1 jobs for TAP's ``/async``: the job record and its XML.

Phases: PENDING (created), QUEUED (RUN received; set before the RUN answer is
sent, so a client that waits right after never sees PENDING), EXECUTING,
then COMPLETED, ERROR or ABORTED. A job belongs to the user whose token created
it; other users see a 404. Times are ISO 8601 UTC with ``Z``.

Dependency rule: the standard library and the service's XML helpers.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from datetime import UTC

from .._votable import xml_attr, xml_text

__all__ = [
    "ACTIVE",
    "FINISHED",
    "PHASES",
    "Job",
    "iso_time",
    "job_xml",
    "jobs_xml",
    "parse_iso_time",
]

PHASES = (
    "PENDING",
    "QUEUED",
    "EXECUTING",
    "COMPLETED",
    "ERROR",
    "ABORTED",
    "UNKNOWN",
    "HELD",
    "SUSPENDED",
    "ARCHIVED",
)
ACTIVE = frozenset({"QUEUED", "EXECUTING"})
FINISHED = frozenset({"COMPLETED", "ERROR", "ABORTED"})

_NS = (
    'xmlns:uws="http://www.ivoa.net/xml/UWS/v1.0" '
    'xmlns:xlink="http://www.w3.org/1999/xlink" '
    'xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance"'
)
_DECL = '<?xml version="1.0" encoding="UTF-8"?>\n'


def iso_time(t: float) -> str:
    """Epoch seconds as ``2026-12-04T13:06:00.000Z``."""
    whole = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t))
    return f"{whole}.{int((t % 1) * 1000):03d}Z"


def parse_iso_time(text: str) -> float:
    """An ISO 8601 UTC time (``Z`` or no zone; fractions allowed) as epoch seconds.

    Raises
    ------
    ValueError
    """
    from datetime import datetime

    value = text.strip()
    if value.endswith("Z"):
        value = value[:-1]
    moment = datetime.fromisoformat(value)
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.timestamp()


@dataclass
class Job:
    """One async query: parameters, phase, times, and its result or error."""

    id: str
    owner: str
    params: dict[str, str]
    creation: float
    execution_duration: int
    destruction: float
    phase: str = "PENDING"
    start: float | None = None
    end: float | None = None
    result: bytes | None = None
    rows: int = 0
    error: str | None = None
    changed: asyncio.Event = field(default_factory=asyncio.Event, repr=False)

    def set_phase(self, phase: str, now: float) -> None:
        """Move to ``phase`` and wake whoever waits on the job."""
        self.phase = phase
        if phase == "EXECUTING":
            self.start = now
        elif phase in FINISHED:
            self.end = now
        self.changed.set()
        self.changed = asyncio.Event()


def _timed(tag: str, t: float | None) -> str:
    if t is None:
        return f'  <uws:{tag} xsi:nil="true"/>\n'
    return f"  <uws:{tag}>{iso_time(t)}</uws:{tag}>\n"


def job_xml(job: Job, url: str) -> str:
    """The ``<uws:job>`` document of a job at ``url``."""
    parts = [_DECL, f'<uws:job {_NS} version="1.1">\n']
    parts.append(f"  <uws:jobId>{xml_text(job.id)}</uws:jobId>\n")
    if "RUNID" in job.params:
        parts.append(f"  <uws:runId>{xml_text(job.params['RUNID'])}</uws:runId>\n")
    parts.append(f"  <uws:ownerId>{xml_text(job.owner)}</uws:ownerId>\n")
    parts.append(f"  <uws:phase>{job.phase}</uws:phase>\n")
    parts.append('  <uws:quote xsi:nil="true"/>\n')
    parts.append(_timed("creationTime", job.creation))
    parts.append(_timed("startTime", job.start))
    parts.append(_timed("endTime", job.end))
    parts.append(f"  <uws:executionDuration>{job.execution_duration}</uws:executionDuration>\n")
    parts.append(_timed("destruction", job.destruction))
    parts.append(parameters_xml(job, inner=True))
    parts.append(results_xml(job, url, inner=True))
    if job.phase == "ERROR" and job.error is not None:
        parts.append(
            '  <uws:errorSummary type="fatal" hasDetail="true">\n'
            f"    <uws:message>{xml_text(job.error)}</uws:message>\n"
            "  </uws:errorSummary>\n"
        )
    parts.append("</uws:job>\n")
    return "".join(parts)


def parameters_xml(job: Job, inner: bool = False) -> str:
    rows = "".join(
        f"    <uws:parameter id={xml_attr(k.lower())}>{xml_text(v)}</uws:parameter>\n"
        for k, v in job.params.items()
    )
    body = f"  <uws:parameters>\n{rows}  </uws:parameters>\n"
    if inner:
        return body
    return _DECL + body.replace("<uws:parameters>", f"<uws:parameters {_NS}>", 1)


def results_xml(job: Job, url: str, inner: bool = False) -> str:
    rows = ""
    if job.phase == "COMPLETED" and job.result is not None:
        href = xml_attr(f"{url}/results/result")
        rows = (
            f'    <uws:result id="result" xlink:href={href} '
            f'mime-type="application/x-votable+xml" size="{len(job.result)}"/>\n'
        )
    body = f"  <uws:results>\n{rows}  </uws:results>\n"
    if inner:
        return body
    return _DECL + body.replace("<uws:results>", f"<uws:results {_NS}>", 1)


def jobs_xml(jobs: list[Job], base: str) -> str:
    """The job list (``GET /async``)."""
    parts = [_DECL, f'<uws:jobs {_NS} version="1.1">\n']
    for job in jobs:
        href = xml_attr(f"{base}/{job.id}")
        parts.append(
            f"  <uws:jobref id={xml_attr(job.id)} xlink:href={href}>\n"
            f"    <uws:phase>{job.phase}</uws:phase>\n"
            f"    <uws:ownerId>{xml_text(job.owner)}</uws:ownerId>\n"
            f"    <uws:creationTime>{iso_time(job.creation)}</uws:creationTime>\n"
            "  </uws:jobref>\n"
        )
    parts.append("</uws:jobs>\n")
    return "".join(parts)
