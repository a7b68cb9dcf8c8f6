"""Range requests: merging and caps of the parser, and no amplification over HTTP.

Expected ranges come from an independent model: the set of byte positions each
range names, then the maximal runs of consecutive positions in their union,
placed where the first range touching them appears in the header.
"""

from __future__ import annotations

import io
import random

import aiohttp
import pytest
from astropy.io import votable

from harvester.repo import Repository
from harvester.service import ServiceSettings, serve
from harvester.service._range_header import Unsatisfiable, merge_ranges, parse_ranges

TOKENS: dict[str, frozenset[str]] = {"tok": frozenset({"read:image"})}
AUTH = {"Authorization": "Bearer tok"}


def positions(spec: str, size: int) -> set[int]:
    """Byte positions one ``first-last`` / ``-suffix`` / ``first-`` spec names."""
    first, _, last = spec.partition("-")
    if first == "":
        return set(range(max(0, size - int(last)), size))
    stop = size if last == "" else min(size, int(last) + 1)
    return set(range(int(first), stop))


def model(specs: list[str], size: int) -> list[tuple[int, int]]:
    """The merged ranges, from sets of byte positions."""
    sets = [positions(s, size) for s in specs]
    union = sorted(set().union(*sets))
    runs: list[tuple[int, int]] = []
    for p in union:
        if runs and runs[-1][1] == p - 1:
            runs[-1] = (runs[-1][0], p)
        else:
            runs.append((p, p))

    def first_seen(run: tuple[int, int]) -> int:
        return min(i for i, s in enumerate(sets) if any(run[0] <= p <= run[1] for p in s))

    return sorted(runs, key=first_seen)


@pytest.mark.parametrize(
    ("header", "size", "expected"),
    [
        ("bytes=0-99,50-149", 1000, [(0, 149)]),  # overlap
        ("bytes=0-9,10-19,20-29", 1000, [(0, 29)]),  # adjacent
        ("bytes=0-0,2-2", 1000, [(0, 0), (2, 2)]),  # a one-byte gap stays a gap
        ("bytes=500-599,0-99,90-120", 1000, [(500, 599), (0, 120)]),  # out of order
        ("bytes=-500", 1000, [(500, 999)]),  # suffix
        ("bytes=500-", 1000, [(500, 999)]),  # open
        ("bytes=-500,400-", 1000, [(400, 999)]),  # suffix and open overlap
        ("bytes=-5000", 1000, [(0, 999)]),  # suffix longer than the body
        ("bytes=990-2000, 3000-4000", 1000, [(990, 999)]),  # clipped, one dropped
        ("bytes=0-99" + ",0-99" * 199, 1000, [(0, 99)]),  # the amplification header
        ("bytes=7-7,5-5,6-6", 1000, [(5, 7)]),  # all touch, out of order: one range
        ("BYTES = 1-2 , 3-4", 1000, [(1, 4)]),
    ],
)
def test_parser_merges(header: str, size: int, expected: list[tuple[int, int]]) -> None:
    specs = [s.strip() for s in header.partition("=")[2].split(",")]
    assert model(specs, size) == expected  # the model agrees with the hand-made answer
    assert parse_ranges(header, size, 10) == expected


def test_parser_matches_the_model_on_random_headers() -> None:
    rng = random.Random(7)
    for _ in range(500):
        size = rng.randint(1, 120)
        specs = []
        for _ in range(rng.randint(1, 8)):
            kind = rng.random()
            a = rng.randint(0, size + 10)
            if kind < 0.15:
                specs.append(f"-{rng.randint(1, size + 10)}")
            elif kind < 0.3:
                specs.append(f"{a}-")
            else:
                specs.append(f"{a}-{a + rng.randint(0, 30)}")
        header = "bytes=" + ",".join(specs)
        expected = model(specs, size)
        if not expected:
            with pytest.raises(Unsatisfiable):
                parse_ranges(header, size, 100)
            continue
        assert parse_ranges(header, size, 100) == expected, header
        got = parse_ranges(header, size, 100)
        assert got is not None
        assert sum(b - a + 1 for a, b in got) <= size


def test_parser_caps_and_ignored_headers() -> None:
    three = "bytes=0-1,10-11,20-21"
    assert parse_ranges(three, 100, 3) == [(0, 1), (10, 11), (20, 21)]
    assert parse_ranges(three, 100, 2) is None  # too many left: the whole body
    assert parse_ranges("bytes=0-1,2-3,4-5", 100, 1) == [(0, 5)]  # counted after merging
    assert parse_ranges("bytes=0-1" + ",2-3" * 300, 100, 2) == [(0, 3)]
    for bad in ("bytes", "bytes=x-1", "bytes=3-1", "bytes=--1", "lines=1-2", "bytes=", "bytes=-"):
        assert parse_ranges(bad, 100, 10) is None, bad
    for none in ("bytes=100-", "bytes=200-300", "bytes=-0", "bytes=100-200,150-"):
        with pytest.raises(Unsatisfiable):
            parse_ranges(none, 100, 10)
    with pytest.raises(Unsatisfiable):
        parse_ranges("bytes=0-5", 0, 10)  # an empty body has no satisfiable range
    # Object-store mode asks for no merging and one range at most.
    assert parse_ranges("bytes=0-9,0-9", 100, 1, merge=False) is None
    assert parse_ranges("bytes=0-9,500-600", 100, 1, merge=False) == [(0, 9)]
    assert merge_ranges([(5, 9), (0, 4)]) == [(0, 9)]
    assert merge_ranges([(5, 9)]) == [(5, 9)]


