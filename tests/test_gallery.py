"""The gallery without a browser: the read-only store under it, the recipe rules it shows, and the standalone
`klein-agent gallery` process over HTTP (the guard, the one-time login link, the 404s, thumbnails made once, nothing
written to the store). The page itself is tested in a real browser in test_gallery_browser.py."""

from __future__ import annotations

import http.client
import json
import os
import re
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

import pytest
from fill_store import fill  # tools/, on the path through conftest
from PIL import Image

from klein_agent.gallery.app import Gallery
from klein_agent.option_types import THUMBS_DIR
from klein_agent.rules.recipes import rerun_call, rerun_command
from klein_agent.service.store import ImageStore, StoreError, read_only_uri
from tests.http_helpers import REPO, wait_listening


def rows(root: Path) -> list[tuple]:
    """Every column of every record, LRU bookkeeping included: what "nothing was written" compares."""
    with sqlite3.connect(f"{(root / 'store.sqlite3').as_uri()}?mode=ro", uri=True) as conn:
        return conn.execute("SELECT * FROM images ORDER BY seq").fetchall()


@pytest.fixture
def filled(tmp_path: Path) -> Path:
    root = tmp_path / "store"
    with ImageStore(root) as store:
        fill(store, images=12, sessions=3)
    return root


# ---- the store, read-only -------------------------------------------------------------------------------------


def test_a_read_only_store_reads_everything_and_writes_nothing(filled: Path) -> None:
    orphan = filled / "images" / ("0" * 64 + ".png")
    orphan.write_bytes(b"left by a crash")
    before = rows(filled)
    with ImageStore(filled, read_only=True, max_images=1) as store:  # a bound that would evict, if it could
        page, _ = store.list_images(limit=100)
        assert len(page) == 12
        for image in page:
            assert store.read_png(image.image_id)[:4] == b"\x89PNG"
            assert store.get(image.image_id).parents == image.parents
        assert [s.session for s in store.sessions()] == ["session-03", "session-02", "session-01"]
        assert sum(s.count for s in store.sessions()) == 12
        with pytest.raises(StoreError, match="read-only"):
            store.put(store.read_png(page[0].image_id), width=page[0].width, height=page[0].height, recipe={})
    assert rows(filled) == before, "reads through a read-only store count as no use, evict nothing"
    assert orphan.exists(), "a read-only store does not sweep"


def test_the_read_only_uri_adds_immutable_only_where_side_files_cannot_be_made(tmp_path: Path) -> None:
    db = tmp_path / "store.sqlite3"
    assert read_only_uri(db, folder_writable=True) == f"{db.as_uri()}?mode=ro"
    assert read_only_uri(db, folder_writable=False) == f"{db.as_uri()}?mode=ro&immutable=1"


