"""What the commands' parsers share: argparse types for numbers (ports, positive limits: a bad value is an instant
usage error, exit 2, that names the option, before anything heavy is imported), and where `--store` puts the store,
its token file and its thumbnails (`store_locations`)."""

from __future__ import annotations

import argparse
import math
import os
from dataclasses import dataclass
from pathlib import Path

import platformdirs


def _parse(text: str, cast: type[int] | type[float], kind: str) -> float:
    try:
        value = cast(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {kind}, got {text!r}") from None
    if math.isnan(value) or math.isinf(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text}")
    return value


def _at_least(
    text: str, cast: type[int] | type[float], kind: str, low: float, above: bool, why: str
) -> float:
    value = _parse(text, cast, kind)
    if value < low or (above and value == low):
        raise argparse.ArgumentTypeError(f"{why}, got {text.strip()}")
    return value


def port_number(text: str) -> int:
    """A TCP port, 0 to 65535 (0 lets the system pick a free one)."""
    value = int(_parse(text, int, "a port number"))
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"must be from 0 to 65535 (0 picks a free port), got {value}")
    return value


def positive_float(text: str) -> float:
    """A finite number above 0 (--max-megapixels, --store-max-gb)."""
    return float(_at_least(text, float, "a number", 0, True, "must be positive"))


def non_negative_gib(text: str) -> float:
    """A finite number of GiB, 0 or more (--reference-kv-cache-gib)."""
    return float(
        _at_least(text, float, "a number of GiB", 0, False, "expected a finite number of GiB of at least 0")
    )


def positive_int(text: str) -> int:
    """A whole number of at least 1 (--store-max-images, --num-images)."""
    return int(_at_least(text, int, "a whole number", 1, False, "must be positive"))


def non_negative_int(text: str) -> int:
    """A whole number of at least 0 (--max-queue)."""
    return int(_at_least(text, int, "a whole number", 0, False, "must be 0 or more"))


# ---- where the store and its neighbours live -----------------------------------------------------------------
# The one place that chooses folders: the commands compute these once from --store and pass them in; the store,
# the gallery's thumbnails and the token file take the paths they are given.

STORE_ENV = "KLEIN_AGENT_STORE"
THUMBS_DIR = "thumbs"
SHARED_DIR = "shared"  # a shared store's local neighbours (thumbnails, token file) in the user data folder


@dataclass(frozen=True)
class StoreLocations:
    """Where `--store` (or its default) puts things: the store folder, the HTTP token file (beside the folder:
    `<parent>/<name>.http-token`) and the gallery's thumbnail folder (`<store>/thumbs`, which the store's sweep
    never looks in). `source` says which setting chose the folder, for messages. For a shared store, `address` is
    its URL (`--store postgresql://…`) and `store` the local folder of its neighbours (`SHARED_DIR`)."""

    store: Path
    token_file: Path
    thumbs: Path
    source: str
    address: str | None = None
    # How a command shown to a person names the shared store: `env:NAME` when the address came from a variable
    # (kept as given, so no secret is spelt out), else None (the address is shown without its password).
    spelled: str | None = None


def default_store_dir() -> Path:
    """$KLEIN_AGENT_STORE, else the user data folder + klein-agent/store (never a temp dir: images must survive
    reboots and tmp cleaners), as `platformdirs` names it: $XDG_DATA_HOME or ~/.local/share on Linux,
    ~/Library/Application Support on macOS, %LOCALAPPDATA% on Windows."""
    env = os.environ.get(STORE_ENV, "").strip()
    if env:
        return Path(env).expanduser().absolute()
    return Path(platformdirs.user_data_dir("klein-agent", appauthor=False)) / "store"


def store_source(given: Path | str | None) -> str:
    """Which setting chose the store folder, for messages: `--store DIR`, `$KLEIN_AGENT_STORE`, or the default
    (with the two ways to choose another)."""
    if given is not None:
        return "the folder given with --store: pass another --store DIR"
    if os.environ.get(STORE_ENV, "").strip():
        return f"the folder ${STORE_ENV} names: set it to another folder, or pass --store DIR"
    return f"the default folder: choose another with --store DIR or ${STORE_ENV}"


