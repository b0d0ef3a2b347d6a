"""What the store hands out and checks, whatever its backends: ids, records, errors, and the checks on a PNG,
a recipe and a parent list before anything is written. No I/O here."""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import secrets
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from klein_agent.rules.image_refs import ID_PREFIX, is_image_id
from klein_agent.service.error_text import describe

log = logging.getLogger("klein_agent.service.store")

# The key a damaged recipe is read with (`read_recipe`): its value says what is wrong.
UNREADABLE_RECIPE = "unreadable"
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
MAX_PARENTS = 256
MAX_RECIPE_BYTES = 256 * 1024


class StoreError(Exception):
    """Base class of every error the store raises on purpose; the message says what to do next."""


class UnknownImageError(StoreError, LookupError):
    """An id that is malformed or absent. One message for both, so the store is no existence oracle."""

    def __init__(self, image_id: object) -> None:
        self.image_id = image_id
        text = image_id if isinstance(image_id, str) else repr(image_id)
        shown = text if len(text) <= 40 else text[:40] + "..."
        super().__init__(f"Unknown image id {shown!r}. Call list_images to see the ids in the store.")


class StoreFullError(StoreError):
    """The image cannot fit in the quota: it is larger than the quota, or leased images fill it."""


def leased_full_message(max_images: int, max_bytes: int) -> str:
    """The StoreFullError text when leased images alone break a bound: one text for every catalog."""
    return (
        f"The store is full: the images in use by running calls fill the quota ({max_images} "
        f"images, {max_bytes} bytes), so nothing can be evicted to make room. Retry when those "
        "calls finish, or raise the store quota."
    )


class StoreWriteError(StoreError):
    """An I/O error (disk full, permissions) while saving; the store is left as it was before the call."""


class CallStoredError(StoreError):
    """`Catalog.insert` found a row with the same call key (a retried call stored it first): nothing was
    committed; `image_id` is the stored row's."""

    def __init__(self, call_key: str, image_id: str) -> None:
        self.call_key, self.image_id = call_key, image_id
        super().__init__(f"picture {call_key!r} of this call is stored already, as {image_id}")


@dataclass(frozen=True)
class StoredImage:
    """One image's record in the store: its id, size in px, PNG size in bytes, lineage, recipe and blob key."""

    image_id: str
    width: int
    height: int
    size_bytes: int
    created_at: float  # unix time
    session: str | None
    parents: tuple[str, ...]  # in the order given to put(); a parent may have been evicted since
    recipe: dict[str, Any]  # as given to put(), after a JSON round trip (tuples come back as lists)
    blob_key: str  # where the blob store keeps the PNG (`blob_key`): derived from the id alone


@dataclass(frozen=True)
class NewImage:
    """A row about to be inserted: its blob is written already (blob first, row second)."""

    image_id: str
    width: int
    height: int
    size_bytes: int
    session: str | None
    parents: tuple[str, ...]
    recipe_json: str
    content_key: str | None = None
    # a picture of a keyed call (`rules.calls.picture_keys`): unique in both catalogs, so a retry stores it once
    call_id: str | None = None
    created_at: float | None = None  # Unix time; None: now (a copy between stores keeps the original time)


@dataclass(frozen=True)
class StoreStats:
    """What the store holds (images, bytes) against its bounds, and where it lives."""

    count: int
    total_bytes: int
    max_bytes: int
    max_images: int
    root: Path


@dataclass(frozen=True)
class SessionSummary:
    """One session label (None: images stored without one), its image count, and when its first and last images
    were stored (unix time)."""

    session: str | None
    count: int
    first_at: float
    last_at: float


@dataclass(frozen=True)
class VerdictRecord:
    """One verdict on an image as the catalog keeps it: `verdict` is "pick", "reject" or "note", `reason` the
    checked text (`rules.verdicts.check_verdict`; "" for none), `at` when it was recorded (Unix time, the
    catalog's clock)."""

    image_id: str
    verdict: str
    reason: str
    at: float


@dataclass(frozen=True)
class Verdicts:
    """What is shown of one image's verdicts: its standing (the latest "pick" or "reject" record; None when there
    is none) and its newest notes, newest first."""

    standing: VerdictRecord | None
    notes: tuple[VerdictRecord, ...]

    @classmethod
    def of(cls, newest_first: Sequence[VerdictRecord], notes: int) -> Verdicts:
        """One image's verdicts from its records, newest first: the latest pick or reject stands, and at most
        `notes` of the newest notes are shown. The one reading every catalog gives its rows."""
        return cls(
            standing=next((r for r in newest_first if r.verdict != "note"), None),
            notes=tuple(r for r in newest_first if r.verdict == "note")[: max(0, notes)],
        )


@dataclass(frozen=True)
class LeaseRow:
    """One lease as the catalog keeps it: `holder` protects `image_id` until `expires_at` (Unix time)."""

    image_id: str
    holder: str
    expires_at: float


def new_image_id() -> str:
    """A fresh opaque id: 128 random bits, so ids can be neither guessed nor enumerated."""
    return ID_PREFIX + secrets.token_urlsafe(16)  # 16 bytes: the 22 characters `IMAGE_ID_PATTERN` asks for


def is_valid_id(image_id: object) -> bool:
    """The strict shape check that runs before any catalog or blob use of an id (`rules.image_refs`)."""
    return is_image_id(image_id)


