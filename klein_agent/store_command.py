"""`klein-agent store copy SRC DST`: move a whole image store between the embedded form (a folder: SQLite + PNG
files) and the shared one (PostgreSQL + S3), either way, verified by counts and SHA-256 digests.

    klein-agent store copy ~/.local/share/klein-agent/store env:KLEIN_DSN --blobs s3://klein/images
    klein-agent store copy env:KLEIN_DSN ./store-backup --blobs s3://klein/images

SRC and DST are folders, postgresql:// URLs or `env:NAME` (the address read from the variable NAME, so a password
is not on the command line). The shared side's blobs come from --blobs (or --src-blobs / --dst-blobs when both
sides are shared), else $KLEIN_AGENT_BLOBS; S3 keys from AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, the endpoint
from --s3-endpoint or $AWS_ENDPOINT_URL. The source is opened read-only (a server may keep running on it); what the
copy does and checks is in service/store/copy.py. Exit 0: copied and verified; 1: the verification found
differences (listed on stderr); 2: a store could not be opened or written (the message says which and why).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
from pathlib import Path

from klein_agent.option_types import BLOBS_ENV, positive_float, positive_int, store_address
from klein_agent.rules import limits

log = logging.getLogger("klein_agent.store")


def add_store_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the `copy` subcommand (SRC, DST, the blob and quota options) to `parser`, the `store` command's."""
    actions = parser.add_subparsers(dest="store_action", metavar="ACTION", required=True)
    copy = actions.add_parser(
        "copy",
        help="copy every image (ids, recipes, lineage, leases, bytes) from SRC to DST and verify",
        description=__doc__.split("\n\n")[0],
    )
    copy.add_argument(
        "source", type=store_address, metavar="SRC", help="a folder, postgresql://… or env:NAME"
    )
    copy.add_argument(
        "destination", type=store_address, metavar="DST", help="a folder, postgresql://… or env:NAME"
    )
    copy.add_argument(
        "--blobs", metavar="s3://BUCKET/PREFIX", help="the blobs of the side that is PostgreSQL"
    )
    copy.add_argument(
        "--src-blobs", metavar="s3://BUCKET/PREFIX", help="the source's blobs (both sides shared)"
    )
    copy.add_argument("--dst-blobs", metavar="s3://BUCKET/PREFIX", help="the destination's blobs")
    copy.add_argument(
        "--s3-endpoint", metavar="URL", help="an S3-compatible server (default: $AWS_ENDPOINT_URL)"
    )
    copy.add_argument(
        "--max-images",
        type=positive_int,
        default=limits.STORE_MAX_IMAGES,
        help="the destination's image quota; the copy refuses to start if the source would not fit (default: "
        f"{limits.STORE_MAX_IMAGES})",
    )
    copy.add_argument(
        "--max-gb",
        type=positive_float,
        default=limits.STORE_MAX_BYTES / 2**30,
        metavar="GB",
        help=f"the destination's quota in GiB (default: {limits.STORE_MAX_BYTES / 2**30:g})",
    )
    copy.set_defaults(run=run_store)


def blobs_for(args: argparse.Namespace) -> tuple[str | None, str | None]:
    """(source blobs, destination blobs) from the options: each shared side gets its own option, else --blobs,
    else $KLEIN_AGENT_BLOBS; a folder side gets None. Raises ValueError when one URL would serve both sides."""
    from klein_agent.service.store.open import is_shared

    shared = (is_shared(args.source), is_shared(args.destination))
    common = args.blobs or os.environ.get(BLOBS_ENV, "").strip() or None
    if all(shared) and not (args.src_blobs and args.dst_blobs):
        raise ValueError(
            "both SRC and DST are PostgreSQL stores: give each its own blobs with --src-blobs and --dst-blobs"
        )
    src = (args.src_blobs or common) if shared[0] else None
    dst = (args.dst_blobs or common) if shared[1] else None
    for side, given, url in (("SRC", args.src_blobs, src), ("DST", args.dst_blobs, dst)):
        if given and url is None:
            raise ValueError(f"--{side.lower()}-blobs is for a PostgreSQL {side}; {side} is a folder")
    return src, dst


def run_store(args: argparse.Namespace) -> int:
    """Run `store copy`; returns the exit status (0 verified, 1 differences, 2 a store error)."""
    from klein_agent.service.store import StoreError
    from klein_agent.service.store.copy import copy_store
    from klein_agent.service.store.open import open_store

    try:
        src_blobs, dst_blobs = blobs_for(args)
    except ValueError as e:
        print(f"klein-agent store copy: error: {e}", file=sys.stderr)
        return 2
    bounds = {"max_images": args.max_images, "max_bytes": int(args.max_gb * 2**30)}
    with tempfile.TemporaryDirectory(prefix="klein-copy-") as scratch:
        source = destination = None
        try:
            source = open_store(
                args.source,
                src_blobs,
                root=Path(scratch) / "src",
                s3_endpoint=args.s3_endpoint,
                read_only=True,
            )
            destination = open_store(
                args.destination,
                dst_blobs,
                root=Path(scratch) / "dst",
                s3_endpoint=args.s3_endpoint,
                **bounds,
            )
            report = copy_store(source, destination)
        except StoreError as e:
            print(f"klein-agent store copy: error: {e}", file=sys.stderr)
            return 2
        finally:
            for store in (destination, source):
                if store is not None:
                    store.close()
    print(
        f"copied {report.copied} images, {report.skipped} already there, {report.leases} lease rows, "
        f"{report.verdicts} verdicts; "
        f"source: {report.source_count} images, {report.source_bytes} bytes"
    )
    if report.problems:
        for problem in report.problems:
            print(f"klein-agent store copy: {problem}", file=sys.stderr)
        print(f"klein-agent store copy: {len(report.problems)} difference(s) found; the copy is incomplete")
        return 1
    print(
        f"verified: {report.source_count} ids in the destination, fields, verdicts and SHA-256 of every PNG equal"
    )
    return 0
