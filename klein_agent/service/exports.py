"""Writing a stored image out of the store: the export target's checks and the write itself.

The target is checked by path (`check_output_path`: inside an allowed folder, outside the store, a PNG name),
then written through its folder's descriptor, reached by walking the checked path without following a symlink
(`klein_agent.service.safe_paths`): a folder swapped for a link after the check is refused, an existing file is
never replaced unless `overwrite` says so (the refusal is the filesystem's own, so a file created after the
check is kept), and a failed write leaves no temporary file behind.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from klein_agent.rules.resolution import RequestError
from klein_agent.service.error_text import describe
from klein_agent.service.inputs.common import ImageInputError, show
from klein_agent.service.inputs.paths import check_path_syntax, inside_store_error, path_from_file_uri
from klein_agent.service.inputs.policy import INPUT_DIR_FLAG, InputPolicy
from klein_agent.service.safe_paths import ExcludedFolderError, UnsafePathError, folder_beneath

EXPORT_TMP_PREFIX = ".klein-export-"  # a hidden name only where O_TMPFILE is missing, removed on any error


def check_output_path(path: str, policy: InputPolicy, *, default_name: str | None = None) -> Path:
    """Validate an export target and return the resolved path to write.

    The path must be absolute, its parent folder must exist and lie inside the allowed folders and outside the
    image store after resolving symlinks, and the target must not be a symlink or a folder. `.png` is added when the name has no image
    suffix; another image suffix (.jpg, .webp, …) is refused because export writes PNG. If `path` names an
    existing folder and `default_name` is given, the file `default_name` inside it is the target.

    An existing regular file is returned as is: whether to overwrite is the caller's decision (`write_export`).
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
        raise ImageInputError(f"cannot resolve {show(parent_text)} ({describe(e)}): check the path") from None
    if not any(parent.is_relative_to(d) for d in policy.allowed_dirs):
        raise ImageInputError(
            f"{show(path)} is outside the folders this server may write ({policy.dirs_text()}): choose a "
            f"path inside one of them, or ask the user to allow the folder with {INPUT_DIR_FLAG}"
        )
    if policy.store_holds(parent):
        raise inside_store_error(path, policy)
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


def write_export(target: Path, png: bytes, policy: InputPolicy, *, overwrite: bool = False) -> None:
    """Write `png` to `target` (from `check_output_path`): a reader sees no file or the whole one, never a part.

    The folder is reached from its allowed folder without following a symlink, and the file is written through
    that folder's descriptor (`safe_paths.Folder.write_file`). `overwrite=False` never replaces anything, even a
    file created after the check: RequestError. `overwrite=True` replaces the file (a symlink planted at
    `target` is replaced, not followed). Raises ImageInputError for a swapped folder, the store, or an I/O
    error naming the folder; on any error no temporary file is left.
    """
    root = policy.root_of(target.parent)
    if root is None:  # check_output_path made sure of it; kept so this function is safe on its own
        raise ImageInputError(f"{show(str(target))} is outside the folders this server may write")
    try:
        with folder_beneath(
            root, target.parent.relative_to(root).parts, excluded=policy.store_id, writable=True
        ) as folder:
            folder.write_file(target.name, png, replace=overwrite, tmp_prefix=EXPORT_TMP_PREFIX)
    except FileExistsError:
        raise RequestError(
            f"{str(target)!r} already exists: pass overwrite=true to replace it, or choose another name"
        ) from None
    except ExcludedFolderError:
        raise inside_store_error(str(target), policy) from None
    except UnsafePathError as exc:
        raise ImageInputError(str(exc)) from None
    except FileNotFoundError:
        raise ImageInputError(
            f"folder {show(str(target.parent))} does not exist (any more): create it first or pick another one"
        ) from None
    except OSError as exc:
        raise ImageInputError(
            f"could not write {str(target)!r}: {exc.strerror or exc}; check the folder"
        ) from exc
