"""`klein-agent serve`: running over stdio or streamable HTTP (with the gallery at
/gallery).

The CLI (`klein_agent.cli`) adds the model options with `add_model_arguments` and the serve options with
`klein_agent.server.options.add_serve_arguments`, then calls `run_serve`.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable

import anyio

from klein_agent.gallery.app import Gallery
from klein_agent.gallery.command import command_line
from klein_agent.model_options import generator_factory, model_family
from klein_agent.option_types import S3_ENDPOINT_ENV, StoreLocations, shared_blobs, store_locations
from klein_agent.replica.config import replica_option_problem
from klein_agent.replica.handle import parse_generator, ray_generator_factory
from klein_agent.rules.requests import ImageGenerator
from klein_agent.server.app import build_server
from klein_agent.server.http import HttpPlan, serve_http
from klein_agent.server.options import allowed_dir_options
from klein_agent.server.stdio import serve_stdio
from klein_agent.service.engine import Engine
from klein_agent.service.inputs import InputPolicy, default_allowed_dirs
from klein_agent.service.store import StoreError
from klein_agent.service.store.open import open_store
from klein_agent.service.studio import Studio, StudioConfig
from klein_agent.web.listen import (
    HttpStartError,
    allowed_hosts,
    allowed_origins,
    bind,
    load_tokens,
    login_key,
    token_hint,
)

log = logging.getLogger("klein_agent.serve")

STDIO_TTY_NOTE = (
    "klein-agent serve is waiting for an MCP client on stdin. It is meant to be started by one (Claude Desktop, "
    "Claude Code: see docs/server.md), not typed in a terminal; Ctrl-C stops it. To try the model by hand, use "
    "'klein-agent generate'; for a server on the network, 'klein-agent serve --http'."
)


def build_studio(args: argparse.Namespace, where: StoreLocations | None = None) -> Studio:
    """Open the store (in `where`, else where `args.store` says) and set up the engine (not yet loading) from parsed
    arguments. Raises ValueError for a bad option and StoreError for a store that cannot be opened."""
    # --max-queue, --max-megapixels, --store-max-gb and --store-max-images are checked as they are parsed
    # (klein_agent.option_types): one rule for serve and generate
    if parse_generator(args.generator) is not None and (
        problem := replica_option_problem(vars(args), f"--generator {args.generator}")
    ):
        raise ValueError(problem)  # replicas load the model from the deploy options, which cannot name these
    dirs = [] if args.no_default_dirs else list(default_allowed_dirs())
    dirs += allowed_dir_options(args)
    policy = InputPolicy(allowed_dirs=tuple(dirs), allow_urls=args.allow_urls)
    where = where or store_locations(args.store)
    try:
        store = (
            open_store(  # a folder: ImageStore(where.store) as ever; postgresql:// + --blobs: the shared pair
                where.address or where.store,
                shared_blobs(args.blobs, where),
                root=where.store,
                s3_endpoint=args.s3_endpoint,
                max_bytes=int(args.store_max_gb * 2**30),
                max_images=args.store_max_images,
            )
        )
    except StoreError as exc:
        raise StoreError(f"{exc} This is {where.source}.") from exc
    app = parse_generator(args.generator)  # None: the model loads here, as ever; else a Ray Serve application
    config = StudioConfig(
        max_pixels_per_call=None if args.max_megapixels is None else int(args.max_megapixels * 1_000_000),
        device_hint=args.device,  # else the loaded model's device decides the default (limits.default_max_pixels)
        # FLUX 3's reference limit and rules apply while it loads; a Ray replica's model is known once it answers
        family=model_family(args) if app is None else StudioConfig.family,
        upsampler=getattr(args, "prompt_upsampler", None) is not None,
    )
    factory = generator_factory(args, skip_bad_loras=True) if app is None else remote_factory(app, args.model)
    engine = Engine(factory, max_queue=args.max_queue)
    try:
        studio = Studio(engine, store, policy, config)
    except ValueError:  # an allowed folder inside the store
        store.close()
        raise
    holders = [d for d in studio.policy.allowed_dirs if store.root.resolve().is_relative_to(d)]
    if holders:
        log.warning(
            "the store %s lies inside the allowed folder %s: tools will not read or export paths inside the store "
            "(pass stored images by id); use --store elsewhere to silence this",
            store.root,
            holders[0],
        )
    return studio


def remote_factory(app: str, model: str | None) -> Callable[[], ImageGenerator]:
    """The engine's factory for `--generator ray:APP`: connect, and learn the model, its defaults, limits and
    adapters from the application (`RayGenerator.info`, asked of a replica), so this machine needs no weights.
    `model` (an optional --model) must then be the application's, or the load fails saying both."""
    connect = ray_generator_factory(app)

    def load() -> ImageGenerator:
        generator = connect()
        if model is not None and model != generator.info.model:
            raise RuntimeError(
                f"--model {model}: the Ray application {app!r} runs {generator.info.model}; drop --model (a "
                f"front-end uses the application's model) or deploy {model} with klein-agent deploy --app {app}"
            )
        return generator

    return load


