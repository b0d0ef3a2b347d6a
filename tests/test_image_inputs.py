"""klein_agent.service.inputs: every way an image argument can be wrong, and the ways it can be right.

All inputs are generated here; nothing binary is checked in. Security cases name the attack they stand for
(the rules they check: docs/server.md, "Security defaults").
"""

from __future__ import annotations

import base64
import http.server
import io
import ipaddress
import os
import random
import socket
import struct
import subprocess
import sys
import threading
import time
import warnings
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, ClassVar

import pytest
from PIL import ExifTags, Image, ImageFile, WebPImagePlugin, features

from klein_agent.rules import limits
from klein_agent.service.exports import check_output_path
from klein_agent.service.inputs import (
    ALLOW_URLS_FLAG,
    INPUT_DIR_FLAG,
    ImageInputError,
    InputPolicy,
    LoadedImage,
    decoding,
    default_allowed_dirs,
    load_image_argument,
    urls,
)
from klein_agent.service.inputs import data_uri as data_uri_module


def decode_image_bytes(data: bytes, *, max_pixels: int) -> Image.Image:
    """The decoder every input goes through, without the format it reports."""
    return decoding.decode(data, max_pixels=max_pixels)[0]


# ----------------------------------------------------------------------------------------------- helpers

GOOD_ID = "img_Q2hlY2tzIGFyZSBjaGVhcA"
UNKNOWN_ID = "img_DoesNotExist0123456789"  # the store's shape (22 characters after img_), in no store


def noise_image(size: tuple[int, int] = (64, 64), seed: int = 0, mode: str = "RGB") -> Image.Image:
    rng = random.Random(seed)
    channels = len(Image.new(mode, (1, 1)).getbands())
    data = bytes(rng.randrange(256) for _ in range(size[0] * size[1] * channels))
    return Image.frombytes(mode, size, data)


def encode(img: Image.Image, fmt: str, **params: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **params)
    return buf.getvalue()


