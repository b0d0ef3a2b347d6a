"""One image call as a value, and the one way it becomes a request. PIL only, no torch, no I/O.

An `ImageCall` (`Generate`, `Edit`, `Compose`, `Inpaint`) is what a caller asked for, each kind with only its own
fields. `ImageCall.check` runs every rule that needs no picture, with the messages the CLI and the server share.
`prepare_call` then turns it into what runs and what is recorded: the inputs decoded (by the `Decoder` the driver
passes in: files for the CLI, ids, paths, data URIs and URLs for the studio) and prepared as the model uses them,
the output size fitted to the pixel budget, the mask, and the `GenerationRequest`; `PreparedCall.recipe` is the
provenance every picture carries. The CLI's `generate` and `Studio.make` both go through here, so the same
arguments give the same pixels, messages and recipes.
"""

from __future__ import annotations

import hashlib
import json
import secrets
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields, replace
from typing import Any, ClassVar, Generic, Protocol, TypeVar

from PIL import Image

from klein_agent.rules import families, limits, masks, resolution, upsampling
from klein_agent.rules.flux3_references import prepare_flux3_input
from klein_agent.rules.layout import LayoutBox, check_layout, layout_box
from klein_agent.rules.recipes import provenance
from klein_agent.rules.references import original_size, prepare_reference
from klein_agent.rules.requests import GenerationRequest, GenerationResult, GeneratorInfo, reference_rule
from klein_agent.rules.resolution import RequestError
from klein_agent.rules.step_caches import chosen_step_cache

T = TypeVar("T")
Prepare = Callable[[Image.Image], Image.Image]
# The per-call pixel budget for a device (None: the loaded model's, or the one named at start) and where it comes
# from, for messages; None while it is still unknown (the model is loading).
Budget = Callable[[str | None], tuple[int, str] | None]
# Run by the engine once the model has loaded, when the budget was unknown before: the request to run.
Finalize = Callable[[GeneratorInfo, GenerationRequest], GenerationRequest]


@dataclass(frozen=True, kw_only=True)
class ImageCall:
    """What every image call has. Unset values follow `klein_agent.rules.resolution`."""

    tool: ClassVar[str]  # the tool name recipes record and reruns call
    prompt: str
    width: int | None = None
    height: int | None = None
    seed: int | None = None
    steps: int | None = None
    guidance: float | None = None
    num_images: int = 1
    session: str | None = None
    loras: Sequence[tuple[str, float | None]] | None = None  # (name, scale or None for its default)
    # the step cache (`klein_agent.rules.step_caches`): (kind, threshold or None for its default); None for none
    step_cache: tuple[str, float | None] | None = None
    # The idempotency key: a client's (`IDEMPOTENCY_META_KEY`), else one `Studio.make` mints for the call
    # (`new_call_id`); None for a call no retry can repeat (the CLI). A retry with the same key and arguments
    # returns the pictures stored the first time (`picture_keys`) instead of storing them again.
    call_id: str | None = None
    # FLUX 3: the caption the text encoder reads, used verbatim instead of the prompt (no upsampling); the prompt
    # is still recorded as the request (`klein_agent.rules.upsampling`)
    caption: str | None = None
    # FLUX 3: boxes placing objects, as the caller gave them (LayoutBox, or the JSON {"box", "label"}); read and
    # checked by `layout_boxes` (`klein_agent.rules.layout`), put into the caption's box table
    layout: Sequence[Any] = ()

    @property
    def inputs(self) -> tuple[str, ...]:
        """The image arguments (ids, paths, URIs), in "image 1, image 2" order."""
        return ()

    @property
    def layout_boxes(self) -> tuple[LayoutBox, ...]:
        """The layout as LayoutBox values, checked (`rules.layout.check_layout`). Raises RequestError naming the
        box and its problem."""
        boxes = tuple(layout_box(value, k) for k, value in enumerate(self.layout, start=1))
        check_layout(boxes)
        return boxes

    @property
    def region(self) -> masks.MaskRequest | None:
        """The region a masked edit repaints; None for calls that make whole pictures. Raises RequestError for
        boxes that are not boxes."""
        return None

    def check(self, max_references: int = limits.MAX_REFERENCES) -> None:
        """Every rule that needs no picture, in the order a caller reads them: the prompt, the session, the size,
        the reference count (`max_references`: the loaded model's), the seeds, steps and guidance, the step
        cache, the region. Raises RequestError with the message the CLI and the server share."""
        resolution.clean_prompt(self.prompt)
        if self.caption is not None:
            upsampling.clean_caption(self.caption)
        layout = self.layout_boxes
        resolution.check_session(self.session)
        check_call_id(self.call_id)
        resolution.check_user_size(self.width, self.height)
        resolution.check_reference_count(len(self.inputs), max_references)
        resolution.batch_seeds(self.seed, self.num_images)
        resolution.check_steps(self.steps)
        resolution.check_guidance(self.guidance)
        chosen_step_cache(self.step_cache)
        region = self.region
        if region is not None:
            region.check()
            if layout:
                raise RequestError(
                    "a masked edit takes no layout: its boxes say where to repaint; use edit with layout to place "
                    "objects in the whole picture"
                )


