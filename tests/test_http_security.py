"""`serve --http` against a hostile neighbour: the token, exact Host and Origin, sessions bound to their token,
slow clients, and a clean refusal when the port is taken. A real server process and raw sockets."""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mcp import Client

from tests.http_helpers import REPO, authed, http_server, post_initialize, serve_args

pytestmark = [pytest.mark.anyio, pytest.mark.slow]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def request(
    port: int, method: str, path: str, headers: dict[str, str], body: bytes = b""
) -> tuple[int, dict, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request(method, path, body=body, headers=headers)
        response = conn.getresponse()
        return response.status, dict(response.getheaders()), response.read()
    finally:
        conn.close()


async def test_token_host_and_origin_are_checked_exactly(tmp_path: Path) -> None:
    store = tmp_path / "store"
    with http_server(tmp_path, store, "--allow-origin", "http://127.0.0.1:9") as (_, port, token):
        assert token is not None
        token_file = store.parent / "store.http-token"
        assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
        log = (tmp_path / "server.log").read_text()
        assert str(token_file) in log and token not in log  # the file is named, the secret is not logged
        good = {"Authorization": f"Bearer {token}"}

        # no token, a wrong one, the right one
        status, headers, body = request(port, "POST", "/mcp", {"Content-Type": "application/json"}, b"{}")
        assert status == 401 and headers.get("www-authenticate", "").startswith("Bearer")
        assert (
            json.loads(body)["error"]["code"] == -32001 and "Bearer" in json.loads(body)["error"]["message"]
        )
        assert post_initialize(port, {"Authorization": "Bearer " + "x" * len(token)}) == 401
        assert post_initialize(port, {"Authorization": f"bearer {token}"}) == 200

        # Host and Origin: exact scheme, host and port; prefix tricks and other local ports are refused
        for host in (
            "evil.example",
            "localhost:1.evil.com",
            f"127.0.0.1:{port}@evil.com",
            f"127.0.0.1:{port + 1}",
        ):
            assert post_initialize(port, {**good, "Host": host}) == 421, host
        for origin in (
            f"http://localhost:{port}.evil.com",
            "http://127.0.0.1:1234",
            f"https://127.0.0.1:{port}",
        ):
            assert post_initialize(port, {**good, "Origin": origin}) == 403, origin
        assert post_initialize(port, {**good, "Origin": f"http://localhost:{port}"}) == 200
        assert post_initialize(port, {**good, "Origin": "http://127.0.0.1:9"}) == 200  # --allow-origin

        async with Client(authed(port, token)) as client:
            assert not (await client.call_tool("server_status", {})).is_error

    # the token file is kept across restarts, so configured clients keep working
    with http_server(tmp_path, store) as (_, _, again):
        assert again == token


async def test_a_session_is_bound_to_the_token_that_made_it(tmp_path: Path) -> None:
    first, second = "a" * 24 + "-first-client", "b" * 24 + "-second-client"
    env = {"KLEIN_AGENT_TOKEN": f"{first},{second}"}
    with http_server(tmp_path, tmp_path / "store", env=env) as (_, port, _):
        body = json.dumps(
            {
                "jsonrpc": "2.0",
                "id": 1,
                "method": "initialize",
                "params": {
                    "protocolVersion": "2025-11-25",
                    "capabilities": {},
                    "clientInfo": {"name": "t", "version": "0"},
                },
            }
        ).encode()
        headers = {"Content-Type": "application/json", "Accept": "application/json, text/event-stream"}
        status, got, _ = request(port, "POST", "/mcp", {**headers, "Authorization": f"Bearer {first}"}, body)
        session = got.get("mcp-session-id")
        assert status == 200 and session
        ping = json.dumps({"jsonrpc": "2.0", "id": 2, "method": "ping"}).encode()
        with_session = {**headers, "mcp-session-id": session, "mcp-protocol-version": "2025-11-25"}
        status, _, body = request(
            port, "POST", "/mcp", {**with_session, "Authorization": f"Bearer {second}"}, ping
        )
        assert status == 404 and b"unknown session" in body
        status, _, _ = request(
            port, "POST", "/mcp", {**with_session, "Authorization": f"Bearer {first}"}, ping
        )
        assert status == 200


@pytest.mark.slow
def test_slow_clients_are_cut_off(tmp_path: Path) -> None:
    client_timeout = 1.5
    hang_guard = 20 * client_timeout  # how long a socket read may wait before the test calls it a hang
    timeout_flag = ("--client-timeout", str(client_timeout))
    with http_server(tmp_path, tmp_path / "store", *timeout_flag) as (_, port, token):
        # Headers a byte at a time, and never finished (no blank line): a server without a header deadline
        # would wait for good, so a close is the deadline at work, however long the machine takes to reach it.
        with socket.create_connection(("127.0.0.1", port), timeout=hang_guard) as sock:
            closed = False
            for byte in b"POST /mcp HTTP/1.1\r\nHost: 127.0.0.1\r\n":
                try:
                    sock.sendall(bytes([byte]))
                    time.sleep(0.25)
                    sock.setblocking(False)
                    try:
                        if sock.recv(1024) == b"":
                            closed = True
                            break
                    except BlockingIOError:
                        pass
                    finally:
                        sock.settimeout(hang_guard)  # blocking again, with the guard
                except OSError:
                    closed = True
                    break
            if not closed:  # all sent before the deadline struck (a slow machine): the headers are still open
                try:
                    closed = sock.recv(1024) == b""  # a hang past the guard raises TimeoutError: a failure
                except ConnectionError:
                    closed = True
            assert closed
        # A body that never finishes: the answer is the 408 and the connection is closed, without the rest.
        with socket.create_connection(("127.0.0.1", port), timeout=hang_guard) as sock:
            head = (
                f"POST /mcp HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nAuthorization: Bearer {token}\r\n"
                "Content-Type: application/json\r\nAccept: application/json, text/event-stream\r\n"
                "Content-Length: 1000\r\n\r\n{"
            )
            sock.sendall(head.encode())
            data = b""
            with contextlib.suppress(ConnectionError):  # a reset after the answer is a close too
                while chunk := sock.recv(4096):  # a hang past the guard raises TimeoutError: a failure
                    data += chunk
            assert data.startswith(b"HTTP/1.1 408"), data[:200]


def test_no_auth_only_on_loopback_and_a_taken_port_is_named(tmp_path: Path) -> None:
    store = tmp_path / "store"
    done = subprocess.run(
        [sys.executable, *serve_args(store, "--http", "--host", "0.0.0.0", "--port", "0", "--no-auth")],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2 and "--no-auth is allowed only on a loopback address" in done.stderr
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = subprocess.run(
            [sys.executable, *serve_args(store, "--http", "--port", str(port))],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert done.returncode == 2
    assert f"port {port} on 127.0.0.1 is already in use" in done.stderr and "--port" in done.stderr
    assert "Traceback" not in done.stderr
    assert not store.exists() and not (tmp_path / "store.http-token").exists(), (
        "nothing created before the bind"
    )


def test_no_auth_on_loopback_works_and_warns(tmp_path: Path) -> None:
    with http_server(tmp_path, tmp_path / "store", "--no-auth") as (_, port, token):
        assert token is None
        assert post_initialize(port, {}) == 200
        assert "--no-auth: any local process" in (tmp_path / "server.log").read_text()


def test_a_world_readable_token_file_is_refused(tmp_path: Path) -> None:
    store = tmp_path / "store"
    token_file = tmp_path / "store.http-token"
    token_file.write_text("t" * 40)
    os.chmod(token_file, 0o644)
    done = subprocess.run(
        [sys.executable, *serve_args(store, "--http", "--port", "0")],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2 and "can be read by other users" in done.stderr and "chmod 600" in done.stderr
