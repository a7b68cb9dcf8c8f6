"""Connection guards of ``harvester serve``: the header timeout (slowloris), the
keep-alive timeout and the cap on connections per client.

The server runs in a thread on 127.0.0.1 (port 0); clients are raw sockets in the
test's thread. Waits are polling loops with generous deadlines: what is asserted
is what the server did (its counters, what each socket received), never how fast.
"""

from __future__ import annotations

import contextlib
import select
import socket
import time
from collections.abc import Iterator
from urllib.parse import urlsplit

import pytest

from harvester.errors import ConfigError
from harvester.repo import Repository
from harvester.service import ServerHandle, ServiceSettings, serve_in_thread

TOKENS: dict[str, frozenset[str]] = {"tok": frozenset({"read:image"})}
DEADLINE = 10.0
REQUEST = b"GET /repertoire/discovery HTTP/1.1\r\nHost: x\r\n\r\n"


@contextlib.contextmanager
def server(repo: Repository, **kw: object) -> Iterator[ServerHandle]:
    # Field types vary per keyword; ServiceSettings checks them at run time.
    settings = ServiceSettings(tokens=TOKENS, **kw)  # type: ignore[arg-type]
    with serve_in_thread(repo, settings) as handle:
        yield handle


def connect(handle: ServerHandle) -> socket.socket:
    parts = urlsplit(handle.base_url)
    assert parts.hostname and parts.port
    return socket.create_connection((parts.hostname, parts.port), timeout=DEADLINE)


def exchange(sock: socket.socket, request: bytes = REQUEST) -> int:
    """Send one request on a kept-alive connection and read its whole answer."""
    sock.sendall(request)
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, "connection closed before the answer"
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    length = next(
        int(v) for k, _, v in (x.partition(":") for x in lines[1:]) if k.lower() == "content-length"
    )
    while len(body) < length:
        body += sock.recv(65536)
    return int(lines[0].split()[1])


