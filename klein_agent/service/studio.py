"""The domain layer: what an agent or a script can do with the model and the store, free of MCP types.

`Studio` makes pictures (an `ImageCall`: generate, edit, compose, inpaint), lists, shows, exports and reports,
with plain values in and out; the store's side of making is `klein_agent.service.making`. The MCP tools
(`klein_agent.server.tools`) are a thin layer over it, and tests call it directly.

The path of one call: every argument is checked before any work (bad input costs no model time and writes
nothing); inputs are decoded; the call queues in the engine, which runs the model on its own thread and hands
the pictures back; then the inputs that came from outside the store and the new pictures are stored together,
here, on a pool thread, so the engine is already running the next call. A call refused, failed or cancelled
before it is stored leaves nothing in the store; once storing has begun it finishes (every image is atomic,
and a batch is not split by a cancellation).

Every image a call uses or makes is leased (`ImageStore.lease`) from the moment its id is known until the call
ends, so no process sharing the store evicts it meanwhile; an input deleted on purpose meanwhile costs nothing
either: the pictures are stored with its id in their lineage, and `NewImages.gone` names it.

Errors raised on purpose, each with a message that says what to do: RequestError, ImageInputError, StoreError
and EngineError (`EXPECTED_ERRORS`).
"""

from __future__ import annotations

import contextlib
import io
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import anyio
import anyio.lowlevel
import anyio.to_thread
from PIL import Image

from klein_agent import __version__
from klein_agent.rules import families, limits, masks, resolution
from klein_agent.rules import loras as lora_rules
from klein_agent.rules.calls import ImageCall, PreparedCall, new_call_id, prepare_call
from klein_agent.rules.image_refs import require_image_id
from klein_agent.rules.resolution import RequestError
from klein_agent.service.critique.zoom import zoom
from klein_agent.service.engine import AsyncProgress, Engine, EngineError, EngineStatus
from klein_agent.service.exports import check_output_path, write_export
from klein_agent.service.inputs import ImageInputError, InputPolicy, LoadedImage
from klein_agent.service.making import (
    NewImages,
    StoreDecoder,
    input_ids,
    model_run,
    now_iso,
    store_call,
    stored_call,
)
from klein_agent.service.previews import Preview, make_preview
from klein_agent.service.store import ImageStore, Lease, StoredImage, StoreError, StoreStats

__all__ = ["EXPECTED_ERRORS", "NewImages", "Studio", "StudioConfig", "now_iso"]

EXPECTED_ERRORS: tuple[type[Exception], ...] = (RequestError, ImageInputError, StoreError, EngineError)


@dataclass(frozen=True)
class StudioConfig:
    """Per-call limits and preview sizes of one studio (the server's command line chooses them)."""

    # width x height x num_images of one call; None: by the model's device (`limits.default_max_pixels`: 2048x2048
    # on CUDA, 512x512 on a CPU), so a call stays well under the ~60 s a client such as Claude Desktop waits.
    max_pixels_per_call: int | None = None
    device_hint: str | None = None  # the device the user named (--device), known before the model has loaded
    # the model family --model names (rules.families), known before the model has loaded; the loaded model's rules
    family: str = families.FLUX2.name
    preview_max_edge: int = limits.PREVIEW_MAX_EDGE
    preview_budget_b64: int = limits.PREVIEW_BUDGET_B64
    # `--prompt-upsampler` named one: calls without a caption get their inputs prepared for it too
    upsampler: bool = False


@dataclass(frozen=True)
class ShownImages:
    """Stored images shown together: one preview, or a contact sheet labelled 1, 2, ... in the order asked."""

    images: list[StoredImage]
    preview: Preview


@dataclass(frozen=True)
class Exported:
    """A written export: the image, the absolute path of its PNG, and the file's size in bytes."""

    image_id: str
    path: Path
    size_bytes: int


@dataclass(frozen=True)
class Status:
    """The model, the queue, the store and the input rules, as one snapshot."""

    engine: EngineStatus
    store: StoreStats
    allowed_dirs: list[Path]
    allow_urls: bool
    max_pixels_per_call: int | None  # None while it depends on the device of a model still loading
    version: str


