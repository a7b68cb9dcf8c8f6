"""``harvester serve --tap`` as a command: flags, its own cluster, errors; and taplint.

The taplint test runs STILTS (Debian package ``stilts``), the IVOA community's TAP
validator, against the server and requires zero errors.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from harvester.cli import main
from harvester.repo import Repository
from harvester.service import ServiceSettings, serve_tap_in_thread
from harvester.service.tap import PostgresCluster, TapUnavailable


def test_serve_flags_build_tap_settings(
    tap_repo: Repository, monkeypatch: pytest.MonkeyPatch
) -> None:
    import harvester.service as service

    seen: dict[str, object] = {}

    def fake_run(repo: Repository, s: ServiceSettings, **kw: object) -> None:
        seen["settings"] = s

    monkeypatch.setattr(service, "run_server", fake_run)
    root = str(tap_repo.root)
    argv = ["serve", root, "--tap", "--token", "t1", "--quota", "tap=5", "--tap-maxrec", "7"]
    argv += ["--tap-hardlimit", "70", "--tap-timeout", "3"]
    assert main(argv) == 0
    s = seen["settings"]
    assert isinstance(s, ServiceSettings)
    assert s.tap and s.tap_dsn is None
    assert dict(s.tokens) == {"t1": {"read:image", "read:tap"}}
    assert s.quotas["tap"] == 5
    assert (s.tap_maxrec, s.tap_hardlimit, s.tap_timeout) == (7, 70, 3.0)
    assert main(["serve", root, "--no-auth", "--tap-dsn", "dbname=x"]) == 0
    s = seen["settings"]
    assert isinstance(s, ServiceSettings) and s.tap and s.tap_dsn == "dbname=x"
    assert (
        main(["serve", root, "--no-auth", "--tap", "--tap-maxrec", "9", "--tap-hardlimit", "5"])
        == 1
    )


def test_unreachable_database_is_a_clear_error(
    tap_repo: Repository, tap_cluster: PostgresCluster, capsys: pytest.CaptureFixture[str]
) -> None:
    dsn = "host=/nonexistent-harvester-socket dbname=tap password=secret"
    argv = ["serve", str(tap_repo.root), "--no-auth", "--tap-dsn", dsn, "--port", "0"]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert "TAP database" in err and "nonexistent-harvester-socket" in err
    assert "secret" not in err


def test_missing_postgres_says_what_to_install(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from harvester.service.tap import _postgres

    monkeypatch.setattr(_postgres, "_candidates", lambda: [tmp_path])
    with pytest.raises(TapUnavailable, match="postgresql-15-pgsphere"):
        PostgresCluster().start()


@pytest.fixture()
def pg_tmpdir() -> Iterator[Path]:
    """A TMPDIR the ``postgres`` user can reach (pytest's own is private to root)."""
    path = Path(tempfile.mkdtemp(prefix="harvester-test-"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def test_serve_tap_starts_and_removes_its_own_cluster(
    tap_repo: Repository, tap_cluster: PostgresCluster, pg_tmpdir: Path
) -> None:
    """The real command: its own throwaway cluster, up in discovery, gone after SIGTERM."""
    cmd = [sys.executable, "-m", "harvester", "serve", str(tap_repo.root), "--tap"]
    cmd += ["--no-auth", "--port", "0"]
    env = dict(os.environ, TMPDIR=str(pg_tmpdir))
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env
    )
    try:
        assert proc.stdout is not None
        lines = []
        for line in proc.stdout:
            lines.append(line)
            if "/api/tap on" in line:
                break
        match = re.search(r"TAP: (http://\S+)/api/tap on a throwaway", "".join(lines))
        assert match, "".join(lines)
        base = match.group(1)
        assert len(os.listdir(pg_tmpdir)) == 1  # the cluster's folder
        doc = requests.get(f"{base}/repertoire/discovery", timeout=10).json()
        assert doc["datasets"]["dp1"]["services"]["tap"]["url"] == f"{base}/api/tap"
        r = requests.get(
            f"{base}/api/tap/sync",
            params={"LANG": "ADQL", "QUERY": "SELECT TOP 2 objectId FROM dp1.Object"},
            timeout=30,
        )
        assert r.status_code == 200 and r.text.count("<TR>") == 2
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
    assert proc.returncode == 0
    assert os.listdir(pg_tmpdir) == []  # the cluster stopped and its folder is gone


def test_taplint_reports_no_errors(tap_repo: Repository, tap_cluster: PostgresCluster) -> None:
    stilts = shutil.which("stilts")
    if stilts is None:
        pytest.skip("stilts is not installed (Debian package stilts; make test installs it)")
    with serve_tap_in_thread(tap_repo, tap_cluster, ServiceSettings(auth=False)) as server:
        out = subprocess.run(
            [stilts, "taplint", f"tapurl={server.tap_url}"],
            capture_output=True,
            text=True,
            timeout=600,
        ).stdout
    totals = re.search(r"Totals: Errors: (\d+); Warnings: (\d+)", out)
    assert totals, out[-2000:]
    reported = sorted(
        {line.split(" ", 1)[0] for line in out.splitlines() if line[:2] in ("E-", "W-", "F-")}
    )
    print("taplint:", totals.group(0), reported)
    errors = [line for line in out.splitlines() if line.startswith("E-")]
    assert int(totals.group(1)) == 0, "\n".join(errors)


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("tap", "yes"),
        ("tap_dsn", ""),
        ("tap_maxrec", 0),
        ("tap_hardlimit", "many"),
        ("tap_timeout", 0),
        ("tap_execution_duration", float("nan")),
        ("tap_retention", -1.0),
        ("tap_workers", 0),
        ("tap_max_jobs", 1.5),
    ],
)
def test_tap_settings_name_the_bad_key_and_value(key: str, value: object) -> None:
    from harvester.errors import ConfigError

    with pytest.raises(
        ConfigError, match=rf"^service: {key} must be .*, not {re.escape(repr(value))}$"
    ):
        ServiceSettings(**{key: value})  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=r"tap_maxrec must be <= tap_hardlimit \(5\), not 6"):
        ServiceSettings(tap_maxrec=6, tap_hardlimit=5)