def data_uri(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64," + base64.b64encode(data).decode()


def png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def png_bomb(width: int, height: int) -> bytes:
    """A valid-looking PNG header declaring width x height, with one tiny IDAT: a few hundred bytes."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 4096, 9)
    return (
        b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", idat) + png_chunk(b"IEND", b"")
    )


def webp_vp8x_bomb(width: int, height: int) -> bytes:
    body = b"\x00\x00\x00\x00" + (width - 1).to_bytes(3, "little") + (height - 1).to_bytes(3, "little")
    chunk = b"VP8X" + struct.pack("<I", len(body)) + body
    return b"RIFF" + struct.pack("<I", 4 + len(chunk)) + b"WEBP" + chunk


def webp_vp8l_bomb(width: int, height: int) -> bytes:
    """A lossless WebP header (VP8L) declaring width x height with alpha: 34 bytes (issue 18 used one of 38)."""
    bits = (width - 1) | (height - 1) << 14 | 1 << 28
    body = b"\x2f" + bits.to_bytes(4, "little") + b"\x00" * 9
    chunk = b"VP8L" + struct.pack("<I", len(body)) + body
    return b"RIFF" + struct.pack("<I", 4 + len(chunk)) + b"WEBP" + chunk


def jpeg_bomb(width: int, height: int) -> bytes:
    sof = b"\xff\xc0" + struct.pack(">HBHHB", 11, 8, height, width, 1) + b"\x01\x11\x00"
    return b"\xff\xd8" + sof + b"\xff\xd9"


def no_lookup(image_id: str) -> bytes:
    raise LookupError(f"unknown image id {image_id}: call list_images to see stored ids")


@pytest.fixture
def dirs(tmp_path: Path) -> dict[str, Path]:
    """allowed/ (with a PNG), siblings that share its name prefix, and an outside folder."""
    allowed = tmp_path / "allowed"
    outside = tmp_path / "outside"
    for d in (allowed, outside, tmp_path / "allowed_evil", tmp_path / "allowedX", allowed / "sub"):
        d.mkdir()
    png = encode(noise_image(), "PNG")
    for d in (allowed, outside, tmp_path / "allowed_evil", tmp_path / "allowedX"):
        (d / "img.png").write_bytes(png)
    return {"root": tmp_path, "allowed": allowed, "outside": outside}


@pytest.fixture
def policy(dirs: dict[str, Path]) -> InputPolicy:
    return InputPolicy(allowed_dirs=(dirs["allowed"],))


@pytest.fixture
def store() -> Callable[[str], bytes]:
    images = {GOOD_ID: encode(noise_image((96, 80), seed=3), "PNG")}

    def lookup(image_id: str) -> bytes:
        if image_id not in images:
            raise KeyError(f"unknown image id {image_id}: call list_images to see stored ids")
        return images[image_id]

    return lookup


# Audit hooks cannot be removed, so one recorder is installed for the whole module and switched on per test.
_AUDIT: dict[str, list[tuple[str, tuple[object, ...]]] | None] = {"events": None}
_SPAWN_EVENTS = (
    "subprocess.Popen",
    "os.system",
    "os.posix_spawn",
    "os.exec",
    "os.spawn",
    "os.fork",
    "pty.spawn",
)


def _audit_hook(event: str, args: tuple[object, ...]) -> None:
    events = _AUDIT["events"]
    if events is not None and (event == "open" or event.startswith(_SPAWN_EVENTS)):
        events.append((event, args))


sys.addaudithook(_audit_hook)


@pytest.fixture
def audit() -> Iterator[list[tuple[str, tuple[object, ...]]]]:
    events: list[tuple[str, tuple[object, ...]]] = []
    _AUDIT["events"] = events
    try:
        yield events
    finally:
        _AUDIT["events"] = None


def spawned(events: list[tuple[str, tuple[object, ...]]]) -> list[str]:
    return [e for e, _ in events if e.startswith(_SPAWN_EVENTS)]


# ----------------------------------------------------------------------------------------- valid inputs


def test_image_id_and_image_uri_resolve_through_lookup(
    policy: InputPolicy, store: Callable[[str], bytes]
) -> None:
    for arg in (GOOD_ID, f"image://{GOOD_ID}", f"  {GOOD_ID}\n"):
        got = load_image_argument(arg, policy, store)
        assert isinstance(got, LoadedImage)
        assert got.source == "image_id" and got.image_id == GOOD_ID and got.description == GOOD_ID
        assert got.image.mode == "RGB" and got.image.size == (96, 80)


def test_unknown_id_keeps_the_store_message(policy: InputPolicy, store: Callable[[str], bytes]) -> None:
    for lookup in (store, no_lookup):
        with pytest.raises(ImageInputError) as e:
            load_image_argument(UNKNOWN_ID, policy, lookup)
        assert str(e.value) == f"unknown image id {UNKNOWN_ID}: call list_images to see stored ids"


def test_meta_resource_is_not_an_image(policy: InputPolicy, store: Callable[[str], bytes]) -> None:
    with pytest.raises(ImageInputError, match=rf"metadata resource.*image://{GOOD_ID}"):
        load_image_argument(f"image://{GOOD_ID}/meta", policy, store)


def test_corrupt_store_bytes_become_input_error(policy: InputPolicy) -> None:
    with pytest.raises(ImageInputError, match="not a PNG, JPEG or WebP"):
        load_image_argument(GOOD_ID, policy, lambda _id: b"garbage")


def test_absolute_path_file_uri_and_description(dirs: dict[str, Path], policy: InputPolicy) -> None:
    odd = dirs["allowed"] / "sub" / "my cat é.jpg"
    odd.write_bytes(encode(noise_image((100, 70)), "JPEG"))
    got = load_image_argument(str(odd), policy, no_lookup)
    assert got.source == "path" and got.image_id is None
    assert got.description == "my cat é.jpg (JPEG, 100x70)"
    assert got.image.mode == "RGB" and got.image.size == (100, 70)
    got2 = load_image_argument(odd.as_uri(), policy, no_lookup)  # file:///…/my%20cat%20%C3%A9.jpg
    assert got2.image.tobytes() == got.image.tobytes()
    got3 = load_image_argument("file://localhost" + odd.as_uri()[len("file://") :], policy, no_lookup)
    assert got3.image.size == (100, 70)


def test_symlink_inside_pointing_inside_is_fine(dirs: dict[str, Path], policy: InputPolicy) -> None:
    link = dirs["allowed"] / "sub" / "alias.png"
    link.symlink_to(dirs["allowed"] / "img.png")
    assert load_image_argument(str(link), policy, no_lookup).image.size == (64, 64)


def test_allowed_dir_given_through_a_symlink(dirs: dict[str, Path]) -> None:
    alias = dirs["root"] / "alias_of_allowed"
    alias.symlink_to(dirs["allowed"], target_is_directory=True)
    pol = InputPolicy(allowed_dirs=(alias, alias))
    assert pol.allowed_dirs == (dirs["allowed"].resolve(),)  # realpath'd and de-duplicated at construction
    assert load_image_argument(str(alias / "img.png"), pol, no_lookup).image.size == (64, 64)


def test_single_dir_passed_bare(dirs: dict[str, Path]) -> None:
    pol = InputPolicy(allowed_dirs=dirs["allowed"])  # type: ignore[arg-type]
    assert pol.allowed_dirs == (dirs["allowed"].resolve(),)


def test_tilde_is_expanded(dirs: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(dirs["root"]))
    pol = InputPolicy(allowed_dirs=(Path("~/allowed"),))
    assert pol.allowed_dirs == (dirs["allowed"].resolve(),)
    assert load_image_argument("~/allowed/img.png", pol, no_lookup).source == "path"


@pytest.mark.parametrize(
    ("fmt", "mime"),
    [("PNG", "image/png"), ("JPEG", "image/jpeg"), ("JPEG", "image/jpg"), ("WEBP", "image/webp")],
)
def test_data_uri_formats(policy: InputPolicy, fmt: str, mime: str) -> None:
    got = load_image_argument(data_uri(encode(noise_image((80, 64)), fmt), mime), policy, no_lookup)
    assert got.source == "data_uri" and got.image_id is None
    assert got.description == f"data: URI ({fmt}, 80x64)"
    assert got.image.mode == "RGB" and got.image.size == (80, 64)


def test_data_uri_tolerates_wrapping_case_and_missing_padding(policy: InputPolicy) -> None:
    b64 = base64.b64encode(encode(noise_image(), "PNG")).decode()
    wrapped = "\n".join(b64[i : i + 76] for i in range(0, len(b64), 76))
    assert load_image_argument("DATA:Image/PNG;BASE64," + wrapped, policy, no_lookup).image.size == (64, 64)
    assert (
        load_image_argument("data:image/png;base64," + b64.rstrip("="), policy, no_lookup).source
        == "data_uri"
    )
    urlsafe = base64.urlsafe_b64encode(encode(noise_image(seed=5), "PNG")).decode()
    assert load_image_argument("data:image/png;base64," + urlsafe, policy, no_lookup).source == "data_uri"


def test_bare_base64_is_accepted(policy: InputPolicy) -> None:
    for fmt, prefix in (("PNG", "iVBORw0KGgo"), ("JPEG", "/9j/"), ("WEBP", "UklGR")):
        b64 = base64.b64encode(encode(noise_image(), fmt)).decode()
        assert b64.startswith(prefix)
        got = load_image_argument(b64, policy, no_lookup)
        assert got.description == f"base64 data ({fmt}, 64x64)"


def test_declared_mime_may_disagree_with_allowed_bytes(policy: InputPolicy) -> None:
    # The bytes are sniffed and decoded under the same allowlist; the label is only a label.
    got = load_image_argument(data_uri(encode(noise_image(), "JPEG"), "image/png"), policy, no_lookup)
    assert got.description.startswith("data: URI (JPEG")


# ------------------------------------------------------------------------------------------ hostile paths


def hostile_arguments(d: dict[str, Path]) -> list[str]:
    allowed, outside, root = d["allowed"], d["outside"], d["root"]
    (allowed / "etc_link").symlink_to("/etc", target_is_directory=True)
    (allowed / "outside_link.png").symlink_to(outside / "img.png")
    (allowed / "dir_link").symlink_to(outside, target_is_directory=True)
    (allowed / "rel_link.png").symlink_to("../outside/img.png")
    os.mkfifo(allowed / "fifo.png")
    return [
        # relative and traversal
        "../x",
        "..\\x",
        "../../../../etc/passwd",
        "x.png",
        "IMG_1234.JPG",
        "./img.png",
        "%2e%2e/x",
        "%2e%2e%2fetc%2fpasswd",
        "\u2024\u2024/etc/passwd",  # one-dot leaders look like ".."
        f"{allowed}/../outside/img.png",
        f"{allowed}/sub/../../outside/img.png",
        f"{allowed}\\..\\outside\\img.png",
        "~/../../etc/passwd",
        "/etc/../etc/passwd",
        # outside the allowed folders
        "/etc/passwd",
        "/proc/self/environ",
        "/dev/zero",
        "/mnt/user-data/uploads/cat.png",
        str(outside / "img.png"),
        # sibling-prefix folders (CVE-2025-53110 class)
        str(root / "allowed_evil" / "img.png"),
        str(root / "allowedX" / "img.png"),
        # symlink escapes (CVE-2025-53109 class)
        f"{allowed}/etc_link/passwd",
        f"{allowed}/etc_link/hostname",
        str(allowed / "outside_link.png"),
        str(allowed / "dir_link" / "img.png"),
        str(allowed / "rel_link.png"),
        # Windows and network syntax
        "C:\\x",
        "C:/Windows/win.ini",
        "c:\\Users\\me\\Pictures\\cat.png",
        "\\\\server\\share\\x.png",
        "//etc/passwd",
        "//server/share/x.png",
        # NUL and over-length
        "x\x00y",
        f"{allowed}/img.png\x00.txt",
        "/" + "a" * 5000,
        "a" * 5000,
        str(allowed / ("b" * 300 + ".png")),  # one component over NAME_MAX
        # file:// URIs
        "file:///etc/passwd",
        f"file://{allowed}/%2e%2e/outside/img.png",
        f"file://{allowed}/%2E%2E/outside/img.png",
        "file://evil.example/share/x.png",
        "file:////server/share/x.png",
        f"file://{allowed}/img.png%00.txt",
        f"file://{allowed}/img.png?x=1",
        # malformed ids and image URIs
        "img_../x",
        "img_..\\x",
        "img_/etc/passwd",
        "img_",
        "img_" + "a" * 200,
        "img_abc\x00",
        "img_\uff41\uff42\uff43",  # full-width letters
        "img_abc%2F..%2Fx",
        "img_1234.png",
        "image://../etc/passwd",
        "image://img_abc/../x",
        "image:///etc/passwd",
        "image://img_abc%2F..%2Fmeta",
        "image://",
        # other schemes
        "ftp://example.com/x.png",
        "javascript:alert(1)",
        "gopher://127.0.0.1:70/",
        "http://127.0.0.1/x.png",  # URLs are off in this policy
        "data:text/html;base64,PGh0bWw+",
        # wrong kinds of file
        "",
        "   ",
        str(allowed),
        str(allowed / "sub"),
        str(allowed / "missing.png"),
        str(allowed / "fifo.png"),
    ]


def test_hostile_ids_and_paths_are_refused(
    dirs: dict[str, Path], policy: InputPolicy, store: Callable[[str], bytes], audit: list
) -> None:
    args = hostile_arguments(dirs)
    assert len(args) >= 40
    for arg in args:
        with pytest.raises(ImageInputError) as e:
            load_image_argument(arg, policy, store)
        assert len(str(e.value)) < 1000, arg  # bounded: never echoes a 5000-char argument in full
    # Nothing outside the allowed folder was opened (Python's own module loading aside).
    allowed = dirs["allowed"].resolve()
    opened = [
        Path(str(a[0])) for ev, a in audit if ev == "open" and isinstance(a[0], (str, bytes, os.PathLike))
    ]
    lib_roots = {Path(p).resolve() for p in (sys.prefix, sys.base_prefix, sys.exec_prefix)}
    bad = [
        p
        for p in opened
        if not Path(os.path.realpath(p)).is_relative_to(allowed)
        and not any(Path(os.path.realpath(p)).is_relative_to(r) for r in lib_roots)
    ]
    assert bad == []
    assert spawned(audit) == []


@pytest.mark.skipif(not os.supports_dir_fd >= {os.open}, reason="the walk needs dir_fd (POSIX)")
def test_a_path_is_read_by_walking_from_the_allowed_folder_without_following_links(
    dirs: dict[str, Path], policy: InputPolicy, audit: list
) -> None:
    (dirs["allowed"] / "sub" / "deep").mkdir()
    (dirs["allowed"] / "sub" / "deep" / "x.png").write_bytes((dirs["allowed"] / "img.png").read_bytes())
    audit.clear()  # the set-up's own opens
    load_image_argument(str(dirs["allowed"] / "sub" / "deep" / "x.png"), policy, no_lookup)
    opens = [(str(a[0]), a[2]) for ev, a in audit if ev == "open" and isinstance(a[0], str)]
    by_path = [name for name, _flags in opens if os.path.isabs(name)]
    relative = [(name, flags) for name, flags in opens if not os.path.isabs(name)]
    assert by_path == [str(dirs["allowed"].resolve())]  # only the allowed folder is opened by path
    assert [name for name, _ in relative] == ["sub", "deep", "x.png"]  # then one component at a time
    assert all(isinstance(flags, int) and flags & os.O_NOFOLLOW for _, flags in relative)


def test_messages_say_how_to_fix(dirs: dict[str, Path], policy: InputPolicy) -> None:
    allowed = dirs["allowed"]
    cases = {
        "cat.png": "give an absolute path",
        str(allowed / "missing.png"): "attached the image in the chat",
        "/mnt/user-data/uploads/cat.png": INPUT_DIR_FLAG,
        str(dirs["root"] / "allowed_evil" / "img.png"): "outside the folders",
        str(allowed / "sub"): "is a folder",
        f"{allowed}/../outside/img.png": "without '..'",
        "C:\\Users\\me\\cat.png": "Windows path",
        "\\\\server\\share\\x.png": "UNC",
        "img_1234.png": "absolute path",
        "ftp://example.com/x.png": "unsupported URI scheme",
    }
    for arg, needle in cases.items():
        with pytest.raises(ImageInputError, match=None) as e:
            load_image_argument(arg, policy, no_lookup)
        assert needle in str(e.value), (arg, str(e.value))
    # the outside-folder message lists what *is* allowed, so the agent can move the file there
    with pytest.raises(ImageInputError, match=str(allowed.resolve())):
        load_image_argument("/etc/hostname", policy, no_lookup)


def test_no_allowed_dirs_refuses_every_path(dirs: dict[str, Path]) -> None:
    with pytest.raises(ImageInputError, match=r"\(none configured\)"):
        load_image_argument(str(dirs["allowed"] / "img.png"), InputPolicy(allowed_dirs=()), no_lookup)


def test_file_larger_than_cap(dirs: dict[str, Path]) -> None:
    big = dirs["allowed"] / "big.png"
    big.write_bytes(encode(noise_image((256, 256)), "PNG"))
    pol = InputPolicy(allowed_dirs=(dirs["allowed"],), max_bytes=10_000)
    with pytest.raises(ImageInputError, match="MiB limit"):
        load_image_argument(str(big), pol, no_lookup)


def test_default_allowed_dirs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    home = tmp_path / "home"
    (home / "Pictures").mkdir(parents=True)
    (home / "Desktop").mkdir()
    project = tmp_path / "project"
    project.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(project)
    assert default_allowed_dirs() == (
        project.resolve(),
        (home / "Pictures").resolve(),
        (home / "Desktop").resolve(),
    )
    # cwd "/" (how Claude Desktop starts servers) or the home folder itself would allow far too much
    monkeypatch.chdir("/")
    assert Path("/") not in default_allowed_dirs()
    monkeypatch.chdir(home)
    assert home.resolve() not in default_allowed_dirs()


def test_policy_rejects_nonsense_limits() -> None:
    with pytest.raises(ValueError):
        InputPolicy(allowed_dirs=(), max_bytes=0)
    with pytest.raises(ValueError):
        InputPolicy(allowed_dirs=(), url_timeout_s=-1)


# ---------------------------------------------------------------------------------------------- data URIs


@pytest.mark.parametrize(
    "header",
    [
        "data:image/svg+xml;base64,",
        "data:text/html;base64,",
        "data:image/gif;base64,",
        "data:image/tiff;base64,",
        "data:application/octet-stream;base64,",
        "data:;base64,",
    ],
)
def test_data_uri_wrong_mime(policy: InputPolicy, header: str) -> None:
    with pytest.raises(ImageInputError, match="only image/png, image/jpeg and image/webp"):
        load_image_argument(
            header + base64.b64encode(encode(noise_image(), "PNG")).decode(), policy, no_lookup
        )


@pytest.mark.parametrize(
    ("arg", "needle"),
    [
        ("data:image/png;base64,@@@@@@@@", "not valid base64"),
        ("data:image/png;base64,iVBORw0KGgo=AAAA", "not valid base64"),
        ("data:image/png;base64,iVBORw0KG", "not valid base64"),  # length 4k+1 cannot be base64
        ("data:image/png;base64,iVBORw0KGgoé", "not valid base64"),
        ("data:image/png,iVBORw0KGgo", "must be base64"),
        ("data:image/png;base64", "no comma"),
        ("data:image/png;base64,", "empty"),
    ],
)
def test_data_uri_bad_payload(policy: InputPolicy, arg: str, needle: str) -> None:
    with pytest.raises(ImageInputError, match=needle):
        load_image_argument(arg, policy, no_lookup)


def test_oversized_base64_rejected_before_decoding(
    dirs: dict[str, Path], policy: InputPolicy, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[str] = []
    real_sub = data_uri_module.re.sub

    def spy_b64decode(*a: object, **k: object) -> bytes:
        calls.append("b64decode")
        raise AssertionError("decoded an oversized payload")

    def spy_sub(*a: Any, **k: Any) -> Any:
        calls.append("sub")
        return real_sub(*a, **k)

    monkeypatch.setattr(data_uri_module.base64, "b64decode", spy_b64decode)
    monkeypatch.setattr(data_uri_module.re, "sub", spy_sub)
    small = InputPolicy(allowed_dirs=(dirs["allowed"],), max_bytes=1024**2)
    cases = [
        (small, "data:image/png;base64," + "A" * (20 * 1024**2)),  # 20 MiB string, 1 MiB cap
        (policy, "data:image/png;base64," + "A" * (64 * 1024**2)),  # 64 MiB string, default 32 MiB cap
        (small, "iVBORw0KGgo" + "A" * (4 * 1024**2)),  # bare base64 goes through the same cap
    ]
    for pol, arg in cases:
        with pytest.raises(ImageInputError, match="MiB limit"):
            load_image_argument(arg, pol, no_lookup)
    assert calls == []  # refused on length alone: not even whitespace stripping ran, let alone a decode


def test_base64_just_over_cap_after_stripping_whitespace(dirs: dict[str, Path]) -> None:
    pol = InputPolicy(allowed_dirs=(dirs["allowed"],), max_bytes=3000)
    payload = "A" * 4004 + "\n" * 10  # 4004 chars > 4000 = base64 of 3000 bytes; passes the raw-length slack
    with pytest.raises(ImageInputError, match="MiB limit"):
        load_image_argument("data:image/png;base64," + payload, pol, no_lookup)


# --------------------------------------------------------------------------------------- malformed images


def _corruptions(data: bytes, rng: random.Random) -> list[bytes]:
    n = len(data)
    cuts = sorted(
        {0, 1, 4, 8, 12, 16, 20, 24, 30, 33, 40, 64, 100, 200, n // 4, n // 3, n // 2, n - 20, n - 1}
    )
    cuts += sorted({rng.randrange(1, n) for _ in range(12)})
    out = [data[:c] for c in cuts]  # >= 30 truncation points
    for _ in range(20):  # single-byte flips
        i = rng.randrange(n)
        b = bytearray(data)
        b[i] ^= 1 << rng.randrange(8)
        out.append(bytes(b))
    for _ in range(20):  # byte set to an extreme value, often in the header
        i = rng.randrange(min(n, 64))
        b = bytearray(data)
        b[i] = rng.choice((0x00, 0xFF, 0x7F, 0x80))
        out.append(bytes(b))
    return out


def _header_only(fmt: str, data: bytes) -> bytes:
    if fmt == "PNG":
        return data[:33]  # signature + IHDR chunk
    if fmt == "WEBP":
        return data[:30]  # RIFF header + first chunk header and size fields
    end = data.index(b"\xff\xda")  # JPEG: everything up to the start of scan
    return data[:end]


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP"])
def test_malformed_images_never_raise_anything_else(fmt: str, monkeypatch: pytest.MonkeyPatch) -> None:
    rng = random.Random(fmt)
    inputs: list[bytes] = []
    for seed in range(2):
        img = noise_image((64, 64), seed=seed, mode="RGBA" if fmt != "JPEG" and seed else "RGB")
        data = encode(img, fmt, **({"quality": 80} if fmt != "PNG" else {}))
        inputs += _corruptions(data, rng)
        inputs.append(_header_only(fmt, data))
    magic = {"PNG": b"\x89PNG\r\n\x1a\n", "JPEG": b"\xff\xd8\xff", "WEBP": b"RIFF\x00\x10\x00\x00WEBP"}[fmt]
    for size in (0, 1, 17, 100, 1000, 5000, 20000):  # random blobs, bare and behind the format's signature
        blob = rng.randbytes(size)
        inputs += [blob, magic + blob]
    assert len(inputs) >= 100
    outcomes = {"decoded": 0, "refused": 0}
    allocated: list[tuple[int, int]] = []
    real_prepare = ImageFile.ImageFile.load_prepare

    def prepare(self: ImageFile.ImageFile) -> None:
        allocated.append(self.size)  # where a decode allocates its picture
        real_prepare(self)

    monkeypatch.setattr(ImageFile.ImageFile, "load_prepare", prepare)
    for data in inputs:
        try:
            img = decode_image_bytes(data, max_pixels=64 * 1024**2)
        except ImageInputError as e:
            assert str(e)
            outcomes["refused"] += 1
        else:
            assert img.mode == "RGB" and min(img.size) >= 64
            img.tobytes()  # really decoded: no lazy file behind it
            outcomes["decoded"] += 1
    assert outcomes["refused"] > 0
    # The work a corrupt header can cause is bounded by what it makes the decoder allocate: never more than the
    # largest accepted full decode, whatever the header declared (the rest of the work is the input's length).
    assert allocated and max(w * h for w, h in allocated) <= max(limits.FULL_DECODE_MAX_PIXELS.values())


def test_malformed_through_data_uri_and_file(dirs: dict[str, Path], policy: InputPolicy) -> None:
    data = encode(noise_image(), "PNG")
    bad = dirs["allowed"] / "bad.png"
    for cut in (10, 40, len(data) // 2, len(data) * 3 // 4):  # PNG needs neither IEND nor the zlib checksum
        bad.write_bytes(data[:cut])
        for arg in (str(bad), data_uri(data[:cut])):
            with pytest.raises(ImageInputError):
                load_image_argument(arg, policy, no_lookup)


def test_empty_file(dirs: dict[str, Path], policy: InputPolicy) -> None:
    empty = dirs["allowed"] / "empty.png"
    empty.write_bytes(b"")
    with pytest.raises(ImageInputError, match="empty"):
        load_image_argument(str(empty), policy, no_lookup)


# ----------------------------------------------------------------------------------- decompression bombs


@pytest.mark.parametrize(
    ("name", "data"),
    [
        ("png 65535x65535", png_bomb(65535, 65535)),
        ("png 20000x20000", png_bomb(20000, 20000)),
        ("png 10000x10000", png_bomb(10000, 10000)),  # between Pillow's warn (1x) and error (2x) limits
        ("png 2^31x2^31", png_bomb(2**31 - 1, 2**31 - 1)),
        ("webp 16384x16384", webp_vp8x_bomb(16384, 16384)),
        ("jpeg 65500x65500", jpeg_bomb(65500, 65500)),
    ],
)
def test_decompression_bombs_refused_before_anything_is_decoded(
    name: str, data: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert len(data) < 5000, name
    # Above 2 x MAX_IMAGE_PIXELS Pillow's own guard would raise first inside Image.open: our message must win.
    refused = "Mpx limit|accepted up to"
    work: list[str] = []
    real_load, real_anim = ImageFile.ImageFile.load, WebPImagePlugin._webp.WebPAnimDecoder

    def load(self: ImageFile.ImageFile) -> Any:
        work.append("load")  # where PNG and JPEG allocate the picture and create their decoder
        return real_load(self)

    def anim_decoder(*a: Any) -> Any:
        work.append("WebPAnimDecoder")  # libwebp allocates two canvas-size buffers as it is created
        return real_anim(*a)

    monkeypatch.setattr(ImageFile.ImageFile, "load", load)
    monkeypatch.setattr(WebPImagePlugin._webp, "WebPAnimDecoder", anim_decoder)
    fmt = name.split()[0].upper()
    decode_image_bytes(encode(noise_image(), fmt), max_pixels=64 * 1024**2)  # the spies see a real decode
    assert "load" in work and ("WebPAnimDecoder" in work) == (fmt == "WEBP")
    work.clear()
    with pytest.raises(ImageInputError, match=refused):
        decode_image_bytes(data, max_pixels=64 * 1024**2)
    assert work == []


def test_bomb_under_a_raised_limit_still_stops_at_pillows_threshold() -> None:
    # max_pixels above Pillow's MAX_IMAGE_PIXELS: the stricter of the two wins, so Pillow never warns.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(ImageInputError, match=r"Mpx limit|accepted up to"):
            decode_image_bytes(png_bomb(10000, 10000), max_pixels=10**9)


def test_a_stricter_pillow_limit_set_by_the_host_is_honoured(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000 * 1000)
    with pytest.raises(ImageInputError, match=r"over the 1\.0 Mpx limit"):
        decode_image_bytes(encode(Image.new("RGB", (1001, 1000)), "PNG"), max_pixels=64 * 1024**2)
    assert decode_image_bytes(encode(Image.new("RGB", (1000, 1000)), "PNG"), max_pixels=64 * 1024**2)


@pytest.mark.parametrize(
    ("data", "fmt", "name"),
    [(png_bomb(8192, 8192), "PNG", "PNG"), (webp_vp8l_bomb(8192, 8192), "WEBP", "WebP")],
)
def test_lossless_over_its_cap_is_refused_naming_the_cap(
    data: bytes, fmt: str, name: str, policy: InputPolicy
) -> None:
    # PNG and WebP cannot be decoded at a reduced size: their own cap applies, under the 64 Mi px of a JPEG
    cap = limits.FULL_DECODE_MAX_PIXELS[fmt]
    assert cap < limits.INPUT_MAX_PIXELS < 8192 * 8192 * 2
    for decode in (
        lambda: decode_image_bytes(data, max_pixels=limits.INPUT_MAX_PIXELS),
        lambda: load_image_argument(data_uri(data), policy, no_lookup),
    ):
        with pytest.raises(ImageInputError) as caught:
            decode()
        text = str(caught.value)
        assert "8192x8192 = 67.1 Mpx" in text
        assert (
            f"a {name} is accepted up to {cap / 1e6:.1f} Mpx, because it cannot be decoded at a reduced"
            in text
        )
        assert "or send it as a JPEG (accepted up to 67.1 Mpx)" in text


def test_full_decode_cap_is_inclusive_and_a_reduced_jpeg_is_not_held_to_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for fmt in ("PNG", "WEBP", "JPEG"):
        monkeypatch.setitem(decoding.FULL_DECODE_MAX_PIXELS, fmt, 400 * 400)
    for fmt in ("PNG", "WEBP"):
        at_cap = encode(Image.new("RGB", (400, 400)), fmt)
        assert decode_image_bytes(at_cap, max_pixels=2**20).size == (400, 400)
        with pytest.raises(ImageInputError, match=r"accepted up to 0\.2 Mpx"):
            decode_image_bytes(encode(Image.new("RGB", (400, 401)), fmt), max_pixels=2**20)
    jpeg = encode(Image.new("RGB", (400, 401)), "JPEG")
    # with reduce_to set (the default) a JPEG is decoded reduced once it is large, so only max_pixels holds it
    assert decoding.decode(jpeg, max_pixels=2**20)[0].size == (400, 401)
    with pytest.raises(ImageInputError, match="a JPEG decoded at full size is accepted up to"):
        decoding.decode(jpeg, max_pixels=2**20, reduce_to=None)


@pytest.mark.parametrize(
    ("size", "needle"),
    [
        ((4097, 16), "at least 64"),
        ((63, 64), "at least 64"),
        ((64, 513), "aspect ratio"),
        ((600, 64), "aspect"),
    ],
)
def test_geometry_rules(size: tuple[int, int], needle: str) -> None:
    with pytest.raises(ImageInputError, match=needle):
        decode_image_bytes(encode(Image.new("RGB", size, "gray"), "PNG"), max_pixels=64 * 1024**2)


def test_geometry_limits_are_inclusive() -> None:
    for size in ((64, 64), (64, 512), (512, 64)):
        assert decode_image_bytes(encode(Image.new("RGB", size), "PNG"), max_pixels=64 * 1024**2).size == size
    with pytest.raises(ImageInputError, match="Mpx limit"):
        decode_image_bytes(encode(Image.new("RGB", (128, 128)), "PNG"), max_pixels=128 * 128 - 1)


# -------------------------------------------------------------------------------------- format allowlist


def _other_formats() -> dict[str, bytes]:
    img = noise_image((64, 64))
    out = {
        "GIF": encode(img.convert("P"), "GIF"),
        "BMP": encode(img, "BMP"),
        "TIFF": encode(img, "TIFF"),
        "ICO": encode(img, "ICO"),
        "EPS": (
            b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 64 64\n"
            b"newpath 0 0 moveto 64 64 lineto stroke\n(%pipe%id) (w) file\nshowpage\n%%EOF\n"
        ),
        "EPS (DOS binary)": b"\xc5\xd0\xd3\xc6" + struct.pack("<IIIIII", 30, 60, 0, 0, 0, 0) + b"\xff\xff"
        b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 64 64\nshowpage\n",
        "SVG": b'<?xml version="1.0"?>\n<svg xmlns="http://www.w3.org/2000/svg" width="64" height="64"/>',
        "PDF": encode(img, "PDF"),
        "PPM": encode(img, "PPM"),  # Pillow's name for the PBM/PGM/PPM family
        "PCX": encode(img, "PCX"),
        "SGI": encode(img, "SGI"),
        "XBM": encode(img.convert("1"), "XBM"),
        "HEIC": b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic" + b"\x00" * 40,  # an iPhone photo's start
    }
    for name, feature in (("JPEG2000", "jpg_2000"), ("AVIF", "avif")):
        if features.check(feature):
            out[name] = encode(img, name)
    return out


def test_other_formats_unsupported_and_no_subprocess(
    dirs: dict[str, Path], policy: InputPolicy, audit: list
) -> None:
    # First prove the recorder sees process creation at all.
    subprocess.run([sys.executable, "-c", "pass"], check=True)
    assert "subprocess.Popen" in spawned(audit)
    audit.clear()
    for name, data in _other_formats().items():
        expected = name.split(" ")[0]
        with pytest.raises(ImageInputError, match=rf"unsupported format {expected}; use PNG, JPEG or WebP"):
            decode_image_bytes(data, max_pixels=64 * 1024**2)
        path = dirs["allowed"] / f"file_{expected}.png"  # a misleading suffix changes nothing
        path.write_bytes(data)
        with pytest.raises(ImageInputError, match="unsupported format"):
            load_image_argument(str(path), policy, no_lookup)
        with pytest.raises(ImageInputError, match="unsupported format"):
            load_image_argument(data_uri(data, "image/png"), policy, no_lookup)
    assert spawned(audit) == []


def test_unrecognised_bytes() -> None:
    for data in (b"hello world, not an image at all", b"\x00" * 64, b"<html><body>404</body></html>"):
        with pytest.raises(ImageInputError, match=r"not a PNG, JPEG or WebP|unsupported format HTML"):
            decode_image_bytes(data, max_pixels=64 * 1024**2)


# --------------------------------------------------------------------------------- orientation and modes


def test_exif_orientation_applied() -> None:
    img = Image.new("RGB", (64, 128), (255, 0, 0))
    img.paste((0, 0, 255), (0, 64, 64, 128))  # top red, bottom blue
    exif = Image.Exif()
    exif[ExifTags.Base.Orientation] = 6  # displayed rotated 90° clockwise
    for fmt in ("JPEG", "WEBP", "PNG"):
        out = decode_image_bytes(encode(img, fmt, exif=exif.tobytes()), max_pixels=64 * 1024**2)
        assert out.size == (128, 64), fmt
        left, right = out.getpixel((16, 32)), out.getpixel((112, 32))
        assert isinstance(left, tuple) and isinstance(right, tuple)
        assert left[2] > 200 and left[0] < 60, (fmt, left)  # bottom (blue) went to the left
        assert right[0] > 200 and right[2] < 60, (fmt, right)


@pytest.mark.filterwarnings("ignore:Corrupt EXIF data")
def test_broken_exif_does_not_cost_the_image() -> None:
    img = noise_image()
    data = encode(img, "JPEG", exif=b"Exif\x00\x00MM\x00*\x00\x00\x00\x08\xff\xff garbage")
    assert decode_image_bytes(data, max_pixels=64 * 1024**2).size == (64, 64)


def _mode_cases() -> list[tuple[str, bytes, tuple[int, int, int]]]:
    """(name, encoded bytes, expected RGB of pixel (0,0))."""
    cases = []
    rgba = Image.new("RGBA", (64, 64), (255, 0, 0, 0))  # fully transparent red → white
    cases.append(("RGBA png", encode(rgba, "PNG"), (255, 255, 255)))
    cases.append(("RGBA webp", encode(rgba, "WEBP", lossless=True), (255, 255, 255)))
    half = Image.new("RGBA", (64, 64), (0, 0, 0, 128))  # half-transparent black → mid grey
    cases.append(("RGBA half png", encode(half, "PNG"), (127, 127, 127)))
    cases.append(("LA png", encode(Image.new("LA", (64, 64), (0, 0)), "PNG"), (255, 255, 255)))
    cases.append(("L png", encode(Image.new("L", (64, 64), 77), "PNG"), (77, 77, 77)))
    cases.append(("1 png", encode(Image.new("1", (64, 64), 1), "PNG"), (255, 255, 255)))
    pal = Image.new("P", (64, 64), 3)
    pal.putpalette([0, 0, 0, 10, 20, 30, 40, 50, 60, 0, 128, 255] + [0] * (256 * 3 - 12))
    cases.append(("P png", encode(pal, "PNG"), (0, 128, 255)))
    cases.append(("P+transparency png", encode(pal, "PNG", transparency=3), (255, 255, 255)))
    cmyk = Image.new("CMYK", (64, 64), (0, 255, 0, 0))  # magenta
    cases.append(("CMYK jpeg", encode(cmyk, "JPEG", quality=95), (255, 0, 255)))
    i16 = Image.new("I;16", (64, 64), 32768)  # half of the 16-bit range → 128, not clipped to 255
    cases.append(("I;16 png", encode(i16, "PNG"), (128, 128, 128)))
    cases.append(("L jpeg", encode(Image.new("L", (64, 64), 200), "JPEG", quality=95), (200, 200, 200)))
    return cases


@pytest.mark.parametrize(("name", "data", "expected"), _mode_cases(), ids=[c[0] for c in _mode_cases()])
def test_modes_become_rgb(name: str, data: bytes, expected: tuple[int, int, int]) -> None:
    out = decode_image_bytes(data, max_pixels=64 * 1024**2)
    assert out.mode == "RGB"
    px = out.getpixel((0, 0))
    assert isinstance(px, tuple)
    assert all(abs(a - b) <= 3 for a, b in zip(px, expected, strict=True)), (name, px)


def test_animated_webp_and_png_give_first_frame() -> None:
    frames = [Image.new("RGB", (64, 64), c) for c in ((255, 0, 0), (0, 255, 0))]
    for fmt in ("PNG", "WEBP"):
        data = encode(
            frames[0],
            fmt,
            save_all=True,
            append_images=frames[1:],
            **({"lossless": True} if fmt == "WEBP" else {}),
        )
        assert decode_image_bytes(data, max_pixels=64 * 1024**2).getpixel((5, 5)) == (255, 0, 0)


# --------------------------------------------------------------------------------------------------- URLs


class _Handler(http.server.BaseHTTPRequestHandler):
    routes: ClassVar[dict[str, Callable[[http.server.BaseHTTPRequestHandler], None]]] = {}
    hits: ClassVar[list[str]] = []

    def do_GET(self) -> None:
        type(self).hits.append(self.path)
        route = self.routes.get(self.path)
        if route is None:
            self.send_error(404)
            return
        route(self)

    def log_message(self, format: str, *args: object) -> None:  # keep test output clean
        pass


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False  # a handler stuck in the slow route must not hang teardown


@pytest.fixture
def http_server() -> Iterator[tuple[str, list[str]]]:
    png = encode(noise_image((72, 64), seed=9), "PNG")

    def ok(h: http.server.BaseHTTPRequestHandler) -> None:
        h.send_response(200)
        h.send_header("Content-Type", "image/png")
        h.send_header("Content-Length", str(len(png)))
        h.end_headers()
        h.wfile.write(png)

    def redirect(h: http.server.BaseHTTPRequestHandler) -> None:
        h.send_response(302)
        h.send_header("Location", "http://169.254.169.254/latest/meta-data/")
        h.end_headers()

    def big_streamed(h: http.server.BaseHTTPRequestHandler) -> None:
        h.send_response(200)
        h.end_headers()  # no Content-Length: the cap has to be enforced while reading
        try:
            for _ in range(64):
                h.wfile.write(png[:8] + b"\x00" * 16384)
        except OSError:
            pass  # the client hung up once it had enough, as it should

    def big_declared(h: http.server.BaseHTTPRequestHandler) -> None:
        h.send_response(200)
        h.send_header("Content-Length", str(10**9))
        h.end_headers()

    def slow(h: http.server.BaseHTTPRequestHandler) -> None:
        h.send_response(200)
        h.send_header("Content-Length", str(len(png)))
        h.end_headers()
        try:
            for i in range(0, len(png), 16):  # a drip that resets any per-read timeout
                h.wfile.write(png[i : i + 16])
                h.wfile.flush()
                time.sleep(0.1)
        except OSError:
            pass

    def html(h: http.server.BaseHTTPRequestHandler) -> None:
        body = b"<html><body>not an image</body></html>"
        h.send_response(200)
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        h.wfile.write(body)

    _Handler.routes = {
        "/ok.png": ok,
        "/ok.png?size=large": ok,
        "/redirect": redirect,
        "/big": big_streamed,
        "/declared-big": big_declared,
        "/slow": slow,
        "/page.html": html,
    }
    _Handler.hits = []
    server = _Server(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", _Handler.hits
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def test_urls_off_by_default_with_enabling_hint(
    dirs: dict[str, Path], http_server: tuple[str, list[str]]
) -> None:
    base, hits = http_server
    pol = InputPolicy(allowed_dirs=(dirs["allowed"],))
    assert pol.allow_urls is False
    for url in (f"{base}/ok.png", "https://example.com/cat.png", "HTTP://EXAMPLE.COM/x.png"):
        with pytest.raises(ImageInputError) as e:
            load_image_argument(url, pol, no_lookup)
        assert ALLOW_URLS_FLAG in str(e.value) and "data:" in str(e.value)
    assert hits == []


@pytest.fixture
def loopback_allowed(monkeypatch: pytest.MonkeyPatch) -> None:
    """The test server listens on 127.0.0.1: let the address check pass loopback, and nothing else."""
    real = urls.is_public_address
    monkeypatch.setattr(urls, "is_public_address", lambda ip: ip.is_loopback or real(ip))


@pytest.mark.usefixtures("loopback_allowed")
def test_url_fetch_from_local_server(dirs: dict[str, Path], http_server: tuple[str, list[str]]) -> None:
    base, hits = http_server
    pol = InputPolicy(allowed_dirs=(dirs["allowed"],), allow_urls=True)
    got = load_image_argument(f"{base}/ok.png", pol, no_lookup)
    assert got.source == "url" and got.image_id is None
    assert got.image.mode == "RGB" and got.image.size == (72, 64)
    assert got.description == "URL 127.0.0.1/ok.png (PNG, 72x64)"
    assert load_image_argument(f"{base}/ok.png?size=large", pol, no_lookup).image.size == (72, 64)
    assert hits == ["/ok.png", "/ok.png?size=large"]


def test_loopback_url_refused_without_escape_hatch(
    dirs: dict[str, Path], http_server: tuple[str, list[str]]
) -> None:
    base, hits = http_server
    port = base.rsplit(":", 1)[1]
    pol = InputPolicy(allowed_dirs=(dirs["allowed"],), allow_urls=True)
    for host in ("127.0.0.1", "localhost", "[::1]", "2130706433", "0x7f.1", "[::ffff:127.0.0.1]", "0.0.0.0"):
        with pytest.raises(ImageInputError, match=r"refusing to fetch|cannot resolve"):
            load_image_argument(f"http://{host}:{port}/ok.png", pol, no_lookup)
    assert hits == []  # refused before connecting


@pytest.mark.parametrize(
    "url",
    [
        "http://169.254.169.254/latest/meta-data/",  # cloud metadata endpoint
        "http://10.0.0.1/x.png",
        "http://192.168.1.1/x.png",
        "http://172.16.0.1/x.png",
        "http://100.64.0.1/x.png",  # carrier-grade NAT
        "http://224.0.0.1/x.png",  # multicast
        "http://240.0.0.1/x.png",  # reserved
        "http://[fe80::1]/x.png",  # IPv6 link-local
        "http://[fd00::1]/x.png",  # IPv6 unique local
        "http://[64:ff9b::a00:1]/x.png",  # NAT64 of 10.0.0.1
        "https://[::ffff:169.254.169.254]/",
    ],
)
def test_private_addresses_refused(dirs: dict[str, Path], url: str) -> None:
    pol = InputPolicy(allowed_dirs=(dirs["allowed"],), allow_urls=True)
    with pytest.raises(ImageInputError, match="refusing to fetch"):
        load_image_argument(url, pol, no_lookup)


def test_every_resolved_address_is_checked(dirs: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    def fake_getaddrinfo(host: str, port: int, *a: object, **k: object) -> list[tuple[object, ...]]:
        return [
            (socket.AF_INET, socket.SOCK_STREAM, 6, "", ("93.184.216.34", port)),
            (socket.AF_INET, socket.SOCK_STREAM, 6, "", ("10.1.2.3", port)),
        ]

    monkeypatch.setattr(urls.socket, "getaddrinfo", fake_getaddrinfo)
    pol = InputPolicy(allowed_dirs=(dirs["allowed"],), allow_urls=True)
    with pytest.raises(ImageInputError, match=r"resolves to 10\.1\.2\.3"):
        load_image_argument("https://rebind.example/x.png", pol, no_lookup)


def test_is_public_address_table() -> None:
    public = ["93.184.216.34", "8.8.8.8", "2606:2800:220:1:248:1893:25c8:1946", "1.1.1.1"]
    private = [
        "127.0.0.1", "10.0.0.1", "172.31.255.255", "192.168.0.1", "169.254.169.254", "100.64.0.1", "0.0.0.0",
        "255.255.255.255", "224.0.0.1", "::1", "::", "fe80::1", "fc00::1", "::ffff:10.0.0.1", "64:ff9b::7f00:1",
        "192.0.2.1", "198.18.0.1",
    ]  # fmt: skip
    for a in public:
        assert urls.is_public_address(ipaddress.ip_address(a)), a
    for a in private:
        assert not urls.is_public_address(ipaddress.ip_address(a)), a


@pytest.mark.parametrize(
    ("path", "needle", "kwargs"),
    [
        ("/redirect", "redirects", {}),
        ("/missing.png", "HTTP 404", {}),
        ("/big", "MiB limit", {"max_bytes": 100_000}),
        ("/declared-big", "MiB limit", {}),
        ("/slow", "longer than", {"url_timeout_s": 0.5}),
        ("/page.html", "unsupported format HTML", {}),
    ],
)
@pytest.mark.usefixtures("loopback_allowed")
def test_url_failures(
    dirs: dict[str, Path], http_server: tuple[str, list[str]], path: str, needle: str, kwargs: dict
) -> None:
    base, hits = http_server
    pol = InputPolicy(allowed_dirs=(dirs["allowed"],), allow_urls=True, **kwargs)
    # Each message names the check that stopped the fetch, which is what a timing would only suggest: "longer
    # than" comes from the whole-fetch deadline alone (the drip, 16 bytes every 0.1 s for ~90 s, resets any
    # per-read timeout), "MiB limit" from the count while reading or the declared length, never from a read body.
    with pytest.raises(ImageInputError, match=needle):
        load_image_argument(base + path, pol, no_lookup)
    assert hits == [path]  # one request: a redirect is reported, never followed


@pytest.mark.parametrize(
    ("url", "needle"),
    [
        ("http://user:pw@example.com/x.png", "credentials"),
        ("http:///x.png", "malformed URL"),
        ("http://example.com:99999/x.png", "malformed URL"),
        ("http://exa mple.com/x.png", "whitespace"),
        ("http://host.invalid/x.png", "cannot resolve"),
    ],
)
@pytest.mark.usefixtures("loopback_allowed")
def test_malformed_urls(dirs: dict[str, Path], url: str, needle: str) -> None:
    pol = InputPolicy(allowed_dirs=(dirs["allowed"],), allow_urls=True)
    with pytest.raises(ImageInputError, match=needle):
        load_image_argument(url, pol, no_lookup)


# ----------------------------------------------------------------------------------------- export paths


def test_export_path_inside_allowed(dirs: dict[str, Path], policy: InputPolicy) -> None:
    a = dirs["allowed"].resolve()
    assert check_output_path(str(a / "out.png"), policy) == a / "out.png"
    assert check_output_path(str(a / "sub" / "out.PNG"), policy) == a / "sub" / "out.PNG"
    assert check_output_path(str(a / "out"), policy) == a / "out.png"
    assert check_output_path(str(a / "cat.v2"), policy) == a / "cat.v2.png"
    assert check_output_path((a / "my out.png").as_uri(), policy) == a / "my out.png"
    assert check_output_path(str(a / "img.png"), policy) == a / "img.png"  # existing file: caller decides
    assert check_output_path(str(a / "sub"), policy, default_name="img_x.png") == a / "sub" / "img_x.png"
    link_dir = dirs["allowed"] / "inner_link"
    link_dir.symlink_to(dirs["allowed"] / "sub", target_is_directory=True)
    assert check_output_path(str(link_dir / "x.png"), policy) == a / "sub" / "x.png"


def test_export_path_refusals(dirs: dict[str, Path], policy: InputPolicy) -> None:
    allowed, root = dirs["allowed"], dirs["root"]
    (allowed / "escape").symlink_to(dirs["outside"], target_is_directory=True)
    (allowed / "planted.png").symlink_to(dirs["outside"] / "victim.png")
    (allowed / "folder.png").mkdir()
    cases = {
        "out.png": "relative path",
        "../out.png": "'..'",
        f"{allowed}/../outside/out.png": "'..'",
        "/etc/cron.d/x.png": "outside the folders",
        str(root / "allowed_evil" / "out.png"): "outside the folders",
        str(root / "allowedX" / "out.png"): "outside the folders",
        str(allowed / "escape" / "out.png"): "outside the folders",
        str(allowed / "planted.png"): "symbolic link",
        str(allowed / "folder.png"): "not a regular file",
        str(allowed / "nope" / "out.png"): "does not exist",
        str(allowed / "out.jpg"): "end the file name with .png",
        str(allowed / "out.webp"): "end the file name with .png",
        f"{allowed}/out\x00.png": "NUL",
        "C:\\Users\\me\\out.png": "Windows path",
        "\\\\server\\share\\out.png": "UNC",
        "": "empty",
        str(allowed) + "/": "names no file",
    }
    for arg, needle in cases.items():
        with pytest.raises(ImageInputError) as e:
            check_output_path(arg, policy)
        assert needle in str(e.value), (arg, str(e.value))
    assert not (dirs["outside"] / "victim.png").exists()