# Where a client puts its idempotency key in a tools/call request's `_meta` (MCP's open map; not a tool argument,
# so no model-facing schema carries it: a retry is the client program's business).
IDEMPOTENCY_META_KEY = "klein-agent/idempotency-key"


def check_call_id(call_id: object) -> str | None:
    """An idempotency key as given, or None; raises RequestError unless it is 1 to CALL_ID_MAX_CHARS letters,
    digits or `_ . : -` (a UUID fits)."""
    if call_id is None:
        return None
    if not isinstance(call_id, str) or not limits.CALL_ID_PATTERN.fullmatch(call_id):
        text = repr(call_id)  # bounded below, whatever was sent
        shown = text if len(text) <= 42 else text[:40] + "..."
        raise RequestError(
            f"idempotency key {shown} (_meta {IDEMPOTENCY_META_KEY!r}) is not valid: use 1 to "
            f"{limits.CALL_ID_MAX_CHARS} letters, digits, '_', '.', ':' or '-' (a UUID fits), the same on every "
            "retry of one call"
        )
    return call_id


def new_call_id() -> str:
    """A fresh idempotency key (128 random bits), for a call whose client sent none."""
    return "call_" + secrets.token_hex(16)


def _as_json(value: Any) -> Any:
    """A call argument JSON does not spell: a layout box as its dict, a sequence (tuples, pictures' boxes) as a list."""
    return value.as_dict() if isinstance(value, LayoutBox) else list(value)


def picture_keys(call: ImageCall) -> list[str] | None:
    """What the store records on picture k of `call` (`call_id` column, unique): a digest of the key *and* the
    arguments, then `#k`; None when the call has no key. The arguments are part of it so that a key reused for a
    different call makes new pictures rather than returning another call's (a retry sends the same arguments);
    the key itself is not stored. Each picture has its own key, so a retry after a death between picture 1 and
    picture 2 stores picture 2 only."""
    if call.call_id is None:
        return None
    arguments = {f.name: getattr(call, f.name) for f in fields(call) if f.name != "call_id"}
    text = json.dumps([call.tool, call.call_id, arguments], sort_keys=True, default=_as_json)
    digest = hashlib.sha256(text.encode()).hexdigest()[:40]
    return [f"{digest}#{k}" for k in range(call.num_images)]


@dataclass(frozen=True, kw_only=True)
class Generate(ImageCall):
    """A picture from the prompt alone."""

    tool: ClassVar[str] = "generate"


@dataclass(frozen=True, kw_only=True)
class Edit(ImageCall):
    """One picture changed as the prompt says."""

    tool: ClassVar[str] = "edit"
    image: str

    @property
    def inputs(self) -> tuple[str, ...]:  # noqa: D102 - as ImageCall.inputs
        return (self.image,)


@dataclass(frozen=True, kw_only=True)
class Compose(ImageCall):
    """A picture from several references the prompt names "image 1", "image 2", ..."""

    tool: ClassVar[str] = "compose"
    images: Sequence[str]

    @property
    def inputs(self) -> tuple[str, ...]:  # noqa: D102 - as ImageCall.inputs
        return tuple(self.images)


@dataclass(frozen=True, kw_only=True)
class Inpaint(ImageCall):
    """A masked edit (`klein_agent.rules.masks`): `image` repainted where `mask` is white or inside `boxes`
    ([x, y, width, height] in pixels of the image, or all four in fractions), guided by `references`; `strength`
    in (0, 1]. The output keeps the image's size as the model sees it."""

    tool: ClassVar[str] = "inpaint"
    image: str
    references: Sequence[str] = ()
    mask: str | None = None
    boxes: Sequence[Sequence[float]] | None = None  # as the caller gave them (JSON); checked by `region`
    strength: float | None = None

    @property
    def inputs(self) -> tuple[str, ...]:  # noqa: D102 - as ImageCall.inputs
        return (self.image, *self.references)

    @property
    def region(self) -> masks.MaskRequest:  # noqa: D102 - as ImageCall.region
        return masks.MaskRequest(self.mask, masks.boxes_from(self.boxes), self.strength)

    def check(self, max_references: int = limits.MAX_REFERENCES) -> None:  # noqa: D102 - as ImageCall.check
        if self.width is not None or self.height is not None:
            raise RequestError(
                "a masked edit keeps the image's size (as the model sees it): drop width/height, or resize with "
                "an edit first"
            )
        super().check(max_references)


