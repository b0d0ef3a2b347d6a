"""Making pictures, the store's side: inputs decoded from ids, paths, data URIs and URLs under one call's lease,
and what a call made stored with its recipe, its imported inputs and its preview. No torch.

`Studio.make` runs a call through `klein_agent.rules.calls` (checks, decoding with `StoreDecoder`, sizing, the
request), the engine, and then `store_call` here, on a pool thread while the engine already runs the next call.
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime

from PIL import Image

from klein_agent import __version__
from klein_agent.rules.calls import Decoded, ImageCall, Prepare, PreparedCall, model_input, picture_keys
from klein_agent.service.engine import FinishedRun
from klein_agent.service.inputs import ImageInputError, InputPolicy, LoadedImage, load_image_argument
from klein_agent.service.memory import release_memory
from klein_agent.service.pngfile import encode_png
from klein_agent.service.previews import Preview, make_preview
from klein_agent.service.store import ImageStore, Lease, StoredImage, UnknownImageError, new_image_id

# Where call previews are encoded while their PNGs are stored; a few calls may be storing at once (a front-end over
# several replicas), each needing one. Leases (one short catalog round trip) have their own threads, so a call's
# lease never waits behind another call's preview.
PREVIEWS = ThreadPoolExecutor(4, thread_name_prefix="klein-preview")
LEASES = ThreadPoolExecutor(4, thread_name_prefix="klein-lease")


@dataclass(frozen=True)
class ModelRun:
    """How the model made a call's pictures: their seeds (in order), steps, guidance and costs."""

    seeds: list[int]
    steps: int
    guidance: float | None
    model_ms: float
    queued_ms: float
    cache_hits: dict[str, int] = field(default_factory=dict)
    # FLUX 3: where the encoded text came from ("upsampler", "caller", "prompt"); None for FLUX.2
    caption_source: str | None = None


@dataclass(frozen=True)
class NewImages:
    """What one image call made and stored. `run` is None for pictures no seeded model run made."""

    tool: str
    images: list[StoredImage]  # in the order made (seed order for a model run)
    parents: list[str]  # ids of the inputs, in "image 1, image 2" order (imported ones included)
    imported: list[StoredImage]  # inputs from outside the store, stored with the results
    preview: Preview  # one picture, or a labelled contact sheet of several
    session: str | None
    elapsed_ms: float  # the whole call, queueing and storing included
    run: ModelRun | None
    # parents no longer in the store when the pictures were stored
    gone: list[str] = field(default_factory=list)
    # sentences on how the call was resolved (rules.resolution)
    notes: list[str] = field(default_factory=list)

    @property
    def seeds(self) -> list[int | None]:
        """Each picture's seed, None where no seed made it."""
        return list(self.run.seeds) if self.run is not None else [None] * len(self.images)


class StoreDecoder:
    """`rules.calls.Decoder` for the studio: ids, paths, data URIs and URLs (`service.inputs`, under the input
    policy), a stored input leased before it is read, and an input imported before named by its stored id
    (imports are stored once per content). Errors name the input ("image 2: ...", "mask: ...")."""

    def __init__(self, policy: InputPolicy, lease: Lease) -> None:
        self.policy = policy
        self.lease = lease

    def _load(self, argument: str) -> LoadedImage:
        item = load_image_argument(argument, self.policy, self.lease.read_png)
        if item.image_id is None and item.content_key is not None:
            known = self.lease.find_content(item.content_key)
            if known is not None:
                item = replace(item, image_id=known.image_id)
        return item

    def image(self, argument: str, number: int, count: int, prepare: Prepare) -> Decoded[LoadedImage]:
        """Input `number` of `count`, prepared as soon as it is decoded, so a call holds at most one full-size
        decode at a time, whose memory is given back before the next."""
        try:
            item = self._load(argument)
        except ImageInputError as exc:
            where = f"image {number}: " if count > 1 else ""
            raise ImageInputError(f"{where}{exc}") from exc
        item = replace(item, image=prepare(item.image))
        if item.content_key is not None:  # decoded from outside, maybe large: its memory goes back before
            release_memory()  # the next decode, so the heap does not hold two full-size decodes' worth
        return Decoded(item.image, item)

    def mask(self, argument: str) -> Decoded[LoadedImage]:
        """The mask argument, decoded by the one decoder (transparency on white: transparent pixels repaint)."""
        try:
            item = self._load(argument)
        except ImageInputError as exc:
            raise ImageInputError(f"mask: {exc}") from exc
        return Decoded(item.image, item)


