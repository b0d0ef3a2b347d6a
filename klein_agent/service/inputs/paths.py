"""Local files: path syntax checks, folder confinement (realpath, by component), and reading with size caps.

A server reads only inside its allowed folders; `read_image_file` is the CLI's way in (the user's own files, no
folder policy), through the same reader and decoder.
"""

from __future__ import annotations

import os
import re
import stat
import sys
import urllib.parse
import urllib.request
from pathlib import Path

from klein_agent.service.inputs.common import (
    ATTACHMENT_HINT,
    MAX_ARG_CHARS,
    ImageInputError,
    LoadedImage,
    content_key,
    ellipsize,
    show,
    too_big_error,
)
from klein_agent.service.inputs.decoding import decode
from klein_agent.service.inputs.policy import INPUT_DIR_FLAG, InputPolicy

WINDOWS_DRIVE_RE = re.compile(r"[A-Za-z]:[\\/]")


def path_from_file_uri(uri: str) -> str:
    """The local path of a `file://` URI, percent-decoded; the path is checked later like any other.

    Raises ImageInputError for a URI naming another host, one with a query or fragment, or one decoding to a
    NUL.
    """
    parts = urllib.parse.urlsplit(uri)
    if parts.netloc not in ("", "localhost"):
        raise ImageInputError(
            f"{show(uri)} names another machine ({parts.netloc!r}); only local files are read: use "
            "file:///absolute/path or a plain absolute path"
        )
    if parts.query or parts.fragment:
        raise ImageInputError(f"{show(uri)} has a query or fragment; a file:// URI must name a file only")
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
            f"{what} {show(path)} is wrapped in quotes, which became part of the name: pass it without the "
            f"quotes ({show(path[1:-1])})"
        )


def check_path_syntax(path: str, what: str) -> str:
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
            f"{show(path)}: network (UNC) and device paths are not accepted: copy the file to a local folder "
            "and give its absolute path"
        )
    if path == "~" or path.startswith(("~/", "~" + os.sep)):
        path = os.path.expanduser(path)
    if any(part == ".." for part in re.split(r"[\\/]", path)):
        raise ImageInputError(f"{show(path)} contains '..': give the absolute path without '..' segments")
    if not os.path.isabs(path):
        if os.name != "nt" and WINDOWS_DRIVE_RE.match(path):
            raise ImageInputError(
                f"{show(path)} is a Windows path, but this server runs on {sys.platform}: give an absolute "
                "path on the server's machine"
            )
        raise ImageInputError(
            f"{show(path)} is a relative path: give an absolute path (the server's working directory is not "
            "the user's)"
        )
    return path


def _inside(resolved: Path, policy: InputPolicy) -> bool:
    # Component-wise containment on realpath'd paths: immune to sibling-prefix names and symlink escapes.
    return any(resolved.is_relative_to(d) for d in policy.allowed_dirs)


def _outside_error(path: str, policy: InputPolicy) -> ImageInputError:
    return ImageInputError(
        f"{show(path)} is outside the folders this server may read ({policy.dirs_text()}): move or copy the "
        f"image into one of them, or ask the user to allow its folder with {INPUT_DIR_FLAG}. "
        + ATTACHMENT_HINT
    )


def load_path(path: str, policy: InputPolicy) -> LoadedImage:
    """Read and decode an image file inside the policy's allowed folders (checked after resolving symlinks).

    Raises ImageInputError for bad path syntax, a path outside the allowed folders (before saying whether it
    exists), a missing, non-regular or oversized file (`policy.max_bytes`), or bytes that do not decode.
    """
    path = check_path_syntax(path, "path")
    try:
        resolved = Path(os.path.realpath(path))
    except (OSError, ValueError) as e:
        raise ImageInputError(
            f"cannot resolve {show(path)} ({e.__class__.__name__}): check the path"
        ) from None
    # Containment first, existence second: a "not found" for paths outside the allowed folders would let a
    # caller probe which files exist on the machine.
    if not _inside(resolved, policy):
        raise _outside_error(path, policy)
    data = _read_file(resolved, path, policy.max_bytes)
    return _path_image(data, resolved, policy.max_pixels, policy.reduce_to)


def read_image_file(
    path: str, *, max_bytes: int, max_pixels: int, reduce_to: int | None = None
) -> LoadedImage:
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
            f"cannot resolve {show(path)} ({e.__class__.__name__}): check the path"
        ) from None
    return _path_image(_read_file(resolved, path, max_bytes, hint=False), resolved, max_pixels, reduce_to)


def _path_image(data: bytes, resolved: Path, max_pixels: int, reduce_to: int | None) -> LoadedImage:
    image, fmt = decode(data, max_pixels=max_pixels, reduce_to=reduce_to)
    name = ellipsize(resolved.name, 60)
    return LoadedImage(
        image=image,
        source="path",
        image_id=None,
        description=f"{name} ({fmt}, {image.width}x{image.height})",
        content_key=content_key(data),
    )


def _read_file(resolved: Path, shown: str, max_bytes: int, *, hint: bool = True) -> bytes:
    try:
        st = os.stat(resolved)
    except FileNotFoundError:
        extra = f" {ATTACHMENT_HINT}" if hint else ""
        raise ImageInputError(f"{show(shown)} does not exist on this machine.{extra}") from None
    except OSError as e:
        raise ImageInputError(f"cannot access {show(shown)}: {e.strerror or e}; check the path") from None
    if stat.S_ISDIR(st.st_mode):
        raise ImageInputError(f"{show(shown)} is a folder: give the path of an image file inside it")
    if not stat.S_ISREG(st.st_mode):  # FIFOs and devices: opening one could block or never end
        raise ImageInputError(
            f"{show(shown)} is not a regular file: give the path of a PNG, JPEG or WebP file"
        )
    if st.st_size > max_bytes:
        raise too_big_error(shown, st.st_size, max_bytes)
    # O_NOFOLLOW: `resolved` has no symlinks, so one appearing here was swapped in after the check (TOCTOU).
    # O_NONBLOCK: harmless on regular files, and keeps a swapped-in FIFO from blocking the open.
    flags = (
        os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0)
    )
    try:
        fd = os.open(resolved, flags)
    except OSError as e:
        raise ImageInputError(f"cannot open {show(shown)}: {e.strerror or e}; check the path") from None
    with os.fdopen(fd, "rb") as f:
        fst = os.fstat(f.fileno())
        if not stat.S_ISREG(fst.st_mode):
            raise ImageInputError(f"{show(shown)} is not a regular file: give the path of an image file")
        data = f.read(max_bytes + 1)  # +1: a file that grew since stat() is caught, not truncated
    if len(data) > max_bytes:
        raise too_big_error(shown, len(data), max_bytes)
    return data
