"""What the tools share (engine, store, input policy, limits) and the checks every tool makes before work starts.

Everything here runs before the engine is called: a bad argument costs no model time and writes nothing.
Errors become `ToolError`, whose text reaches the calling model: it names the problem and how to fix it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

import anyio.to_thread
from mcp.server.mcpserver.exceptions import ToolError
from PIL import Image

from klein_agent import __version__
from klein_agent.rules import resolution
from klein_agent.rules.limits import SESSION_PATTERN, SIZE_MULTIPLE
from klein_agent.rules.resolution import RequestError
from klein_agent.server.config import ServerConfig
from klein_agent.service.engine import Engine, EngineError
from klein_agent.service.inputs import ImageInputError, InputPolicy, LoadedImage, load_image_argument
from klein_agent.service.previews import encode_png
from klein_agent.service.store import ImageStore, StoreError


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
    except (ImageInputError, StoreError, EngineError, RequestError) as exc:
        raise ToolError(str(exc)) from exc


def clean_prompt(prompt: str) -> str:
    """The shared prompt rule (`resolution.clean_prompt`), its errors as ToolError."""
    with tool_errors():
        return resolution.clean_prompt(prompt)


def check_session(session: str | None) -> str | None:
    if session is None:
        return None
    if not SESSION_PATTERN.fullmatch(session):
        raise ToolError(
            f"session {session[:70]!r} is not a valid label: use 1 to 64 letters, digits, spaces, '_', '.', ':' "
            "or '-' (for example \"logo-v2\")"
        )
    return session


def size_multiple(state: ServerState) -> int:
    """Pixels per latent token of the loaded model; 16 (every klein checkpoint's) until it has loaded."""
    info = state.engine.info
    return info.size_multiple if info is not None else SIZE_MULTIPLE


def plan_size(
    state: ServerState, first: Image.Image | None, width: int | None, height: int | None, num_images: int
) -> tuple[int, int]:
    """The output size by the shared rule (`resolution.output_size`), checked against the per-call pixel budget
    before any work; ToolError when it does not fit."""
    multiple = size_multiple(state)
    prepared = None if first is None else resolution.prepared_reference_size(*first.size, multiple)
    w, h = resolution.output_size(width, height, prepared, multiple)
    with tool_errors():
        resolution.check_pixels(w, h, num_images, state.config.max_pixels_per_call)
    return w, h


def plan_seeds(seed: int | None, num_images: int) -> tuple[int, ...]:
    """seed, seed + 1, ... (a drawn seed when None); ToolError when the batch would run past the largest seed."""
    with tool_errors():
        return resolution.batch_seeds(seed, num_images)


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
