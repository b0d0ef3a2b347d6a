"""What the tools share (engine, store, input policy, limits) and the checks every tool makes before work starts.

Everything here runs before the engine is called: a bad argument costs no model time and writes nothing.
Errors become `ToolError`, whose text reaches the calling model: it names the problem and how to fix it.
"""

from __future__ import annotations

import contextlib
import math
import re
import secrets
import unicodedata
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

import anyio.to_thread
from mcp.server.mcpserver.exceptions import ToolError
from PIL import Image

from klein_agent import __version__
from klein_agent.engine import Engine, EngineError
from klein_agent.image_inputs import ImageInputError, InputPolicy, LoadedImage, load_image_argument
from klein_agent.previews import encode_png
from klein_agent.request import MULTIPLE
from klein_agent.server.config import MAX_SIDE, MIN_SIDE, ServerConfig
from klein_agent.store import ImageStore, StoreError

_SESSION_RE = re.compile(r"[A-Za-z0-9 _.:-]{1,64}", re.ASCII)  # the store's rule, checked before any work


@dataclass
class ServerState:
    engine: Engine
    store: ImageStore
    policy: InputPolicy
    config: ServerConfig


@contextlib.contextmanager
def tool_errors() -> Iterator[None]:
    """Turn the anticipated failures of the layers below into ToolError, so their text reaches the model."""
    try:
        yield
    except ToolError:
        raise
    except (ImageInputError, StoreError, EngineError) as exc:
        raise ToolError(str(exc)) from exc


def clean_prompt(prompt: str) -> str:
    """Strip control characters (keeping newlines and tabs) and surrounding space; refuse an empty result."""
    text = "".join(ch for ch in prompt if ch in "\n\t" or unicodedata.category(ch) != "Cc").strip()
    if not text:
        raise ToolError(
            "the prompt is empty: describe the picture you want, subject first "
            '(for example "a red fox sitting in fresh snow, morning light")'
        )
    return text


def check_session(session: str | None) -> str | None:
    if session is None:
        return None
    if not _SESSION_RE.fullmatch(session):
        raise ToolError(
            f"session {session[:70]!r} is not a valid label: use 1 to 64 letters, digits, spaces, '_', '.', ':' "
            "or '-' (for example \"logo-v2\")"
        )
    return session


def check_pixels(config: ServerConfig, width: int, height: int, num_images: int) -> None:
    total = width * height * num_images
    if total > config.max_pixels_per_call:
        raise ToolError(
            f"{num_images} image(s) of {width}x{height} is {total / 1e6:.1f} megapixels, over this server's "
            f"{config.max_pixels_per_call / 1e6:.1f} megapixel limit per call: lower width/height or num_images"
        )


def fit_size(width: int, height: int, budget_pixels: int) -> tuple[int, int]:
    """A size with the same aspect as width x height: multiples of 16, sides in [64, 2048], within the budget."""
    scale = min(1.0, math.sqrt(budget_pixels / (width * height)), MAX_SIDE / max(width, height))
    while True:
        w = _snap(width * scale)
        h = _snap(height * scale)
        if w * h <= budget_pixels or scale < 0.01:
            return w, h
        scale *= 0.97


def _snap(value: float) -> int:
    return int(min(MAX_SIDE, max(MIN_SIDE, MULTIPLE * round(value / MULTIPLE))))


def output_size(
    config: ServerConfig, source: Image.Image, width: int | None, height: int | None, num_images: int
) -> tuple[int, int]:
    """The size of an edit or composition: the caller's, else the source's (rounded to 16, within the limits).

    With only one side given, the other follows the source's aspect ratio.
    """
    if width is not None and height is not None:
        return width, height
    if width is not None:
        return width, _snap(width * source.height / source.width)
    if height is not None:
        return _snap(height * source.width / source.height), height
    return fit_size(source.width, source.height, config.max_pixels_per_call // num_images)


def new_seed() -> int:
    return secrets.randbelow(2**31)


def now_iso(timestamp: float | None = None) -> str:
    moment = datetime.now(UTC) if timestamp is None else datetime.fromtimestamp(timestamp, UTC)
    return moment.isoformat(timespec="seconds").replace("+00:00", "Z")


def strip_image_uri(value: str) -> str:
    value = value.strip()
    return value[len("image://") :] if value.lower().startswith("image://") else value


async def load_images(state: ServerState, args: Sequence[str]) -> list[LoadedImage]:
    """Decode and check every image argument (ids, paths, data: URIs, URLs); writes nothing."""

    def load_all() -> list[LoadedImage]:
        loaded = []
        for k, arg in enumerate(args, start=1):
            try:
                loaded.append(load_image_argument(arg, state.policy, state.store.read_png))
            except ImageInputError as exc:
                where = f"image {k}: " if len(args) > 1 else ""
                raise ImageInputError(f"{where}{exc}") from exc
        return loaded

    with tool_errors():
        return await anyio.to_thread.run_sync(load_all)


async def import_images(state: ServerState, loaded: Sequence[LoadedImage], session: str | None) -> list[str]:
    """Store every input that is not already stored (recipe {"tool": "import"}); return all ids in order."""

    def import_all() -> list[str]:
        ids = []
        for item in loaded:
            if item.image_id is not None:
                ids.append(item.image_id)
                continue
            recipe = {
                "tool": "import",
                "source": item.source,
                "description": item.description,
                "width": item.image.width,
                "height": item.image.height,
                "created_at": now_iso(),
                "klein_agent": __version__,
            }
            png = encode_png(item.image, provenance={"tool": "import", "source": item.source})
            stored = state.store.put(
                png, width=item.image.width, height=item.image.height, recipe=recipe, session=session
            )
            ids.append(stored.image_id)
        return ids

    with tool_errors():
        return await anyio.to_thread.run_sync(import_all)