def store_locations(given: Path | str | None) -> StoreLocations:
    """The locations for `--store` = `given` (None: the default), as absolute paths. A URL (`store_option` keeps
    it a str; $KLEIN_AGENT_STORE may hold one too) is a shared store: its token file and thumbnails live in the
    user data folder's `shared` folder."""
    if given is None and "://" in os.environ.get(STORE_ENV, ""):
        given = FromVariable(os.environ[STORE_ENV].strip(), STORE_ENV)
    if isinstance(given, str) and "://" in given:
        local = Path(platformdirs.user_data_dir("klein-agent", appauthor=False)) / SHARED_DIR
        source = "the shared store given with --store or $" + STORE_ENV
        spelled = f"{ENV_PREFIX}{given.variable}" if isinstance(given, FromVariable) else None
        return StoreLocations(
            local, local.parent / f"{SHARED_DIR}.http-token", local / THUMBS_DIR, source, str(given), spelled
        )
    store = (Path(given) if given is not None else default_store_dir()).expanduser().absolute()
    return StoreLocations(
        store=store,
        token_file=store.parent / f"{store.name}.http-token",
        thumbs=store / THUMBS_DIR,
        source=store_source(given),
    )


# ---- stores named by address: a folder, or a shared PostgreSQL catalog ----------------------------------------
# A DSN carries a password, and a command line is visible to every user of the machine (`ps`): `env:NAME` reads
# the address from the variable NAME instead (KLEIN_AGENT_STORE may hold a DSN too).

ENV_PREFIX = "env:"
BLOBS_ENV = "KLEIN_AGENT_BLOBS"
S3_ENDPOINT_ENV = "AWS_ENDPOINT_URL"


class FromVariable(str):
    """A store address read from an environment variable (`env:NAME`): the value, remembering the variable's
    name, so what is shown to a person can say `env:NAME` instead of the DSN it holds."""

    variable: str

    def __new__(cls, value: str, variable: str) -> FromVariable:
        """`value`, the variable's content, remembering `variable`, its name."""
        text = super().__new__(cls, value)
        text.variable = variable
        return text


def store_option(text: str) -> Path | str:
    """`--store` of serve and gallery: a folder (a Path, as before), or a URL kept as text (`postgresql://…`;
    `open_store` says what it accepts), or `env:NAME` for either."""
    value = store_address(text)
    return value if "://" in value else Path(value)


def store_address(text: str) -> str:
    """A store as given on the command line: a folder, a postgresql:// URL, or `env:NAME` (the variable's value).
    Raises ArgumentTypeError naming the variable when it is unset (its value is never shown)."""
    if text.startswith(ENV_PREFIX):
        name = text[len(ENV_PREFIX) :]
        value = os.environ.get(name, "").strip()
        if not name or not value:
            raise argparse.ArgumentTypeError(
                f"{text}: the environment variable {name or '(no name)'} is not set; export it with the store's "
                "folder or postgresql:// URL"
            )
        return FromVariable(value, name)
    if not text.strip():
        raise argparse.ArgumentTypeError("expected a folder or a postgresql:// URL, got an empty string")
    return text.strip()


def add_shared_store_arguments(parser: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    """--blobs and --s3-endpoint, for a shared --store (serve and gallery alike)."""
    parser.add_argument(
        "--blobs",
        default=None,
        metavar="s3://BUCKET/PREFIX",
        help=f"where a postgresql:// store keeps its PNGs (default: ${BLOBS_ENV}); keys from AWS_ACCESS_KEY_ID and "
        "AWS_SECRET_ACCESS_KEY",
    )
    parser.add_argument(
        "--s3-endpoint",
        default=None,
        metavar="URL",
        help=f"an S3-compatible server for --blobs (default: ${S3_ENDPOINT_ENV}, else AWS)",
    )


def shared_blobs(given: str | None, where: StoreLocations) -> str | None:
    """The --blobs a store opens with: the option, else $KLEIN_AGENT_BLOBS for a shared store (None for a folder
    store, so a stray variable cannot change the embedded default)."""
    if given is not None:
        return given
    return (os.environ.get(BLOBS_ENV, "").strip() or None) if where.address else None
