"""The domain layer: what an agent or a script can do with the model and the store, free of MCP types.

`Studio` makes pictures (generate, edit, compose), lists, shows, exports and reports, with plain values in and
out. The MCP tools (`klein_agent.server.tools`) are a thin layer over it, and tests call it directly.

The path of one call: every argument is checked before any work (bad input costs no model time and writes
nothing); inputs are decoded; the call queues in the engine, which runs the model on its own thread and hands
the pictures back; then the inputs that came from outside the store and the new pictures are stored together,
here, on a pool thread, so the engine is already running the next call. A call refused, failed or cancelled
before it is stored leaves nothing in the store; once storing has begun it finishes (every image is atomic,
and a batch is not split by a cancellation).

Every image a call uses or makes is leased (`ImageStore.lease`) from the moment its id is known until the call
ends, so no process sharing the store evicts it meanwhile; an input deleted on purpose meanwhile costs nothing
either: the pictures are stored with its id in their lineage, and `Made.gone` names it.

Errors raised on purpose, each with a message that says what to do: RequestError, ImageInputError, StoreError
and EngineError (`EXPECTED_ERRORS`).
"""

from __future__ import annotations

import contextlib
import io
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import anyio
import anyio.lowlevel
import anyio.to_thread
from PIL import Image

from klein_agent import __version__
from klein_agent.rules import limits, masks, resolution
from klein_agent.rules import loras as lora_rules
from klein_agent.rules.recipes import provenance
from klein_agent.rules.references import prepare_reference
from klein_agent.rules.requests import GenerationRequest, GeneratorInfo
from klein_agent.rules.resolution import RequestError
from klein_agent.rules.step_caches import check_step_cache
from klein_agent.service.engine import AsyncProgress, Completed, Engine, EngineError, EngineStatus
from klein_agent.service.exports import check_output_path, write_export
from klein_agent.service.inputs import ImageInputError, InputPolicy, LoadedImage, load_image_argument
from klein_agent.service.memory import release_memory
from klein_agent.service.pngfile import encode_png
from klein_agent.service.previews import Preview, make_preview
from klein_agent.service.store import ImageStore, Lease, StoredImage, StoreError, StoreStats, new_image_id

EXPECTED_ERRORS: tuple[type[Exception], ...] = (RequestError, ImageInputError, StoreError, EngineError)


@dataclass(frozen=True)
class StudioConfig:
    """Per-call limits and preview sizes of one studio (the server's command line chooses them)."""

    # width x height x num_images of one call; None: by the model's device (`limits.default_max_pixels`: 2048x2048
    # on CUDA, 512x512 on a CPU), so a call stays well under the ~60 s a client such as Claude Desktop waits.
    max_pixels_per_call: int | None = None
    device_hint: str | None = None  # the device the user named (--device), known before the model has loaded
    preview_max_edge: int = limits.PREVIEW_MAX_EDGE
    preview_budget_b64: int = limits.PREVIEW_BUDGET_B64


