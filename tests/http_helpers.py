"""Starting `klein-agent serve --http` as a subprocess and talking to it, for the HTTP tests."""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import re
import resource
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx2
from mcp.client.streamable_http import streamable_http_client

REPO = Path(__file__).resolve().parents[1]


def serve_args(store: Path, *extra: str, model: str | None = "tiny") -> list[str]:
    """`python -m klein_agent serve` arguments of a test server; `model` None: no --model (--generator ray)."""
    return [
        "-m",
        "klein_agent",
        "serve",
        *(["--model", model] if model is not None else []),
        "--store",
        str(store),
        "--no-default-dirs",
        # CUDA's budget on the CPU too: the stopping tests hold a long 512x512 x4 call of the tiny model
        "--max-megapixels",
        "4.2",
        *extra,
    ]


@contextlib.asynccontextmanager
async def authed(port: int, token: str | None) -> AsyncIterator[Any]:
    """A streamable HTTP transport for the SDK Client that sends the bearer token (as Claude Code's `--header`
    or a script's HTTP client would)."""
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with (
        httpx2.AsyncClient(headers=headers, timeout=httpx2.Timeout(30.0, read=300.0)) as http,
        streamable_http_client(f"http://127.0.0.1:{port}/mcp", http_client=http) as streams,
    ):
        yield streams


@contextlib.contextmanager
def http_server(
    tmp_path: Path,
    store: Path,
    *extra: str,
    env: dict[str, str] | None = None,
    nofile: int | None = None,
    model: str | None = "tiny",
) -> Iterator[tuple[subprocess.Popen[bytes], int, str | None]]:
    """`serve --http --port 0` as a subprocess: yields (process, port, token from the token file or None).
    `nofile`: the server's RLIMIT_NOFILE (soft and hard), as `ulimit -n` would set it; `model` as `serve_args`."""
    log_path = tmp_path / "server.log"

    def limit() -> None:
        if nofile is not None:
            resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))

    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, *serve_args(store, "--http", "--port", "0", *extra, model=model)],
            cwd=REPO,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})},
            preexec_fn=limit,
        )
    try:
        deadline = time.monotonic() + 60
        port = None
        while port is None:
            assert proc.poll() is None, log_path.read_text()
            assert time.monotonic() < deadline, log_path.read_text()
            if m := re.search(r"streamable HTTP at http://127\.0\.0\.1:(\d+)/mcp", log_path.read_text()):
                port = int(m.group(1))
            else:
                time.sleep(0.05)
        wait_listening(port)
        token_file = store.parent / f"{store.name}.http-token"
        token = token_file.read_text().strip() if token_file.exists() else None
        yield proc, port, token
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def wait_listening(port: int) -> None:
    deadline = time.monotonic() + 30
    while True:
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            conn.request("GET", "/health-probe")
            conn.getresponse().read()
            conn.close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def post_initialize(port: int, headers: dict[str, str]) -> int:
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
    )
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request(
            "POST",
            "/mcp",
            body=body,
            headers={
                "Content-Type": "application/json",
                "Accept": "application/json, text/event-stream",
                **headers,
            },
        )
        response = conn.getresponse()
        response.read()
        return response.status
    finally:
        conn.close()
