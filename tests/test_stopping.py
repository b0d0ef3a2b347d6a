"""Stopping `klein-agent serve` as a person or a client manager would: Ctrl-C in a terminal, SIGINT, SIGTERM — in
stdio and HTTP, idle and in the middle of a call — and what the stdio boundary answers for lines the SDK would drop.

Each stop must end the process promptly with status 0, and a call cut off must leave nothing in the store.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import pty
import select
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import anyio
import pytest
from mcp import Client

from klein_agent.service.store import ImageStore
from tests.http_helpers import REPO, authed, http_server, serve_args

pytestmark = [pytest.mark.slow]

# Generous for a loaded 2-core CI machine; without the fix a stdio server waits for Enter forever.
PROMPT_EXIT_S = 20.0
LONG_CALL = {"prompt": "a long call", "width": 512, "height": 512, "steps": 100, "num_images": 4}


def _initialize(request_id: int = 1) -> dict[str, Any]:
    return {
        "jsonrpc": "2.0",
        "id": request_id,
        "method": "initialize",
        "params": {
            "protocolVersion": "2025-11-25",
            "capabilities": {},
            "clientInfo": {"name": "raw", "version": "0"},
        },
    }


class RawStdio:
    """`serve` over pipes, spoken to in raw JSON-RPC lines; stderr goes to a file so logs never block it."""

    def __init__(self, tmp_path: Path) -> None:
        self.store = tmp_path / "store"
        self.log_path = tmp_path / "stderr.log"
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, *serve_args(self.store)],
                cwd=REPO,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=log,
            )

    def send_bytes(self, data: bytes) -> None:
        assert self.proc.stdin
        self.proc.stdin.write(data)
        self.proc.stdin.flush()

    def send(self, message: dict[str, Any]) -> None:
        self.send_bytes(json.dumps(message).encode() + b"\n")

    def next_message(self, timeout: float = 120.0) -> dict[str, Any]:
        assert self.proc.stdout
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        assert ready, f"no answer in {timeout} s:\n{self.log_path.read_text()}"
        line = self.proc.stdout.readline()
        assert line, f"the server closed stdout:\n{self.log_path.read_text()}"
        message: dict[str, Any] = json.loads(line)
        return message

    def answer(self, request_id: int | None) -> dict[str, Any]:
        while True:
            message = self.next_message()
            if "method" not in message and message.get("id") == request_id:
                return message

    def start_session(self) -> None:
        self.send(_initialize())
        assert self.answer(1)["result"]["serverInfo"]["name"] == "klein-agent"
        self.send({"jsonrpc": "2.0", "method": "notifications/initialized"})

    def exit_status(self, timeout: float) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        for pipe in (self.proc.stdin, self.proc.stdout):
            if pipe is not None:
                pipe.close()


def _nothing_stored(store: Path) -> None:
    with ImageStore(store) as reopened:
        page, _ = reopened.list_images(limit=100)
        assert page == [], "a call cut off by the stop left images behind"
    assert not [p for p in (store / "images").iterdir()], "a call cut off by the stop left files behind"


def test_ctrl_c_in_a_terminal_stops_the_stdio_server(tmp_path: Path) -> None:
    """The bug this guards: the SDK's reader thread sat in a blocking read of the terminal, so Ctrl-C did nothing
    until Enter was pressed."""
    pid, fd = pty.fork()
    if pid == 0:  # the child: a server whose stdin, stdout and stderr are a terminal
        os.chdir(REPO)
        os.execv(sys.executable, [sys.executable, *serve_args(tmp_path / "store")])
    output = b""
    status = None
    try:
        deadline = time.monotonic() + 120
        while b"model ready" not in output:
            assert time.monotonic() < deadline, output.decode(errors="replace")
            if select.select([fd], [], [], 0.1)[0]:
                output += os.read(fd, 65536)
        os.write(fd, b"\x03")  # Ctrl-C typed at the terminal: the line discipline sends SIGINT
        stopped_at = time.monotonic()
        while True:
            done, waited = os.waitpid(pid, os.WNOHANG)
            if done:
                status = waited
                break
            assert time.monotonic() - stopped_at < PROMPT_EXIT_S, "Ctrl-C did not stop the server"
            if select.select([fd], [], [], 0.1)[0]:
                with contextlib.suppress(OSError):  # the terminal closes as the server exits
                    output += os.read(fd, 65536)
        assert os.waitstatus_to_exitcode(status) == 0, output.decode(errors="replace")
        assert b"Traceback" not in output
    finally:
        if status is None:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        os.close(fd)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_in_the_middle_of_a_stdio_call_stops_it_and_stores_nothing(
    tmp_path: Path, sig: signal.Signals
) -> None:
    server = RawStdio(tmp_path)
    try:
        server.start_session()
        call = {"name": "generate", "arguments": LONG_CALL, "_meta": {"progressToken": "p"}}
        server.send({"jsonrpc": "2.0", "id": 2, "method": "tools/call", "params": call})
        while True:  # wait until the model is denoising
            message = server.next_message()
            assert message.get("id") != 2, f"the long call finished before the signal: {message}"
            if message.get("method") == "notifications/progress" and "step" in message["params"].get(
                "message", ""
            ):
                break
        server.proc.send_signal(sig)
        stopped_at = time.monotonic()
        assert server.exit_status(PROMPT_EXIT_S) == 0, server.log_path.read_text()
        elapsed = time.monotonic() - stopped_at
    finally:
        server.close()
    assert elapsed < PROMPT_EXIT_S
    assert "Traceback" not in server.log_path.read_text()
    _nothing_stored(server.store)


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
async def test_a_signal_in_the_middle_of_an_http_call_stops_it_and_stores_nothing(
    tmp_path: Path, sig: signal.Signals
) -> None:
    store = tmp_path / "store"
    with http_server(tmp_path, store) as (proc, port, token):
        progressed = anyio.Event()

        async def on_progress(value: float, total: float | None, message: str | None) -> None:
            if message and "step" in message:
                progressed.set()

        async def long_call() -> None:
            try:
                async with Client(authed(port, token)) as client:
                    await client.call_tool("generate", LONG_CALL, progress_callback=on_progress)
            except Exception:  # the server going away mid-call is the point
                pass

        async with anyio.create_task_group() as tg:
            tg.start_soon(long_call)
            with anyio.fail_after(120):
                await progressed.wait()
            proc.send_signal(sig)
            stopped_at = time.monotonic()
            with anyio.fail_after(PROMPT_EXIT_S):
                while proc.poll() is None:
                    await anyio.sleep(0.05)
            tg.cancel_scope.cancel()
        assert time.monotonic() - stopped_at < PROMPT_EXIT_S
        assert proc.returncode == 0
    log = (tmp_path / "server.log").read_text()
    assert "Traceback" not in log, log
    _nothing_stored(store)


def test_lines_the_sdk_would_drop_are_answered_and_the_session_goes_on(tmp_path: Path) -> None:
    server = RawStdio(tmp_path)
    try:
        server.send_bytes(b"\xff\xfe not utf-8\n")
        assert server.answer(None)["error"]["code"] == -32700
        server.send_bytes(b"{not json\n")
        assert server.answer(None)["error"]["code"] == -32700
        server.send_bytes(b'{"jsonrpc": "2.0", "id": 9, "method": "x", "params": {"p": "\\ud800"}}\n')
        lone = server.answer(9)["error"]
        assert lone["code"] == -32700 and "surrogate" in lone["message"]
        server.send_bytes(b'{"jsonrpc": "2.0", "id": 10, "method": 5}\n')
        assert server.answer(10)["error"]["code"] == -32600
        server.send_bytes(b"[1, 2]\n")
        assert server.answer(None)["error"]["code"] == -32600
        server.start_session()  # the same session still works
        server.send({"jsonrpc": "2.0", "id": 3, "method": "tools/list"})
        assert "generate" in {t["name"] for t in server.answer(3)["result"]["tools"]}
        assert server.proc.stdin
        server.proc.stdin.close()  # the client closing stdin ends the server as before
        assert server.exit_status(PROMPT_EXIT_S) == 0
    finally:
        server.close()


def test_uvicorns_stop_warning_becomes_one_line_of_ours(caplog: pytest.LogCaptureFixture) -> None:
    from klein_agent.web.stopping import quiet_stop

    record = logging.LogRecord(
        "uvicorn.error",
        logging.WARNING,
        __file__,
        1,
        "Cancel %s running task(s), timeout graceful shutdown exceeded",
        (2,),
        None,
    )
    with caplog.at_level(logging.INFO, logger="klein_agent"):
        assert quiet_stop(record) is False  # uvicorn's own line is dropped...
    assert [(r.name, r.levelname, r.getMessage()) for r in caplog.records] == [
        ("klein_agent.http", "INFO", "stopping: 2 open request(s) cancelled")  # ...and ours stands for it
    ]


@pytest.mark.parametrize("transport", [[], ["--http", "--port", "0", "--no-auth"]])
def test_a_stopped_server_ends_at_once_with_its_logs_flushed(tmp_path: Path, transport: list[str]) -> None:
    """After the engine and the store are closed the process ends without tearing down torch module by module
    (`klein_agent.cli.exit_now`): the status and every log line must survive that."""
    log_path = tmp_path / "stderr.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, *serve_args(tmp_path / "store", "-v", *transport)],
            cwd=REPO,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=log,
        )
    try:
        deadline = time.monotonic() + 120
        while b"model ready" not in log_path.read_bytes():
            assert time.monotonic() < deadline and proc.poll() is None, log_path.read_text()
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(PROMPT_EXIT_S) == 0, log_path.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for pipe in (proc.stdin, proc.stdout):
            if pipe is not None:
                pipe.close()
    text = log_path.read_text()
    assert text.rstrip().endswith("engine and store closed"), text  # the last line, written before the exit
    assert "Traceback" not in text