@dataclass(frozen=True)
class Decoded(Generic[T]):
    """An image argument decoded and prepared as the model uses it, with the decoder's own record of it
    (`origin`: the studio's LoadedImage, the CLI's path)."""

    image: Image.Image
    origin: T


class Decoder(Protocol[T]):
    """How a driver turns image arguments into pictures; each wraps its errors in its own words ("image 2: ...",
    "--image cat.png: ...")."""

    def image(self, argument: str, number: int, count: int, prepare: Prepare) -> Decoded[T]:
        """Input `number` (from 1) of `count`, decoded and then prepared with `prepare`."""
        ...

    def mask(self, argument: str) -> Decoded[T]:
        """A mask argument, decoded (the region's rule prepares it)."""
        ...


@dataclass(frozen=True)
class PreparedCall(Generic[T]):
    """A checked call ready to run: the request, its inputs as decoded and prepared (in order), the mask input
    (None for boxes or a whole-picture call), and `finalize` for the engine when the budget was unknown."""

    call: ImageCall
    request: GenerationRequest
    inputs: tuple[Decoded[T], ...]
    mask: Decoded[T] | None
    finalize: Finalize | None

    def recipe(
        self, result: GenerationResult, k: int, parents: Sequence[str], mask_name: str | None = None
    ) -> dict[str, Any]:
        """Picture k's provenance: what decides the pixels (the step cache too, as it ran), the tool, the
        `parents` by the names the driver gives them (stored ids, or CLI paths), and for a masked edit the mask
        ({"image": mask_name}) or boxes."""
        recipe = provenance(result, k, tool=self.call.tool, parents=parents)
        if self.call.layout:  # in the caption already; kept as given, so a rerun passes the same boxes
            recipe["layout"] = [box.as_dict() for box in self.call.layout_boxes]
        region = self.call.region
        if region is not None:
            recipe["mask"] = (
                {"image": mask_name}
                if self.mask is not None
                else {"boxes": [b.as_list() for b in region.boxes]}
            )
        return recipe


def prepare_call(
    call: ImageCall,
    decoder: Decoder[T],
    *,
    multiple: int | None,
    budget: Budget,
    loras: tuple[tuple[str, float | None], ...] = (),
    family: str = families.FLUX2.name,
    upsampler: bool = False,
) -> PreparedCall[T]:
    """Decode and prepare `call`'s inputs one at a time, fit its size to `budget`, build its mask and request.

    `multiple` is the loaded model's token size; None while the model loads: sizes then assume
    `limits.SIZE_MULTIPLE` (every klein checkpoint's) and references stay as decoded, for the pipeline to prepare.
    `family` ("flux2", "flux3": `rules.families`, known from --model before the model loads) says how references
    are prepared and sized, and whether a masked edit can run at all (refused before any input is decoded).
    A masked edit's source is always prepared (resized to whole tokens: its size is the output's). `loras` go
    into the request as they are; the call's step cache goes in checked. With `upsampler` (a prompt upsampler is
    loaded) and no caption, each input is also prepared as the upsampler sees it, from the picture as decoded
    (`upsampling.prepare_references`), as diffusers' block prepares the images the pipeline gets. Raises
    RequestError, or what the decoder raises. Assumes `call.check()` passed.
    """
    text = resolution.clean_prompt(call.prompt)
    seeds = resolution.batch_seeds(call.seed, call.num_images)
    region = call.region
    if region is not None:
        families.check_masked_edit(families.family(family).no_masked_edits)
    size_multiple = multiple or limits.SIZE_MULTIPLE
    arguments = call.inputs
    inputs = []
    for_upsampler: list[Image.Image] = []
    upsample = upsampler and call.caption is None and region is None
    for k, argument in enumerate(arguments, start=1):
        if region is not None and k == 1:  # the picture to repaint, as the model uses it
            how: Prepare = lambda image: masks.prepare_source(image, size_multiple)  # noqa: E731
        elif family == families.FLUX3.name or multiple is not None:
            how = lambda image: model_input(image, len(arguments), family, size_multiple)  # noqa: E731
        else:
            how = lambda image: image  # noqa: E731
        if upsample:
            how = _also_for_upsampler(how, len(arguments), for_upsampler)
        inputs.append(decoder.image(argument, k, len(arguments), how))
    mask = None if region is None or region.mask is None else decoder.mask(region.mask)
    mask_picture = None
    if region is not None:
        mask_picture = region.picture(inputs[0].image, None if mask is None else mask.image)
    sizes = [original_size(item.image) for item in inputs]
    fitted, finalize = fit_size(call, sizes, size_multiple, budget, fit=region is None, family=family)
    width, height = fitted or (call.width, call.height)
    request = GenerationRequest(
        prompt=text,
        width=width,
        height=height,
        seed=seeds[0],
        num_images=call.num_images,
        steps=call.steps,
        guidance=call.guidance,
        references=tuple(item.image for item in inputs),
        mask=mask_picture,
        strength=None if region is None else region.strength,
        loras=loras,
        step_cache=chosen_step_cache(call.step_cache),
        call_id=call.call_id,  # the replica logs it beside a retry
        caption=None if call.caption is None else upsampling.clean_caption(call.caption),
        layout=call.layout_boxes,
        upsampler_references=tuple(for_upsampler),
    )
    return PreparedCall(call, request, tuple(inputs), mask, finalize)


