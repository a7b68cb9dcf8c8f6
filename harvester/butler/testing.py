"""The real Butler server on loopback, for tests, benchmarks and ``harvester serve --butler``.

The RSP hands its users a RemoteButler: ``Butler("dp1")`` resolves the label to
the Butler server's URL, queries go over HTTP, and ``getURI`` returns presigned
``https://`` URLs to the object store. :func:`butler_server` runs that same server
(``lsst-daf-butler[server]``: FastAPI under uvicorn, in a subprocess) over local
repositories, with Gafaelfawr disabled (``GAFAELFAWR_URL=DISABLED``): the server
then takes any token, and the client still needs one in
``BUTLER_RUBIN_ACCESS_TOKEN``.

The server presigns the datastore's URIs, and lsst-resources cannot sign
``file://`` URLs, so a repository served this way must point at HTTP storage that
honours ``Range``: :func:`build_http_butler` ingests a repository's files as
``harvester serve``'s ``/_store/<id>.fits`` URLs, which that service answers
unsigned when ``ServiceSettings.public_store`` is set. Plain ``http`` URLs are
handed out as they are (lsst-resources presigns only s3, gs and webdav), so the
client reads the same URL the datastore holds.

Optional: ``pip install 'harvester[butler-server]'``.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from ..repo import Repository
from ._build import BuiltButler, build_butler_repository

__all__ = [
    "SERVER_EXTRA",
    "ButlerServer",
    "build_http_butler",
    "butler_server",
    "label_environment",
]

#: What to install for the Butler server.
SERVER_EXTRA = "pip install 'harvester[butler-server]'"
_HOST = "127.0.0.1"
_APP = "lsst.daf.butler.remote_butler.server:create_app"


@dataclass(frozen=True)
class ButlerServer:
    """A running Butler server: its base URL and the repositories it serves."""

    url: str
    labels: tuple[str, ...]
    process: subprocess.Popen[bytes]

    def repo_url(self, label: str) -> str:
        """The URL a client opens for ``label`` (what a repository index maps it to)."""
        return f"{self.url}/api/butler/repo/{label}"


def build_http_butler(
    repo: Repository, where: str | os.PathLike[str], storage_url: str
) -> BuiltButler:
    """A Butler repository over ``repo`` whose datastore points at ``harvester serve``.

    Parameters
    ----------
    repo : Repository
    where : path
        The Butler repository folder (replaced if it exists).
    storage_url : str
        The base URL of a ``harvester serve`` of ``repo`` with
        ``public_store=True``; files are ingested as ``{storage_url}/_store/{id}.fits``.
    """
    base = storage_url.rstrip("/")
    return build_butler_repository(repo, where, uri_of=lambda ident: f"{base}/_store/{ident}.fits")


def label_environment(labels: Mapping[str, str], token: str = "harvester") -> dict[str, str]:
    """Environment variables that make ``Butler(label)`` open these URLs or paths.

    ``DAF_BUTLER_REPOSITORIES`` maps labels to repositories (as the RSP's
    repository index does); ``BUTLER_RUBIN_ACCESS_TOKEN`` is the token the
    RemoteButler client sends to any host (it sends ``ACCESS_TOKEN`` only to
    ``*.lsst.cloud`` and ``*.slac.stanford.edu``).
    """
    return {
        "DAF_BUTLER_REPOSITORIES": json.dumps(dict(labels)),
        "BUTLER_RUBIN_ACCESS_TOKEN": token,
    }


@contextmanager
def butler_server(
    repos: Mapping[str, str | os.PathLike[str]],
    *,
    port: int = 0,
    timeout: float = 60.0,
    log: str | os.PathLike[str] | None = None,
) -> Iterator[ButlerServer]:
    """Run the real Butler server over ``repos`` (label -> repository) on loopback.

    The listening socket is bound here and handed to uvicorn (``--fd``), so a
    free port (``port=0``) is known before the server starts and nothing races
    for it. The server is stopped (SIGTERM, then SIGKILL) on exit.

    Parameters
    ----------
    repos : mapping of str to path
        Label to Butler repository; each repository's datastore must hold
        HTTP URLs (see :func:`build_http_butler`).
    port : int
        0 picks a free port.
    timeout : float
        Seconds to wait for the server to answer.
    log : path, optional
        Where the server's log goes (default: discarded).

    Raises
    ------
    RuntimeError
        The server exited or did not answer within ``timeout`` (its log's tail is
        in the message when ``log`` is given).
    """
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((_HOST, port))
    sock.listen(128)
    url = f"http://{_HOST}:{sock.getsockname()[1]}"
    env = dict(os.environ)
    env.update(
        {
            "DAF_BUTLER_SERVER_REPOSITORIES": json.dumps(
                {k: {"config_uri": str(v), "authorized_groups": ["*"]} for k, v in repos.items()}
            ),
            "DAF_BUTLER_SERVER_GAFAELFAWR_URL": "DISABLED",
            "DAF_BUTLER_SERVER_AUTHENTICATION": "rubin_science_platform",
        }
    )
    out = open(log, "ab") if log is not None else subprocess.DEVNULL  # noqa: SIM115
    try:
        process = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "--factory", _APP, "--fd", str(sock.fileno())],
            env=env,
            pass_fds=(sock.fileno(),),
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    finally:
        sock.close()  # the child holds its own copy
        if log is not None:
            out.close()  # type: ignore[union-attr]
    server = ButlerServer(url, tuple(repos), process)
    try:
        _wait_ready(server, next(iter(repos)), timeout, log)
        yield server
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _wait_ready(
    server: ButlerServer, label: str, timeout: float, log: str | os.PathLike[str] | None
) -> None:
    deadline = time.monotonic() + timeout
    probe = server.repo_url(label) + "/butler.yaml"
    while True:
        if server.process.poll() is not None:
            raise RuntimeError(
                f"the Butler server exited ({server.process.returncode}){_tail(log)}"
            )
        try:
            with urllib.request.urlopen(probe, timeout=2) as answer:
                answer.read()
            return
        except (urllib.error.URLError, OSError):
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"the Butler server did not answer {probe} within {timeout} s{_tail(log)}"
                ) from None
            time.sleep(0.1)


def _tail(log: str | os.PathLike[str] | None) -> str:
    if log is None:
        return ""
    try:
        lines = Path(log).read_text(errors="replace").splitlines()[-15:]
    except OSError:
        return ""
    return ":\n" + "\n".join(lines)
