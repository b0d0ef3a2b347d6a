"""Writing a stored image out of the store: the export target's checks and the write itself."""

from __future__ import annotations

import os
import stat
from pathlib import Path

from klein_agent.service.files import write_atomically
from klein_agent.service.inputs.common import ImageInputError, show
from klein_agent.service.inputs.paths import check_path_syntax, path_from_file_uri
from klein_agent.service.inputs.policy import INPUT_DIR_FLAG, InputPolicy


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
        path = path_from_file_uri(path)
    path = check_path_syntax(path, "export path")
    if default_name is not None and os.path.isdir(path):
        path = os.path.join(path, default_name)
    parent_text, name = os.path.split(path)
    if not name or name in (".", ".."):
        raise ImageInputError(
            f"{show(path)} names no file: give a path ending in a file name such as out.png"
        )
    suffix = os.path.splitext(name)[1].lower()
    if suffix in (".jpg", ".jpeg", ".webp", ".gif", ".bmp", ".tif", ".tiff", ".avif", ".heic"):
        raise ImageInputError(f"{show(path)}: export writes PNG files; end the file name with .png")
    if suffix != ".png":
        name += ".png"
    try:
        parent = Path(os.path.realpath(parent_text))
    except (OSError, ValueError) as e:
        raise ImageInputError(f"cannot resolve {show(parent_text)} ({e.__class__.__name__})") from None
    if not any(parent.is_relative_to(d) for d in policy.allowed_dirs):
        raise ImageInputError(
            f"{show(path)} is outside the folders this server may write ({policy.dirs_text()}): choose a "
            f"path inside one of them, or ask the user to allow the folder with {INPUT_DIR_FLAG}"
        )
    if not parent.is_dir():
        raise ImageInputError(
            f"folder {show(parent_text)} does not exist: create it first or pick another one"
        )
    target = parent / name
    try:
        st = os.lstat(target)
    except FileNotFoundError:
        return target
    except OSError as e:
        raise ImageInputError(f"cannot access {show(str(target))}: {e.strerror or e}") from None
    if stat.S_ISLNK(st.st_mode):
        raise ImageInputError(f"{show(str(target))} is a symbolic link: choose a different file name")
    if not stat.S_ISREG(st.st_mode):
        raise ImageInputError(f"{show(str(target))} exists and is not a regular file: choose another name")
    return target


def write_export(target: Path, png: bytes) -> None:
    """Write `png` to `target` (from `check_output_path`) atomically: a reader sees the old file or the new one.
    The temporary file is a dot-file beside the target; a symlink planted at `target` meanwhile is replaced, not
    followed. Raises ImageInputError naming the folder on an I/O error."""
    try:
        write_atomically(target, png, tmp_prefix=".klein-export-", mode=0o666)
    except OSError as exc:
        raise ImageInputError(
            f"could not write {str(target)!r}: {exc.strerror or exc}; check the folder"
        ) from exc