def model_input(image: Image.Image, count: int, family: str, multiple: int) -> Image.Image:
    """One of `count` references as the model of `family` uses it, and as the store keeps an import (so a recipe
    naming it remakes the same pixels): FLUX 3's rule (`prepare_flux3_input`: a single one fitted to its 4 Mpx
    canvas) or FLUX.2's (`prepare_reference`: ~1 Mpx, whole tokens of `multiple` px). Preparing again changes
    nothing. Raises RequestError for a reference the rule refuses."""
    if family == families.FLUX3.name:
        return prepare_flux3_input(image, count)
    return prepare_reference(image, multiple)


def _also_for_upsampler(how: Prepare, count: int, into: list[Image.Image]) -> Prepare:
    """`how`, keeping the decoded picture's upsampler copy in `into` on the way (RequestError for one it refuses)."""

    def prepare(image: Image.Image) -> Image.Image:
        try:
            into.append(upsampling.prepare_reference(image, count))
        except ValueError as err:
            raise RequestError(str(err)) from err
        return how(image)

    return prepare


def fit_size(
    call: ImageCall,
    sizes: Sequence[tuple[int, int]],
    multiple: int,
    budget: Budget,
    *,
    fit: bool,
    family: str = families.FLUX2.name,
) -> tuple[tuple[int, int] | None, Finalize | None]:
    """The output size by the shared rule (`resolution.output_size`, the first of the inputs of these original
    `sizes` as the family prepares it: FLUX 3's single reference is its canvas, up to 4 Mpx), against the per-call
    pixel budget: what the model runs is what is counted.

    Returns (size, finalize): `size` is the (width, height) to ask for when the budget scaled an unset size down
    (`fit`: not for a masked edit, whose output is its source), else None; `finalize` is None, or, when the budget
    is not known yet (`budget(None)` is None: the model is loading), what the engine runs once it has loaded: the
    same rule with that device's budget, giving the request to run. The largest default budget is checked at
    once. Raises RequestError."""
    width, height, count = call.width, call.height, call.num_images
    if not sizes:
        prepared = None
    elif fit:
        prepared = reference_rule(family)(sizes, multiple)[0][0]
    else:  # a masked edit's source is resized to whole tokens, FLUX.2's rule
        prepared = resolution.prepared_reference_size(*sizes[0], multiple)
    unset = width is None and height is None
    default = resolution.output_size(width, height, prepared, multiple)

    def sized(pixels: int, why: str) -> tuple[int, int] | None:
        fit_to = pixels // count if fit else None
        w, h = resolution.output_size(width, height, prepared, multiple, max_pixels=fit_to)
        resolution.check_pixels(w, h, count, pixels, why, masked=not fit)
        return (w, h) if unset and (w, h) != default else None

    known = budget(None)
    if known is not None:
        return sized(*known), None
    sized(max(limits.MAX_PIXELS_PER_CALL, *limits.DEVICE_MAX_PIXELS_PER_CALL.values()), "")

    def once_loaded(loaded: GeneratorInfo, request: GenerationRequest) -> GenerationRequest:
        found = budget(loaded.device)
        assert found is not None
        size = sized(*found)
        return request if size is None else replace(request, width=size[0], height=size[1])

    return None, once_loaded
