"""Turn an image argument from a tool call into a safe RGB image, or explain what to do instead.

An argument is one of: a stored image id (`img_…` or `image://img_…`), an absolute local path or `file://` URI
inside a server-configured folder, a `data:image/…;base64,…` URI (or bare base64 of a PNG/JPEG/WebP), or an
`http(s)://` URL when the server was started with URL inputs on.

Every failure raises `ImageInputError` whose message says what was wrong *and* how to fix it: the calling agent
reads it and must be able to correct itself without a human.

Security rules (see docs/style-and-security.md B1-B3):
- paths are compared after `os.path.realpath`, by path component (`Path.is_relative_to`), never by string prefix,
  so `/data/store_evil` is not inside `/data/store` and a symlink inside an allowed folder cannot lead out of it;
- only PNG, JPEG and WebP reach Pillow's decoders: the format is sniffed from the magic bytes first, and
  `Image.open(..., formats=...)` keeps every other plugin (EPS → Ghostscript, TIFF, …) out;
- the pixel count is read from the file header and checked before Pillow builds an image object, so a
  decompression bomb costs a few bytes of parsing, never an allocation;
- sizes are capped before work is done: base64 length before decoding, file size before reading, URL bodies
  while streaming;
- URLs (off by default) are fetched only from public addresses, with the vetted IP pinned for the connection
  (no second DNS lookup to rebind) and without following redirects.

This module imports neither torch nor mcp: the server layer and its tests use it on machines without either.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import http.client
import io
import ipaddress
import logging
import math
import os
import re
import socket
import ssl
import stat
import struct
import sys
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

log = logging.getLogger(__name__)

# The flags named in error messages. The CLI owns them; keep these strings in step with it.
ALLOW_URLS_FLAG = "--allow-urls"
INPUT_DIR_FLAG = "--allow-dir"

ALLOWED_FORMATS = ("PNG", "JPEG", "WEBP")
MIN_SIDE = 64  # FLUX.2 reference-image rules (BFL sampling.py cap_min_pixels): shorter side >= 64 px ...
MAX_ASPECT = 8.0  # ... and long/short side <= 8
MAX_ARG_CHARS = 4096  # for everything but data: URIs and bare base64; PATH_MAX on Linux
_ATTACHMENT_HINT = (
    "If the user attached the image in the chat, it is not on this machine's disk: ask the user for a local "
    "path, or pass the image as a data:image/png;base64,... URI."
)

# Server-minted handles are opaque; this only has to keep path and URL syntax out of the store lookup.
# ASCII-only on purpose: `\w` would admit Unicode look-alikes.
_IMAGE_ID_RE = re.compile(r"img_[A-Za-z0-9_-]{1,100}")
_WINDOWS_DRIVE_RE = re.compile(r"[A-Za-z]:[\\/]")
_B64_BODY_RE = re.compile(rb"[A-Za-z0-9+/]*={0,2}")
# Bare base64 (no data: prefix) is recognised by the encoded magic bytes of the three allowed formats.
_BARE_B64_PREFIXES = ("iVBORw0KGgo", "/9j/", "UklGR")
_DATA_MIME = {"image/png": "PNG", "image/jpeg": "JPEG", "image/jpg": "JPEG", "image/webp": "WEBP"}
_URL_CHUNK = 64 * 1024

Source = Literal["image_id", "path", "data_uri", "url"]


class ImageInputError(ValueError):
    """An image argument that cannot be used. The message says why and how to fix it."""


# --------------------------------------------------------------------------------------------------- policy


@dataclass(frozen=True)
class InputPolicy:
    """Where images may come from. One instance per server, built from the command line."""

    allowed_dirs: tuple[Path, ...]  # resolved (realpath) at construction
    allow_urls: bool = False
    allow_private_hosts: bool = False  # tests only: lets a URL reach 127.0.0.1 and other non-public addresses
    max_bytes: int = 32 * 1024**2  # encoded size: file, decoded data: URI, or URL body
    max_pixels: int = 64 * 1024**2  # width x height from the header, checked before decoding
    url_timeout_s: float = 15.0  # whole fetch: connect, headers and body together

    def __post_init__(self) -> None:
        if self.max_bytes <= 0 or self.max_pixels <= 0 or self.url_timeout_s <= 0:
            raise ValueError("max_bytes, max_pixels and url_timeout_s must be positive")
        given: object = self.allowed_dirs
        # One folder passed bare (a str would otherwise be iterated character by character).
        dirs = (given,) if isinstance(given, (str, os.PathLike)) else tuple(self.allowed_dirs)
        resolved: list[Path] = []
        for d in dirs:
            p = Path(os.path.realpath(os.path.expanduser(os.fspath(d))))
            if p not in resolved:
                resolved.append(p)
        # frozen dataclass: the only way to normalise a field is to bypass __setattr__ once, here.
        object.__setattr__(self, "allowed_dirs", tuple(resolved))

    def _dirs_text(self) -> str:
        if not self.allowed_dirs:
            return "(none configured)"
        return ", ".join(str(d) for d in self.allowed_dirs)


def default_allowed_dirs() -> tuple[Path, ...]:
    """The current working directory plus ~/Pictures, ~/Downloads and ~/Desktop, where they exist.

    The working directory is left out when it is a filesystem root or the home directory itself: MCP clients
    such as Claude Desktop start servers with cwd `/`, and allowing all of it would make the allowlist
    meaningless. Users add folders with `--allow-dir`.
    """
    home = Path.home()
    dirs: list[Path] = []
    try:
        cwd = Path(os.path.realpath(os.getcwd()))
    except OSError:  # the working directory was deleted under us
        cwd = None
    if cwd is not None and cwd != Path(cwd.anchor) and cwd != Path(os.path.realpath(home)):
        dirs.append(cwd)
    for name in ("Pictures", "Downloads", "Desktop"):
        p = home / name
        if p.is_dir():
            dirs.append(Path(os.path.realpath(p)))
    return tuple(dict.fromkeys(dirs))


@dataclass(frozen=True)
class LoadedImage:
    image: Image.Image  # RGB, EXIF orientation applied, fully loaded (no open file behind it)
    source: Source
    image_id: str | None  # set when it came from the store
    description: str  # short, for summaries: "img_…", "cat.png (JPEG, 800x600)", "data: URI (PNG, 512x512)"


# --------------------------------------------------------------------------------------------- entry point


def load_image_argument(arg: str, policy: InputPolicy, lookup: Callable[[str], bytes]) -> LoadedImage:
    """Resolve one tool argument to an RGB image.

    `lookup(image_id)` returns the stored PNG bytes and raises `LookupError` with an actionable message when
    the id is unknown; that message is passed on unchanged. Other exceptions from `lookup` (a broken store)
    are server faults and propagate.
    """
    if not isinstance(arg, str):
        raise ImageInputError(f"image argument must be a string, got {type(arg).__name__}")
    arg = arg.strip()  # agents often add a trailing newline; no legitimate id, URI or path relies on it
    if not arg:
        raise ImageInputError(
            "empty image argument: pass an image id (img_...), an absolute file path, or a data: URI"
        )
    # Inline image data first, and without scanning or copying the string: a 200 MB argument must be
    # refused on its length alone. (The base64 check rejects NUL and every other stray character.)
    lower = arg[:16].lower()
    if lower.startswith("data:"):
        return _load_data_uri(arg, policy)
    if _looks_like_bare_base64(arg):
        return _load_base64(arg, 0, policy, what="base64 data")
    if "\x00" in arg:
        raise ImageInputError("image argument contains a NUL character: pass a plain image id, path or URI")
    if len(arg) > MAX_ARG_CHARS:
        raise ImageInputError(
            f"image argument is {len(arg)} characters long, over the {MAX_ARG_CHARS} limit for ids, paths "
            "and URLs: pass an image id, a shorter path, or the image itself as a data: URI"
        )
    if arg.startswith("img_"):
        return _load_id(arg, policy, lookup)
    if lower.startswith("image://"):
        return _load_id(_id_from_image_uri(arg), policy, lookup)
    if lower.startswith(("http://", "https://")):
        return _load_url(arg, policy)
    if lower.startswith("file:"):
        path = _path_from_file_uri(arg)
        return _load_path(path, policy)
    scheme = re.match(r"([A-Za-z][A-Za-z0-9+.-]*):", arg)
    if scheme and not _WINDOWS_DRIVE_RE.match(arg):
        raise ImageInputError(
            f"unsupported URI scheme {scheme.group(1)!r}: pass an image id (img_...), an absolute file path, "
            "a file:// URI, a data:image/png;base64,... URI, or an http(s) URL"
        )
    return _load_path(arg, policy)


# --------------------------------------------------------------------------------------------------- ids


def _id_from_image_uri(arg: str) -> str:
    rest = arg[len("image://") :]
    if rest.endswith("/meta") and _IMAGE_ID_RE.fullmatch(rest[: -len("/meta")]):
        image_id = rest[: -len("/meta")]
        raise ImageInputError(
            f"{_show(arg)} is the metadata resource, not an image: pass image://{image_id} or {image_id}"
        )
    if not _IMAGE_ID_RE.fullmatch(rest):
        raise ImageInputError(
            f"{_show(arg)} is not a valid image URI: use image://img_... with the id from a previous result "
            "(list_images shows the stored ids)"
        )
    return rest


def _load_id(image_id: str, policy: InputPolicy, lookup: Callable[[str], bytes]) -> LoadedImage:
    if not _IMAGE_ID_RE.fullmatch(image_id):
        raise ImageInputError(
            f"{_show(image_id)} is not a valid image id: ids look like img_ followed by letters, digits, '-' "
            "or '_' (copy one from a previous result or list_images); if it is a file, give its absolute path"
        )
    try:
        data = lookup(image_id)
    except LookupError as e:
        # KeyError's str() adds quotes; the store's message is the first argument.
        msg = e.args[0] if e.args and isinstance(e.args[0], str) else str(e)
        raise ImageInputError(msg) from None
    # Our own store, so the bytes are trusted; the same checks cost next to nothing.
    image, _fmt = _decode(data, max_pixels=policy.max_pixels)
    return LoadedImage(image=image, source="image_id", image_id=image_id, description=image_id)


# --------------------------------------------------------------------------------------------------- paths


def _path_from_file_uri(uri: str) -> str:
    parts = urllib.parse.urlsplit(uri)
    if parts.netloc not in ("", "localhost"):
        raise ImageInputError(
            f"{_show(uri)} names another machine ({parts.netloc!r}); only local files are read: use "
            "file:///absolute/path or a plain absolute path"
        )
    if parts.query or parts.fragment:
        raise ImageInputError(f"{_show(uri)} has a query or fragment; a file:// URI must name a file only")
    # url2pathname percent-decodes (so %2e%2e becomes .. and is refused below) and maps /C:/x to C:\x on Windows.
    path = urllib.request.url2pathname(parts.path)
    if "\x00" in path:
        raise ImageInputError("file URI decodes to a path with a NUL character: pass a plain absolute path")
    return path


_QUOTE_PAIRS = {'"': '"', "'": "'", "\u201c": "\u201d", "\u2018": "\u2019", "`": "`"}


def check_not_quoted(path: str, what: str = "path") -> None:
    """Refuse a path whose quotes became part of it (`'"/tmp/a.png"'`): no real file name starts and ends so."""
    if len(path) >= 2 and _QUOTE_PAIRS.get(path[0]) == path[-1]:
        raise ImageInputError(
            f"{what} {_show(path)} is wrapped in quotes, which became part of the name: pass it without the "
            f"quotes ({_show(path[1:-1])})"
        )


def _check_path_syntax(path: str, what: str) -> str:
    """Reject what must never reach the filesystem; return the path with a leading ~ expanded."""
    if not path:
        raise ImageInputError(f"empty {what}: give an absolute path")
    check_not_quoted(path, what)
    if "\x00" in path:
        raise ImageInputError(f"{what} contains a NUL character: give a plain absolute path")
    if len(path) > MAX_ARG_CHARS:
        raise ImageInputError(f"{what} is over {MAX_ARG_CHARS} characters: give a shorter absolute path")
    # UNC and device paths (\\server\share, \\?\C:\, //host/x): opening them on Windows contacts another
    # machine (and may send the user's credentials); there is no local use for them here.
    if path.startswith(("\\\\", "//")):
        raise ImageInputError(
            f"{_show(path)}: network (UNC) and device paths are not accepted: copy the file to a local folder "
            "and give its absolute path"
        )
    if path == "~" or path.startswith(("~/", "~" + os.sep)):
        path = os.path.expanduser(path)
    if any(part == ".." for part in re.split(r"[\\/]", path)):
        raise ImageInputError(f"{_show(path)} contains '..': give the absolute path without '..' segments")
    if not os.path.isabs(path):
        if os.name != "nt" and _WINDOWS_DRIVE_RE.match(path):
            raise ImageInputError(
                f"{_show(path)} is a Windows path, but this server runs on {sys.platform}: give an absolute "
                "path on the server's machine"
            )
        raise ImageInputError(
            f"{_show(path)} is a relative path: give an absolute path (the server's working directory is not "
            "the user's)"
        )
    return path


def _inside(resolved: Path, policy: InputPolicy) -> bool:
    # Component-wise containment on realpath'd paths: immune to sibling-prefix names and symlink escapes.
    return any(resolved.is_relative_to(d) for d in policy.allowed_dirs)


def _outside_error(path: str, policy: InputPolicy) -> ImageInputError:
    return ImageInputError(
        f"{_show(path)} is outside the folders this server may read ({policy._dirs_text()}): move or copy the "
        f"image into one of them, or ask the user to allow its folder with {INPUT_DIR_FLAG}. "
        + _ATTACHMENT_HINT
    )


def _load_path(path: str, policy: InputPolicy) -> LoadedImage:
    path = _check_path_syntax(path, "path")
    try:
        resolved = Path(os.path.realpath(path))
    except (OSError, ValueError) as e:
        raise ImageInputError(
            f"cannot resolve {_show(path)} ({e.__class__.__name__}): check the path"
        ) from None
    # Containment first, existence second: a "not found" for paths outside the allowed folders would let a
    # caller probe which files exist on the machine.
    if not _inside(resolved, policy):
        raise _outside_error(path, policy)
    data = _read_file(resolved, path, policy.max_bytes)
    return _path_image(data, resolved, policy.max_pixels)


def read_image_file(path: str, *, max_bytes: int, max_pixels: int) -> LoadedImage:
    """A picture the user names on the command line: any file they can read (no folder policy), decoded by the
    same untrusted-input decoder the server uses, so a file gives the same pixels from the CLI and the server.

    Relative paths and `~` are allowed. Raises ImageInputError with what to do, as the server's messages do.
    """
    check_not_quoted(path)
    if "\x00" in path:
        raise ImageInputError("path contains a NUL character")
    try:
        resolved = Path(os.path.realpath(os.path.expanduser(path)))
    except (OSError, ValueError) as e:
        raise ImageInputError(
            f"cannot resolve {_show(path)} ({e.__class__.__name__}): check the path"
        ) from None
    return _path_image(_read_file(resolved, path, max_bytes, hint=False), resolved, max_pixels)


def _path_image(data: bytes, resolved: Path, max_pixels: int) -> LoadedImage:
    image, fmt = _decode(data, max_pixels=max_pixels)
    name = _ellipsize(resolved.name, 60)
    return LoadedImage(
        image=image, source="path", image_id=None, description=f"{name} ({fmt}, {image.width}x{image.height})"
    )


def _read_file(resolved: Path, shown: str, max_bytes: int, *, hint: bool = True) -> bytes:
    try:
        st = os.stat(resolved)
    except FileNotFoundError:
        extra = f" {_ATTACHMENT_HINT}" if hint else ""
        raise ImageInputError(f"{_show(shown)} does not exist on this machine.{extra}") from None
    except OSError as e:
        raise ImageInputError(f"cannot access {_show(shown)}: {e.strerror or e}; check the path") from None
    if stat.S_ISDIR(st.st_mode):
        raise ImageInputError(f"{_show(shown)} is a folder: give the path of an image file inside it")
    if not stat.S_ISREG(st.st_mode):  # FIFOs and devices: opening one could block or never end
        raise ImageInputError(
            f"{_show(shown)} is not a regular file: give the path of a PNG, JPEG or WebP file"
        )
    if st.st_size > max_bytes:
        raise _too_big_error(shown, st.st_size, max_bytes)
    # O_NOFOLLOW: `resolved` has no symlinks, so one appearing here was swapped in after the check (TOCTOU).
    # O_NONBLOCK: harmless on regular files, and keeps a swapped-in FIFO from blocking the open.
    flags = (
        os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0)
    )
    try:
        fd = os.open(resolved, flags)
    except OSError as e:
        raise ImageInputError(f"cannot open {_show(shown)}: {e.strerror or e}; check the path") from None
    with os.fdopen(fd, "rb") as f:
        fst = os.fstat(f.fileno())
        if not stat.S_ISREG(fst.st_mode):
            raise ImageInputError(f"{_show(shown)} is not a regular file: give the path of an image file")
        data = f.read(max_bytes + 1)  # +1: a file that grew since stat() is caught, not truncated
    if len(data) > max_bytes:
        raise _too_big_error(shown, len(data), max_bytes)
    return data


def check_output_path(path: str, policy: InputPolicy, *, default_name: str | None = None) -> Path:
    """Validate an export target and return the resolved path to write.

    The path must be absolute, its parent folder must exist and lie inside the allowed folders after resolving
    symlinks, and the target must not be a symlink or a folder. `.png` is added when the name has no image
    suffix; another image suffix (.jpg, .webp, …) is refused because export writes PNG. If `path` names an
    existing folder and `default_name` is given, the file `default_name` inside it is the target.

    An existing regular file is returned as is: whether to overwrite is the caller's decision. Write with a
    temporary file and `os.replace` (which replaces a symlink planted later instead of following it).
    """
    if not isinstance(path, str):
        raise ImageInputError(f"export path must be a string, got {type(path).__name__}")
    path = path.strip()
    if path[:5].lower() == "file:":
        path = _path_from_file_uri(path)
    path = _check_path_syntax(path, "export path")
    if default_name is not None and os.path.isdir(path):
        path = os.path.join(path, default_name)
    parent_text, name = os.path.split(path)
    if not name or name in (".", ".."):
        raise ImageInputError(
            f"{_show(path)} names no file: give a path ending in a file name such as out.png"
        )
    suffix = os.path.splitext(name)[1].lower()
    if suffix in (".jpg", ".jpeg", ".webp", ".gif", ".bmp", ".tif", ".tiff", ".avif", ".heic"):
        raise ImageInputError(f"{_show(path)}: export writes PNG files; end the file name with .png")
    if suffix != ".png":
        name += ".png"
    try:
        parent = Path(os.path.realpath(parent_text))
    except (OSError, ValueError) as e:
        raise ImageInputError(f"cannot resolve {_show(parent_text)} ({e.__class__.__name__})") from None
    if not any(parent.is_relative_to(d) for d in policy.allowed_dirs):
        raise ImageInputError(
            f"{_show(path)} is outside the folders this server may write ({policy._dirs_text()}): choose a "
            f"path inside one of them, or ask the user to allow the folder with {INPUT_DIR_FLAG}"
        )
    if not parent.is_dir():
        raise ImageInputError(
            f"folder {_show(parent_text)} does not exist: create it first or pick another one"
        )
    target = parent / name
    try:
        st = os.lstat(target)
    except FileNotFoundError:
        return target
    except OSError as e:
        raise ImageInputError(f"cannot access {_show(str(target))}: {e.strerror or e}") from None
    if stat.S_ISLNK(st.st_mode):
        raise ImageInputError(f"{_show(str(target))} is a symbolic link: choose a different file name")
    if not stat.S_ISREG(st.st_mode):
        raise ImageInputError(f"{_show(str(target))} exists and is not a regular file: choose another name")
    return target


# ----------------------------------------------------------------------------------------------- data URIs


def _looks_like_bare_base64(arg: str) -> bool:
    return len(arg) >= 64 and arg.startswith(_BARE_B64_PREFIXES)


def _load_data_uri(arg: str, policy: InputPolicy) -> LoadedImage:
    comma = arg.find(",", 0, 256)
    if comma < 0:
        raise ImageInputError(
            "malformed data: URI (no comma after the header): use data:image/png;base64,<base64 of the file>"
        )
    header = arg[5:comma].strip().lower()
    params = [p.strip() for p in header.split(";")]
    mime = params[0]
    if mime not in _DATA_MIME:
        raise ImageInputError(
            f"data: URI declares {mime or 'no type'!r}; only image/png, image/jpeg and image/webp are accepted: "
            "convert the image to PNG, JPEG or WebP first"
        )
    if "base64" not in params[1:]:
        raise ImageInputError(
            "data: URI must be base64-encoded: use data:image/png;base64,<base64 of the file>"
        )
    # A declared MIME that disagrees with the bytes is not rejected: the bytes are sniffed and decoded under
    # the same allowlist, and the label carries no risk. The description reports what was found.
    return _load_base64(arg, comma + 1, policy, what="data: URI")


def _load_base64(arg: str, start: int, policy: InputPolicy, *, what: str) -> LoadedImage:
    """Decode `arg[start:]`; `start` instead of a slice so an oversized payload is never copied."""
    data = _b64decode_capped(arg, start, policy.max_bytes, what)
    image, fmt = _decode(data, max_pixels=policy.max_pixels)
    return LoadedImage(
        image=image,
        source="data_uri",
        image_id=None,
        description=f"{what} ({fmt}, {image.width}x{image.height})",
    )


def _b64decode_capped(arg: str, start: int, max_bytes: int, what: str) -> bytes:
    max_b64 = 4 * math.ceil(max_bytes / 3)
    # Checked on the raw length first (with slack for line breaks), so a 200 MB argument is refused in O(1).
    raw_len = len(arg) - start
    if raw_len > max_b64 + max_b64 // 32 + 1024:
        raise _too_big_error(what, raw_len * 3 // 4, max_bytes)
    compact = re.sub(r"\s+", "", arg[start:])  # MIME-style line wrapping is common in what agents paste
    if len(compact) > max_b64:
        raise _too_big_error(what, len(compact) * 3 // 4, max_bytes)
    raw = compact.encode("ascii", "replace")
    if "-" in compact or "_" in compact:  # tolerate URL-safe base64
        raw = raw.translate(bytes.maketrans(b"-_", b"+/"))
    if not _B64_BODY_RE.fullmatch(raw) or len(raw) % 4 == 1:
        raise ImageInputError(
            f"{what} is not valid base64 (characters outside A-Z a-z 0-9 + / =, or a bad length): encode the "
            "file bytes with standard base64"
        )
    raw += b"=" * (-len(raw) % 4)  # restore stripped padding
    try:
        data = base64.b64decode(raw, validate=True)
    except (binascii.Error, ValueError):
        raise ImageInputError(
            f"{what} is not valid base64: encode the file bytes with standard base64"
        ) from None
    if len(data) > max_bytes:
        raise _too_big_error(what, len(data), max_bytes)
    return data


# ----------------------------------------------------------------------------------------------------- URLs


def _load_url(url: str, policy: InputPolicy) -> LoadedImage:
    if not policy.allow_urls:
        raise ImageInputError(
            f"URL inputs are turned off on this server (the user can enable them by starting klein-agent with "
            f"{ALLOW_URLS_FLAG}). Instead, download the image and pass its absolute path inside "
            f"{policy._dirs_text()}, or pass it as a data:image/png;base64,... URI."
        )
    data, host, name = _fetch_url(url, policy)
    image, fmt = _decode(data, max_pixels=policy.max_pixels)
    where = _ellipsize(host + (f"/{name}" if name else ""), 60)
    return LoadedImage(
        image=image,
        source="url",
        image_id=None,
        description=f"URL {where} ({fmt}, {image.width}x{image.height})",
    )


def _is_public_address(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:  # ::ffff:127.0.0.1 reaches 127.0.0.1
            return _is_public_address(ip.ipv4_mapped)
        if ip in _NAT64:  # 64:ff9b::a00:1 reaches 10.0.0.1 through a NAT64 gateway
            return _is_public_address(ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF))
    return not (
        ip.is_private
        or ip.is_loopback
        or ip.is_link_local  # includes 169.254.169.254, the cloud metadata endpoint
        or ip.is_reserved
        or ip.is_multicast
        or ip.is_unspecified
        or not ip.is_global  # also catches 100.64.0.0/10 (carrier-grade NAT) and documentation ranges
    )


_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")


def _resolve_checked(host: str, port: int, policy: InputPolicy) -> list[str]:
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError, OSError) as e:
        raise ImageInputError(f"cannot resolve host {host!r} ({e}): check the URL") from None
    addresses = list(dict.fromkeys(str(info[4][0]) for info in infos))
    if not addresses:
        raise ImageInputError(f"host {host!r} has no addresses: check the URL")
    if policy.allow_private_hosts:
        return addresses
    for a in addresses:  # every address: a host with one public and one private record must not pass
        try:
            ip = ipaddress.ip_address(a.split("%", 1)[0])
        except ValueError:
            ip = None
        if ip is None or not _is_public_address(ip):
            raise ImageInputError(
                f"refusing to fetch from {host!r}: it resolves to {a}, a private, loopback, link-local or "
                "reserved address. Only public internet addresses are fetched; download the image yourself and "
                "pass a local path or a data: URI"
            )
    return addresses


class _PinnedHTTPConnection(http.client.HTTPConnection):
    """Connects to an address checked in advance instead of resolving the host name a second time.

    A second resolution could answer differently (DNS rebinding) and land on a private address after the
    check passed. The Host header still carries the name. http.client ignores proxy environment variables,
    which is what we want: a proxy would connect to a host we did not check.
    """

    def __init__(self, host: str, port: int, *, address: str, timeout: float) -> None:
        super().__init__(host, port, timeout=timeout)
        self._address = address

    def connect(self) -> None:
        self.sock = socket.create_connection((self._address, self.port), self.timeout)


class _PinnedHTTPSConnection(http.client.HTTPSConnection):
    def __init__(self, host: str, port: int, *, address: str, timeout: float) -> None:
        self._tls = ssl.create_default_context()
        super().__init__(host, port, timeout=timeout, context=self._tls)
        self._address = address

    def connect(self) -> None:
        sock = socket.create_connection((self._address, self.port), self.timeout)
        # The certificate is checked against the host *name*, as for an ordinary connection.
        self.sock = self._tls.wrap_socket(sock, server_hostname=self.host)


def _shutdown_socket(conn: http.client.HTTPConnection) -> None:
    sock = conn.sock
    if sock is not None:
        with contextlib.suppress(OSError):  # already closed: the fetch finished in the meantime
            sock.shutdown(socket.SHUT_RDWR)


def _fetch_url(url: str, policy: InputPolicy) -> tuple[bytes, str, str]:
    """GET `url` under the policy's checks; return (body, host, last path segment)."""
    try:
        parts = urllib.parse.urlsplit(url)
        port = parts.port
    except ValueError as e:
        raise ImageInputError(f"malformed URL {_show(url)} ({e}): check it") from None
    scheme = parts.scheme.lower()
    host = parts.hostname or ""
    if scheme not in ("http", "https") or not host:
        raise ImageInputError(f"malformed URL {_show(url)}: use http://host/path or https://host/path")
    if parts.username is not None or parts.password is not None:
        raise ImageInputError("URL contains a user name or password: remove the credentials from the URL")
    if any(c in url for c in "\r\n\t ") or any(ord(c) < 32 for c in url):
        raise ImageInputError("URL contains whitespace or control characters: percent-encode them")
    port = port or (443 if scheme == "https" else 80)
    addresses = _resolve_checked(host, port, policy)

    deadline = time.monotonic() + policy.url_timeout_s
    conn_cls = _PinnedHTTPSConnection if scheme == "https" else _PinnedHTTPConnection
    conn = conn_cls(host, port, address=addresses[0], timeout=policy.url_timeout_s)
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    # Socket timeouts bound each recv, not the whole exchange: a server dripping one byte per second would
    # never trip them. The watchdog shuts the socket down at the deadline, which wakes any blocked read.
    watchdog = threading.Timer(policy.url_timeout_s, _shutdown_socket, args=(conn,))
    watchdog.daemon = True
    chunks: list[bytes] = []
    try:
        conn.connect()
        watchdog.start()
        conn.request(
            "GET",
            target,
            headers={"User-Agent": "klein-agent", "Accept": "image/png, image/jpeg, image/webp"},
        )
        resp = conn.getresponse()
        if 300 <= resp.status < 400:
            location = resp.getheader("Location") or "?"
            # Not followed: the new target would need the same address checks, and the agent can simply pass it.
            raise ImageInputError(
                f"the URL redirects (HTTP {resp.status}) to {_show(location)}; redirects are not followed: pass "
                "the final URL directly"
            )
        if resp.status != 200:
            raise ImageInputError(f"the server answered HTTP {resp.status} {resp.reason}: check the URL")
        length = resp.getheader("Content-Length")
        if length is not None and length.strip().isdigit() and int(length) > policy.max_bytes:
            raise _too_big_error("the URL's image", int(length), policy.max_bytes)
        total = 0
        while True:
            chunk = resp.read1(_URL_CHUNK)  # read1: whatever has arrived, so the deadline is checked often
            if time.monotonic() >= deadline:
                raise TimeoutError
            if not chunk:
                break
            total += len(chunk)
            if total > policy.max_bytes:
                raise _too_big_error("the URL's image", total, policy.max_bytes)
            chunks.append(chunk)
    except ImageInputError:
        raise
    except (OSError, http.client.HTTPException, ValueError) as e:
        if isinstance(e, TimeoutError) or time.monotonic() >= deadline:
            raise ImageInputError(
                f"fetching the URL took longer than {policy.url_timeout_s:g} s: download the image yourself and "
                "pass a local path or a data: URI"
            ) from None
        raise ImageInputError(
            f"could not fetch the URL ({e.__class__.__name__}: {e}): check it, or pass a local path or data: URI"
        ) from None
    finally:
        watchdog.cancel()
        conn.close()
    name = urllib.parse.unquote(parts.path.rsplit("/", 1)[-1])
    return b"".join(chunks), host, name