# ---- over HTTP ---------------------------------------------------------------------------


async def _this_url(http: aiohttp.ClientSession, base: str, ref_id: str) -> str:
    did = f"ivo://org.rubinobs/lsst-dp1?repo=dp1&id={ref_id}"
    async with http.get(f"{base}/api/datalink/links", params={"ID": did}, headers=AUTH) as r:
        table = votable.parse(io.BytesIO(await r.read())).get_first_table().to_table()
    (url,) = [row["access_url"] for row in table if row["semantics"] == "#this"]
    return str(url)


def _parts(body: bytes, ctype: str) -> list[tuple[str, bytes]]:
    boundary = ctype.split("boundary=")[1].encode()
    out = []
    for part in body.split(b"--" + boundary)[1:-1]:
        head, _, data = part.partition(b"\r\n\r\n")
        (line,) = [x for x in head.split(b"\r\n") if x.startswith(b"Content-Range:")]
        out.append((line.decode().split("bytes ")[1], data[:-2]))
    return out


#: Bytes of multipart framing allowed per range answered (boundary and part headers).
FRAMING = 200


async def test_overlapping_ranges_do_not_amplify(tiny_repo: Repository) -> None:
    ref = next(iter(tiny_repo))
    raw = tiny_repo.path_of(ref).read_bytes()
    size = len(raw)
    amplifier = "bytes=" + ",".join([f"0-{10 * size}"] * 200)
    async with (
        serve(tiny_repo, ServiceSettings(tokens=TOKENS)) as server,
        aiohttp.ClientSession() as http,
    ):
        url = await _this_url(http, server.base_url, ref.id)
        async with http.get(url, headers={"Range": amplifier}) as r:
            status, headers = r.status, r.headers.copy()
            body = await r.read()
        assert len(body) <= size + FRAMING
        assert body == raw
        assert status == 206 and headers["Content-Type"] == "application/fits"
        assert headers["Content-Range"] == f"bytes 0-{size - 1}/{size}"
        async with http.head(url, headers={"Range": amplifier}) as r:
            assert int(r.headers["Content-Length"]) == size
        # Overlapping and adjacent ranges answered as the merged parts, in header order.
        spec = f"bytes={size - 50}-{size - 41},0-9,5-14,15-19,{size - 45}-"
        async with http.get(url, headers={"Range": spec}) as r:
            assert r.status == 206
            parts = _parts(await r.read(), r.headers["Content-Type"])
        assert parts == [
            (f"{size - 50}-{size - 1}/{size}", raw[size - 50 :]),
            (f"0-19/{size}", raw[:20]),
        ]


async def test_range_caps_answer_200_or_416(tiny_repo: Repository) -> None:
    ref = next(iter(tiny_repo))
    raw = tiny_repo.path_of(ref).read_bytes()
    size = len(raw)
    async with (
        serve(tiny_repo, ServiceSettings(tokens=TOKENS, max_ranges=4)) as server,
        aiohttp.ClientSession() as http,
    ):
        url = await _this_url(http, server.base_url, ref.id)
        disjoint = "bytes=" + ",".join(f"{10 * i}-{10 * i + 1}" for i in range(5))
        async with http.get(url, headers={"Range": disjoint}) as r:
            assert r.status == 200 and await r.read() == raw  # 5 ranges left > 4
        four = "bytes=" + ",".join(f"{10 * i}-{10 * i + 1}" for i in range(4))
        async with http.get(url, headers={"Range": four}) as r:
            assert r.status == 206
            got = _parts(await r.read(), r.headers["Content-Type"])
        assert got == [(f"{a}-{a + 1}/{size}", raw[a : a + 2]) for a in range(0, 40, 10)]
        touching = "bytes=" + ",".join(f"{2 * i}-{2 * i + 1}" for i in range(50))
        async with http.get(url, headers={"Range": touching}) as r:
            assert r.status == 206 and r.headers["Content-Range"] == f"bytes 0-99/{size}"
            assert await r.read() == raw[:100]
        async with http.get(url, headers={"Range": f"bytes={size}-,{size + 9}-{size + 20}"}) as r:
            assert r.status == 416 and r.headers["Content-Range"] == f"bytes */{size}"


async def test_single_range_mode_never_merges(tiny_repo: Repository) -> None:
    ref = next(iter(tiny_repo))
    raw = tiny_repo.path_of(ref).read_bytes()
    size = len(raw)
    async with (
        serve(tiny_repo, ServiceSettings(tokens=TOKENS, multi_range=False)) as server,
        aiohttp.ClientSession() as http,
    ):
        url = await _this_url(http, server.base_url, ref.id)
        for spec in ("bytes=" + ",".join([f"0-{size}"] * 200), "bytes=0-9,10-19"):
            async with http.get(url, headers={"Range": spec}) as r:
                assert r.status == 200 and await r.read() == raw  # as an object store
        async with http.get(url, headers={"Range": f"bytes=10-19,{size + 5}-"}) as r:
            assert r.status == 206 and await r.read() == raw[10:20]  # one satisfiable range
