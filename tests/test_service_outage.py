"""The outage switch of the fault injector: ``server.faults.down`` (the same object
as ``server.state.faults``), ``outage_after``, and the counters.

Requests go over raw connections, one request each, so that every request the
client makes is exactly one request the server sees (aiohttp's client would
retry an idempotent request once after a reset).
"""

from __future__ import annotations

import asyncio
import threading
from urllib.parse import urlsplit

import pytest

from harvester.errors import ConfigError
from harvester.repo import Repository
from harvester.service import ServerHandle, ServiceSettings, serve
from harvester.service._faults import FaultInjector

AUTH = "Authorization: Bearer tok\r\n"


async def get(server: ServerHandle, target: str, auth: bool = True) -> int | None:
    """One GET on a fresh connection: the status, or None if the connection was
    dropped without an answer."""
    parts = urlsplit(server.base_url)
    reader, writer = await asyncio.open_connection(parts.hostname, parts.port)
    head = f"GET {target} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n{AUTH if auth else ''}\r\n"
    writer.write(head.encode())
    try:
        await writer.drain()
        data = await reader.read()
    except ConnectionError:
        data = b""
    finally:
        writer.close()
    return int(data.split(b" ", 2)[1]) if data else None


def settings(**kw: object) -> ServiceSettings:
    # Field types vary per keyword; ServiceSettings checks them at run time.
    return ServiceSettings(tokens={"tok": frozenset({"read:image"})}, **kw)  # type: ignore[arg-type]


async def test_down_refuses_data_routes_counts_and_comes_back(tiny_repo: Repository) -> None:
    ref = next(iter(tiny_repo))
    datalink = f"/api/datalink/links?ID=ivo://x?repo%3Ddp1%26id%3D{ref.id}"
    async with serve(tiny_repo, settings()) as server:
        faults = server.faults
        assert faults is server.state.faults
        assert (faults.down, faults.refused_while_down, faults.requests_seen) == (False, 0, 0)
        assert await get(server, datalink) == 200
        assert await get(server, "/api/sia/dp1/query?MAXREC=1") == 200
        faults.down = True
        assert await get(server, datalink) is None  # reset, no answer
        assert await get(server, "/api/sia/dp1/query?MAXREC=1") is None
        assert await get(server, "/api/cutout/sync?ID=x") is None
        assert await get(server, "/_store/x.fits", auth=False) is None
        assert await get(server, "/_results/x.fits", auth=False) is None
        # Not data routes: discovery, VOSI and the repository index stay up.
        assert await get(server, "/repertoire/discovery", auth=False) == 200
        assert await get(server, "/api/sia/dp1/availability", auth=False) == 200
        assert await get(server, "/api/harvester/repository") == 200
        assert faults.refused_while_down == 5
        faults.down = False
        assert await get(server, datalink) == 200
        assert await get(server, "/_store/x.fits", auth=False) == 403  # answered again
        assert faults.refused_while_down == 5
        assert faults.requests_seen == 2 + 5 + 2
        assert faults.requests_answered == 4
        downs = [r for r in server.received if r.fault == "down"]
        assert [(r.kind, r.status) for r in downs] == [
            ("datalink", 0),
            ("sia", 0),
            ("cutout", 0),
            ("storage", 0),
            ("results", 0),
        ]
        assert server.state.fault_counts[("datalink", "down")] == 1
        assert server.stats[("sia", 0)] == 1 and server.stats[("sia", 200)] == 1


async def test_outage_after_goes_down_by_itself_once(tiny_repo: Repository) -> None:
    async with serve(tiny_repo, settings(outage_after=3, quotas={"sia": 4})) as server:
        statuses = [await get(server, "/api/sia/dp1/query?MAXREC=1") for _ in range(5)]
        assert statuses == [200, 200, 200, None, None]
        assert server.faults.down and server.faults.refused_while_down == 2
        assert await get(server, "/repertoire/discovery", auth=False) == 200
        server.faults.down = False
        # Up again for good (the trip happens once); refused requests used no quota.
        assert [await get(server, "/api/sia/dp1/query?MAXREC=1") for _ in range(2)] == [200, 429]
        assert not server.faults.down
        assert (server.faults.requests_seen, server.faults.requests_answered) == (7, 5)


async def test_outage_follows_fault_routes(tiny_repo: Repository) -> None:
    async with serve(tiny_repo, settings(fault_routes=frozenset({"storage"}))) as server:
        server.faults.down = True
        assert await get(server, "/api/sia/dp1/query?MAXREC=1") == 200
        assert await get(server, "/_store/x.fits", auth=False) is None
        assert (server.faults.requests_seen, server.faults.refused_while_down) == (1, 1)


def test_outage_counters_are_thread_safe() -> None:
    faults = FaultInjector(0.0, (), 0.0, 0.0, 0, outage_after=0)
    faults.down = True

    def hammer() -> None:
        for _ in range(2000):
            faults.admit()
            faults.answered()

    threads = [threading.Thread(target=hammer) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert (faults.requests_seen, faults.refused_while_down) == (16000, 16000)
    assert faults.requests_answered == 16000


def test_outage_after_is_checked() -> None:
    for bad in (-1, 1.5, "3", True):
        with pytest.raises(ConfigError, match=rf"outage_after must be .*not {bad!r}"):
            settings(outage_after=bad)
    assert settings().outage_after == 0
