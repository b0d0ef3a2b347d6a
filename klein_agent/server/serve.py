"""`klein-agent serve`: the command-line options, logging to stderr, and running over stdio or streamable HTTP.

The CLI (`klein_agent.cli`) adds the model options with `add_model_arguments` and these with
`add_serve_arguments`, then calls `run_serve`.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import socket
import sys
from pathlib import Path

import anyio
from mcp.server import MCPServer
from mcp.server.transport_security import TransportSecuritySettings
from starlette.applications import Starlette

from klein_agent.model_options import generator_factory
from klein_agent.rules import limits
from klein_agent.server.app import build_server
from klein_agent.service.engine import Engine
from klein_agent.service.inputs import InputPolicy, default_allowed_dirs
from klein_agent.service.store import ImageStore, StoreError, default_store_dir
from klein_agent.service.studio import Studio, StudioConfig

log = logging.getLogger("klein_agent.serve")

LOOPBACK = ("127.0.0.1", "localhost", "::1")
DEFAULT_PORT = 8765


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the store, input, limit and transport options of `klein-agent serve` to `parser`."""
    store = parser.add_argument_group("image store")
    store.add_argument(
        "--store",
        type=Path,
        default=None,
        metavar="DIR",
        help="folder of the persistent image store (default: $KLEIN_AGENT_STORE, else the user data folder: "
        "~/.local/share/klein-agent/store on Linux, ~/Library/Application Support/klein-agent/store on macOS, "
        "%%LOCALAPPDATA%%\\klein-agent\\store on Windows)",
    )
    store.add_argument(
        "--store-max-gb",
        type=float,
        default=limits.STORE_MAX_BYTES / 2**30,
        metavar="GB",
        help="evict the least recently used images beyond this many GiB (default: 2)",
    )
    store.add_argument(
        "--store-max-images",
        type=int,
        default=limits.STORE_MAX_IMAGES,
        metavar="N",
        help="evict the least recently used images beyond this many (default: 10000)",
    )
    inputs = parser.add_argument_group("image inputs")
    inputs.add_argument(
        "--allow-dir",
        "--input-dir",
        dest="allow_dirs",
        action="append",
        type=Path,
        default=[],
        metavar="DIR",
        help="a folder whose images tools may read and export_image may write (repeatable); added to the "
        "defaults: the working directory (unless it is / or your home) and ~/Pictures, ~/Downloads, ~/Desktop",
    )
    inputs.add_argument(
        "--no-default-dirs",
        action="store_true",
        help="allow only the --allow-dir folders, not the default ones",
    )
    inputs.add_argument(
        "--allow-urls",
        action="store_true",
        help="let image arguments be http(s) URLs (public addresses only, no redirects); off by default",
    )
    caps = parser.add_argument_group("limits")
    caps.add_argument(
        "--max-queue",
        type=int,
        default=limits.MAX_QUEUE,
        metavar="N",
        help="calls that may wait behind the running one; more are refused at once with 'busy' (default: 8)",
    )
    caps.add_argument(
        "--max-megapixels",
        type=float,
        default=round(limits.MAX_PIXELS_PER_CALL / 1e6, 1),
        metavar="MP",
        help="width x height x num_images of one call, in millions of pixels (default: 4.2, one 2048x2048 image "
        "or four of 1024x1024); lower it on small GPUs so a call stays well under a client's ~60 s timeout",
    )
    transport = parser.add_argument_group("transport")
    transport.add_argument(
        "--http",
        action="store_true",
        help="serve streamable HTTP at http://HOST:PORT/mcp instead of stdio (one resident model for several "
        "clients); no authentication, so keep it on a loopback address",
    )
    transport.add_argument(
        "--host",
        default="127.0.0.1",
        help="HTTP address to bind (default: 127.0.0.1); Host and Origin headers are checked against it",
    )
    transport.add_argument(
        "--port",
        type=int,
        default=DEFAULT_PORT,
        help=f"HTTP port (default: {DEFAULT_PORT}; 0 picks a free one)",
    )
    parser.add_argument(
        "--log-level",
        default="INFO",
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        help="logging on stderr (stdout carries the MCP protocol in stdio mode)",
    )