def input_ids(prepared: PreparedCall[LoadedImage]) -> tuple[list[str], str | None]:
    """The ids the recipe names the inputs and the mask by: stored ids, or new ids for imports to come."""
    parents = [item.origin.image_id or new_image_id() for item in prepared.inputs]
    mask = prepared.mask
    return parents, None if mask is None else mask.origin.image_id or new_image_id()


def store_call(
    store: ImageStore,
    prepared: PreparedCall[LoadedImage],
    done: FinishedRun,
    ids: tuple[list[str], str | None],
    lease: Lease,
    preview_size: tuple[int, int],
) -> tuple[list[StoredImage], list[StoredImage], Preview, list[str]]:
    """The inputs from outside the store (under the ids the recipe already names, `ids`), then one PNG and one
    record per picture, then the preview (`preview_size`: long edge, base64 budget): on a pool thread, after the
    engine has moved on. Returns (imported, stored, preview, gone): `gone` are the parents (the mask included) no
    longer in the store, deleted while the model ran, their ids kept in the lineage."""
    parents, mask_id = ids
    session = prepared.call.session
    imported: list[StoredImage] = []
    try:
        info = done.result.info
        for item, image_id in zip(prepared.inputs, parents, strict=True):
            if item.origin.image_id is None:
                # as the model used it (FLUX.2: about 1 Mpx, whole tokens; FLUX 3: a single one whole, up to
                # 4 Mpx), so a recipe naming it remakes the same pixels
                picture = model_input(item.image, len(prepared.inputs), info.family, info.size_multiple)
                imported.append(
                    import_input(store, item.origin, image_id, picture, item.origin.description, session)
                )
        mask, drawn = prepared.mask, prepared.request.mask
        if mask is not None and mask.origin.image_id is None:
            assert (
                mask_id is not None and drawn is not None
            )  # stored as the model used it: output size, 0 or 255
            imported.append(
                import_input(
                    store,
                    mask.origin,
                    mask_id,
                    drawn.convert("RGB"),
                    f"mask: {mask.origin.description}",
                    session,
                )
            )
        stored, preview = store_results(store, prepared, done, parents, mask_id, lease, preview_size)
        return imported, stored, preview, store.absent([*parents, *([mask_id] if mask_id else [])])
    except BaseException:
        # nothing of a call that could not be stored whole stays behind: not even its inputs
        for image in imported:
            store.delete(image.image_id)
        raise


def store_results(
    store: ImageStore,
    prepared: PreparedCall[LoadedImage],
    done: FinishedRun,
    parents: list[str],
    mask_id: str | None,
    lease: Lease,
    preview_size: tuple[int, int],
) -> tuple[list[StoredImage], Preview]:
    """One PNG (with its provenance) and one record (the full recipe) per picture, and their preview. The preview
    is encoded on another thread while the PNGs are encoded and stored (Pillow's encoders release the GIL): at
    256² that takes 6 of a call's 15 ms of encoding off its latency. Raises what the lease or the store raised."""
    result = done.result
    session = prepared.call.session
    keys = picture_keys(prepared.call)
    minted = [new_image_id() for _ in result.images]
    cores = [prepared.recipe(result, k, parents, mask_id) for k in range(len(result.images))]  # decide pixels
    seeds = [core.get("seed") for core in cores]
    preview = PREVIEWS.submit(call_preview, minted, result.images, seeds, preview_size)
    # every picture leased before the first is stored, so storing picture 2 cannot evict picture 1 meanwhile; the
    # lease (a catalog round trip) is taken while the first PNG is encoded
    leasing = LEASES.submit(lease.add, minted, require_stored=False)
    stored = []
    try:
        for k, (picture, image_id, core) in enumerate(zip(result.images, minted, cores, strict=True)):
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
            png = encode_png(picture, provenance=core)
            leasing.result()  # raises what the lease raised, before anything is stored
            stored.append(
                store.put(
                    png,
                    width=picture.width,
                    height=picture.height,
                    recipe=recipe,
                    parents=parents,
                    session=session,
                    image_id=image_id,
                    call_key=None if keys is None else keys[k],
                )
            )
    except BaseException:
        preview.cancel()  # a running encode finishes on its own; nothing waits for it
        with contextlib.suppress(BaseException):  # the lease is released with the call's, however it went
            leasing.result()
        raise
    leasing.result()  # taken (a call of no pictures included) before the call's lease can be released
    ids = [image.image_id for image in stored]
    if minted != ids:  # another attempt of this call stored some first: show what the store holds
        preview.cancel()
        pictures = [stored_picture(store, image_id) for image_id in ids]
        return stored, call_preview(
            ids, pictures, [image.recipe.get("seed") for image in stored], preview_size
        )
    return stored, preview.result()


