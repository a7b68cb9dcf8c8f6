"""bench_tap.py's client part: a 10^5-row ADQL query into a harvest (see bench_tap.py).

The TAP server runs in this process (``serve_tap_in_thread``: its database is at
hand for the limit); each ``harvester run`` and the pyvo peer run in their own
processes, so no client shares the server's interpreter. A client's peak memory is
taken by a small Python shim that starts it and reads ``os.wait4`` (a child forked
from this large process would count this process's pages as its own until it
execs).
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import sqlite3
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import requests

RESULT = "tap_client.json"
TRACT = 5063


def build(work: Path, patches: int) -> tuple[Path, float, int]:
    """The repository (built once, kept): its path, build seconds (0 if kept), bytes."""
    from harvester.repo import load_repository
    from harvester.synth import SynthSpec, build_repository

    root = work / f"repo-{patches}"
    record = work / f"repo-{patches}.json"  # the build's time, for later runs' results
    if not (root / "index.json").is_file():
        cols = 8
        chosen = tuple((TRACT, (1 + i // cols) * 10 + 1 + i % cols) for i in range(patches))
        t0 = time.perf_counter()
        build_repository(root, SynthSpec(patches=chosen, bands=("r",), seed=3), jobs=2)
        seconds = time.perf_counter() - t0
        record.write_text(json.dumps({"build_s": seconds, "load": os.getloadavg()}))
    seconds = json.loads(record.read_text())["build_s"] if record.is_file() else float("nan")
    repo = load_repository(root)
    return root, seconds, sum(ref.size for ref in repo)


def _query(root: Path, pad: float = 0.01) -> str:
    """Every object: a circle around the repository's patches (the tutorial's form);
    ``pad`` degrees past the farthest corner (a distinct pad gives a distinct text, which
    the server translates afresh)."""
    from harvester.repo import load_repository

    repo = load_repository(root)
    pts = np.array([p for ref in repo for p in ref.polygon])
    ra0, dec0 = float(pts[:, 0].mean()), float(pts[:, 1].mean())
    radius = float(
        np.degrees(
            np.arccos(
                np.clip(
                    np.sin(np.radians(dec0)) * np.sin(np.radians(pts[:, 1]))
                    + np.cos(np.radians(dec0))
                    * np.cos(np.radians(pts[:, 1]))
                    * np.cos(np.radians(pts[:, 0] - ra0)),
                    -1,
                    1,
                )
            )
        ).max()
    )
    return (
        "SELECT objectId, coord_ra, coord_dec FROM dp1.Object WHERE CONTAINS("
        f"POINT('ICRS', coord_ra, coord_dec), CIRCLE('ICRS', {ra0:.4f}, {dec0:.4f}, "
        f"{radius + pad:.4f})) = 1"
    )


def _run(root: Path, srv: Any, query: str, out: Path, tap: dict[str, Any]) -> dict[str, Any]:
    """One ``harvester run`` in its own process: fetch, first cutout, harvest, memory."""
    toml = out.with_suffix(".toml")
    toml.write_text("[tap]\n" + "".join(f"{k} = {json.dumps(v)}\n" for k, v in tap.items()))
    cmd = [sys.executable, "-m", "harvester", "run", str(toml), "--targets", f"adql:{query}"]
    cmd += ["--repo", str(root), "--source", "local", "--service-url", srv.base_url]
    cmd += ["--output", str(out), "--bands", "r", "--size", "50", "--planes", "image"]
    cmd += ["--formats", "stack", "--fresh", "--quiet"]
    env = dict(os.environ, ACCESS_TOKEN=srv.token)
    logs = out.with_suffix(".log")
    launched = time.time()
    code, peak = _measured(cmd, env, logs)
    ended = time.time()
    if code:
        raise RuntimeError(f"harvester run failed: {logs.read_text()[-2000:]}")
    stdout = logs.read_text()
    meta = json.loads((out / "tap" / "job.json").read_text())
    db = sqlite3.connect(out / "ledger.sqlite")
    try:
        first, start, last = db.execute(
            "SELECT min(finished), min(started), max(finished) FROM batches WHERE tract IS NOT NULL"
        ).fetchone()
        done = db.execute("SELECT count(*) FROM targets WHERE status = 'ok'").fetchone()[0]
    finally:
        db.close()
    return {
        "tap": tap,
        "rows": meta["rows"],
        "requests": meta["pages"],
        "jobs": len(meta["jobs"]),
        "paged_by": meta["paged_by"],
        "fetch_s": meta["query_seconds"],
        "rows_per_s": meta["rows"] / meta["query_seconds"],
        "fetch_with_setup_s": meta["seconds"],
        "first_cutout_s": first - launched,
        "harvest_s": last - start,
        "harvest_per_s": done / (last - start),
        "ok": done,
        "wall_s": ended - launched,
        "max_rss_mb": peak,
        "report": stdout.strip().splitlines()[-4:],
    }


def _measured(cmd: list[str], env: dict[str, str], log: Path) -> tuple[int, float]:
    """Run ``cmd`` (output to ``log``) through the shim: exit code, peak RSS in MB."""
    peak = log.with_suffix(".rss")
    with log.open("wb") as out:
        code = subprocess.call(
            [sys.executable, __file__, "rss", str(peak), *cmd],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    return code, float(peak.read_text())


def _rss_shim(peak: str, cmd: list[str]) -> None:
    pid = os.fork()
    if pid == 0:
        os.execvp(cmd[0], cmd)
    _, status, usage = os.wait4(pid, 0)
    Path(peak).write_text(str(usage.ru_maxrss / 1024))
    raise SystemExit(os.waitstatus_to_exitcode(status))


def _plan(root: Path, srv: Any, query: str, out: Path) -> dict[str, Any]:
    """``harvester plan`` on the query (fetch, snapshot, targets, plan; no pixels): the
    peak memory of the query's part alone; and the command's start-up for scale."""
    cmd = [sys.executable, "-m", "harvester", "plan", "--targets", f"adql:{query}"]
    cmd += ["--repo", str(root), "--service-url", srv.base_url, "--output", str(out)]
    cmd += ["--bands", "r", "--size", "50", "--planes", "image"]
    env = dict(os.environ, ACCESS_TOKEN=srv.token)
    t0 = time.perf_counter()
    subprocess.run(
        [sys.executable, "-m", "harvester", "--version"], check=True, env=env, capture_output=True
    )
    startup = time.perf_counter() - t0
    shutil.rmtree(out, ignore_errors=True)  # plan has no --fresh: it would reuse the snapshot
    t0 = time.perf_counter()
    code, peak = _measured(cmd, env, out.with_suffix(".log"))
    if code:
        raise RuntimeError(f"harvester plan failed: {out.with_suffix('.log').read_text()}")
    return {
        "seconds": time.perf_counter() - t0,
        "max_rss_mb": peak,
        "python_startup_s": startup,
    }


def _pyvo(url: str, token: str, query: str, mode: str, maxrec: int = 1_000_000) -> dict[str, Any]:
    """The peer: pyvo alone, one request (MAXREC above the rows), to an astropy Table,
    timed from the query (the service's capabilities read before, as harvester's
    ``query_seconds`` counts), in its own process
    (``python _tap_client.py URL MODE MAXREC QUERY``)."""
    proc = subprocess.run(
        [sys.executable, __file__, url, mode, str(maxrec), query],
        env=dict(os.environ, ACCESS_TOKEN=token),
        capture_output=True,
        text=True,
        check=True,
    )
    return dict(json.loads(proc.stdout))


def _pyvo_main(url: str, mode: str, maxrec: str, query: str) -> None:
    from pyvo.auth import AuthSession
    from pyvo.dal import TAPService

    bearer = requests.Session()
    bearer.headers["Authorization"] = f"Bearer {os.environ['ACCESS_TOKEN']}"
    auth = AuthSession()
    auth.credentials.set("lsst-token", bearer)
    for suffix in ("", "/sync", "/async"):
        auth.add_security_method_for_url(url + suffix, "lsst-token")
    tap = TAPService(url, session=auth)
    t0 = time.perf_counter()  # from the query, as harvester's query_seconds
    run = tap.run_sync if mode == "sync" else tap.run_async
    table = run(query, maxrec=int(maxrec)).to_table()
    seconds = time.perf_counter() - t0
    print(
        json.dumps(
            {
                "mode": mode,
                "rows": len(table),
                "seconds": seconds,
                "rows_per_s": len(table) / seconds,
            }
        )
    )


def _median(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The median of each number over repeats (the rest from the first); ``first_fetch_s``
    keeps the first fetch, whose page queries the server had not translated yet."""
    out = dict(runs[0])
    for key, value in runs[0].items():
        if isinstance(value, int | float) and not isinstance(value, bool):
            out[key] = statistics.median(r[key] for r in runs)
    out["first_fetch_s"] = runs[0].get("fetch_s", runs[0].get("seconds"))
    out["repeats"] = runs
    return out


