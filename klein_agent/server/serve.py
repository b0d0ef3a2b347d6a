"""`klein-agent serve`: the command-line options, logging to stderr, and running over stdio or streamable HTTP.

The CLI (`klein_agent.cli`) adds the model options with `add_model_arguments` and these with
`add_serve_arguments`, then calls `run_serve`.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

import anyio

from klein_agent.model_options import generator_factory
from klein_agent.rules import limits
from klein_agent.server.app import build_server
from klein_agent.server.http import (
    HttpPlan,
    HttpStartError,
    allowed_hosts,
    allowed_origins,
    bind,
    load_tokens,
    serve_http,
)
from klein_agent.server.stdio import serve_stdio
from klein_agent.service.engine import Engine
from klein_agent.service.inputs import InputPolicy, default_allowed_dirs
from klein_agent.service.store import ImageStore, StoreError, default_store_dir
from klein_agent.service.studio import Studio, StudioConfig

log = logging.getLogger("klein_agent.serve")


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
        "clients); clients send 'Authorization: Bearer <token>' ($KLEIN_AGENT_TOKEN, else the token file the log "
        "names, beside the store)",
    )
    transport.add_argument(
        "--host",
        default="127.0.0.1",
        help="HTTP address to bind (default: 127.0.0.1); Host and Origin headers must name this server exactly",
    )
    transport.add_argument(
        "--port",
        type=int,
        default=DEFAULT_PORT,
        help=f"HTTP port (default: {DEFAULT_PORT}; 0 picks a free one)",
    )
    transport.add_argument(
        "--no-auth",
        action="store_true",
        help="no bearer token (loopback addresses only): any local process and any web page could use the tools",
    )
    transport.add_argument(
        "--allowed-host",
        action="append",
        default=[],
        metavar="NAME[:PORT]",
        help="another Host header value to accept, e.g. a DNS name for a LAN bind (repeatable)",
    )
    transport.add_argument(
        "--client-timeout",
        type=float,
        default=30.0,
        metavar="S",
        help="drop an HTTP client whose request headers or body take longer than this (default: 30 s)",
    )
    transport.add_argument(
        "--allow-origin",
        action="append",
        default=[],
        metavar="ORIGIN",
        help="a web page origin (scheme://host:port) that may call the server from a browser (repeatable)",
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


def run_serve(args: argparse.Namespace) -> int:
    """`klein-agent serve`: start loading the model, serve stdio or HTTP until the client goes, then close.

    Returns 2 after logging the reason for a bad option, a port that cannot be bound or a store that cannot be
    opened (for HTTP the port is bound first, so nothing is created when it is taken), else 0.
    """
    configure_logging(args.log_level)
    plan = None
    try:
        if args.http:
            plan = plan_http(args)
        studio = build_studio(args)
    except (StoreError, ValueError, HttpStartError) as exc:
        log.error("%s", exc)
        if plan is not None:
            plan.sock.close()
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
        if plan is not None:
            anyio.run(serve_http, mcp, studio, plan)
        else:
            serve_stdio(mcp)
    except KeyboardInterrupt:
        pass
    finally:
        log.debug("server loop ended; stopping the engine")
        studio.engine.close(timeout=5)
        studio.store.close()
        log.debug("engine and store closed")
    return 0


def plan_http(args: argparse.Namespace) -> HttpPlan:
    """Bind the port and settle the token, hosts and origins for `serve --http`. Raises HttpStartError."""
    sock = bind(args.host, args.port)
    try:
        port = sock.getsockname()[1]
        store_root = (args.store if args.store is not None else default_store_dir()).expanduser().absolute()
        tokens, source = load_tokens(store_root, no_auth=args.no_auth, host=args.host)
        hosts = allowed_hosts(args.host, port, args.allowed_host)
        return HttpPlan(
            sock=sock,
            host=args.host,
            port=port,
            allowed_hosts=hosts,
            allowed_origins=allowed_origins(hosts, args.allow_origin),
            tokens=tokens,
            token_source=source,
            client_timeout_s=args.client_timeout,
        )
    except BaseException:
        sock.close()
        raise