# -------------------------------------------------------------------------------------------------- decoding


def decode_image_bytes(data: bytes, *, max_pixels: int) -> Image.Image:
    """Decode untrusted PNG/JPEG/WebP bytes into a loaded RGB image, or raise ImageInputError.

    Checks, in order: format from the magic bytes (nothing else reaches Pillow); pixel count from the header
    against min(max_pixels, Pillow's MAX_IMAGE_PIXELS); Pillow's lazy open restricted to the three formats;
    side >= 64 px and aspect <= 8; then decoding, EXIF orientation and conversion to RGB (alpha composited on
    white, palette, CMYK and 16-bit handled). Any decoder failure becomes ImageInputError.
    """
    return _decode(data, max_pixels=max_pixels)[0]


def _decode(data: bytes, *, max_pixels: int) -> tuple[Image.Image, str]:
    if not data:
        raise ImageInputError("the image is empty (0 bytes): pass a PNG, JPEG or WebP file")
    kind = _sniff_format(data)
    if kind not in ALLOWED_FORMATS:
        if kind is None:
            raise ImageInputError(
                "the data is not a PNG, JPEG or WebP image (unrecognised signature): pass one of those formats"
            )
        raise ImageInputError(f"unsupported format {kind}; use PNG, JPEG or WebP (convert the image first)")

    # Honour a stricter global Pillow limit if the host application set one, and stay at or under Pillow's
    # warning threshold so its DecompressionBombWarning cannot fire for anything we let through.
    limit = max_pixels
    pil_limit = Image.MAX_IMAGE_PIXELS
    if pil_limit:
        limit = min(limit, pil_limit)
    size = _header_size(data, kind)
    if size is not None:
        _check_geometry(*size, limit)

    try:
        img = Image.open(io.BytesIO(data), formats=list(ALLOWED_FORMATS))
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        # Reached only when our header parser could not read the size (then Pillow's own check fires). The
        # warning arrives as an exception when a warnings filter escalates it (pytest does, for example).
        raise ImageInputError(
            "the image header declares more pixels than Pillow allows (decompression bomb guard): downscale it"
        ) from None
    except UnidentifiedImageError:
        raise ImageInputError(
            f"the {kind} data is corrupt or truncated (its header cannot be read): re-export or re-encode it"
        ) from None
    except Exception as e:
        # Untrusted-input boundary: any parser failure is the input's fault, not the server's.
        raise _corrupt_error(kind, e) from None

    fmt = "JPEG" if img.format == "MPO" else (img.format or kind)  # MPO: multi-picture JPEG from cameras
    try:
        if fmt not in ALLOWED_FORMATS:
            raise ImageInputError(
                f"unsupported format {fmt}; use PNG, JPEG or WebP (convert the image first)"
            )
        _check_geometry(img.width, img.height, limit)
        try:
            img.load()
            rgb = _to_rgb(_apply_orientation(img))
        except ImageInputError:
            raise
        except Exception as e:  # see above: truncated streams, bad CRCs, decoder errors, MemoryError, ...
            raise _corrupt_error(fmt, e) from None
    finally:
        img.close()
    return rgb, fmt