def client_part(work: Path, patches: int, page_size: int, results: Path, repeat: int = 3) -> int:
    work.mkdir(parents=True, exist_ok=True)
    load_before = os.getloadavg()
    root, build_s, nbytes = build(work, patches)
    size = f"{nbytes / 1e9:.1f} GB"
    print(f"repository {root}: {patches} patches, band r, {size}, built in {build_s:.0f} s")
    from harvester.repo import load_repository
    from harvester.service import ServiceSettings, serve_tap_in_thread, tap_cluster

    with tap_cluster() as cluster:
        t0 = time.perf_counter()
        settings = ServiceSettings(tap_hardlimit=1_000_000)
        with serve_tap_in_thread(load_repository(root), cluster, settings) as srv:
            up_s = time.perf_counter() - t0
            query = _query(root)
            print(f"harvester serve --tap up in {up_s:.1f} s; query: {query}")
            # Translated once before any timing (the server caches it): the one-request
            # runs compare fetching, not queryparser's first call; pages pay their own.
            _pyvo(srv.tap_url, srv.token, query, "sync", maxrec=1)
            pyvo = [
                _median([_pyvo(srv.tap_url, srv.token, query, m) for _ in range(repeat)])
                for m in ("async", "sync")
            ]
            variants = {
                "one": {"mode": "async"},
                "one-sync": {"mode": "sync"},
                "paged": {"mode": "async", "page_size": page_size},
                "paged-sync": {"mode": "sync", "page_size": page_size},
            }
            # Each variant its own query text: its first run pays the server's translation
            # of its pages, as a new query does; the repeats find them cached.
            texts = {name: _query(root, 0.011 + i / 1000) for i, name in enumerate(variants)}
            runs = [
                _median([_run(root, srv, texts[name], work / name, tap) for _ in range(repeat)])
                for name, tap in variants.items()
            ]
            plan = _median([_plan(root, srv, query, work / "plan") for _ in range(repeat)])
            limit = _limit_seconds(srv.dsn, query, runs[0]["rows"])
    res = {
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count()},
        "load_before": load_before,
        "load_after": os.getloadavg(),
        "repository": {"patches": patches, "bytes": nbytes, "build_s": build_s},
        "server_up_s": up_s,
        "query": query,
        "variant_queries": texts,
        "pyvo": pyvo,
        "runs": runs,
        "plan": plan,
        "limit_psycopg_s": limit,
    }
    print(f"median of {repeat} runs each")
    print(f"{'variant':<34} {'rows':>7} {'req.':>4} {'fetch':>7} {'rows/s':>8} {'vs pyvo':>7}")
    print(f"{'':<34} {'first cutout':>13} {'harvest/s':>10} {'max RSS':>9}")
    peer = {p["mode"]: p["rows_per_s"] for p in pyvo}
    for p in pyvo:
        print(
            f"{'pyvo ' + p['mode'] + ', one request':<34} {p['rows']:>7} {1:>4} "
            f"{p['seconds']:>6.2f}s {p['rows_per_s']:>8.0f}"
        )
    for r in runs:
        name = f"harvester {r['tap']['mode']}" + (
            f", pages of {r['tap']['page_size']:,}" if "page_size" in r["tap"] else ", one request"
        )
        print(
            f"{name:<34} {r['rows']:>7} {r['requests']:>4} {r['fetch_s']:>6.2f}s "
            f"{r['rows_per_s']:>8.0f} {r['rows_per_s'] / peer[r['tap']['mode']]:>6.0%}\n{'':<34} "
            f"{r['first_cutout_s']:>12.2f}s {r['harvest_per_s']:>10.0f} {r['max_rss_mb']:>7.0f}MB"
            f"   (first fetch {r['first_fetch_s']:.2f} s)"
        )
    print(
        f"harvester plan (fetch, snapshot, targets, plan; no pixels): {plan['seconds']:.2f} s, "
        f"max RSS {plan['max_rss_mb']:.0f} MB; `harvester --version` takes "
        f"{plan['python_startup_s']:.2f} s"
    )
    print(f"limit (the SQL through psycopg, no TAP): {limit:.2f} s")
    print(f"load average before/after: {load_before[0]:.2f} / {res['load_after'][0]:.2f}")
    results.mkdir(parents=True, exist_ok=True)
    (results / RESULT).write_text(json.dumps(res, indent=2) + "\n")
    return 0


def _limit_seconds(dsn: str, query: str, rows: int) -> float:
    """The translated SQL straight on the server's database (rows as text)."""
    import psycopg
    from psycopg.types.string import TextLoader

    from harvester.service.tap._adql import Translator

    sql = Translator().translate(query).sql
    with psycopg.connect(dsn) as conn:
        for name in ("int2", "int4", "int8", "float4", "float8", "numeric"):
            conn.adapters.register_loader(name, TextLoader)
        conn.read_only = True
        t0 = time.perf_counter()
        with conn.transaction(), conn.cursor(name="limit") as cur:
            cur.execute(sql)  # type: ignore[arg-type]
            got = len(cur.fetchmany(rows + 1))
        assert got == rows, (got, rows)
        return time.perf_counter() - t0


if __name__ == "__main__":
    if sys.argv[1] == "rss":
        _rss_shim(sys.argv[2], sys.argv[3:])
    else:
        _pyvo_main(*sys.argv[1:5])
