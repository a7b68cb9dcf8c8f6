"""Repertoire discovery (``rsp-protocols.md`` §1): a dataset's service endpoints.

:func:`discover` reads ``{url}/repertoire/discovery`` (anonymously) into
:class:`Endpoints`: the dataset's SIA, DataLink and SODA URLs (falling back to the
RSP's URL conventions), its TAP service, the repository extension ``harvester
serve`` offers, and the service prefixes that may see the token (set on the
client).

Dependency rule: :mod:`harvester.errors` and :mod:`._client`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ..errors import ConfigError, UsageError
from ._client import ServiceClient

__all__ = ["Endpoints", "discover", "parse_discovery"]


@dataclass(frozen=True)
class Endpoints:
    """What discovery says about one dataset."""

    base: str
    dataset: str
    sia: str  # the SIA query URL
    datalink: str  # the DataLink links URL
    cutout: str | None  # the SODA sync URL
    repository: str | None  # harvester serve's repository extension, if offered
    prefixes: tuple[str, ...]  # URLs at or under which the token may be sent
    #: The TAP service: discovery's ``tap`` entry; with no discovery document, the
    #: RSP's ``{base}/api/tap``; None when discovery lists the dataset without one.
    tap: str | None = None


def discovery_url(base: str) -> str:
    return f"{base}/repertoire/discovery"


def parse_discovery(doc: Any, base: str, dataset: str) -> Endpoints:
    """:class:`Endpoints` from a Repertoire discovery document (§1.2).

    Missing SIA, DataLink and SODA services fall back to the RSP URL conventions
    under ``base`` (``lsst.rsp`` sends the token there too); the repository
    extension is used only when discovery offers it (``harvester serve`` does), and
    TAP when discovery lists it or when there is no discovery document at all
    (``doc`` None: ``{base}/api/tap``; ``harvester serve`` lists it only with
    ``--tap``).
    """
    services: Mapping[str, Any] = {}
    if isinstance(doc, dict):
        ds = doc.get("datasets", {})
        if isinstance(ds, dict) and isinstance(ds.get(dataset), dict):
            found = ds[dataset].get("services", {})
            services = found if isinstance(found, dict) else {}
        elif isinstance(ds, dict) and ds:
            raise ConfigError(
                f"{discovery_url(base)}: no dataset {dataset!r} (offered: {', '.join(sorted(ds))})"
            )
    prefixes: list[str] = []

    def url(name: str, versions: Sequence[str], suffix: str, fallback: str) -> str:
        entry = services.get(name)
        if not isinstance(entry, dict):
            prefixes.append(fallback)
            return fallback + suffix
        root = str(entry.get("url", fallback)).rstrip("/")
        prefixes.append(root)
        found = entry.get("versions", {})
        for key in versions:
            v = found.get(key) if isinstance(found, dict) else None
            if isinstance(v, dict) and v.get("url"):
                prefixes.append(str(v["url"]).rstrip("/"))
                return str(v["url"]).rstrip("/")
        return root + suffix

    sia = url("sia", ("sia-query-2.0", "v2"), "/query", f"{base}/api/sia/{dataset}")
    datalink = url("datalink", ("datalink-links-1.1",), "/links", f"{base}/api/datalink")
    cutout = url("cutout", ("soda-sync-1.0",), "/sync", f"{base}/api/cutout")
    repository = None
    if isinstance(services.get("harvester"), dict):
        repository = url(
            "harvester", ("repository-1", "repository"), "/repository", f"{base}/api/harvester"
        )
    tap = None
    entry = services.get("tap")
    if isinstance(entry, dict) and isinstance(entry.get("url"), str):
        tap = entry["url"].rstrip("/")
    elif doc is None:
        tap = f"{base}/api/tap"
        prefixes.append(tap)
    for name, entry in services.items():
        known = name in ("sia", "datalink", "cutout", "harvester")
        if not known and isinstance(entry, dict) and isinstance(entry.get("url"), str):
            prefixes.append(entry["url"].rstrip("/"))
    return Endpoints(
        base, dataset, sia, datalink, cutout, repository, tuple(dict.fromkeys(prefixes)), tap
    )


async def discover(client: ServiceClient) -> Endpoints:
    """Read the discovery document (anonymously) and set the client's token prefixes."""
    s = client.settings
    url = discovery_url(s.url)
    doc: Any = None
    try:
        r = await client.request("GET", url, service="discovery", auth=False)
        doc = json.loads(r.body)
    except UsageError:
        doc = None  # no discovery service: RSP URL conventions
    except ValueError as exc:
        raise ConfigError(f"{url}: the discovery document is not JSON: {exc}") from exc
    endpoints = parse_discovery(doc, s.url, s.dataset)
    client.prefixes = endpoints.prefixes
    return endpoints
