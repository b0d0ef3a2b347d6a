"""The descriptor walk and the no-replace write (klein_agent/service/safe_paths.py), in each of its modes, and the
rule that paths never reach the image store. The races themselves are in tests/test_path_races.py."""

from __future__ import annotations

import errno
import logging
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from klein_agent.service import safe_paths
from klein_agent.service.exports import check_output_path, write_export
from klein_agent.service.inputs import ImageInputError, InputPolicy, load_image_argument
from klein_agent.service.safe_paths import ExcludedFolderError, UnsafePathError, folder_beneath, folder_id
from tests.fakes import png_bytes

LINUX_TMPFILE = bool(safe_paths.O_TMPFILE and safe_paths.PROC_FD and safe_paths.DIR_FDS)


@pytest.fixture(params=["tmpfile", "hidden-name", "no-hard-links", "by-path"])
def mode(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """Each way `write_file` can run here: O_TMPFILE + linkat (Linux), a hidden name through the folder's
    descriptor (macOS, filesystems without O_TMPFILE), that on a filesystem without hard links (FAT), and the
    by-path fallback of platforms without dir_fd (Windows)."""
    name = request.param
    if name == "tmpfile" and not LINUX_TMPFILE:
        pytest.skip("O_TMPFILE with /proc/self/fd is Linux's")
    if name != "tmpfile":
        monkeypatch.setattr(safe_paths, "O_TMPFILE", 0)
    if name == "no-hard-links":
        real_link = os.link

        def no_links(src: object, dst: object, **kwargs: object) -> None:
            if str(src).startswith("/proc/"):
                real_link(src, dst, **kwargs)  # type: ignore[arg-type]
            raise PermissionError(errno.EPERM, "Operation not permitted")

        monkeypatch.setattr(os, "link", no_links)
    if name == "by-path":
        monkeypatch.setattr(safe_paths, "DIR_FDS", False)
    yield name


@pytest.fixture
def tree(tmp_path: Path) -> dict[str, Path]:
    allowed, outside = tmp_path / "allowed", tmp_path / "outside"
    (allowed / "a" / "b").mkdir(parents=True)
    outside.mkdir()
    (outside / "victim.png").write_bytes(b"outside")
    return {"allowed": allowed.resolve(), "outside": outside.resolve()}


def names(folder: Path) -> list[str]:
    return sorted(os.listdir(folder))


# ------------------------------------------------------------------------------------------------- the walk


def test_walk_reaches_the_folder_and_opens_its_files(tree: dict[str, Path], mode: str) -> None:
    (tree["allowed"] / "a" / "b" / "x.png").write_bytes(b"inside")
    with folder_beneath(tree["allowed"], ("a", "b")) as folder:
        assert folder.path == tree["allowed"] / "a" / "b"
        fd = folder.open_file("x.png", os.O_RDONLY)
        with os.fdopen(fd, "rb") as f:
            assert f.read() == b"inside"


def test_walk_refuses_a_symlink_in_any_component_naming_it_and_the_allowed_folder(
    tree: dict[str, Path], mode: str
) -> None:
    allowed = tree["allowed"]
    (allowed / "a" / "out").symlink_to(tree["outside"], target_is_directory=True)
    (allowed / "a" / "b" / "x.png").symlink_to(tree["outside"] / "victim.png")
    with pytest.raises(UnsafePathError) as e, folder_beneath(allowed, ("a", "out")):
        pass
    assert repr(str(allowed / "a" / "out")) in str(e.value) and f"allowed folder {allowed}" in str(e.value)
    with folder_beneath(allowed, ("a", "b")) as folder, pytest.raises(UnsafePathError, match="symbolic link"):
        folder.open_file("x.png", os.O_RDONLY)
    link_root = allowed.parent / "root-link"
    link_root.symlink_to(allowed, target_is_directory=True)
    with pytest.raises(UnsafePathError, match="root-link"), folder_beneath(link_root, ()):
        pass


def test_walk_names_missing_folders_files_and_odd_parts(tree: dict[str, Path], mode: str) -> None:
    (tree["allowed"] / "a" / "file").write_bytes(b"x")
    with pytest.raises(FileNotFoundError), folder_beneath(tree["allowed"], ("a", "nope")):
        pass
    with pytest.raises(NotADirectoryError), folder_beneath(tree["allowed"], ("a", "file")):
        pass
    for bad in ("..", ".", "", "a/b"):
        with pytest.raises(ValueError, match="plain folder name"), folder_beneath(tree["allowed"], (bad,)):
            pass


def test_walk_refuses_the_excluded_folder_however_it_is_reached(tree: dict[str, Path], mode: str) -> None:
    excluded = folder_id(tree["allowed"] / "a")
    assert excluded is not None
    with (
        pytest.raises(ExcludedFolderError) as e,
        folder_beneath(tree["allowed"], ("a", "b"), excluded=excluded),
    ):
        pass
    assert e.value.path == tree["allowed"] / "a"
    with folder_beneath(tree["allowed"], (), excluded=excluded):  # the folder above it is fine
        pass


# ---------------------------------------------------------------------------------------------- the write


def write(folder_path: Path, root: Path, name: str, data: bytes, *, replace: bool) -> None:
    parts = folder_path.relative_to(root).parts
    with folder_beneath(root, parts, writable=True) as folder:
        folder.write_file(name, data, replace=replace, tmp_prefix=".klein-export-")


def test_write_creates_replaces_only_when_asked_and_never_follows_a_link(
    tree: dict[str, Path], mode: str
) -> None:
    root, folder = tree["allowed"], tree["allowed"] / "a"
    old_umask = os.umask(0o022)
    try:
        write(folder, root, "new.png", b"one", replace=False)
    finally:
        os.umask(old_umask)
    assert (folder / "new.png").read_bytes() == b"one"
    assert (folder / "new.png").stat().st_mode & 0o777 == 0o644  # 0o666 less the umask, as open() makes
    with pytest.raises(FileExistsError):
        write(folder, root, "new.png", b"two", replace=False)
    assert (folder / "new.png").read_bytes() == b"one"
    write(folder, root, "new.png", b"three", replace=True)
    assert (folder / "new.png").read_bytes() == b"three"
    (folder / "planted.png").symlink_to(tree["outside"] / "victim.png")
    with pytest.raises(FileExistsError):
        write(folder, root, "planted.png", b"four", replace=False)
    write(folder, root, "planted.png", b"five", replace=True)  # replaces the link itself
    assert not (folder / "planted.png").is_symlink() and (folder / "planted.png").read_bytes() == b"five"
    assert (tree["outside"] / "victim.png").read_bytes() == b"outside"
    assert names(folder) == ["b", "new.png", "planted.png"]  # no temporary file


@pytest.mark.parametrize("replace", [False, True])
def test_a_failed_write_leaves_nothing_and_keeps_the_old_file(
    tree: dict[str, Path], mode: str, replace: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    root, folder = tree["allowed"], tree["allowed"] / "a"
    (folder / "keep.png").write_bytes(b"old")

    def disk_full(fd: int, data: bytes) -> None:
        os.write(fd, data[: len(data) // 2])
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(safe_paths, "write_all", disk_full)
    with pytest.raises(OSError, match="No space"):
        write(folder, root, "new.png", b"x" * 10_000, replace=replace)
    with pytest.raises(OSError, match="No space"):
        write(folder, root, "keep.png", b"x" * 10_000, replace=True)
    assert names(folder) == ["b", "keep.png"] and (folder / "keep.png").read_bytes() == b"old"


def test_a_failed_rename_leaves_no_temporary_file(
    tree: dict[str, Path], mode: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    root, folder = tree["allowed"], tree["allowed"] / "a"
    (folder / "keep.png").write_bytes(b"old")

    def broken(*args: object, **kwargs: object) -> None:
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(os, "rename", broken)
    monkeypatch.setattr(os, "replace", broken)
    with pytest.raises(OSError, match="Input/output"):
        write(folder, root, "keep.png", b"new", replace=True)
    assert names(folder) == ["b", "keep.png"] and (folder / "keep.png").read_bytes() == b"old"


CRASH = """
import os, signal, sys
from pathlib import Path
from klein_agent.service import safe_paths

def crash(fd, data):
    os.write(fd, data[:100])
    os.kill(os.getpid(), signal.SIGKILL)

safe_paths.write_all = crash
root = Path(sys.argv[1])
with safe_paths.folder_beneath(root, (), writable=True) as folder:
    folder.write_file("out.png", b"x" * 1000, replace=sys.argv[2] == "1", tmp_prefix=".klein-export-")
"""


@pytest.mark.skipif(not LINUX_TMPFILE, reason="O_TMPFILE with /proc/self/fd is Linux's")
@pytest.mark.parametrize("replace", [False, True])
def test_a_crash_while_writing_leaves_nothing_in_the_folder(tmp_path: Path, replace: bool) -> None:
    done = subprocess.run(
        [sys.executable, "-c", CRASH, str(tmp_path), "1" if replace else "0"],
        cwd=Path(__file__).resolve().parents[1],
        capture_output=True,
        timeout=60,
    )
    assert done.returncode == -signal.SIGKILL, done.stderr
    assert names(tmp_path) == []  # the unnamed file went with the process


# ------------------------------------------------------------------------------------------- the image store


@pytest.fixture
def store_inside(tmp_path: Path) -> dict[str, Path]:
    """A project folder that is allowed and holds the store: `serve --store ./store --allow-dir .`."""
    project = (tmp_path / "project").resolve()
    (project / "store" / "images").mkdir(parents=True)
    (project / "store" / "images" / "img_x.png").write_bytes(png_bytes(64, 64))
    (project / "photo.png").write_bytes(png_bytes(64, 64))
    return {"project": project, "store": project / "store"}


def test_paths_inside_the_store_are_neither_read_nor_written(
    store_inside: dict[str, Path], mode: str
) -> None:
    project, store = store_inside["project"], store_inside["store"]
    policy = InputPolicy(allowed_dirs=(project,)).with_store(store)
    assert load_image_argument(str(project / "photo.png"), policy, lambda _id: b"").image.size == (64, 64)
    with pytest.raises(ImageInputError, match="inside the image store") as e:
        load_image_argument(str(store / "images" / "img_x.png"), policy, lambda _id: b"")
    assert "by its id" in str(e.value)
    for target in (store / "images" / "img_x.png", store / "images"):
        with pytest.raises(ImageInputError, match="inside the image store"):
            check_output_path(str(target), policy, default_name="img_x.png")
    # Reached another way (a folder renamed or bind-mounted in after the check): the walk compares identities.
    alias = project / "renamed"
    store.rename(alias)
    with pytest.raises(ImageInputError, match="inside the image store"):
        write_export(alias / "images" / "img_x.png", b"new", policy, overwrite=True)
    with pytest.raises(ImageInputError, match="inside the image store"):
        load_image_argument(str(alias / "images" / "img_x.png"), policy, lambda _id: b"")
    assert (alias / "images" / "img_x.png").read_bytes() == png_bytes(64, 64)


def serve_args(*argv: str) -> object:
    from klein_agent.cli import build_parser

    return build_parser().parse_args(["serve", "--model", "tiny", "--no-default-dirs", *argv])


def test_serve_with_the_store_inside_an_allowed_folder_starts_and_keeps_the_store_closed(
    store_inside: dict[str, Path], caplog: pytest.LogCaptureFixture
) -> None:
    from klein_agent.server.serve import build_studio

    project, store = store_inside["project"], store_inside["store"]
    with caplog.at_level(logging.WARNING, logger="klein_agent.serve"):
        studio = build_studio(serve_args("--store", str(store), "--allow-dir", str(project)))
    try:
        assert studio.policy.store_dir == store
        assert f"the store {store} lies inside the allowed folder {project}" in caplog.text
        with pytest.raises(ImageInputError, match="inside the image store"):
            check_output_path(str(store / "images"), studio.policy, default_name="img_x.png")
    finally:
        studio.store.close()


def test_serve_refuses_an_allowed_folder_inside_the_store_naming_both_options(
    store_inside: dict[str, Path], caplog: pytest.LogCaptureFixture
) -> None:
    from klein_agent.server.serve import run_serve

    store = store_inside["store"]
    with caplog.at_level(logging.ERROR, logger="klein_agent.serve"):
        code = run_serve(serve_args("--store", str(store), "--allow-dir", str(store / "images")))
    assert code == 2
    assert (
        f"the allowed folder {store / 'images'}" in caplog.text
        and f"inside the image store {store}" in caplog.text
    )
    assert "--allow-dir" in caplog.text and "--store" in caplog.text