@dataclass(frozen=True)
class Made:
    """What one generate/edit/compose call made."""

    tool: str
    images: list[StoredImage]  # in seed order
    seeds: list[int]
    parents: list[str]  # ids of the inputs, in "image 1, image 2" order (imported ones included)
    imported: list[StoredImage]  # inputs from outside the store, stored with the results
    preview: Preview  # one picture, or a labelled contact sheet of several
    steps: int
    guidance: float | None
    session: str | None
    elapsed_ms: float  # the whole call, queueing and storing included
    model_ms: float
    queued_ms: float
    cache_hits: dict[str, int] = field(default_factory=dict)
    # parents no longer in the store when the pictures were stored
    gone: list[str] = field(default_factory=list)
    # sentences on how the call was resolved (rules.resolution)
    notes: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Sheet:
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

    # -- making ----------------------------------------------------------------------------------------------

    async def make(
        self,
        tool: str,
        prompt: str,
        images: Sequence[str] = (),
        *,
        width: int | None = None,
        height: int | None = None,
        seed: int | None = None,
        steps: int | None = None,
        guidance: float | None = None,
        num_images: int = 1,
        session: str | None = None,
        progress: AsyncProgress | None = None,
        mask: str | None = None,
        boxes: Sequence[Sequence[float]] | None = None,
        strength: float | None = None,
        loras: Sequence[tuple[str, float | None]] | None = None,
        step_cache: tuple[str, float | None] | None = None,
    ) -> Made:
        """Make `num_images` pictures from `prompt` and the image arguments `images` (none: generate; one: edit;
        several: compose) and store them. Unset values follow `klein_agent.rules.resolution`. `progress` gets
        (value, total, message) on the caller's loop, rising strictly. Raises one of EXPECTED_ERRORS.

        For tool "inpaint" (a masked edit, `klein_agent.rules.masks`), images[0] is the picture to repaint and the
        rest condition the repainted area; the region is a `mask` image argument (white repaints) or `boxes`
        ([x, y, width, height] in pixels of the source, or all four in fractions); `strength` in (0, 1].
        `loras` names loaded LoRA adapters to run, each with a scale or None for its default; `step_cache` is a
        (kind, threshold or None) choice of `klein_agent.rules.step_caches`, None for none."""
        started = time.perf_counter()
        text = resolution.clean_prompt(prompt)
        session = resolution.check_session(session)
        self._check_reference_count(len(images))
        inpaint = tool == "inpaint"
        chosen = self._check_loras(loras)
        cache = None if step_cache is None else check_step_cache(*step_cache)
        region = masks.MaskRequest(mask, masks.boxes_from(boxes), strength) if inpaint else None
        if region is not None:
            region.check()
        seeds = resolution.batch_seeds(seed, num_images)
        resolution.resolve_sampling(
            steps, guidance, distilled=False, default_steps=1, default_guidance=limits.MIN_GUIDANCE
        )
        # The queue place is taken now, in arrival order and before any decoding: a busy server refuses at
        # once, and calls keep their order however long each one's inputs take to decode.
        async with self.engine.reserve() as slot, self._leased() as lease:
            async with self._decoding:
                loaded = await anyio.to_thread.run_sync(self._load_inputs, list(images), inpaint, lease)
                mask_item = None
                if region is not None and region.mask is not None:
                    mask_item = await anyio.to_thread.run_sync(self._load_mask, region.mask, lease)
            fitted, finalize = self._sizing(
                loaded[0].image if loaded else None, width, height, num_images, fit=not inpaint
            )
            if fitted is not None:
                width, height = fitted
            parents = [item.image_id or new_image_id() for item in loaded]
            mask_picture, mask_id = None, None
            mask_recipe: dict[str, Any] | None = None
            if region is not None:
                mask_picture = region.picture(loaded[0].image, None if mask_item is None else mask_item.image)
                if mask_item is not None:
                    mask_id = mask_item.image_id or new_image_id()
                    mask_recipe = {"image": mask_id}
                else:
                    mask_recipe = {"boxes": [box.as_list() for box in region.boxes]}
            request = GenerationRequest(
                prompt=text,
                width=width,
                height=height,
                seed=seeds[0],
                num_images=num_images,
                steps=steps,
                guidance=guidance,
                references=tuple(item.image for item in loaded),
                mask=mask_picture,
                strength=strength,
                loras=chosen,
                step_cache=cache,
            )
            # the ids of inputs from outside the store, leased before they are stored with the pictures
            await anyio.to_thread.run_sync(
                lambda: lease.add([*parents, *([mask_id] if mask_id else [])], require_stored=False)
            )
            done = await slot.run(request, progress=progress, finalize=finalize)
            # Cancelled after the model ran: nothing is stored. From here on, storing runs to its end.
            await anyio.lowlevel.checkpoint_if_cancelled()
            imported, stored, preview, gone = await anyio.to_thread.run_sync(
                self._store_call,
                tool,
                done,
                loaded,
                parents,
                session,
                MaskRecord(mask_item, mask_id, mask_picture, mask_recipe),
                lease,
            )
        resolved = done.result.resolved
        return Made(
            tool=tool,
            images=stored,
            seeds=list(resolved.seeds),
            parents=parents,
            imported=imported,
            preview=preview,
            steps=resolved.steps,
            guidance=resolved.guidance,
            session=session,
            elapsed_ms=(time.perf_counter() - started) * 1000,
            model_ms=done.model_ms,
            queued_ms=done.queued_ms,
            cache_hits=dict(done.result.cache_hits),
            gone=gone,
            notes=list(resolved.notes),
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

    def _check_reference_count(self, count: int) -> None:
        info = self.engine.info
        resolution.check_reference_count(
            count, info.max_references if info is not None else limits.MAX_REFERENCES
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

    def _sizing(
        self, first: Image.Image | None, width: int | None, height: int | None, count: int, fit: bool
    ) -> tuple[
        tuple[int, int] | None, Callable[[GeneratorInfo, GenerationRequest], GenerationRequest] | None
    ]:
        """The output size by the shared rule (`resolution.output_size`), against the per-call pixel budget.

        Returns (size, finalize): `size` is the (width, height) to ask for when the budget scaled an unset size
        down (`fit`: not for inpaint, whose output is its source), else None; `finalize` is None, or, when the
        budget depends on a device not known yet (the model is loading), what the engine runs once it has loaded:
        the same rule with that device's budget, giving the request to run. The largest default budget is checked
        at once. The token size is the loaded model's (16 for every klein checkpoint, assumed until it has
        loaded). Raises RequestError."""
        info = self.engine.info
        multiple = info.size_multiple if info is not None else limits.SIZE_MULTIPLE
        prepared = None if first is None else resolution.prepared_reference_size(*first.size, multiple)
        unset = width is None and height is None
        default = resolution.output_size(width, height, prepared, multiple)

        def sized(budget: int, why: str) -> tuple[int, int] | None:
            fit_to = budget // count if fit else None
            w, h = resolution.output_size(width, height, prepared, multiple, max_pixels=fit_to)
            resolution.check_pixels(w, h, count, budget, why, masked=not fit)
            return (w, h) if unset and (w, h) != default else None

        budget = self.pixel_budget()
        if budget is not None:
            return sized(*budget), None
        sized(max(limits.MAX_PIXELS_PER_CALL, *limits.DEVICE_MAX_PIXELS_PER_CALL.values()), "")

        def once_loaded(loaded: GeneratorInfo, request: GenerationRequest) -> GenerationRequest:
            known = self.pixel_budget(loaded.device)
            assert known is not None
            size = sized(*known)
            return request if size is None else replace(request, width=size[0], height=size[1])

        return None, once_loaded

    def _load_mask(self, argument: str, lease: Lease) -> LoadedImage:
        """The mask argument, decoded by the one decoder (transparency on white: transparent pixels repaint); a
        stored mask is leased before it is read."""
        try:
            item = load_image_argument(argument, self.policy, lease.read_png)
        except ImageInputError as exc:
            raise ImageInputError(f"mask: {exc}") from exc
        if item.image_id is None and item.content_key is not None:
            known = lease.find_content(item.content_key)
            if known is not None:
                item = replace(item, image_id=known.image_id)
        return item

    def _load_inputs(self, arguments: list[str], inpaint: bool, lease: Lease) -> list[LoadedImage]:
        """Decode every argument, one at a time, keeping only what the model will use. A stored input is leased
        (`lease`) before it is read, and so is the stored twin of an input imported before.

        With the model loaded, each picture is prepared as soon as it is decoded (about 1 Mpx, whole tokens), so a
        call holds at most one full-size decode at a time, whose memory is given back before the next; an input
        whose bytes were imported before is named by its stored id (imports are stored once per content)."""
        info = self.engine.info
        loaded = []
        for k, argument in enumerate(arguments, start=1):
            try:
                item = load_image_argument(argument, self.policy, lease.read_png)
            except ImageInputError as exc:
                where = f"image {k}: " if len(arguments) > 1 else ""
                raise ImageInputError(f"{where}{exc}") from exc
            if item.image_id is None and item.content_key is not None:
                known = lease.find_content(item.content_key)
                if known is not None:
                    item = replace(item, image_id=known.image_id)
            multiple = info.size_multiple if info is not None else limits.SIZE_MULTIPLE
            if inpaint and k == 1:  # the picture to repaint: resized to whole tokens, as the model uses it
                item = replace(item, image=masks.prepare_source(item.image, multiple))
            elif info is not None:
                item = replace(item, image=prepare_reference(item.image, info.size_multiple))
            loaded.append(item)
            if item.content_key is not None:  # decoded from outside, maybe large: its memory goes back before
                release_memory()  # the next decode, so the heap does not hold two full-size decodes' worth
        return loaded

    def _store_call(
        self,
        tool: str,
        done: Completed,
        loaded: list[LoadedImage],
        parents: list[str],
        session: str | None,
        mask: MaskRecord | None = None,
        lease: Lease | None = None,
    ) -> tuple[list[StoredImage], list[StoredImage], Preview, list[str]]:
        """The inputs from outside the store (under the ids the recipe already names), then one PNG and one
        record per picture, then the preview: on a pool thread, after the engine has moved on. Also returns the
        parents (the mask included) no longer in the store: deleted while the model ran, their ids kept in the
        lineage."""
        result = done.result
        imported: list[StoredImage] = []
        try:
            for item, image_id in zip(loaded, parents, strict=True):
                if item.image_id is None:
                    imported.append(self._import(item, image_id, session, result.info.size_multiple))
            if mask is not None and mask.item is not None and mask.item.image_id is None:
                assert mask.image_id is not None and mask.picture is not None
                imported.append(self._import_mask(mask.item, mask.image_id, mask.picture, session))
            extra = {} if mask is None or mask.recipe is None else {"mask": mask.recipe}
            stored, preview = self._store_results(tool, done, parents, session, extra, lease)
            used = [*parents, *([mask.image_id] if mask is not None and mask.image_id else [])]
            return imported, stored, preview, self.store.absent(used)
        except BaseException:
            # nothing of a call that could not be stored whole stays behind: not even its inputs
            for image in imported:
                self.store.delete(image.image_id)
            raise

    def _store_results(
        self,
        tool: str,
        done: Completed,
        parents: list[str],
        session: str | None,
        extra: dict[str, Any] | None = None,
        lease: Lease | None = None,
    ) -> tuple[list[StoredImage], Preview]:
        result = done.result
        stored = []
        for k, picture in enumerate(result.images):
            image_id = new_image_id()
            if lease is not None:  # so storing picture 2 cannot evict picture 1 before the call returns it
                lease.add([image_id], require_stored=False)
            # what decides the pixels; in the PNG too
            core = {**provenance(result, k, tool=tool, parents=parents), **(extra or {})}
            recipe = {
                **core,
                "session": session,
                "batch": {"index": k, "of": len(result.images), "first_seed": result.resolved.seeds[0]},
                "device": result.info.device,
                "dtype": result.info.dtype,
                "timings_ms": {key: round(value, 1) for key, value in result.timings_ms.items()},
                "queued_ms": round(done.queued_ms, 1),
                "model_ms": round(done.model_ms, 1),
                "cache_hits": dict(result.cache_hits),
                "created_at": now_iso(),
                "klein_agent": __version__,
            }
            stored.append(
                self.store.put(
                    encode_png(picture, provenance=core),
                    width=picture.width,
                    height=picture.height,
                    recipe=recipe,
                    parents=parents,
                    session=session,
                    image_id=image_id,
                )
            )
        seeds = result.resolved.seeds
        labels = (
            [stored[0].image_id]
            if len(stored) == 1
            else [
                f"{k} {img.image_id} seed {s}"
                for k, (img, s) in enumerate(zip(stored, seeds, strict=True), 1)
            ]
        )
        preview = make_preview(
            result.images,
            labels,
            max_edge=self.config.preview_max_edge,
            budget_b64=self.config.preview_budget_b64,
        )
        return stored, preview

    def _import(self, item: LoadedImage, image_id: str, session: str | None, multiple: int) -> StoredImage:
        """Store an input as the model used it (prepared: about 1 Mpx, whole tokens), so its size is bounded and
        a recipe that names it as a parent remakes the same pixels."""
        return self._store_import(
            item, image_id, prepare_reference(item.image, multiple), item.description, session
        )

    def _import_mask(
        self, item: LoadedImage, image_id: str, picture: Image.Image, session: str | None
    ) -> StoredImage:
        """Store a mask from outside the store as the model used it (output size, black or white), so the recipe
        that names it remakes the same pixels."""
        return self._store_import(
            item, image_id, picture.convert("RGB"), f"mask: {item.description}", session
        )

    def _store_import(
        self, item: LoadedImage, image_id: str, picture: Image.Image, description: str, session: str | None
    ) -> StoredImage:
        recipe = {
            "tool": "import",
            "source": item.source,
            "description": description,
            "width": picture.width,
            "height": picture.height,
            "created_at": now_iso(),
            "klein_agent": __version__,
        }
        png = encode_png(picture, provenance={"tool": "import", "source": item.source})
        return self.store.put(
            png,
            width=picture.width,
            height=picture.height,
            recipe=recipe,
            session=session,
            image_id=image_id,
            content_key=item.content_key,
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

    async def contact_sheet(self, image_ids: Sequence[str], *, max_edge: int) -> Sheet:
        """Stored images as one preview (one image) or a contact sheet labelled 1, 2, ... in this order, its
        long edge at most `max_edge` px and within the preview budget. Raises RequestError, UnknownImageError."""
        ids = [strip_image_uri(i) for i in image_ids]
        if not ids:
            raise RequestError(
                "no image ids given: pass one image id, or a list of ids (list_images shows them)"
            )
        if len(ids) > limits.MAX_VIEW_IMAGES:
            raise RequestError(f"{len(ids)} ids given; at most {limits.MAX_VIEW_IMAGES} can be shown at once")

        def render() -> Sheet:
            meta = [self.store.get(i) for i in ids]
            pictures = []
            for i in ids:
                with Image.open(io.BytesIO(self.store.read_png(i)), formats=["PNG"]) as im:
                    pictures.append(im.convert("RGB"))
            labels = [ids[0]] if len(ids) == 1 else [f"{k} {i}" for k, i in enumerate(ids, start=1)]
            preview = make_preview(
                pictures, labels, max_edge=max_edge, budget_b64=self.config.preview_budget_b64
            )
            return Sheet(images=meta, preview=preview)

        return await anyio.to_thread.run_sync(render)

    async def export(self, image_id: str, path: str, *, overwrite: bool = False) -> Exported:
        """Write a stored image's full-resolution PNG to `path` (a file, or a folder for <id>.png) inside the
        allowed folders. Raises ImageInputError for the path, UnknownImageError, or RequestError when the file
        exists and `overwrite` is false."""
        image_id = strip_image_uri(image_id)

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


@dataclass(frozen=True)
class MaskRecord:
    """A masked edit's mask as it is stored and recorded: the loaded argument (None for boxes), its id, the
    prepared picture and the recipe entry ({"image": id} or {"boxes": [...]})."""

    item: LoadedImage | None
    image_id: str | None
    picture: Image.Image | None
    recipe: dict[str, Any] | None


def now_iso(timestamp: float | None = None) -> str:
    """A UTC time as `2026-11-30T17:27:55Z` (now, or the given Unix time)."""
    moment = datetime.now(UTC) if timestamp is None else datetime.fromtimestamp(timestamp, UTC)
    return moment.isoformat(timespec="seconds").replace("+00:00", "Z")


def strip_image_uri(value: str) -> str:
    """An id from `img_...` or `image://img_...` (surrounding space removed)."""
    value = value.strip()
    return value[len("image://") :] if value.lower().startswith("image://") else value