def call_preview(
    ids: Sequence[str],
    pictures: Sequence[Image.Image],
    seeds: Sequence[int | None],
    preview_size: tuple[int, int],
) -> Preview:
    """The preview of a call's pictures (stored as `ids`): one, or a contact sheet labelled "k id seed s"."""
    labels = (
        [ids[0]]
        if len(ids) == 1
        else [f"{k} {image_id} seed {s}" for k, (image_id, s) in enumerate(zip(ids, seeds, strict=True), 1)]
    )
    max_edge, budget_b64 = preview_size
    return make_preview(pictures, labels, max_edge=max_edge, budget_b64=budget_b64)


def stored_picture(store: ImageStore, image_id: str) -> Image.Image:
    """A stored picture's pixels (RGB). Raises UnknownImageError."""
    with Image.open(io.BytesIO(store.read_png(image_id))) as png:
        return png.convert("RGB")


def stored_call(store: ImageStore, call: ImageCall, preview_size: tuple[int, int]) -> NewImages | None:
    """What an earlier attempt of this keyed call stored (every picture of it), as that attempt returned it,
    or None when the call has no key or a picture of it is missing (then it runs, and `store_results` keeps
    the pictures stored already). Reads; stores nothing. Raises StoreError."""
    keys = picture_keys(call)
    if keys is None:
        return None
    found = store.find_calls(keys)
    if len(found) != len(keys):
        return None
    images = [found[key] for key in keys]
    try:
        pictures = [stored_picture(store, image.image_id) for image in images]
    except UnknownImageError:  # evicted or deleted meanwhile: the call runs again
        return None
    first = images[0].recipe
    run = ModelRun(
        seeds=[int(image.recipe["seed"]) for image in images],
        steps=int(first["steps"]),
        guidance=first.get("guidance"),
        model_ms=first.get("model_ms", 0.0),
        queued_ms=first.get("queued_ms", 0.0),
        cache_hits=dict(first.get("cache_hits") or {}),
    )
    return NewImages(
        tool=call.tool,
        images=images,
        parents=list(images[0].parents),
        imported=[],
        preview=call_preview([image.image_id for image in images], pictures, run.seeds, preview_size),
        session=images[0].session,
        elapsed_ms=0.0,
        run=run,
        gone=store.absent(images[0].parents),
        notes=["an earlier attempt with this idempotency key made these images; nothing new was stored"],
    )


def import_input(
    store: ImageStore,
    item: LoadedImage,
    image_id: str,
    picture: Image.Image,
    description: str,
    session: str | None,
) -> StoredImage:
    """Store an input from outside the store as the model used it, under `image_id` and its content key."""
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
    return store.put(
        png,
        width=picture.width,
        height=picture.height,
        recipe=recipe,
        session=session,
        image_id=image_id,
        content_key=item.content_key,
    )


def now_iso(timestamp: float | None = None) -> str:
    """A UTC time as `2026-11-30T17:27:55Z` (now, or the given Unix time)."""
    moment = datetime.now(UTC) if timestamp is None else datetime.fromtimestamp(timestamp, UTC)
    return moment.isoformat(timespec="seconds").replace("+00:00", "Z")


def model_run(done: FinishedRun) -> ModelRun:
    """What the engine's run of a call resolved and cost."""
    resolved = done.result.resolved
    return ModelRun(
        seeds=list(resolved.seeds),
        steps=resolved.steps,
        guidance=resolved.guidance,
        model_ms=done.model_ms,
        queued_ms=done.queued_ms,
        cache_hits=dict(done.result.cache_hits),
        caption_source=done.result.caption_source,
    )
