"""The Butler source through a real RemoteButler: the real Butler server on loopback.

The RSP's path, end to end with nothing mocked: ``harvester serve`` holds the files
(Range-capable storage, unsigned like a public bucket); a Butler repository whose
datastore points at those URLs is served by the real ``lsst.daf.butler`` server
(FastAPI under uvicorn, Gafaelfawr disabled); the client opens it through the
label ``dp1`` as the RSP's users do, so ``Butler("dp1")`` is a ``RemoteButler``.
Pixels and ledger are compared with the ``local`` source's run of the same targets.
"""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from harvester.config import ButlerConfig
from harvester.repo import Repository
from harvester.service import ServiceSettings
from harvester.service.testing import ServerHandle, serve_in_thread
from harvester.targets import random_targets

from ._butler_common import read_ledger, read_stack, run_config, run_harvest, same_stacks
from .conftest import TINY

butler_mod = pytest.importorskip(
    "lsst.daf.butler", reason="lsst-daf-butler is not installed: pip install 'harvester[butler]'"
)
pytest.importorskip(
    "lsst.daf.butler.remote_butler.server",
    reason="the Butler server is not installed: pip install 'harvester[butler-server]'",
)
from harvester.butler._lookup import ButlerRepository, register_skymap  # noqa: E402
from harvester.butler.testing import (  # noqa: E402
    ButlerServer,
    build_http_butler,
    butler_server,
    label_environment,
)

register_skymap(TINY)


@pytest.fixture(scope="module")
def storage(tiny_repo: Repository) -> Iterator[ServerHandle]:
    """``harvester serve`` of the files: unsigned storage, tokens required elsewhere."""
    settings = ServiceSettings(
        tokens={"secret-token": frozenset({"read:image"})}, public_store=True
    )
    with serve_in_thread(tiny_repo, settings) as server:
        yield server


@pytest.fixture(scope="module")
def remote(
    tiny_repo: Repository, storage: ServerHandle, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ButlerServer]:
    tmp = tmp_path_factory.mktemp("remote")
    built = build_http_butler(tiny_repo, tmp / "butler_http", storage.base_url)
    with butler_server({"dp1": built.root}, log=tmp / "server.log") as server:
        yield server


@pytest.fixture
def dp1_label(remote: ButlerServer, monkeypatch: pytest.MonkeyPatch) -> str:
    for name, value in label_environment({"dp1": remote.repo_url("dp1")}).items():
        monkeypatch.setenv(name, value)
    # The RSP's token is in the environment: it must reach neither storage nor,
    # through harvester, the Butler (the Butler client picks its own).
    monkeypatch.setenv("ACCESS_TOKEN", "secret-token")
    return "dp1"


def test_the_label_opens_a_remote_butler(storage: ServerHandle, dp1_label: str) -> None:
    butler = butler_mod.Butler(dp1_label, collections="LSSTComCam/DP1")
    try:
        assert type(butler).__name__ == "RemoteButler"
        refs = butler.query_datasets("deep_coadd", where="band.name = 'z'", limit=None)
        assert refs and {r.dataId["band"] for r in refs} == {"z"}
        uri = str(butler.getURI(refs[0]))
        # The datastore's own URL, handed out as it is: storage, not the Butler server.
        assert uri == f"{storage.base_url}/_store/{refs[0].id}.fits"
    finally:
        butler.close()