def blob_key(image_id: str) -> str:
    """The blob key of a (validated) id: sha256 hex + ".png". Hashed, because case-insensitive file systems (macOS,
    Windows) would merge base64 ids that differ only in case; hex has one case, no leading '-' and no '/'."""
    if not is_valid_id(image_id):
        raise UnknownImageError(image_id)
    return hashlib.sha256(image_id.encode("ascii")).hexdigest() + ".png"


def folder_problem(root: Path, error: OSError) -> str:
    """Why the folder `root` cannot be made or used, in words a user can act on."""
    for part in (root, *root.parents):
        if part.exists() or part.is_symlink():
            if not part.is_dir():
                return f"{part} is a file, not a folder"
            break
    if error.errno == errno.EROFS:
        return "it is on a read-only file system"
    if error.errno in (errno.EACCES, errno.EPERM):
        return f"no permission to write there ({error.strerror})"
    if error.errno == errno.ENOSPC:
        return "the disk is full"
    return error.strerror or str(error)


def write_error_message(exc: BaseException, where: object, *, full: bool | None = None) -> str:
    """The StoreWriteError text for `exc` while saving in `where`; `full` (disk or quota full) is read from an
    OSError's errno when not given."""
    if full is None:
        codes = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}
        full = isinstance(exc, OSError) and exc.errno in codes
    reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc) or type(exc).__name__
    hint = "Free disk space or lower the store quota." if full else "Check that the folder is writable."
    return f"Could not save the image in {where}: {reason}. The store is unchanged. {hint}"


def check_png(png: bytes, width: int, height: int) -> bytes:
    """Bytes in, bytes out: no decoding here, just enough of the header to catch a mix-up of arguments.
    Raises TypeError or ValueError."""
    if not isinstance(png, (bytes, bytearray, memoryview)):
        raise TypeError(f"png must be bytes, got {type(png).__name__}")
    for name, value in (("width", width), ("height", height)):
        if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= 2**31 - 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    data = bytes(png)
    if len(data) < 33 or data[:8] != _PNG_SIGNATURE or data[12:16] != b"IHDR":
        raise ValueError("png is not a PNG file (bad signature or header)")
    header_size = struct.unpack(">II", data[16:24])
    if header_size != (width, height):
        raise ValueError(
            f"width x height {width}x{height} do not match the PNG's {header_size[0]}x{header_size[1]}"
        )
    return data


def check_parents(parents: Sequence[str]) -> tuple[str, ...]:
    """A parent list as put() takes it: a sequence of well-formed ids, at most MAX_PARENTS. Raises TypeError,
    ValueError, or UnknownImageError for a malformed id."""
    if isinstance(parents, str):
        raise TypeError("parents must be a sequence of image ids, not one id string")
    parent_ids = tuple(parents)
    if len(parent_ids) > MAX_PARENTS:
        raise ValueError(f"at most {MAX_PARENTS} parents, got {len(parent_ids)}")
    for parent in parent_ids:
        if not is_valid_id(parent):
            raise UnknownImageError(parent)
    return parent_ids


def recipe_json(recipe: dict[str, Any]) -> str:
    """The recipe as the catalog keeps it (JSON, at most MAX_RECIPE_BYTES). Raises ValueError."""
    if not isinstance(recipe, dict):
        raise ValueError(f"recipe must be a dict, got {type(recipe).__name__}")
    try:
        text = json.dumps(recipe, allow_nan=False, ensure_ascii=True)
    except (TypeError, ValueError, RecursionError) as e:
        raise ValueError(
            f"recipe must be JSON-serialisable (str keys; str, number, bool, None, list, dict): {e}"
        ) from e
    if len(text) > MAX_RECIPE_BYTES:
        raise ValueError(f"recipe is {len(text)} bytes as JSON; the limit is {MAX_RECIPE_BYTES}")
    return text


_JSON_KINDS = {list: "a list", str: "a string", int: "a number", float: "a number", bool: "true or false"}
_JSON_KINDS[type(None)] = "null"


def read_recipe(image_id: str, text: object) -> dict[str, Any]:
    """A row's recipe; a damaged one (not a JSON object: edited by hand, a disk error) is logged and read as
    `{"tool": "unknown", UNREADABLE_RECIPE: why}`, so one bad row never breaks a listing of all the others."""
    try:
        recipe = json.loads(text) if isinstance(text, (str, bytes)) else None
    except (ValueError, RecursionError) as exc:
        why = f"the stored recipe is not valid JSON ({describe(exc)[:80]})"
    else:
        if isinstance(recipe, dict):
            return recipe
        why = f"the stored recipe is {_JSON_KINDS.get(type(recipe), 'not readable')}, not a JSON object"
    log.warning("image %s: %s; it is listed with its recipe marked unreadable", image_id, why)
    return {"tool": "unknown", UNREADABLE_RECIPE: why}


def read_parents(image_id: str, text: object) -> tuple[str, ...]:
    """A row's parent ids; a damaged list is logged and read as no parents (as `read_recipe`)."""
    try:
        parents = json.loads(text) if isinstance(text, (str, bytes)) else None
    except (ValueError, RecursionError):
        parents = None
    if isinstance(parents, list) and all(isinstance(p, str) for p in parents):
        return tuple(parents)
    log.warning("image %s: the stored parent list is damaged; it is listed without parents", image_id)
    return ()
