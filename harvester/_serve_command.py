"""``harvester serve``: its command-line flags and what they start.

Kept apart from :mod:`harvester.cli` so the service's many flags live next to
nothing else; :mod:`harvester.service` is imported only when the command runs.

Dependency rule: argparse, and :mod:`harvester.service` and ``repo`` at run time.
"""

from __future__ import annotations

import argparse
import contextlib
import signal
import sys
import threading
from pathlib import Path
from typing import Any

__all__ = ["add_serve_command"]


def add_serve_command(sub: Any) -> None:
    """Add the ``serve`` command to ``sub`` (an argparse subparsers object)."""
    srv = sub.add_parser(
        "serve",
        help="serve a repository the way the Rubin Science Platform serves DP1",
        description="Serve a repository over HTTP like the RSP serves DP1: discovery, "
        "SIA v2, DataLink, SODA sync cutouts, signed file URLs with Range, tokens, "
        "quotas, optional TAP (--tap: ADQL on PostgreSQL + pg_sphere), and optional "
        "injected latency and faults.",
    )
    srv.add_argument("repo", help="repository folder")
    srv.add_argument("--host", default="127.0.0.1", help="address to listen on")
    srv.add_argument("--port", type=int, default=8080, help="port (0: any free port)")
    srv.add_argument("--base-url", help="public URL, if not http://HOST:PORT")
    srv.add_argument(
        "--token", action="append", default=[], help="accept this token (read:image; repeatable)"
    )
    srv.add_argument("--tokens-file", help="file of 'TOKEN SCOPE[,SCOPE...]' lines")
    srv.add_argument("--no-auth", action="store_true", help="serve without tokens")
    srv.add_argument("--dataset", default="dp1", help="dataset label (default dp1)")
    srv.add_argument(
        "--single-range",
        action="store_true",
        help="object-store mode: a multi-range request gets 200 and the whole file",
    )
    srv.add_argument("--latency-ms", type=float, default=0.0, help="added to data answers")
    srv.add_argument("--jitter-ms", type=float, default=0.0, help="random extra latency, up to")
    srv.add_argument("--fault-rate", type=float, default=0.0, help="fault probability per request")
    srv.add_argument("--faults", default="500,503,reset,truncate,slow", help="fault kinds")
    srv.add_argument("--seed", type=int, default=0, help="seed of the fault generator")
    srv.add_argument(
        "--quota",
        action="append",
        default=[],
        metavar="SERVICE=N",
        help="requests per user per minute, e.g. cutout=35, sia=70, datalink=none",
    )
    srv.add_argument("--url-lifetime", type=float, default=3600.0, help="signed URL seconds")
    srv.add_argument("--cutout-workers", type=int, default=4, help="cutout worker threads")
    srv.add_argument(
        "--header-timeout",
        type=float,
        default=10.0,
        help="seconds a client has to send a complete request head (then 408)",
    )
    srv.add_argument(
        "--keepalive-timeout",
        type=float,
        default=75.0,
        help="seconds an idle keep-alive connection stays open",
    )
    srv.add_argument(
        "--max-connections-per-client",
        type=int,
        default=128,
        help="open connections per client IP; more are closed at once",
    )
    srv.add_argument(
        "--outage-after",
        type=int,
        default=0,
        help="go down (reset every data request) after N answered data requests (0: never)",
    )
    srv.add_argument(
        "--butler",
        action="store_true",
        help="also run the real Butler server (a RemoteButler for label 'dp1') over these "
        "files; needs harvester[butler-server]",
    )
    srv.add_argument("--butler-port", type=int, default=0, help="its port (0: any free port)")
    tap = srv.add_argument_group("TAP (needs pip install 'harvester[tap]', PostgreSQL, pg_sphere)")
    tap.add_argument(
        "--tap",
        action="store_true",
        help="serve TAP at /api/tap (dp1.Object, ivoa.ObsCore) on a throwaway PostgreSQL "
        "cluster started and stopped with the server; --token tokens get read:tap too",
    )
    tap.add_argument(
        "--tap-dsn",
        metavar="DSN",
        help="load the TAP tables into this existing database instead (libpq string, e.g. "
        "'host=/run/postgresql dbname=tap'; its schemas dp1, ivoa, tap_schema are replaced)",
    )
    tap.add_argument("--tap-maxrec", type=int, default=10000, help="MAXREC when none is given")
    tap.add_argument(
        "--tap-hardlimit", type=int, default=100000, help="most rows any TAP query returns"
    )
    tap.add_argument(
        "--tap-timeout", type=float, default=60.0, help="statement timeout of a sync query (s)"
    )
    srv.set_defaults(func=_cmd_serve)