def test_remote_butler_harvest_equals_local(
    tiny_repo: Repository,
    storage: ServerHandle,
    dp1_label: str,
    local_run: Path,
    tmp_path: Path,
) -> None:
    import anyio

    out = tmp_path / "remote"
    config = run_config(tiny_repo, out, "butler", repo=dp1_label)
    assert config.butler == ButlerConfig(repo="dp1")
    before = storage.state.storage_with_authorization
    report, repo = anyio.run(run_harvest, config, random_targets(tiny_repo, "random:600", 1))
    assert report.counts.get("ok", 0) > 0 and report.counts.get("failed", 0) == 0
    same_stacks(read_stack(out), read_stack(local_run))
    assert read_ledger(out) == read_ledger(local_run)

    # Every image came from storage by range reads, and no request carried a token.
    assert storage.stats[("storage", 206)] > 0
    assert storage.state.storage_with_authorization == before
    # Discovery: one query; no bulk URI call exists remotely, so one getURIs per image.
    assert isinstance(repo, ButlerRepository) and repo.lookup is not None
    stats = repo.lookup.stats
    assert stats.queries == 1 and stats.uri_method == "getURIs"
    assert stats.uri_calls == stats.uris == len(repo.datasets) == len(repo.remote)
    # Provenance: the ledger names each batch's image by the Butler's id and its URL.
    db = sqlite3.connect(out / "ledger.sqlite")
    images = db.execute("SELECT band, dataset_id, uri FROM images").fetchall()
    db.close()
    by_id = {r.id: r for r in tiny_repo}
    assert images
    for band, ident, uri in images:
        assert band == by_id[ident].band
        assert uri == f"{storage.base_url}/_store/{ident}.fits"


def test_notebook_butler_is_used_as_given(
    tiny_repo: Repository, dp1_label: str, tmp_path: Path
) -> None:
    """``Harvester(config, butler=Butler("dp1"))``: the notebook's RemoteButler, not a new one."""
    import anyio

    butler: Any = butler_mod.Butler(dp1_label, collections="LSSTComCam/DP1")
    calls = {"n": 0}
    real = butler.query_datasets

    def counted(*a: Any, **k: Any) -> Any:
        calls["n"] += 1
        return real(*a, **k)

    butler.query_datasets = counted
    config = run_config(tiny_repo, tmp_path / "nb", "butler", repo="not-a-label")
    report, _ = anyio.run(run_harvest, config, random_targets(tiny_repo, "random:50", 9), butler)
    assert report.counts.get("ok", 0) + report.counts.get("partial", 0) > 0
    assert calls["n"] == 1
    butler.close()


def test_serve_butler_command(tiny_repo: Repository, tmp_path: Path) -> None:
    """``harvester serve REPO --butler``: a RemoteButler over the served files, gone on SIGTERM."""
    import json
    import re
    import signal
    import subprocess
    import sys

    env = {**os.environ, "TMPDIR": str(tmp_path)}
    cmd = [sys.executable, "-m", "harvester", "serve", str(tiny_repo.root), "--port", "0"]
    serve = subprocess.Popen(
        [*cmd, "--no-auth", "--butler"], stdout=subprocess.PIPE, text=True, env=env
    )
    try:
        assert serve.stdout is not None
        lines = []
        for line in serve.stdout:  # ends when the process does
            lines.append(line)
            if "DAF_BUTLER_REPOSITORIES=" in line:
                break
        found = re.search(r"DAF_BUTLER_REPOSITORIES='(\{.*\})'", "".join(lines))
        assert found, "".join(lines)
        storage = re.search(r"at (http://\S+) ", lines[0])
        assert storage, lines[0]
        labels = json.loads(found.group(1))
        os.environ.update(label_environment(labels))
        butler = butler_mod.Butler("dp1", collections="LSSTComCam/DP1")
        try:
            assert type(butler).__name__ == "RemoteButler"
            refs = butler.query_datasets("deep_coadd", limit=None)
            assert len(refs) == len(tiny_repo)
            assert str(butler.getURI(refs[0])).startswith(storage.group(1) + "/_store/")
        finally:
            butler.close()
            for name in label_environment({}):
                os.environ.pop(name, None)
    finally:
        serve.send_signal(signal.SIGTERM)
        assert serve.wait(30) == 0
    # The temporary Butler repository went with it (and so did the server it ran).
    assert not list(tmp_path.glob("harvester-butler-*"))
