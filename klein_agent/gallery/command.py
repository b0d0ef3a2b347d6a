"""`klein-agent gallery`: the gallery alone, beside a running server or after it, without loading a model.

The same guard as `serve --http` stands in front (exact Host and Origin, the bearer token of the store's token file
or $KLEIN_AGENT_TOKEN), and a one-time login link printed at start lets a browser in (it sets a session cookie that
only the gallery's pages accept). Building the parser imports nothing heavy; `run_gallery` imports the web stack.
"""

from __future__ import annotations

import argparse
import logging
import shlex
from urllib.parse import urlsplit

from klein_agent.option_types import (
    StoreLocations,
    add_shared_store_arguments,
    port_number,
    store_option,
)

log = logging.getLogger("klein_agent.gallery")

DEFAULT_PORT = 8766  # serve --http's is 8765
PREFIX = "/gallery"


def command_line(where: StoreLocations, blobs: str | None = None, s3_endpoint: str | None = None) -> str:
    """The shell command that opens the gallery of the store `where` names in the default browser. A folder store
    is named by its path; a shared one by its options (`--store`, `--blobs`, `--s3-endpoint`, as `serve` opened
    it) without any secret: `env:NAME` stays as given, a DSN's password is left out (libpq then reads
    PGPASSWORD or ~/.pgpass), an endpoint's user information too; S3 keys never were options."""
    if where.address is None:
        return shlex.join(["klein-agent", "gallery", "--store", str(where.store), "--open"])
    from klein_agent.service.store.dsn import without_password  # no driver import: a plain install has it

    words = ["klein-agent", "gallery", "--store", where.spelled or without_password(where.address)]
    if blobs:
        words += ["--blobs", blobs]
    if s3_endpoint:
        parts = urlsplit(s3_endpoint)
        words += ["--s3-endpoint", parts._replace(netloc=parts.netloc.rpartition("@")[2]).geturl()]
    return shlex.join([*words, "--open"])


def add_gallery_arguments(parser: argparse.ArgumentParser) -> None:
    """Add --store, --host, --port and --open to `parser`."""
    parser.add_argument(
        "--store",
        type=store_option,
        default=None,
        metavar="DIR",
        help="the image store to show, as `klein-agent serve` uses it (default: $KLEIN_AGENT_STORE, else the user "
        "data folder); or a shared store, postgresql://… with --blobs",
    )
    add_shared_store_arguments(parser)
    parser.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to bind (default: 127.0.0.1); Host and Origin headers must name this server exactly",
    )
    parser.add_argument(
        "--port",
        type=port_number,
        default=DEFAULT_PORT,
        help=f"port (default: {DEFAULT_PORT}; 0 picks a free one)",
    )
    parser.add_argument(
        "--open",
        action="store_true",
        help="open the page in the default web browser (this uses up the one-time login link)",
    )


def run_gallery(args: argparse.Namespace) -> int:
    """Serve the gallery of `--store` until Ctrl-C. Returns 2 after logging why for a port that cannot be bound
    (nothing else is done first), a missing or unreadable store, or a bad token; else 0."""
    import webbrowser

    import anyio
    from starlette.applications import Starlette
    from starlette.responses import RedirectResponse
    from starlette.routing import Mount, Route

    from klein_agent.gallery.app import Gallery
    from klein_agent.option_types import shared_blobs, store_locations
    from klein_agent.service.store import StoreError
    from klein_agent.service.store.open import open_store
    from klein_agent.web.guard import GuardSettings, HttpGuard
    from klein_agent.web.listen import (
        COOKIE_NAME,
        LOGIN_PATH,
        HttpStartError,
        allowed_hosts,
        allowed_origins,
        bearer_line,
        bind,
        host_port,
        load_tokens,
        login_key,
        serve_app,
        token_hint,
    )

    where = store_locations(args.store)
    root = where.store
    try:
        sock = bind(args.host, args.port)
    except HttpStartError as exc:
        log.error("%s", exc)
        return 2
    gallery = None
    try:
        shared = None
        if where.address is not None:
            blobs = shared_blobs(args.blobs, where)
            shared = open_store(where.address, blobs, root=root, s3_endpoint=args.s3_endpoint, read_only=True)
        gallery = Gallery(root, thumbs=where.thumbs, store=shared)
        tokens, source = load_tokens(where.token_file, no_auth=False, host=args.host)
    except (StoreError, HttpStartError) as exc:
        log.error("%s", exc)
        sock.close()
        if gallery is not None:
            gallery.close()
        return 2
    port = sock.getsockname()[1]
    hosts = allowed_hosts(args.host, port, [])
    key = login_key()
    settings = GuardSettings(
        allowed_hosts=hosts,
        allowed_origins=allowed_origins(hosts, []),
        tokens=tokens,
        cookie_name=COOKIE_NAME,
        cookie_paths=("/",),  # every route here is the read-only gallery (or redirects to it)
        login_path=LOGIN_PATH,
        login_key=key,
        login_redirect=PREFIX + "/",
        token_hint=token_hint(where.token_file),
    )

    async def home(request: object) -> RedirectResponse:
        return RedirectResponse(PREFIX + "/")

    app = HttpGuard(Starlette(routes=[Route("/", home), Mount(PREFIX, app=gallery.app)]), settings)
    url = f"http://{host_port(args.host, port)}"
    link = f"{url}{LOGIN_PATH}?key={key}"

    def started() -> None:
        log.info("gallery of the store %s at %s%s/", root, url, PREFIX)
        log.info("to see it in a browser, open %s (works once)", link)
        log.info("%s", bearer_line(source))  # the file this gallery created or read, as serve --http says it
        if args.open and not webbrowser.open(link):
            log.warning(
                "--open: no web browser could be started here (a machine without a display?); open %s in a "
                "browser on this machine, or forward the port (ssh -L %d:127.0.0.1:%d) and open it there",
                link,
                port,
                port,
            )

    try:
        anyio.run(lambda: serve_app(app, sock, header_timeout_s=10.0, on_started=started))
    except KeyboardInterrupt:
        pass
    finally:
        gallery.close()
    return 0