def test_a_store_on_a_read_only_filesystem_opens_and_nothing_is_created(
    filled: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import shutil

    import klein_agent.service.store.sqlite_catalog as store_module

    copy = tmp_path / "backup"
    shutil.copytree(filled, copy)
    for path in [*copy.rglob("*"), copy]:
        path.chmod(0o555 if path.is_dir() else 0o444)
    if os.geteuid() == 0:  # root writes through permission bits; a read-only mount refuses even root, as here
        monkeypatch.setattr(store_module.os, "access", lambda path, mode: not (mode & os.W_OK))
    before = sorted(p.name for p in copy.iterdir())
    try:
        with ImageStore(copy, read_only=True) as store:
            page, _ = store.list_images(limit=100)
            assert len(page) == 12 and store.read_png(page[0].image_id)[:4] == b"\x89PNG"
        assert sorted(p.name for p in copy.iterdir()) == before, "no -shm, -wal or lock file beside the copy"
        Gallery(
            copy, thumbs=copy / THUMBS_DIR
        ).close()  # the gallery's open path, thumbnails included, takes the store as it is
    finally:
        for path in [copy, *copy.rglob("*")]:
            path.chmod(0o755 if path.is_dir() else 0o644)


def test_a_missing_store_is_named(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="no image store at") as caught:
        ImageStore(tmp_path / "nowhere", read_only=True)
    assert "--store" in str(caught.value)
    assert not (tmp_path / "nowhere").exists()


# ---- the recipe rules the page shows --------------------------------------------------------------------------


def test_rerun_call_and_command_follow_the_tool() -> None:
    base = {"prompt": "a fox's den", "seed": 7, "width": 64, "height": 48, "steps": 4, "guidance": None}
    generate = {"tool": "generate", "model": "tiny", **base, "parents": []}
    assert rerun_call(generate, []) == {"name": "generate", "arguments": base}
    assert rerun_command(generate, [], "out.png") == [
        "klein-agent", "generate", "--model", "tiny", "--prompt", "a fox's den", "--seed", "7",
        "--width", "64", "--height", "48", "--steps", "4", "--out", "out.png",
    ]  # fmt: skip
    edit = {**generate, "tool": "edit", "parents": ["img_a"]}
    assert rerun_call(edit, ["img_a"]) == {"name": "edit", "arguments": {"image": "img_a", **base}}
    compose = {**generate, "tool": "compose", "guidance": 2.5, "parents": ["img_a", "img_b"]}
    argv = rerun_command(compose, ["img_a", "img_b"], "c.png")
    assert argv is not None and argv[-6:] == [
        "--image",
        "img_a.png",
        "--image",
        "img_b.png",
        "--out",
        "c.png",
    ]
    assert argv[argv.index("--guidance") + 1] == "2.5"
    assert rerun_call({"tool": "import", "source": "x.png"}, []) is None
    assert rerun_command({"tool": "import"}, [], "x.png") is None


# ---- thumbnails -----------------------------------------------------------------------------------------------


def test_thumbnails_are_made_once_kept_by_the_sweep_and_pruned_after_eviction(filled: Path) -> None:
    gallery = Gallery(filled, thumbs=filled / THUMBS_DIR)
    try:
        images, _ = gallery.store.list_images(limit=100)
        first = gallery.thumbs.webp(images[0])
        assert first[:4] == b"RIFF" and first[8:12] == b"WEBP"
        cached = list((filled / THUMBS_DIR).iterdir())
        assert len(cached) == 1 and cached[0].read_bytes() == first
        stamp = cached[0].stat().st_mtime_ns
        assert gallery.thumbs.webp(images[0]) == first and cached[0].stat().st_mtime_ns == stamp
        with Image.open(cached[0]) as thumb:
            assert thumb.size == (images[0].width, images[0].height)  # small pictures are never upscaled
        for image in images:
            gallery.thumbs.webp(image)
    finally:
        gallery.close()
    with ImageStore(filled):  # the only user: its sweep removes every file in images/ without a record
        pass
    assert len(list((filled / THUMBS_DIR).iterdir())) == 12, "the store's sweep leaves the thumbnails alone"
    with ImageStore(filled, max_images=5):  # evicts the 7 least recently used
        pass
    gallery = Gallery(filled, thumbs=filled / THUMBS_DIR)
    gallery.close()
    assert len(list((filled / THUMBS_DIR).iterdir())) == 5, "thumbnails of evicted images are pruned"


def test_a_thumbnail_is_made_from_a_large_picture(tmp_path: Path) -> None:
    from tests.fakes import png_bytes

    with ImageStore(tmp_path / "store") as store:
        image = store.put(png_bytes(640, 480), width=640, height=480, recipe={"tool": "import"})
    gallery = Gallery(tmp_path / "store", thumbs=tmp_path / "store" / THUMBS_DIR)
    try:
        data = gallery.thumbs.webp(image)
    finally:
        gallery.close()
    with Image.open(__import__("io").BytesIO(data)) as thumb:
        assert thumb.format == "WEBP" and thumb.size == (320, 240)


# ---- the standalone command -----------------------------------------------------------------------------------

BLOCK_HEAVY = """
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("torch", "transformers", "diffusers", "mcp", "safetensors"):
            raise ImportError(f"{name} imported on the way to the gallery")
sys.meta_path.insert(0, Block())
from klein_agent.cli import build_parser
build_parser().parse_args(["gallery", "--store", "x"])
import klein_agent.gallery.app, klein_agent.gallery.command, klein_agent.web.listen
print("ok")
"""


def test_the_gallery_command_loads_no_model_and_no_mcp() -> None:
    done = subprocess.run([sys.executable, "-c", BLOCK_HEAVY], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-3000:]


@pytest.fixture
def gallery_process(filled: Path, tmp_path: Path) -> Iterator[tuple[int, str, str, Path]]:
    """`klein-agent gallery --port 0 --open` on the filled store: (port, login link path, token, log path).
    $BROWSER is a script that writes down the URL it is asked to open (tmp_path / "opened")."""
    log_path = tmp_path / "gallery.log"
    browser = tmp_path / "browser"
    browser.write_text(
        f"#!{sys.executable}\nimport sys\nopen({str(tmp_path / 'opened')!r}, 'w').write(sys.argv[1])\n"
    )
    browser.chmod(0o700)
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "klein_agent", "gallery", "--store", str(filled), "--port", "0", "--open"],
            cwd=REPO,
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "BROWSER": str(browser)},
        )
    try:
        deadline = time.monotonic() + 30
        while not (
            found := re.search(r"open http://127\.0\.0\.1:(\d+)(/login\?key=\S+)", log_path.read_text())
        ):
            assert proc.poll() is None and time.monotonic() < deadline, log_path.read_text()
            time.sleep(0.05)
        port, link = int(found.group(1)), found.group(2)
        wait_listening(port)
        token = (filled.parent / f"{filled.name}.http-token").read_text().strip()
        yield port, link, token, log_path
    finally:
        proc.terminate()
        proc.wait(timeout=15)