class Studio:
    """The engine, the store and the input policy, and what can be done with them.

    Paths never reach the store: the policy is given the store's folder (`InputPolicy.with_store`), which
    raises ValueError when an allowed folder lies inside the store.
    """

    def __init__(
        self, engine: Engine, store: ImageStore, policy: InputPolicy, config: StudioConfig | None = None
    ) -> None:
        self.engine = engine
        self.store = store
        self.policy = policy.with_store(store.root)
        self.config = config or StudioConfig()
        # Full-size decodes, one at a time across calls: a 64 Mpx input is 256 MB before it is prepared.
        self._decoding = anyio.Semaphore(1)

    def reference_limit(self) -> int:
        """How many references a call may give: the loaded model's limit, else that of the family --model names
        (`StudioConfig.family`) while it loads. The CLI's rule for the same model (`rules.families`)."""
        info = self.engine.info
        return info.max_references if info is not None else families.family(self.config.family).max_references

    # -- making ----------------------------------------------------------------------------------------------

    async def make(self, call: ImageCall, *, progress: AsyncProgress | None = None) -> NewImages:
        """Make and store the pictures `call` asks for (`klein_agent.rules.calls`). `progress` gets (value, total,
        message) on the caller's loop, rising strictly. Raises one of EXPECTED_ERRORS."""
        started = time.perf_counter()
        info = self.engine.info
        family = info.family if info is not None else self.config.family
        call.check(self.reference_limit())
        if info is not None and call.region is not None:  # klein 9B-KV: known once it has loaded
            families.check_masked_edit(info.no_masked_edits)
        chosen = self._check_loras(call.loras)
        sizes = (self.config.preview_max_edge, self.config.preview_budget_b64)
        if call.call_id is None:
            # A fresh key (128 random bits), so a retried insert of this call stores each picture once; nothing
            # can be stored under it yet, so no earlier attempt is looked up (a catalog round trip saved).
            call = replace(call, call_id=new_call_id())
        else:  # a retry of a call stored whole (here or by another front-end): no model time
            earlier = await anyio.to_thread.run_sync(stored_call, self.store, call, sizes)
            if earlier is not None:
                return replace(earlier, elapsed_ms=(time.perf_counter() - started) * 1000)
        # The queue place is taken now, in arrival order and before any decoding: a busy server refuses at
        # once, and calls keep their order however long each one's inputs take to decode.
        async with self.engine.reserve() as place, self._leased() as lease:
            async with self._decoding:
                info = self.engine.info
                multiple = None if info is None else info.size_multiple

                def prepare() -> PreparedCall[LoadedImage]:
                    decoder = StoreDecoder(self.policy, lease)
                    return prepare_call(
                        call,
                        decoder,
                        multiple=multiple,
                        budget=self.pixel_budget,
                        loras=chosen,
                        family=family,
                        upsampler=self.config.upsampler,
                    )

                # A call without inputs decodes nothing: prepared on the loop, without a thread hop.
                prepared = await anyio.to_thread.run_sync(prepare) if call.inputs else prepare()
            ids = input_ids(prepared)
            held = [*ids[0], *([ids[1]] if ids[1] else [])]
            if (
                held
            ):  # the ids of inputs from outside the store, leased before they are stored with the pictures
                await anyio.to_thread.run_sync(lambda: lease.add(held, require_stored=False))
            done = await place.run(prepared.request, progress=progress, finalize=prepared.finalize)
            # Cancelled after the model ran: nothing is stored. From here on, storing runs to its end.
            await anyio.lowlevel.checkpoint_if_cancelled()
            imported, stored, preview, gone = await anyio.to_thread.run_sync(
                store_call, self.store, prepared, done, ids, lease, sizes
            )
        return NewImages(
            tool=call.tool,
            images=stored,
            parents=ids[0],
            imported=imported,
            preview=preview,
            session=call.session,
            elapsed_ms=(time.perf_counter() - started) * 1000,
            run=model_run(done),
            gone=gone,
            notes=list(done.result.resolved.notes),
        )

    @contextlib.asynccontextmanager
    async def _leased(self) -> AsyncIterator[Lease]:
        """One call's lease, released when the call ends however it ends (a cancellation included: the release
        is shielded). Its catalog writes run on a pool thread: another process's write may hold SQLite's lock."""
        lease = self.store.lease()
        try:
            yield lease
        finally:
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(lease.release)

    def _check_loras(
        self, loras: Sequence[tuple[str, float | None]] | None
    ) -> tuple[tuple[str, float | None], ...]:
        """The adapters a call asked for, checked against those loaded and given their default scales. While
        the model is still loading only the scales are checked; the pipeline checks the names once it has loaded."""
        if not loras:
            return ()
        info = self.engine.info
        if info is None:
            for name, scale in loras:
                if scale is not None:
                    lora_rules.check_scale(scale, name)
            return tuple(loras)
        return lora_rules.resolve_loras(
            lora_rules.choices(loras, info.loras, info.unloaded_loras), info.loras
        )

    def pixel_budget(self, device: str | None = None) -> tuple[int, str] | None:
        """The per-call pixel budget and where it comes from: --max-megapixels, else the default for `device`,
        the loaded model's or the one named with --device; None while that is still unknown."""
        if self.config.max_pixels_per_call is not None:
            return self.config.max_pixels_per_call, ""
        info = self.engine.info
        device = device or (info.device if info is not None else self.config.device_hint)
        if device is None:
            return None
        kind = device.split(":", 1)[0]
        return limits.default_max_pixels(device), (
            f"the default on {kind}, so a call ends inside a client's ~60 s timeout; serve --max-megapixels "
            "raises it"
        )

    # -- the store -------------------------------------------------------------------------------------------

    async def list_images(
        self, session: str | None = None, limit: int = 20, cursor: str | None = None
    ) -> tuple[list[StoredImage], str | None]:
        """One page of stored images, newest first, and the cursor of the next page (None at the end)."""
        session = resolution.check_session(session)
        try:
            return await anyio.to_thread.run_sync(
                lambda: self.store.list_images(session=session, limit=limit, cursor=cursor)
            )
        except ValueError as exc:  # a malformed or foreign cursor; the store's message says what to pass
            if isinstance(exc, RequestError):
                raise
            raise RequestError(str(exc)) from exc

    async def contact_sheet(
        self, image_ids: Sequence[str], *, max_edge: int, region: masks.Box | None = None
    ) -> ShownImages:
        """Stored images (with `region`: that part of each, `critique.zoom`) as one preview or a contact sheet
        labelled 1, 2, ... in order, long edge <= `max_edge` px, in budget. Raises RequestError, UnknownImageError."""
        ids = [require_image_id(i) for i in image_ids]
        if not ids:
            raise RequestError(
                "no image ids given: pass one image id, or a list of ids (list_images shows them)"
            )
        if len(ids) > limits.MAX_VIEW_IMAGES:
            raise RequestError(f"{len(ids)} ids given; at most {limits.MAX_VIEW_IMAGES} can be shown at once")

        def render() -> ShownImages:
            meta = [self.store.get(i) for i in ids]
            pictures = []
            for i in ids:
                with Image.open(io.BytesIO(self.store.read_png(i)), formats=["PNG"]) as im:
                    pictures.append(zoom(im.convert("RGB"), region, max_edge=max_edge))
            labels = [ids[0]] if len(ids) == 1 else [f"{k} {i}" for k, i in enumerate(ids, start=1)]
            preview = make_preview(
                pictures, labels, max_edge=max_edge, budget_b64=self.config.preview_budget_b64
            )
            return ShownImages(images=meta, preview=preview)

        return await anyio.to_thread.run_sync(render)

    async def export(self, image_id: str, path: str, *, overwrite: bool = False) -> Exported:
        """Write a stored image's full-resolution PNG to `path` (a file, or a folder for <id>.png) inside the
        allowed folders. Raises ImageInputError for the path, UnknownImageError, or RequestError when the file
        exists and `overwrite` is false."""
        image_id = require_image_id(image_id)

        def run() -> Exported:
            png = self.store.read_png(image_id)
            target = check_output_path(path, self.policy, default_name=f"{image_id}.png")
            write_export(target, png, self.policy, overwrite=overwrite)  # refuses an existing file itself
            return Exported(image_id=image_id, path=target, size_bytes=len(png))

        return await anyio.to_thread.run_sync(run)

    async def status(self) -> Status:
        """The model's state, the queue, the store's size and bounds, and where inputs may come from."""
        stats = await anyio.to_thread.run_sync(self.store.stats)
        return Status(
            engine=self.engine.status(),
            store=stats,
            allowed_dirs=list(self.policy.allowed_dirs),
            allow_urls=self.policy.allow_urls,
            max_pixels_per_call=(self.pixel_budget() or (None,))[0],
            version=__version__,
        )
