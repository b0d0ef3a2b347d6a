"""Opening and writing files beneath an allowed folder without following a symbolic link on the way.

A path that was checked with `realpath()` and then opened by name can be redirected in between: swap a parent
folder for a symlink and the open lands outside the allowed folder (time of check to time of use). Here the
checked path is *walked* instead: the allowed folder is opened once, and each component below it is opened
relative to the previous one's descriptor (`openat`) with `O_NOFOLLOW`, so a symlink anywhere on the way is
refused, never followed. The callers resolve the user's path with `realpath()` first (a stable symlink that stays
inside is fine), so a symlink met during the walk is one that was swapped in: the message says so and names the
allowed folder.

Writing goes through the parent folder's descriptor too: the data is written to an unnamed file in that folder
(`O_TMPFILE`, Linux), fsynced, and then linked into place with `linkat`, which never replaces an existing entry
(`FileExistsError`), or, to overwrite, linked under a hidden name and renamed over the target. A crash or error
before the link leaves nothing in the user's folder. Without `O_TMPFILE` (macOS, some filesystems) a hidden
`<prefix><random hex>` file is created exclusively through the descriptor instead and removed on every error;
on a filesystem without hard links (FAT, exFAT) a no-replace write creates the target itself exclusively.

Each walk also compares every folder it passes with an `excluded` folder's identity (device, inode): the server
passes its image store, which tools may never read or write by path, even when it is reached another way.

Platforms without `dir_fd` support (Windows) fall back to checking each component with `lstat` and then opening
by name: the same refusals, but not race-free (see docs/server.md, "Security defaults").

Mirrors no reference file: this is the server's own file-safety layer. No torch.
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import stat
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from klein_agent.rules.quoting import show

FolderId = tuple[int, int]  # (st_dev, st_ino): what a folder *is*, whatever path reaches it

# Everything below is looked up once; tests switch the fallbacks on by setting these.
DIR_FDS = {os.open, os.stat, os.link, os.rename, os.unlink} <= os.supports_dir_fd
O_TMPFILE: int = getattr(os, "O_TMPFILE", 0)
PROC_FD = os.path.isdir("/proc/self/fd")  # linkat of an O_TMPFILE file goes through /proc/self/fd/N
_O_PATH: int = getattr(os, "O_PATH", 0)  # Linux: a folder descriptor that needs only search permission
O_NOFOLLOW: int = getattr(os, "O_NOFOLLOW", 0)  # 0 on Windows: the caller checks for a link itself
_O_DIRECTORY: int = getattr(os, "O_DIRECTORY", 0)
_O_CLOEXEC: int = getattr(os, "O_CLOEXEC", 0)
O_BINARY: int = getattr(os, "O_BINARY", 0)  # Windows: no newline translation; the one definition
# Errors meaning "this filesystem cannot do that", after which the next fallback is tried.
_UNSUPPORTED = {errno.EOPNOTSUPP, errno.ENOTSUP, errno.EINVAL, errno.EISDIR, errno.ENOSYS}
_NO_HARD_LINKS = {errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENOSYS, errno.EMLINK}


class UnsafePathError(OSError):
    """A path that cannot be opened safely: a component is (or became) a symbolic link, or the walk reached the
    excluded folder. `str()` is the whole message, naming the path and the allowed folder."""

    def __init__(self, message: str) -> None:
        super().__init__(message)


class ExcludedFolderError(UnsafePathError):
    """The walk passed through the excluded folder (the server's image store); `path` is where it met it. Callers
    word the message, since only they know what the folder is."""

    def __init__(self, path: Path) -> None:
        self.path = path
        super().__init__(f"{show(str(path))} is a folder that may not be read or written by path")


def folder_id(path: Path) -> FolderId | None:
    """The identity of the folder at `path` (symlinks followed), or None if it cannot be stat'ed."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino)


@dataclass
class Folder:
    """A folder reached by `folder_beneath`: its descriptor (None in the path fallback) and its path, for
    messages and the fallback."""

    path: Path
    fd: int | None
    root: Path  # the allowed folder the walk started from, for messages

    def lstat(self, name: str) -> os.stat_result:
        """`lstat` of the entry `name` in this folder (a symlink is reported as one). Raises OSError."""
        if self.fd is None:
            return os.lstat(self.path / name)
        return os.stat(name, dir_fd=self.fd, follow_symlinks=False)

    def open_file(self, name: str, flags: int, mode: int = 0o666) -> int:
        """Open the entry `name` in this folder with `flags` | O_NOFOLLOW | O_CLOEXEC; returns the descriptor.
        Raises UnsafePathError when `name` is a symbolic link, other OSErrors as they come."""
        flags |= O_NOFOLLOW | _O_CLOEXEC | O_BINARY
        try:
            if self.fd is None:
                _refuse_link(self.path / name, self.root)  # the fallback's check; racy without O_NOFOLLOW
                return os.open(self.path / name, flags, mode)
            return os.open(name, flags, mode, dir_fd=self.fd)
        except OSError as exc:
            if exc.errno in (errno.ELOOP, errno.EMLINK, errno.ENOTDIR) and self._is_link(name):
                raise _link_error(self.path / name, self.root) from None
            raise

    def write_file(
        self, name: str, data: bytes, *, replace: bool, tmp_prefix: str, mode: int = 0o666
    ) -> None:
        """Put `data` at `name` in this folder, whole or not at all, and make it durable (file and folder fsynced).

        `replace=False` never replaces an existing entry, file or symlink alike: FileExistsError. `replace=True`
        renames over what is there (a symlink is replaced, not followed). `mode` is the new file's permissions
        before the umask. On any error nothing new is left in the folder: the unnamed file vanishes with its
        descriptor, a hidden temporary name is removed, and a target that could not be made durable is removed
        again. Raises OSError.
        """
        fd, tmp = self._new_file(tmp_prefix, mode)
        placed = False
        try:
            try:
                write_all(fd, data)
                os.fsync(fd)
                if tmp is None:  # unnamed (O_TMPFILE): linkat gives it a name, never replacing one
                    link_name = name if not replace else f"{tmp_prefix}{secrets.token_hex(8)}"
                    os.link(f"/proc/self/fd/{fd}", link_name, dst_dir_fd=self.fd)  # AT_SYMLINK_FOLLOW
                    if replace:
                        tmp = link_name  # renamed over `name` below; removed on an error
                    else:
                        placed = True
            finally:
                fd, closing = -1, fd  # the descriptor is gone even if close() fails
                os.close(closing)
            if not placed:
                assert tmp is not None
                self._place(tmp, name, data, replace=replace, mode=mode)
                placed, tmp = True, None
            self.fsync()
        except BaseException:
            if tmp is not None:
                self._unlink_quietly(tmp)
            if placed:
                self._unlink_quietly(name)
            raise

    def fsync(self) -> None:
        """Make this folder's entries (a new name, a rename) durable. A no-op where folders cannot be opened."""
        if self.fd is not None:
            os.fsync(self.fd)
        elif os.name == "posix":
            fd = os.open(self.path, os.O_RDONLY | _O_DIRECTORY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)

    # -- the steps of write_file ------------------------------------------------------------------------------

    def _new_file(self, tmp_prefix: str, mode: int) -> tuple[int, str | None]:
        """A descriptor open for writing on a new file in this folder, and its name (None: unnamed)."""
        if self.fd is not None and O_TMPFILE and PROC_FD:
            try:
                return os.open(".", O_TMPFILE | os.O_WRONLY | _O_CLOEXEC, mode, dir_fd=self.fd), None
            except OSError as exc:
                if exc.errno not in _UNSUPPORTED:
                    raise
        tmp = f"{tmp_prefix}{secrets.token_hex(8)}"
        return self.open_file(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode), tmp

    def _place(self, tmp: str, name: str, data: bytes, *, replace: bool, mode: int) -> None:
        """Move the written file `tmp` to `name`, replacing what is there or never. On an error `name` is as it
        was; `tmp` may remain (the caller removes it)."""
        if replace:
            self._rename(tmp, name)
            return
        try:
            self._link(tmp, name)
        except OSError as exc:
            if exc.errno not in _NO_HARD_LINKS:
                raise
            # No hard links here (FAT, exFAT): create the target itself exclusively. Still never replaces, but
            # a reader may see it half-written, and a crash leaves a partial file (removed on an error here).
            self._unlink_quietly(tmp)
            self._write_exclusive(name, data, mode)
            return
        self._unlink_quietly(tmp)

    def _write_exclusive(self, name: str, data: bytes, mode: int) -> None:
        fd = self.open_file(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
        try:
            write_all(fd, data)
            os.fsync(fd)
        except BaseException:
            os.close(fd)
            self._unlink_quietly(name)
            raise
        os.close(fd)

    def _link(self, src: str, dst: str) -> None:
        if self.fd is None:
            os.link(self.path / src, self.path / dst)  # `src` is our own new file, never a link
        else:
            os.link(src, dst, src_dir_fd=self.fd, dst_dir_fd=self.fd, follow_symlinks=False)

    def _rename(self, src: str, dst: str) -> None:
        if self.fd is None:
            os.replace(self.path / src, self.path / dst)
        else:
            os.rename(src, dst, src_dir_fd=self.fd, dst_dir_fd=self.fd)  # renameat: replaces on POSIX

    def _unlink_quietly(self, name: str) -> None:
        with contextlib.suppress(OSError):
            if self.fd is None:
                os.unlink(self.path / name)
            else:
                os.unlink(name, dir_fd=self.fd)

    def _is_link(self, name: str) -> bool:
        try:
            return stat.S_ISLNK(self.lstat(name).st_mode)
        except OSError:
            return False


@contextlib.contextmanager
def folder_beneath(
    root: Path, parts: Sequence[str], *, excluded: FolderId | None = None, writable: bool = False
) -> Iterator[Folder]:
    """The folder `root`/`parts`, reached by walking down from `root` one component at a time, never following a
    symbolic link; its descriptor is closed when the block ends.

    `root` is an allowed folder as resolved by `realpath()` (its last component is opened with O_NOFOLLOW too).
    `parts` are plain names (no '', '.', '..' or separators: ValueError). `excluded` is a folder identity
    (`folder_id`) the walk must not pass. `writable`: the last folder is opened so it can be fsynced (a plain
    read-only descriptor; intermediate ones are O_PATH on Linux, which needs only search permission).

    Raises UnsafePathError (a component is a symlink), ExcludedFolderError, FileNotFoundError,
    NotADirectoryError (a component is a file), PermissionError or another OSError.
    """
    for part in parts:
        if part in ("", ".", "..") or "/" in part or os.sep in part:
            raise ValueError(f"not a plain folder name: {part!r}")
    if not DIR_FDS:
        yield _folder_by_path(root, parts, excluded)
        return
    fd = -1
    try:
        here = root
        fd = _open_dir(os.fspath(root), None, here, root, for_fsync=writable and not parts)
        _check_excluded(fd, here, excluded)
        for k, part in enumerate(parts):
            parent = fd
            fd = -1
            here = here / part
            try:
                fd = _open_dir(part, parent, here, root, for_fsync=writable and k == len(parts) - 1)
            finally:
                os.close(parent)
            _check_excluded(fd, here, excluded)
        yield Folder(path=here, fd=fd, root=root)
    finally:
        if fd >= 0:
            os.close(fd)


def write_all(fd: int, data: bytes) -> None:
    """Write all of `data` to `fd`. Raises OSError (a write that makes no progress is EIO)."""
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        if written <= 0:
            raise OSError(errno.EIO, "write made no progress")
        view = view[written:]


# -- the walk's parts ------------------------------------------------------------------------------------------


def _open_dir(name: str, dir_fd: int | None, here: Path, root: Path, *, for_fsync: bool) -> int:
    """Open one folder component (`here`, for messages) without following a symlink. O_PATH where possible
    (search permission is enough), a read-only descriptor where it will be fsynced."""
    kind = os.O_RDONLY if for_fsync or not _O_PATH else _O_PATH
    try:
        return os.open(name, kind | _O_DIRECTORY | O_NOFOLLOW | _O_CLOEXEC, dir_fd=dir_fd)
    except OSError as exc:
        # A symlink opened with O_NOFOLLOW | O_DIRECTORY fails with ENOTDIR on Linux, ELOOP or EMLINK elsewhere.
        if exc.errno in (errno.ELOOP, errno.ENOTDIR, errno.EMLINK):
            try:
                is_link = stat.S_ISLNK(os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mode)
            except OSError:
                is_link = False
            if is_link:
                raise _link_error(here, root) from None
        raise


def _check_excluded(fd: int, here: Path, excluded: FolderId | None) -> None:
    if excluded is None:
        return
    st = os.fstat(fd)
    if (st.st_dev, st.st_ino) == excluded:
        raise ExcludedFolderError(here)


def _link_error(path: Path, root: Path) -> UnsafePathError:
    return UnsafePathError(
        f"{show(str(path))} is a symbolic link (or was swapped for one while the path was being opened); below "
        f"the allowed folder {root} no link is followed: try again, or give the path the link points to"
    )


def _refuse_link(path: Path, root: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        if stat.S_ISLNK(os.lstat(path).st_mode):
            raise _link_error(path, root)


def _folder_by_path(root: Path, parts: Sequence[str], excluded: FolderId | None) -> Folder:
    """The fallback walk: each component lstat'ed (no symlink, a folder), then used by name. Not race-free."""
    here = root
    for part in (None, *parts):
        if part is not None:
            here = here / part
        st = os.lstat(here)
        if stat.S_ISLNK(st.st_mode):
            raise _link_error(here, root)
        if not stat.S_ISDIR(st.st_mode):
            raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), str(here))
        if excluded is not None and (st.st_dev, st.st_ino) == excluded:
            raise ExcludedFolderError(here)
    return Folder(path=here, fd=None, root=root)