class Watched:
    """A socket and what the server sent on it, until it closed the connection."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.received = b""
        self.closed = False

    def poll(self) -> None:
        """Read what is there without blocking; note a close or a reset."""
        while not self.closed and select.select([self.sock], [], [], 0)[0]:
            try:
                chunk = self.sock.recv(65536)
            except OSError:  # reset
                chunk = b""
            self.received += chunk
            self.closed = not chunk

    def send(self, data: bytes) -> None:
        try:
            self.sock.sendall(data)
        except OSError:
            self.closed = True


def wait_closed(watched: list[Watched], trickle: bytes | None = None, every: float = 0.2) -> None:
    """Poll until every socket is closed by the server (or the deadline passes),
    sending ``trickle`` on each open one every ``every`` seconds."""
    deadline = time.monotonic() + DEADLINE
    n = 0
    while time.monotonic() < deadline and not all(w.closed for w in watched):
        for w in watched:
            w.poll()
            if trickle is not None and not w.closed:
                w.send(trickle % n if b"%d" in trickle else trickle)
        n += 1
        time.sleep(every)


def test_slowloris_connections_are_closed(tiny_repo: Repository) -> None:
    n = 20
    with server(tiny_repo, header_timeout=1.0) as handle:
        watched = [Watched(connect(handle)) for _ in range(n)]
        try:
            for w in watched:
                w.send(b"GET /repertoire/discovery HTTP/1.1\r\nHost: x\r\n")
            wait_closed(watched, trickle=b"X-Trickle-%d: 1\r\n")
            assert [w.closed for w in watched] == [True] * n
            assert all(w.received.startswith(b"HTTP/1.1 408 ") for w in watched)
            assert handle.connections.header_timeouts == n
            with contextlib.closing(connect(handle)) as fresh:
                assert exchange(fresh) == 200  # the server still answers
        finally:
            for w in watched:
                w.sock.close()


def test_a_slow_answer_is_not_a_slow_client(tiny_repo: Repository) -> None:
    # The header timer stops once the head is in: a request answered after longer
    # than header_timeout (injected latency) is answered, and the kept-alive
    # connection then serves another request.
    with (
        server(tiny_repo, header_timeout=0.3, latency_ms=600, auth=False) as handle,
        contextlib.closing(connect(handle)) as sock,
    ):
        request = b"GET /api/datalink/links HTTP/1.1\r\nHost: x\r\n\r\n"
        assert exchange(sock, request) == 200
        assert exchange(sock, request) == 200
        assert handle.connections.header_timeouts == 0
        (record, _) = [r for r in handle.received if r.kind == "datalink"]
        assert record.delay >= 0.3  # longer than the header timeout, by the server's own count


def test_a_kept_alive_connection_trickling_its_next_head_is_closed(tiny_repo: Repository) -> None:
    with (
        server(tiny_repo, header_timeout=0.5, keepalive_timeout=60) as handle,
        contextlib.closing(connect(handle)) as sock,
    ):
        assert exchange(sock) == 200
        watched = Watched(sock)
        watched.send(b"GET /repertoire/discovery HTTP/1.1\r\n")
        wait_closed([watched], trickle=b"X-Trickle-%d: 1\r\n", every=0.1)
        assert watched.closed and watched.received.startswith(b"HTTP/1.1 408 ")
        assert handle.connections.header_timeouts == 1


def test_an_idle_kept_alive_connection_is_closed(tiny_repo: Repository) -> None:
    with (
        server(tiny_repo, header_timeout=60, keepalive_timeout=0.5) as handle,
        contextlib.closing(connect(handle)) as sock,
    ):
        assert exchange(sock) == 200
        watched = Watched(sock)
        wait_closed([watched])
        assert watched.closed and watched.received == b""  # closed quietly
        assert handle.connections.header_timeouts == 0


def test_connections_past_the_cap_of_a_client_are_refused(tiny_repo: Repository) -> None:
    cap = 4
    with server(tiny_repo, max_connections_per_client=cap, header_timeout=60) as handle:
        socks = [connect(handle) for _ in range(cap)]
        try:
            for s in socks:
                assert exchange(s) == 200  # each connection is in and answered
            extra = Watched(connect(handle))
            wait_closed([extra])
            assert extra.closed and extra.received == b""  # closed at once, unanswered
            assert handle.connections.refused == 1
            assert handle.connections.open_connections("127.0.0.1") == cap
            for s in socks:
                assert exchange(s) == 200  # the first ones stay usable
            socks.pop().close()
            deadline = time.monotonic() + DEADLINE
            while handle.connections.open_connections() > cap - 1:
                assert time.monotonic() < deadline, "the server never saw the close"
                time.sleep(0.01)
            socks.append(connect(handle))
            assert exchange(socks[-1]) == 200  # room again
            assert handle.connections.refused == 1
            assert handle.connections.accepted == cap + 1
        finally:
            for s in socks:
                s.close()
            extra.sock.close()


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("header_timeout", 0),
        ("header_timeout", float("nan")),
        ("keepalive_timeout", -1),
        ("keepalive_timeout", "10"),
        ("max_connections_per_client", 0),
        ("max_connections_per_client", 2.5),
        ("max_connections_per_client", True),
    ],
)
def test_connection_settings_are_checked(key: str, value: object) -> None:
    with pytest.raises(ConfigError, match=rf"service: {key} must be .*not {value!r}"):
        # Deliberately ill-typed values: the run-time check is under test.
        ServiceSettings(**{key: value})  # type: ignore[arg-type]
    defaults = ServiceSettings()
    assert (
        defaults.header_timeout,
        defaults.keepalive_timeout,
        defaults.max_connections_per_client,
    ) == (10.0, 75.0, 128)


def test_cli_serve_passes_the_connection_and_outage_flags(
    tiny_repo: Repository, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import harvester.service as service
    from harvester.cli import main

    flags: tuple[str, ...] = (
        "--header-timeout",
        "--keepalive-timeout",
        "--max-connections-per-client",
    )
    flags += ("--outage-after",)
    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    shown = capsys.readouterr().out
    assert [f for f in flags if f not in shown] == []
    seen: list[ServiceSettings] = []
    monkeypatch.setattr(service, "run_server", lambda repo, s, **kw: seen.append(s))
    argv = ["serve", str(tiny_repo.root), "--no-auth", "--header-timeout", "2.5"]
    argv += ["--keepalive-timeout", "30", "--max-connections-per-client", "16"]
    argv += ["--outage-after", "40"]
    assert main(argv) == 0
    (s,) = seen
    assert (s.header_timeout, s.keepalive_timeout, s.max_connections_per_client) == (2.5, 30, 16)
    assert s.outage_after == 40