def run_serve(args: argparse.Namespace) -> int:
    """`klein-agent serve`: start loading the model, serve stdio or HTTP until the client goes, then close.

    Returns 2 after logging the reason for a bad option, a port that cannot be bound or a store that cannot be
    opened (for HTTP the port is bound first, so nothing is created when it is taken), else 0.
    """
    plan = None
    where = store_locations(args.store)  # the store, its token file and thumbnails: chosen once, passed in
    try:
        if args.http:
            plan = plan_http(args, where)
        studio = build_studio(args, where)
    except (StoreError, ValueError, HttpStartError) as exc:
        log.error("%s", exc)
        if plan is not None:
            plan.sock.close()
        return 2
    mcp = build_server(studio, gallery_command(args, where))
    gallery = None
    if plan is not None:
        try:
            shared = None
            if where.address is not None:  # the gallery reads the shared store through its own read-only pair
                blobs = shared_blobs(args.blobs, where)
                shared = open_store(
                    where.address, blobs, root=where.store, s3_endpoint=args.s3_endpoint, read_only=True
                )
            gallery = Gallery(studio.store.root, thumbs=where.thumbs, store=shared)
        except StoreError as exc:
            log.error("%s", exc)
            plan.sock.close()
            studio.store.close()
            return 2
        plan.extra_routes.append(("/gallery", gallery.app))
    studio.engine.start()  # the model loads in the background while the client connects
    log.info(
        "klein-agent serve: model %s, store %s, %s",
        args.model if args.generator == "local" else f"of the Ray application ({args.generator})",
        studio.store.root
        if where.address is None
        else studio.store.catalog.location,  # location: no password
        "HTTP" if args.http else "stdio",
    )
    try:
        if plan is not None:
            anyio.run(serve_http, mcp, studio, plan)
        else:
            if sys.stdin.isatty():  # typed by hand: say what it waits for (stderr: stdout is the MCP wire)
                print(STDIO_TTY_NOTE, file=sys.stderr, flush=True)
            # the engine stops while the loop runs: a notification in flight is dropped, not failed at exit
            serve_stdio(mcp, before_exit=lambda: studio.engine.aclose(timeout=5))
    except KeyboardInterrupt:
        pass
    finally:
        log.debug("server loop ended; stopping the engine")
        studio.engine.close(timeout=5)
        if gallery is not None:
            gallery.close()
        studio.store.close()
        log.debug("engine and store closed")
    return 0


def gallery_command(args: argparse.Namespace, where: StoreLocations) -> str:
    """The `klein-agent gallery` command for the store this server opened: its folder, or a shared store's
    options as given (`--blobs` and the endpoint as the store resolved them), without secrets."""
    blobs = shared_blobs(args.blobs, where)
    endpoint = args.s3_endpoint or os.environ.get(S3_ENDPOINT_ENV, "").strip() or None
    return command_line(where, blobs, endpoint if blobs else None)


def plan_http(args: argparse.Namespace, where: StoreLocations) -> HttpPlan:
    """Bind the port and settle the token (from `where.token_file`), hosts, origins and the gallery's one-time
    login key for `serve --http`. Raises HttpStartError."""
    sock = bind(args.host, args.port)
    try:
        port = sock.getsockname()[1]
        tokens, source = load_tokens(where.token_file, no_auth=args.no_auth, host=args.host)
        hosts = allowed_hosts(args.host, port, args.allowed_host)
        return HttpPlan(
            sock=sock,
            host=args.host,
            port=port,
            allowed_hosts=hosts,
            allowed_origins=allowed_origins(hosts, args.allow_origin),
            tokens=tokens,
            token_source=source,
            token_hint=token_hint(where.token_file),
            login_key=login_key() if tokens else None,  # the gallery's one-time browser link, logged at start
            client_timeout_s=args.client_timeout,
        )
    except BaseException:
        sock.close()
        raise