def _corrupt_error(fmt: str, e: BaseException) -> ImageInputError:
    detail = _ellipsize(f"{e.__class__.__name__}: {e}", 120)
    return ImageInputError(
        f"the {fmt} image is truncated or corrupt ({detail}): re-export it as PNG, JPEG or WebP and try again"
    )


def _check_geometry(width: int, height: int, max_pixels: int) -> None:
    if width <= 0 or height <= 0:
        raise ImageInputError(
            f"the image header declares an empty size {width}x{height}: the file is corrupt"
        )
    pixels = width * height
    if pixels > max_pixels:
        raise ImageInputError(
            f"the image is {width}x{height} ({pixels / 1e6:.1f} Mpx), over the {max_pixels / 1e6:.1f} Mpx limit: "
            "downscale it (for example to 2048 px on the long edge) and try again"
        )
    if min(width, height) < MIN_SIDE:
        raise ImageInputError(
            f"the image is {width}x{height}; both sides must be at least {MIN_SIDE} px: upscale or pad it"
        )
    aspect = max(width, height) / min(width, height)
    if aspect > MAX_ASPECT:
        raise ImageInputError(
            f"the image is {width}x{height}, aspect ratio {aspect:.1f}:1; at most {MAX_ASPECT:g}:1 is supported: "
            "crop or pad it"
        )


