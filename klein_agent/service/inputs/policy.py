"""Where images may come from: the folders a server may read (and export into), and whether URLs are fetched."""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from pathlib import Path

from klein_agent.rules.limits import INPUT_MAX_BYTES, INPUT_MAX_PIXELS, REFERENCE_MAX_AREA
from klein_agent.service.safe_paths import folder_id

# The flags named in error messages. The CLI owns them; keep these strings in step with it.
ALLOW_URLS_FLAG = "--allow-urls"

INPUT_DIR_FLAG = "--allow-dir"


@dataclass(frozen=True)
class InputPolicy:
    """Where images may come from. One instance per server, built from the command line."""

    allowed_dirs: tuple[Path, ...]  # resolved (realpath) at construction
    allow_urls: bool = False
    max_bytes: int = INPUT_MAX_BYTES  # encoded size: file, decoded data: URI, or URL body
    max_pixels: int = INPUT_MAX_PIXELS  # width x height from the header, checked before decoding
    reduce_to: int | None = (
        REFERENCE_MAX_AREA  # larger JPEGs decode reduced (see decoding.decode); None: never
    )
    url_timeout_s: float = 15.0  # whole fetch: connect, headers and body together
    # The image store: never read or written by path, even inside an allowed folder (stored images are passed
    # by id). Resolved at construction; its identity (device, inode) is what the path walk compares.
    store_dir: Path | None = None
    store_id: tuple[int, int] | None = field(default=None, init=False, compare=False, repr=False)

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
        if self.store_dir is not None:
            store = Path(os.path.realpath(os.path.expanduser(os.fspath(self.store_dir))))
            object.__setattr__(self, "store_dir", store)
            object.__setattr__(self, "store_id", folder_id(store))

    def with_store(self, store_dir: Path) -> InputPolicy:
        """This policy, with the image store `store_dir` closed to paths.

        Raises ValueError when an allowed folder lies inside the store (every path there would be refused, and
        an export could overwrite a stored image): the message names both options. A store *inside* an allowed
        folder is fine: paths into the store are refused, the rest of the folder stays usable.
        """
        policy = replace(self, store_dir=store_dir)
        store = policy.store_dir
        assert store is not None
        for d in policy.allowed_dirs:
            if d.is_relative_to(store):
                raise ValueError(
                    f"the allowed folder {d} (--allow-dir or a default folder) is inside the image store {store} "
                    "(--store): tools may not read or write the store by path; allow another folder, or move the "
                    "store with --store"
                )
        return policy

    def store_holds(self, path: Path) -> bool:
        """Whether the resolved `path` lies inside the image store (compared by component)."""
        return self.store_dir is not None and path.is_relative_to(self.store_dir)

    def root_of(self, resolved: Path) -> Path | None:
        """The allowed folder that holds the resolved `path` (by component, never by string prefix), or None."""
        for d in self.allowed_dirs:
            if resolved.is_relative_to(d):
                return d
        return None

    def dirs_text(self) -> str:
        """The allowed folders, for messages."""
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
