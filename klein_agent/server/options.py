"""The options of `klein-agent serve`: the store, inputs, limits and transport.

Kept apart from `serve` so that building the command line imports no MCP (`klein-agent gallery` and `--help`
start at once); `klein_agent.server.serve.run_serve` runs what they choose.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from klein_agent.option_types import (
    add_shared_store_arguments,
    non_negative_int,
    port_number,
    positive_float,
    positive_int,
    store_option,
)
from klein_agent.replica.handle import GENERATOR_HELP  # no Ray, no torch
from klein_agent.rules import limits

DEFAULT_PORT = 8765


def allowed_dir_options(args: argparse.Namespace) -> list[Path]:
    """The --allow-dir folders, each absolute and existing; raises ValueError naming the option otherwise.
    Filesystem only, so `klein-agent serve` refuses a bad folder before the MCP SDK loads."""
    dirs = []
    for d in args.allow_dirs:
        folder = d.expanduser()
        if not folder.is_absolute():
            raise ValueError(
                f"--allow-dir {d}: give an absolute path (clients start servers in another folder)"
            )
        if folder.exists() and not folder.is_dir():
            raise ValueError(f"--allow-dir {d} is a file, not a folder")
        if not folder.exists():
            raise ValueError(
                f"--allow-dir {d} does not exist: create it (mkdir -p '{folder}') or remove the option, then "
                "restart the client"
            )
        dirs.append(folder)
    return dirs


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the store, input, limit and transport options of `klein-agent serve` to `parser`."""
    store = parser.add_argument_group("image store")
    store.add_argument(
        "--store",
        type=store_option,
        default=None,
        metavar="DIR",
        help="folder of the persistent image store (default: $KLEIN_AGENT_STORE, else the user data folder: "
        "~/.local/share/klein-agent/store on Linux, ~/Library/Application Support/klein-agent/store on macOS, "
        "%%LOCALAPPDATA%%\\klein-agent\\store on Windows); or a shared store, postgresql://… with --blobs (env:NAME reads it from a variable; see "
        "docs/scaling.md)",
    )
    add_shared_store_arguments(store)
    store.add_argument(
        "--store-max-gb",
        type=positive_float,
        default=limits.STORE_MAX_BYTES / 2**30,
        metavar="GB",
        help="evict the least recently used images beyond this many GiB (default: 2)",
    )
    store.add_argument(
        "--store-max-images",
        type=positive_int,
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
    where = parser.add_argument_group("generator")
    where.add_argument("--generator", default="local", metavar="local|ray[:APP]", help=GENERATOR_HELP)
    caps = parser.add_argument_group("limits")
    caps.add_argument(
        "--max-queue",
        type=non_negative_int,
        default=limits.MAX_QUEUE,
        metavar="N",
        help="calls that may wait behind the running one; more are refused at once with 'busy' (default: 8)",
    )
    caps.add_argument(
        "--max-megapixels",
        type=positive_float,
        default=None,
        metavar="MP",
        help="width x height x num_images of one call, in millions of pixels (default: by the model's device, so "
        f"a call stays inside a client's ~60 s timeout: {limits.MAX_PIXELS_PER_CALL / 1e6:.1f} on CUDA, one "
        f"2048x2048 image or four of 1024x1024; {limits.default_max_pixels('mps') / 1e6:.2f} on MPS; "
        f"{limits.default_max_pixels('cpu') / 1e6:.2f} on a CPU, one 512x512 image); lower it on small GPUs",
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
        type=port_number,
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