def _apply_orientation(img: Image.Image) -> Image.Image:
    try:
        out = ImageOps.exif_transpose(img)
    except Exception as e:  # a broken EXIF block must not cost the user an otherwise good image
        log.debug("ignoring unreadable EXIF orientation: %s", e)
        return img
    return img if out is None else out


def _to_rgb(img: Image.Image) -> Image.Image:
    """Any decoded mode -> RGB: transparency (alpha, palette or tRNS colour key) composited on white, 16-bit
    grey scaled to 8 bits (v / 257, rounded) rather than clipped, palette/grey/CMYK converted."""
    mode = img.mode
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        values = np.asarray(img.convert("I"), dtype=np.int64)
        grey = Image.fromarray(np.clip(np.rint(values / 257), 0, 255).astype(np.uint8), "L")
        key = img.info.get("transparency")
        if isinstance(key, int):
            opaque = Image.fromarray(np.where(values == key, 0, 255).astype(np.uint8), "L")
            return Image.composite(grey, Image.new("L", grey.size, 255), opaque).convert("RGB")
        return grey.convert("RGB")
    if mode == "F":
        return img.point(lambda v: v * 255).convert("L").convert("RGB")
    # alpha channels, palette transparency and tRNS colour keys (greyscale or truecolour) alike become white
    has_alpha = mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info
    if has_alpha:
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    if mode == "RGB":
        return img.copy()  # detach from the source file object and its metadata
    return img.convert("RGB")  # L, 1, P, CMYK, YCbCr


