"""Local files: path syntax checks, folder confinement (realpath, by component), and reading with size caps.

A server reads only inside its allowed folders, never inside its image store, and opens what it checked: the
resolved path is walked down from the allowed folder's descriptor without following a symlink
(`klein_agent.service.safe_paths`), so a parent folder swapped for a link after the check is refused, not
followed. `read_image_file` is the CLI's way in (the user's own files, no folder policy), through the same
reader and decoder.
"""

from __future__ import annotations

import os
import re
import stat
import sys
import urllib.parse
import urllib.request
from pathlib import Path

from klein_agent.rules.image_refs import ImageRefError, parse_image_ref
from klein_agent.rules.limits import REFERENCE_MAX_AREA
from klein_agent.service.error_text import describe
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
from klein_agent.service.safe_paths import (
    O_BINARY,
    O_NOFOLLOW,
    ExcludedFolderError,
    UnsafePathError,
    folder_beneath,
)

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


def _outside_error(path: str, policy: InputPolicy) -> ImageInputError:
    return ImageInputError(
        f"{show(path)} is outside the folders this server may read ({policy.dirs_text()}): move or copy the "
        f"image into one of them, or ask the user to allow its folder with {INPUT_DIR_FLAG}. "
        + ATTACHMENT_HINT
    )


def inside_store_error(path: str, policy: InputPolicy) -> ImageInputError:
    """The refusal of a path inside the image store (read or export), with what to do instead."""
    return ImageInputError(
        f"{show(path)} is inside the image store ({policy.store_dir}), which tools do not read or write by path: "
        "pass a stored image by its id (list_images shows them), and export to a folder outside the store"
    )


def load_path(path: str, policy: InputPolicy) -> LoadedImage:
    """Read and decode an image file inside the policy's allowed folders (checked after resolving symlinks, then
    opened by walking the resolved path without following any link, so the file read is the file checked).

    Raises ImageInputError for bad path syntax, a path outside the allowed folders or inside the store (before
    saying whether it exists), a path whose folders were swapped for a symlink meanwhile, a missing,
    non-regular or oversized file (`policy.max_bytes`), or bytes that do not decode.
    """
    path = check_path_syntax(path, "path")
    try:
        resolved = Path(os.path.realpath(path))
    except (OSError, ValueError) as e:
        raise ImageInputError(f"cannot resolve {show(path)} ({describe(e)}): check the path") from None
    # Containment first, existence second: a "not found" for paths outside the allowed folders would let a
    # caller probe which files exist on the machine.
    root = policy.root_of(resolved)
    if root is None:
        raise _outside_error(path, policy)
    if policy.store_holds(resolved):
        raise inside_store_error(path, policy)
    data = _read_beneath(root, resolved, path, policy)
    return _path_image(data, resolved, policy.max_pixels, policy.reduce_to)


# O_NONBLOCK: harmless on regular files, and keeps a swapped-in FIFO from blocking the open.
_READ_FLAGS = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0)


def _read_beneath(root: Path, resolved: Path, shown: str, policy: InputPolicy) -> bytes:
    """The bytes of the regular file `resolved` below the allowed folder `root`, reached without following a
    symlink (a component that is one now was swapped in after `realpath`)."""
    parts = resolved.relative_to(root).parts
    if not parts:
        raise ImageInputError(f"{show(shown)} is a folder: give the path of an image file inside it")
    try:
        with folder_beneath(root, parts[:-1], excluded=policy.store_id) as folder:
            st = folder.lstat(parts[-1])
            if not stat.S_ISLNK(st.st_mode):  # a link: open_file names it below
                _check_kind(st, shown, policy.max_bytes)
            fd = folder.open_file(parts[-1], _READ_FLAGS)
    except ExcludedFolderError:
        raise inside_store_error(shown, policy) from None
    except UnsafePathError as e:
        raise ImageInputError(str(e)) from None
    except FileNotFoundError:
        raise ImageInputError(f"{show(shown)} does not exist on this machine. {ATTACHMENT_HINT}") from None
    except OSError as e:
        raise ImageInputError(f"cannot open {show(shown)}: {e.strerror or e}; check the path") from None
    return _read_fd(fd, shown, policy.max_bytes)