def configure_logging(level: str) -> None:
    """Send all logging to stderr at `level`; quiet the libraries' progress bars (stdout is the MCP wire)."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root.addHandler(handler)
    root.setLevel(level)
    # Library progress bars and advice would go to stdout or clutter stderr; the server reports progress itself.
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    os.environ.setdefault("TQDM_DISABLE", "1")


def build_studio(args: argparse.Namespace) -> Studio:
    """Open the store and set up the engine (not yet loading) from parsed arguments. Raises ValueError for a bad
    option and StoreError for a store that cannot be opened."""
    if args.max_queue < 0:
        raise ValueError("--max-queue must be 0 or more")
    if args.max_megapixels <= 0 or args.store_max_gb <= 0 or args.store_max_images < 1:
        raise ValueError("--max-megapixels, --store-max-gb and --store-max-images must be positive")
    dirs = [] if args.no_default_dirs else list(default_allowed_dirs())
    for d in args.allow_dirs:
        if not d.expanduser().is_absolute() or not d.expanduser().is_dir():
            raise ValueError(f"--allow-dir {d}: give an existing folder as an absolute path")
        dirs.append(d.expanduser())
    policy = InputPolicy(allowed_dirs=tuple(dirs), allow_urls=args.allow_urls)
    store = ImageStore(
        args.store if args.store is not None else default_store_dir(),
        max_bytes=int(args.store_max_gb * 2**30),
        max_images=args.store_max_images,
    )
    config = StudioConfig(max_pixels_per_call=int(args.max_megapixels * 1_000_000))
    engine = Engine(generator_factory(args), max_queue=args.max_queue)
    return Studio(engine, store, policy, config)


def transport_security(host: str) -> TransportSecuritySettings:
    """DNS-rebinding protection, always on: requests must name this server in Host, and browsers a local Origin."""
    hosts = ["127.0.0.1:*", "localhost:*", "[::1]:*"]
    origins = ["http://127.0.0.1:*", "http://localhost:*", "http://[::1]:*"]
    if host not in LOOPBACK:
        shown = f"[{host}]" if ":" in host else host
        hosts.append(f"{shown}:*")
        origins += [f"http://{shown}:*", f"https://{shown}:*"]
    return TransportSecuritySettings(
        enable_dns_rebinding_protection=True, allowed_hosts=hosts, allowed_origins=origins
    )


def http_app(mcp: MCPServer[Studio], studio: Studio, host: str) -> Starlette:
    """The streamable HTTP app, with DNS-rebinding protection for `host` and a request body limit in bytes
    that fits the largest inline image the input policy accepts."""
    # Inline data: URIs are base64 (4/3 of the bytes); leave room for them up to the input size limit.
    body = math.ceil(studio.policy.max_bytes * 4 / 3) + 2**20
    return mcp.streamable_http_app(
        host=host, transport_security=transport_security(host), max_request_body_size=body
    )


async def serve_http(mcp: MCPServer[Studio], studio: Studio, host: str, port: int) -> None:
    """Serve `http_app` with uvicorn on `host`:`port` (0: a free port, logged) until cancelled.

    Binds the socket itself so the log shows the real port; warns when `host` is not a loopback address.
    Raises OSError when the address cannot be bound.
    """
    import uvicorn

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    bound = sock.getsockname()[1]
    shown = f"[{host}]" if ":" in host else host
    log.info("serving MCP over streamable HTTP at http://%s:%d/mcp", shown, bound)
    if host not in LOOPBACK:
        log.warning(
            "bound to %s, which is not a loopback address: anyone who can reach it can use the tools", host
        )
    config = uvicorn.Config(http_app(mcp, studio, host), log_config=None, access_log=False, lifespan="on")
    await uvicorn.Server(config).serve(sockets=[sock])


def run_serve(args: argparse.Namespace) -> int:
    """`klein-agent serve`: start loading the model, serve stdio or HTTP until the client goes, then close.

    Returns 2 after logging the reason for a bad option or a store that cannot be opened, else 0.
    """
    configure_logging(args.log_level)
    try:
        studio = build_studio(args)
    except (StoreError, ValueError) as exc:
        log.error("%s", exc)
        return 2
    mcp = build_server(studio)
    studio.engine.start()  # the model loads in the background while the client connects
    log.info(
        "klein-agent serve: model %s, store %s, %s",
        args.model,
        studio.store.root,
        "HTTP" if args.http else "stdio",
    )
    try:
        if args.http:
            anyio.run(serve_http, mcp, studio, args.host, args.port)
        else:
            mcp.run()
    except KeyboardInterrupt:
        pass
    finally:
        log.debug("server loop ended; stopping the engine")
        studio.engine.close(timeout=5)
        studio.store.close()
        log.debug("engine and store closed")
    return 0
