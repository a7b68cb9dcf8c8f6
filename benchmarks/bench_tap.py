"""Benchmark: TAP per query (service side), and a 10^5-row query into a harvest (client).

Starts ``harvester serve --tap`` on loopback (a throwaway PostgreSQL + pg_sphere
cluster, the repository's dp1.Object and ObsCore), then sends each query with sync
TAP (HTTP POST, as pyvo's ``run_sync`` does) and reads the server's own timings
(``X-Harvester-Translate-Seconds``, ``X-Harvester-Database-Seconds``):

* translation: the first request of a query (queryparser, cold) and the later ones
  (the server's cache);
* database: the translated SQL in a READ ONLY transaction through a server-side
  cursor, up to MAXREC + 1 rows;
* the rest of a request: writing the VOTable and HTTP.

The limit is the same SQL run straight on the same database with psycopg (fetching
the rows as text, no translation, no VOTable, no HTTP): the ratio says what TAP
adds.

The client part (``--part client``; :func:`client_part`) builds a larger synthetic
repository in a work folder (``--patches`` lsst_cells_v1 patches of tract 5063, band
r, about 2,600 objects each: 10^5 Object rows at 40), serves it with ``harvester
serve --tap`` in its own process, and runs ``harvester run --targets adql:...`` on a
query returning every row (a circle around the patches), with the pixels read from
the local files, in a fresh process per variant: one request, pages of
``--page-size`` rows (async and sync). It reports the rows fetched per second (the
fetch as the snapshot records it: query, pages, parsing), the time from the
command's start to its first cutout written, the harvest's rate (first batch to
last), and the process's peak memory (max RSS). Peers in the same run: pyvo's own
``run_async``/``run_sync`` of the query in one request (no snapshot, no targets),
and the limit: the same SQL straight through psycopg.

Run with::

    .venv/bin/python benchmarks/bench_tap.py [--repo data/ecdfs] [--repeat 5]
    .venv/bin/python benchmarks/bench_tap.py --part client [--work DIR] [--patches 40]

Results go to ``benchmarks/results/tap.json`` (``tap_client.json`` for the client
part). Not a test; wall-clock numbers on a shared machine (the load average is
recorded).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import requests

from harvester.repo import load_repository
from harvester.service import ServiceSettings, serve_tap_in_thread, tap_cluster, tap_unavailable

RESULTS = Path(__file__).resolve().parent / "results" / "tap.json"

QUERIES = {
    "tutorial Object": (
        "SELECT objectId, coord_ra, coord_dec, g_cModelMag AS gmag, r_cModelMag AS rmag "
        "FROM dp1.Object WHERE CONTAINS(POINT('ICRS', coord_ra, coord_dec), "
        "CIRCLE('ICRS', 53.2, -28.1, 0.5)) = 1 AND g_cModelMag < 23 AND r_cModelMag < 23 "
        "AND g_cModelMag > 17 AND r_cModelMag > 17"
    ),
    "tutorial ObsCore": (
        "SELECT * FROM ivoa.ObsCore WHERE CONTAINS(POINT('ICRS', 53.2, -28.1), s_region) = 1 "
        "AND dataproduct_subtype = 'lsst.deep_coadd' AND lsst_band = 'r'"
    ),
    "DISTANCE in WHERE": (
        "SELECT objectId, DISTANCE(POINT('ICRS', coord_ra, coord_dec), "
        "POINT('ICRS', 53.2, -28.1)) AS d FROM dp1.Object "
        "WHERE DISTANCE(POINT('ICRS', coord_ra, coord_dec), POINT('ICRS', 53.2, -28.1)) < 0.1"
    ),
    "keyset page, 3 columns": (
        "SELECT TOP 10000 objectId, coord_ra, coord_dec FROM dp1.Object WHERE objectId > 0 "
        "ORDER BY objectId"
    ),
    "all rows, all columns": "SELECT * FROM dp1.Object",
    "TAP_SCHEMA.columns": "SELECT * FROM TAP_SCHEMA.columns",
}


def _limit(dsn: str, sql: str, maxrec: int) -> tuple[float, int]:
    """The same SQL straight on the database: seconds and rows (text, no parsing)."""
    import psycopg
    from psycopg.types.string import TextLoader

    with psycopg.connect(dsn) as conn:
        for name in ("int2", "int4", "int8", "float4", "float8", "numeric"):
            conn.adapters.register_loader(name, TextLoader)
        conn.read_only = True
        conn.execute("SELECT set_sphere_output('DEG')")
        conn.commit()
        t0 = time.perf_counter()
        with conn.transaction(), conn.cursor(name="limit") as cur:
            cur.execute(sql)  # type: ignore[arg-type]
            rows = cur.fetchmany(maxrec + 1)
        return time.perf_counter() - t0, len(rows)


def measure(name: str, adql: str, base: str, token: str, dsn: str, repeat: int) -> dict[str, Any]:
    auth = {"Authorization": f"Bearer {token}"}
    maxrec = 100000
    runs = []
    for _ in range(repeat + 1):
        t0 = time.perf_counter()
        r = requests.post(
            f"{base}/api/tap/sync",
            data={"LANG": "ADQL", "QUERY": adql, "MAXREC": str(maxrec)},
            headers=auth,
            timeout=600,
        )
        total = time.perf_counter() - t0
        r.raise_for_status()
        runs.append(
            {
                "total": total,
                "translate": float(r.headers["X-Harvester-Translate-Seconds"]),
                "database": float(r.headers["X-Harvester-Database-Seconds"]),
                "rows": int(r.headers["X-Harvester-Rows"]),
                "bytes": len(r.content),
            }
        )
    cold, warm = runs[0], runs[1:]
    from harvester.service.tap._adql import Translator

    sql = Translator().translate(adql).sql
    limits = [_limit(dsn, sql, maxrec)[0] for _ in range(repeat)]

    def med(key: str) -> float:
        return statistics.median(r[key] for r in warm)

    rest = statistics.median(r["total"] - r["translate"] - r["database"] for r in warm)
    return {
        "query": name,
        "adql": adql,
        "rows": cold["rows"],
        "bytes": cold["bytes"],
        "translate_cold_s": cold["translate"],
        "translate_cached_s": med("translate"),
        "database_s": med("database"),
        "write_and_http_s": rest,
        "total_s": med("total"),
        "total_cold_s": cold["total"],
        "limit_s": statistics.median(limits),
        "total_over_limit": med("total") / statistics.median(limits),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=("server", "client", "both"), default="server")
    parser.add_argument("--repo", default="data/ecdfs", help="repository to serve")
    parser.add_argument("--repeat", type=int, default=5, help="warm runs per query")
    parser.add_argument("--quick", action="store_true", help="2 warm runs per query")
    parser.add_argument("--out", default=str(RESULTS))
    parser.add_argument(
        "--work", default="/tmp/harvester-bench-tap", help="client part: its repository"
    )
    parser.add_argument("--patches", type=int, default=40, help="client part: patches")
    parser.add_argument("--page-size", type=int, default=20000, help="client part: page")
    args = parser.parse_args(argv)
    reason = tap_unavailable()
    if reason is not None:
        print(f"bench_tap: TAP cannot run here: {reason}", file=sys.stderr)
        return 1
    if args.part in ("client", "both"):
        from _tap_client import client_part

        repeat = 1 if args.quick else 3
        rc = client_part(Path(args.work), args.patches, args.page_size, RESULTS.parent, repeat)
        if rc or args.part == "client":
            return rc
    if not Path(args.repo, "index.json").is_file():
        print(
            f"bench_tap: no repository at {args.repo} (make demo builds data/ecdfs)",
            file=sys.stderr,
        )
        return 1
    repeat = 2 if args.quick else args.repeat
    repo = load_repository(args.repo)
    load_before = os.getloadavg()
    results = []
    with tap_cluster() as cluster:
        t0 = time.perf_counter()
        with serve_tap_in_thread(repo, cluster, ServiceSettings(tap_hardlimit=100000)) as srv:
            startup = time.perf_counter() - t0
            counts = dict(srv.server.state.tap.engine.row_counts) if srv.server.state.tap else {}
            for name, adql in QUERIES.items():
                results.append(measure(name, adql, srv.base_url, srv.token, srv.dsn, repeat))
    res = {
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count()},
        "load_before": load_before,
        "load_after": os.getloadavg(),
        "repo": args.repo,
        "row_counts": counts,
        "startup_s": startup,
        "queries": results,
    }
    print(f"TAP on {args.repo}: {counts.get('dp1.Object', 0)} Object rows, up in {startup:.1f} s")
    head = f"{'query':<24} {'rows':>7} {'transl. cold':>12} {'cached':>8} {'database':>9}"
    print(head + f" {'write+HTTP':>10} {'total':>8} {'limit':>8} {'total/limit':>11}")
    for r in results:
        print(
            f"{r['query']:<24} {r['rows']:>7} {r['translate_cold_s']:>11.3f}s "
            f"{r['translate_cached_s']:>7.3f}s {r['database_s']:>8.3f}s "
            f"{r['write_and_http_s']:>9.3f}s {r['total_s']:>7.3f}s {r['limit_s']:>7.3f}s "
            f"{r['total_over_limit']:>10.1f}x"
        )
    print(f"load average before/after: {load_before[0]:.2f} / {res['load_after'][0]:.2f}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