def get(
    port: int, path: str, headers: dict[str, str] | None = None, method: str = "GET"
) -> tuple[int, dict, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request(method, path, headers=headers or {})  # the path goes out as written: no normalising
        response = conn.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
    finally:
        conn.close()


def test_open_without_a_browser_says_so_and_prints_the_link(filled: Path, tmp_path: Path) -> None:
    log_path = tmp_path / "gallery.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "klein_agent", "gallery", "--store", str(filled), "--port", "0", "--open"],
            cwd=REPO,
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "BROWSER": "false"},  # a browser that cannot start, as on a headless machine
        )
    try:
        deadline = time.monotonic() + 30
        while "--open: no web browser could be started" not in log_path.read_text():
            assert proc.poll() is None and time.monotonic() < deadline, log_path.read_text()
            time.sleep(0.05)
    finally:
        proc.terminate()
        proc.wait(timeout=15)
    assert re.search(
        r"no web browser could be started here .*; open http://127\.0\.0\.1:\d+/login\?key=",
        log_path.read_text(),
    )


def test_the_standalone_gallery_is_guarded_and_its_link_works_once(
    gallery_process: tuple[int, str, str, Path],
) -> None:
    port, link, token, log_path = gallery_process
    assert token not in log_path.read_text()
    opened = log_path.parent / "opened"
    deadline = time.monotonic() + 10
    while not opened.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert opened.read_text() == f"http://127.0.0.1:{port}{link}", "--open opens the login link"
    status, headers, body = get(port, "/gallery/", {"Accept": "text/html"})
    assert status == 401 and headers["content-type"].startswith("text/html") and b"login link" in body
    assert get(port, "/gallery/api/sessions")[0] == 401
    assert get(port, "/gallery/api/sessions", {"Cookie": "klein_agent_session=guess"})[0] == 401
    assert get(port, "/gallery/api/sessions", {"Authorization": f"Bearer {token}"})[0] == 200
    bearer = {"Authorization": f"Bearer {token}"}
    assert get(port, "/gallery/", {**bearer, "Host": "evil.example"})[0] == 421
    assert get(port, "/gallery/", {**bearer, "Host": f"localhost:{port}.evil.com"})[0] == 421
    assert get(port, "/gallery/", {**bearer, "Origin": f"http://localhost:{port}.evil.com"})[0] == 403
    assert get(port, "/gallery/", {**bearer, "Origin": f"http://127.0.0.1:{port}"})[0] == 200

    assert get(port, link.replace("key=", "key=x"))[0] == 401
    status, headers, _ = get(port, link)
    assert status == 303 and headers["location"] == "/gallery/"
    cookie = headers["set-cookie"]
    assert "HttpOnly" in cookie and "SameSite=Strict" in cookie
    session = {"Cookie": cookie.split(";", 1)[0]}
    status, _, body = get(port, "/gallery/api/sessions", session)
    assert status == 200 and json.loads(body)["total"] == 12
    assert get(port, link)[0] == 401, "the link works once"
    assert get(port, "/", session)[0] == 307 and get(port, "/gallery", session)[0] in (307, 308)