# ------------------------------------------------------------------------------------------- header sniffing


def _sniff_format(data: bytes) -> str | None:
    """Name the format from magic bytes. Used to keep non-allowed formats away from Pillow entirely, and to
    tell the user what they sent."""
    head = data[:32]
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "PNG"
    if head.startswith(b"\xff\xd8\xff"):
        return "JPEG"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "WEBP"
    if head.startswith((b"GIF87a", b"GIF89a")):
        return "GIF"
    if head.startswith((b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")):
        return "TIFF"
    if head.startswith((b"%!PS", b"\xc5\xd0\xd3\xc6")):
        return "EPS"
    if head.startswith(b"%PDF"):
        return "PDF"
    if head.startswith((b"\x00\x00\x00\x0cjP  \r\n\x87\n", b"\xff\x4f\xff\x51")):
        return "JPEG2000"
    if head[4:8] == b"ftyp":
        return "AVIF" if head[8:12] in (b"avif", b"avis") else "HEIC"
    if head.startswith(b"8BPS"):
        return "PSD"
    if head.startswith(b"qoif"):
        return "QOI"
    if head.startswith(b"DDS "):
        return "DDS"
    if head.startswith(b"\x76\x2f\x31\x01"):
        return "OpenEXR"
    if head.startswith(b"\x00\x00\x01\x00"):
        return "ICO"
    if head.startswith(b"\x00\x00\x02\x00"):
        return "CUR"
    if head.startswith(b"BM"):
        return "BMP"
    if head[:4] == b"RIFF":
        return "RIFF (not WebP)"
    text = data[:1024].lstrip().lower()
    if text.startswith((b"<svg", b"<?xml", b"<!doctype svg")) and b"<svg" in text:
        return "SVG"
    if text.startswith((b"<!doctype html", b"<html")):
        return "HTML"
    if len(head) >= 2 and head[0] == ord("P") and head[1] in b"1234567":
        return "PNM"
    return None


def _header_size(data: bytes, kind: str) -> tuple[int, int] | None:
    """Width and height from the header, or None when the header cannot be read (Pillow then decides)."""
    try:
        if kind == "PNG":
            if data[12:16] != b"IHDR" or len(data) < 24:
                return None
            w, h = struct.unpack(">II", data[16:24])
            return w, h
        if kind == "WEBP":
            return _webp_size(data)
        if kind == "JPEG":
            return _jpeg_size(data)
    except struct.error:
        return None
    return None


def _webp_size(data: bytes) -> tuple[int, int] | None:
    chunk = data[12:16]
    if chunk == b"VP8X" and len(data) >= 30:
        w = int.from_bytes(data[24:27], "little") + 1
        h = int.from_bytes(data[27:30], "little") + 1
        return w, h
    if chunk == b"VP8L" and len(data) >= 25 and data[20] == 0x2F:
        bits = int.from_bytes(data[21:25], "little")
        return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
    if chunk == b"VP8 " and len(data) >= 30 and data[23:26] == b"\x9d\x01\x2a":
        w, h = struct.unpack("<HH", data[26:30])
        return w & 0x3FFF, h & 0x3FFF
    return None


_JPEG_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}


def _jpeg_size(data: bytes) -> tuple[int, int] | None:
    i, n = 2, len(data)
    while i + 4 <= n:
        if data[i] != 0xFF:
            return None
        while i < n and data[i] == 0xFF:  # fill bytes
            i += 1
        if i >= n:
            return None
        marker = data[i]
        i += 1
        if marker == 0x01 or 0xD0 <= marker <= 0xD8:  # markers without a length field
            continue
        if marker in (0xD9, 0xDA):  # end of image / start of scan before any frame header
            return None
        if i + 2 > n:
            return None
        (length,) = struct.unpack(">H", data[i : i + 2])
        if length < 2:
            return None
        if marker in _JPEG_SOF:
            if i + 7 > n:
                return None
            h, w = struct.unpack(">HH", data[i + 3 : i + 7])
            return w, h
        i += length
    return None


# ----------------------------------------------------------------------------------------------------- misc


def _too_big_error(what: str, size: int, cap: int) -> ImageInputError:
    return ImageInputError(
        f"{_show(what) if what.startswith(('/', '~')) else what} is {size / 2**20:.1f} MiB, over the "
        f"{cap / 2**20:.1f} MiB limit: downscale or re-encode it (JPEG or WebP are smaller) and try again"
    )


def _ellipsize(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _show(text: str) -> str:
    """Quote user text for an error message: bounded length, control characters escaped."""
    return repr(_ellipsize(text, 120))