def _cmd_serve(args: argparse.Namespace) -> int:
    from .repo import load_repository
    from .service import (
        DEFAULT_QUOTAS,
        ServiceSettings,
        load_tokens_file,
        parse_faults,
        parse_quota,
        run_server,
    )

    tokens = load_tokens_file(args.tokens_file) if args.tokens_file else {}
    use_tap = bool(args.tap or args.tap_dsn)
    for token in args.token:
        tokens[token] = frozenset({"read:image", "read:tap"} if use_tap else {"read:image"})
    quotas: dict[str, int] = dict(DEFAULT_QUOTAS)
    for item in args.quota:
        name, limit = parse_quota(item)
        if limit is None:
            quotas.pop(name, None)
        else:
            quotas[name] = limit
    settings = ServiceSettings(
        base_url=args.base_url,
        dataset=args.dataset,
        tokens=tokens,
        auth=not args.no_auth,
        quotas=quotas,
        multi_range=not args.single_range,
        latency_ms=args.latency_ms,
        jitter_ms=args.jitter_ms,
        fault_rate=args.fault_rate,
        faults=parse_faults(args.faults),
        seed=args.seed,
        url_lifetime=args.url_lifetime,
        cutout_workers=args.cutout_workers,
        header_timeout=args.header_timeout,
        keepalive_timeout=args.keepalive_timeout,
        max_connections_per_client=args.max_connections_per_client,
        outage_after=args.outage_after,
        # A Butler datastore holds plain URLs: storage answers them unsigned.
        public_store=args.butler,
        tap=use_tap,
        tap_dsn=args.tap_dsn,
        tap_maxrec=args.tap_maxrec,
        tap_hardlimit=args.tap_hardlimit,
        tap_timeout=args.tap_timeout,
    )
    settings.check_startable()
    repo = load_repository(args.repo)
    if args.butler and not _butler_server_installed():
        return 2
    extras = contextlib.ExitStack()

    def ready(url: str) -> None:
        auth = "no auth" if args.no_auth else f"{len(tokens)} token(s)"
        held = f"{len(repo)} deep_coadd"
        if repo.templates or repo.epochs:
            held += f", {len(repo.templates)} template_coadd, {len(repo.epochs)} single-epoch"
        print(f"Serving {args.repo} ({held} files) as '{args.dataset}' at {url} ({auth})")
        print(f"  discovery: {url}/repertoire/discovery   stop with Ctrl-C", flush=True)
        if use_tap:
            where = "an existing database" if args.tap_dsn else "a throwaway PostgreSQL cluster"
            print(f"  TAP: {url}/api/tap on {where} (token scope read:tap)", flush=True)
        if args.butler:
            # In a thread: ingest checks each file's URL on this very server.
            starter = threading.Thread(
                target=_start_butler,
                args=(extras, repo, url, args.butler_port, args.dataset),
                name="harvester-butler-server",
            )
            starter.start()
            starters.append(starter)

    starters: list[threading.Thread] = []
    # SIGTERM (a service manager, `timeout`) stops like Ctrl-C: temporary folders
    # and the Butler server are cleaned up.
    signal.signal(signal.SIGTERM, _interrupt)
    if use_tap:
        print("Loading the TAP database (PostgreSQL + pg_sphere)...", flush=True)
    try:
        with extras:
            try:
                run_server(repo, settings, host=args.host, port=args.port, ready=ready)
            finally:
                for starter in starters:
                    starter.join()
    except KeyboardInterrupt:
        print("harvester serve: stopped", file=sys.stderr)
    except OSError as exc:
        print(f"harvester: error: cannot listen on {args.host}:{args.port}: {exc}", file=sys.stderr)
        return 1
    return 0


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def _butler_server_installed() -> bool:
    try:
        import lsst.daf.butler.remote_butler.server  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as exc:
        print(
            f"harvester: error: --butler needs the Butler server ({exc}): "
            "pip install 'harvester[butler-server]'",
            file=sys.stderr,
        )
        return False
    return True


def _start_butler(
    stack: contextlib.ExitStack, repo: Any, storage_url: str, port: int, label: str
) -> None:
    """Build a Butler repository over ``storage_url``'s files and serve it (real server).

    Runs once, in a thread, when the service listens (its URL goes into the
    datastore); the repository lives in a temporary folder removed on exit.
    """
    import json
    import tempfile

    from .butler.testing import build_http_butler, butler_server

    tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="harvester-butler-")))
    try:
        built = build_http_butler(repo, tmp / "butler", storage_url)
        server = stack.enter_context(butler_server({label: built.root}, port=port, log=tmp / "log"))
    except Exception as exc:
        print(f"harvester: error: the Butler server did not start: {exc}", file=sys.stderr)
        return
    labels = json.dumps({label: server.repo_url(label)})
    print(f"  Butler server: {server.url} ({built.datasets} datasets, a RemoteButler), e.g.")
    print(f"    export DAF_BUTLER_REPOSITORIES='{labels}' BUTLER_RUBIN_ACCESS_TOKEN=any")
    print(f"    harvester run configs/ecdfs_agn.toml --source butler --butler {label}", flush=True)