def test_the_standalone_gallery_names_the_token_file_it_created_in_its_log_and_its_401(
    filled: Path, gallery_process: tuple[int, str, str, Path]
) -> None:
    """Run without `serve --http`: the gallery itself made the token file, so it says where (as serve does), and
    a script refused for want of the token is told which file holds it (by name: the folder stays private)."""
    port, _, token, log_path = gallery_process
    token_file = filled.parent / f"{filled.name}.http-token"
    said = log_path.read_text()
    assert (
        f"clients and scripts must send 'Authorization: Bearer <token>'; the token is in file {token_file} "
        "(created now)" in said
    ), said
    assert "serve --http" not in said and token not in said
    status, _, body = get(port, "/gallery/api/images")
    assert status == 401
    assert (
        f"(the token is in the file {token_file.name} beside the store, whose path the server logged at start, "
        "or $KLEIN_AGENT_TOKEN)" in body.decode()
    ), body
    assert str(filled.parent) not in body.decode()


def test_the_gallery_json_paths_the_docs_give_answer_on_the_standalone_gallery(
    gallery_process: tuple[int, str, str, Path],
) -> None:
    """docs/server.md gives the JSON routes with the prefix both front-ends mount them under (/gallery/...)."""
    port, _, token, _ = gallery_process
    docs = (REPO / "docs" / "server.md").read_text()
    given = sorted(set(re.findall(r"`(/(?:gallery/)?api/[a-z]+(?:\?[^`]*)?)`", docs)))
    assert given == ["/gallery/api/images?standing=pick", "/gallery/api/verdicts?after=MARK"], given
    for path in given:
        status, _, body = get(port, path.replace("MARK", "0"), {"Authorization": f"Bearer {token}"})
        assert status == 200, (path, body[:200])


