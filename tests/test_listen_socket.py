"""The listening socket of `serve --http` and `gallery` (web.listen.bind, web.connections.BoundedListener) as the
event loop uses it: connections it accepts have Nagle's algorithm off, so a response written in pieces (headers,
then body) is not held back until the client's delayed ACK."""

from __future__ import annotations

import asyncio
import socket

import pytest

from klein_agent.web.connections import BoundedListener, ConnectionBook
from klein_agent.web.listen import HttpStartError, bind


def accepted_nodelay(host: str) -> int:
    """TCP_NODELAY of the server side of one connection accepted by asyncio through our listener."""

    async def main() -> int:
        listener = BoundedListener.around(bind(host, 0), ConnectionBook(8))
        seen: asyncio.Future[int] = asyncio.get_running_loop().create_future()

        async def on_connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            sock = writer.get_extra_info("socket")
            seen.set_result(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
            writer.close()

        server = await asyncio.start_server(on_connect, sock=listener)  # what uvicorn does with our socket
        async with server:
            port = listener.getsockname()[1]
            _, writer = await asyncio.open_connection(host, port)
            value = await asyncio.wait_for(seen, 10)
            writer.close()
        return value

    return asyncio.run(main())


def test_accepted_connections_have_nagles_algorithm_off() -> None:
    assert accepted_nodelay("127.0.0.1") != 0


def test_accepted_ipv6_connections_have_nagles_algorithm_off() -> None:
    try:
        bind("::1", 0).close()
    except HttpStartError as exc:  # a machine without IPv6 loopback cannot serve on it either
        pytest.skip(f"no IPv6 loopback here: {exc}")
    assert accepted_nodelay("::1") != 0