def read_image_file(
    path: str, *, max_bytes: int, max_pixels: int, reduce_to: int | None = REFERENCE_MAX_AREA
) -> LoadedImage:
    """A picture the user names on the command line: any file they can read (no folder policy), decoded by the
    same untrusted-input decoder the server uses, so a file gives the same pixels from the CLI and the server.

    Relative paths and `~` are allowed. `reduce_to`: see `decoding.decode` (a mask is scaled to a picture of at
    most this size too). A name that is no file but an image id reference (`rules.image_refs`) is refused with
    the server's id message when malformed, else with what the command line takes instead. Raises
    ImageInputError with what to do, as the server's messages do.
    """
    check_not_quoted(path)
    if "\x00" in path:
        raise ImageInputError("path contains a NUL character")
    if not os.path.lexists(path):  # a file of that name wins: `img_<id>.png` is how the CLI names a parent
        _refuse_image_ref(path)
    try:
        resolved = Path(os.path.realpath(os.path.expanduser(path)))
    except (OSError, ValueError) as e:
        raise ImageInputError(f"cannot resolve {show(path)} ({describe(e)}): check the path") from None
    return _path_image(_read_file(resolved, path, max_bytes, hint=False), resolved, max_pixels, reduce_to)


def _refuse_image_ref(path: str) -> None:
    """Raise ImageInputError when `path` is an image id reference: the command line reads files, not a store."""
    try:
        image_id = parse_image_ref(path)
    except ImageRefError as exc:
        raise ImageInputError(str(exc)) from None
    if image_id is not None:
        raise ImageInputError(
            f"{show(path)} is an image id of the server's store, and the command line reads files: write it to "
            f"a file with the export_image tool (or save image://{image_id}) and pass that file's path"
        )


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
    """The CLI's read: the user's own file, by path (no folder policy to escape)."""
    try:
        st = os.stat(resolved)
    except FileNotFoundError:
        extra = f" {ATTACHMENT_HINT}" if hint else ""
        raise ImageInputError(f"{show(shown)} does not exist on this machine.{extra}") from None
    except OSError as e:
        raise ImageInputError(f"cannot access {show(shown)}: {e.strerror or e}; check the path") from None
    _check_kind(st, shown, max_bytes)
    # O_NOFOLLOW: `resolved` has no symlinks, so one appearing here was swapped in after the check.
    try:
        fd = os.open(resolved, _READ_FLAGS | O_NOFOLLOW | O_BINARY)
    except OSError as e:
        raise ImageInputError(f"cannot open {show(shown)}: {e.strerror or e}; check the path") from None
    return _read_fd(fd, shown, max_bytes)


def _check_kind(st: os.stat_result, shown: str, max_bytes: int) -> None:
    """Refuse, before opening, what is not a regular file of at most `max_bytes` bytes."""
    if stat.S_ISDIR(st.st_mode):
        raise ImageInputError(f"{show(shown)} is a folder: give the path of an image file inside it")
    if not stat.S_ISREG(st.st_mode):  # FIFOs and devices: opening one could block or never end
        raise ImageInputError(
            f"{show(shown)} is not a regular file: give the path of a PNG, JPEG or WebP file"
        )
    if st.st_size > max_bytes:
        raise too_big_error(shown, st.st_size, max_bytes)


def _read_fd(fd: int, shown: str, max_bytes: int) -> bytes:
    """Read at most `max_bytes` from the open file `fd` (closed here), checking again that it is a regular file
    (it may have been swapped since the stat)."""
    with os.fdopen(fd, "rb") as f:
        fst = os.fstat(f.fileno())
        if not stat.S_ISREG(fst.st_mode):
            raise ImageInputError(f"{show(shown)} is not a regular file: give the path of an image file")
        data = f.read(max_bytes + 1)  # +1: a file that grew since stat() is caught, not truncated
    if len(data) > max_bytes:
        raise too_big_error(shown, len(data), max_bytes)
    return data