def test_unknown_ids_and_path_tricks_get_the_404_page_and_nothing_is_written(
    filled: Path, gallery_process: tuple[int, str, str, Path]
) -> None:
    port, _, token, _ = gallery_process
    auth = {"Authorization": f"Bearer {token}"}
    before = rows(filled)
    status, _, body = get(port, "/gallery/api/images?limit=100", auth)
    cards = json.loads(body)["images"]
    real = cards[0]["id"]
    png_name = next((filled / "images").iterdir()).name
    tricks = [
        "/gallery/image/img_AAAAAAAAAAAAAAAAAAAAAA.png",  # the shape of an id, but no such image
        "/gallery/thumb/img_AAAAAAAAAAAAAAAAAAAAAA.webp",
        "/gallery/image/nope.png",
        f"/gallery/image/{real}.PNG",
        f"/gallery/image/{real}",
        f"/gallery/image/{png_name}",
        "/gallery/image/../store.sqlite3",
        "/gallery/image/..%2F..%2Fstore.sqlite3",
        "/gallery/image/%2e%2e%2fstore.sqlite3",
        f"/gallery/thumb/..%2Fimages%2F{png_name}",
        f"/gallery/image/{real}.png%2F..%2F..%2Fstore.sqlite3",
        "/gallery/static/..%2F..%2F..%2Fstore.sqlite3",
        "/gallery/static/app.py",
        "/gallery/static/%2e%2e/app.py",
        "/gallery/%2e%2e/%2e%2e/etc/passwd",
        "/gallery/nowhere",
    ]
    for path in tricks:
        status, headers, body = get(port, path, auth)
        assert status == 404, path
        assert headers["content-type"].startswith("text/html") and b"Not found" in body, path
        assert b"PNG" not in body and b"SQLite" not in body, path
    for path in ("/gallery/api/images/img_AAAAAAAAAAAAAAAAAAAAAA", "/gallery/api/images/..%2Fx"):
        status, _, body = get(port, path, auth)
        assert status == 404 and "error" in json.loads(body), path
    assert get(port, "/gallery/api/images?cursor=bogus", auth)[0] == 400
    assert get(port, "/gallery/api/images", auth, method="POST")[0] == 405
    assert get(port, "/gallery/", auth, method="DELETE")[0] == 405

    # the real picture, as stored; with ?download=1 as an attachment
    status, headers, body = get(port, f"/gallery/image/{real}.png?download=1", auth)
    with ImageStore(filled, read_only=True) as store:
        assert status == 200 and body == store.read_png(real)
    assert headers["content-disposition"] == f'attachment; filename="{real}.png"'
    assert (
        "immutable" in headers["cache-control"] and "default-src 'none'" in headers["content-security-policy"]
    )
    status, headers, body = get(port, f"/gallery/thumb/{real}.webp", auth)
    assert status == 200 and headers["content-type"] == "image/webp" and body[8:12] == b"WEBP"
    assert "immutable" in headers["cache-control"]
    assert get(port, f"/gallery/thumb/{real}.webp", {**auth, "If-None-Match": headers["etag"]})[0] == 304
    assert rows(filled) == before, "the gallery wrote nothing to the store"


def test_a_store_that_is_not_there_is_refused_before_serving(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "klein_agent", "gallery", "--store", str(tmp_path / "none"), "--port", "0"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ},
    )
    assert done.returncode == 2 and "no image store at" in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "none").exists() and not (tmp_path / "none.http-token").exists()


def test_the_verdicts_recorded_after_a_mark_are_paged_and_a_bad_mark_is_refused(
    filled: Path, gallery_process: tuple[int, str, str, Path]
) -> None:
    port, _, token, _ = gallery_process
    bearer = {"Authorization": f"Bearer {token}"}
    status, _, body = get(port, "/gallery/api/images?limit=3", bearer)
    page = json.loads(body)
    mark, shown = page["verdict_mark"], [card["id"] for card in page["images"]]
    with ImageStore(filled) as writer:  # another process records (the gallery's store is read-only)
        writer.record_verdict(shown[1], "pick", "the sharpest")
        writer.record_verdict(shown[0], "note", "too dark")
        writer.record_verdict(shown[1], "note", "check the hands")
    status, _, body = get(port, f"/gallery/api/verdicts?after={mark}", bearer)
    changes = json.loads(body)
    assert status == 200 and changes["mark"] > mark
    by_id = {change["id"]: change for change in changes["changes"]}
    assert list(by_id) == [shown[1], shown[0]], "each image once, in recording order"
    assert by_id[shown[1]]["verdict"] == "pick" and by_id[shown[1]]["verdict_reason"] == "the sharpest"
    assert by_id[shown[1]]["notes"] == ["check the hands"] and by_id[shown[0]]["verdict"] is None
    status, _, body = get(port, f"/gallery/api/verdicts?after={changes['mark']}", bearer)
    assert json.loads(body) == {"changes": [], "mark": changes["mark"]}
    for bad in ("", "-1", "abc", "1e3", "１", str(2**63), "9" * 40):
        status, _, body = get(port, f"/gallery/api/verdicts?after={quote(bad)}", bearer)
        assert status == 400, bad
        assert json.loads(body)["error"].startswith("after must be a verdict mark (a whole number from 0"), (
            bad
        )
