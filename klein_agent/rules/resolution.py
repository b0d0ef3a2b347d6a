"""From what a caller asked to what the model will run: sizes, seeds, steps and guidance, resolved once.

The pipeline resolves every request with `resolve_request`; the server and the CLI call the same functions to
refuse bad arguments before any model time is spent, so a rule lives here and nowhere else. No torch.

The size rule is the reference's (diffusers `Flux2KleinPipeline.__call__`): without a size, an edit or composition
takes the size of its first reference *as prepared* (scaled down to at most ~1 Mpx, sides floored to the model's
token size), text-to-image takes `limits.DEFAULT_TOKENS_PER_SIDE` tokens a side (1024 px for klein). With only one side given, the other keeps
the aspect ratio of that default (the reference would take the default's other side as it is).
"""

from __future__ import annotations

import math
import secrets
import unicodedata
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from klein_agent.rules import limits

if TYPE_CHECKING:  # step_caches builds on this module's RequestError
    from klein_agent.rules.step_caches import StepCache


class RequestError(ValueError):
    """A request that cannot run as asked; the message names the argument and the allowed values."""


@dataclass(frozen=True)
class ResolvedRequest:
    """Every value that decides the pixels, resolved; a recipe is built from it."""

    prompt: str
    width: int
    height: int
    seeds: tuple[int, ...]  # one per image: seed, seed + 1, ...
    steps: int
    guidance: float | None  # the CFG scale for Base models; None for distilled ones (they take none)
    reference_sizes: tuple[tuple[int, int], ...]  # (width, height) of each reference as prepared, in order
    strength: float | None = None  # masked edits only: how far the masked area is re-noised, in (0, 1]
    first_step: int = 0  # masked edits only: schedule steps skipped (the reference's t_start)
    loras: tuple[tuple[str, float], ...] = ()  # LoRA adapters run: (name, scale), in order
    step_cache: StepCache | None = None  # the step cache the call asked for; None runs every step in full
    # FLUX 3, one reference and no size given: the model runs at width x height (the reference's canvas) and the
    # picture is cropped back to this (left, top, right, bottom) box, the reference's place on the canvas
    crop: tuple[int, int, int, int] | None = None
    # What the caller should be told about how the request was resolved (an argument the model ignores), as
    # sentences; a tool result and the CLI show them as they are.
    notes: tuple[str, ...] = ()

    @property
    def picture_size(self) -> tuple[int, int]:
        """(width, height) of the pictures made: the crop box's size when there is one, else width x height."""
        if self.crop is None:
            return self.width, self.height
        left, top, right, bottom = self.crop
        return right - left, bottom - top

    @property
    def cfg(self) -> bool:
        """Whether classifier-free guidance runs: as in diffusers, only for a scale above 1."""
        return self.guidance is not None and self.guidance > 1.0


def number_text(value: object) -> str:
    """A number as messages show it, the same whether it came as JSON `50` or as the CLI's float `50.0`; NaN and
    the infinities as JSON clients write them (`NaN`, `Infinity`, `-Infinity`), whether typed `nan` or `inf`."""
    if isinstance(value, float) and math.isnan(value):
        return "NaN"
    if isinstance(value, float) and math.isinf(value):
        return "Infinity" if value > 0 else "-Infinity"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def check_finite(value: object, name: str) -> None:
    """Raises RequestError when `value` is a float NaN or infinity (the CLI's float("nan"), or JSON's `NaN`, which
    Python clients send): "`name` must be a finite number, got NaN". Every float argument goes through this first,
    so no comparison with a NaN (always false) lets one through and no rounding of an infinity overflows."""
    if isinstance(value, float) and not math.isfinite(value):
        raise RequestError(f"{name} must be a finite number, got {number_text(value)}")


def clean_prompt(prompt: str) -> str:
    """The prompt as the model gets it: control characters (but newlines and tabs) and surrounding space removed.

    Raises RequestError for text that is not valid Unicode (a lone surrogate: what Python makes of command-line
    bytes that are not UTF-8), for an empty prompt, and for one over MAX_PROMPT_CHARS characters.
    """
    for position, ch in enumerate(prompt):
        if "\ud800" <= ch <= "\udfff":
            byte = f" (byte 0x{ord(ch) - 0xDC00:02x})" if "\udc80" <= ch <= "\udcff" else ""
            raise RequestError(
                f"the prompt is not valid UTF-8 text{byte} at character {position}: set your terminal to UTF-8 "
                "or re-type the prompt"
            )
    text = "".join(ch for ch in prompt if ch in "\n\t" or unicodedata.category(ch) != "Cc").strip()
    if not text:
        raise RequestError(
            "the prompt is empty: describe the picture you want, subject first "
            '(for example "a red fox sitting in fresh snow, morning light")'
        )
    if len(text) > limits.MAX_PROMPT_CHARS:
        raise RequestError(
            f"the prompt is {len(text)} characters long, over the {limits.MAX_PROMPT_CHARS} limit (the model reads "
            "only its first ~500 tokens): shorten it, subject first"
        )
    return text


def check_session(session: str | None) -> str | None:
    """A session label as given, or None; raises RequestError unless it is 1-64 letters, digits, spaces or
    `_ . : -` (labels name groups of images in lists and the gallery; nothing else is allowed in them)."""
    if session is None:
        return None
    if not isinstance(session, str) or not limits.SESSION_PATTERN.fullmatch(session):
        shown = session[:70] if isinstance(session, str) else session
        raise RequestError(
            f"session {shown!r} is not a valid label: use 1 to 64 letters, digits, spaces, '_', '.', ':' or '-' "
            '(for example "logo-v2")'
        )
    return session


def check_reference_geometry(width: int, height: int) -> None:
    """The reference's checks on an input picture (diffusers `Flux2ImageProcessor.check_image_input`).

    Raises RequestError when a side is under 64 px or the aspect ratio is over 8:1.
    """
    if min(width, height) < limits.REFERENCE_MIN_SIDE:
        raise RequestError(
            f"reference image is {width}x{height}; both sides must be at least {limits.REFERENCE_MIN_SIDE} px: "
            "upscale or pad it"
        )
    aspect = max(width / height, height / width)
    if aspect > limits.REFERENCE_MAX_ASPECT:
        raise RequestError(
            f"reference image is {width}x{height}, aspect ratio {aspect:.1f}:1; the aspect ratio must be at most "
            f"{limits.REFERENCE_MAX_ASPECT:g}:1: crop or pad it"
        )


def check_reference_count(count: int, limit: int = limits.MAX_REFERENCES) -> None:
    """Raises RequestError when `count` references are more than `limit`, the model family's
    (`limits.MAX_REFERENCES_BY_FAMILY`; FLUX.2's by default)."""
    if count > limit:
        raise RequestError(
            f"{count} reference images given, but this model takes at most {limit}: pass fewer images, "
            "or compose in two rounds (combine some first, then use that result as one reference)"
        )


def prepared_reference_size(width: int, height: int, multiple: int = limits.SIZE_MULTIPLE) -> tuple[int, int]:
    """(width, height) of a reference after the reference's preparation: scaled down (Lanczos, sides truncated)
    to at most REFERENCE_MAX_AREA pixels, then center-cropped to multiples of `multiple` px."""
    if width * height > limits.REFERENCE_MAX_AREA:
        scale = math.sqrt(limits.REFERENCE_MAX_AREA / (width * height))
        width, height = int(width * scale), int(height * scale)
    return (width // multiple) * multiple, (height // multiple) * multiple


Crop = tuple[int, int, int, int]  # (left, top, right, bottom) in px
# How a family prepares references, by size alone: the original (width, height) of each and the token size in px
# -> each one's prepared (width, height), and the crop-back box of the picture (None: no crop-back). Raises
# RequestError for a reference the family refuses.
ReferenceRule = Callable[[Sequence[tuple[int, int]], int], tuple[tuple[tuple[int, int], ...], Crop | None]]


def flux2_reference_sizes(
    sizes: Sequence[tuple[int, int]], multiple: int = limits.SIZE_MULTIPLE
) -> tuple[tuple[tuple[int, int], ...], Crop | None]:
    """FLUX.2 [klein]'s `ReferenceRule`: every reference checked (`check_reference_geometry`) and prepared
    (`prepared_reference_size`); no crop-back."""
    for w, h in sizes:
        check_reference_geometry(w, h)
    return tuple(prepared_reference_size(w, h, multiple) for w, h in sizes), None


def output_size(
    width: int | None,
    height: int | None,
    first_reference: tuple[int, int] | None,
    multiple: int = limits.SIZE_MULTIPLE,
    max_pixels: int | None = None,
) -> tuple[int, int]:
    """The output (width, height): as given; else the prepared first reference's (`first_reference`, already
    prepared) or 64 tokens a side; one side given: the other keeps that default's aspect ratio, rounded to
    `multiple` px (at least one token). With neither side given and `max_pixels` set (a pixel budget per picture),
    a default over it is scaled down to fit, aspect kept as closely as whole tokens allow: the default of a
    budget-limited server is the largest picture it will make, not a refusal. Sizes a caller gives are never
    changed (`check_pixels` refuses them)."""
    if width is not None and height is not None:
        return width, height
    base_w, base_h = first_reference or (limits.DEFAULT_TOKENS_PER_SIDE * multiple,) * 2
    if width is not None:
        return width, max(multiple, round(width * base_h / base_w / multiple) * multiple)
    if height is not None:
        return max(multiple, round(height * base_w / base_h / multiple) * multiple), height
    if max_pixels is not None and base_w * base_h > max_pixels:
        tokens, aspect = max_pixels // multiple**2, base_w / base_h
        rows = max(
            1, math.isqrt(int(tokens / aspect))
        )  # the most rows at this aspect, then the columns that fit
        columns = max(1, min(tokens // rows, round(rows * aspect)))
        return columns * multiple, rows * multiple
    return base_w, base_h


def check_output_size(width: int, height: int, multiple: int = limits.SIZE_MULTIPLE) -> None:
    """Raises RequestError unless both sides are positive multiples of `multiple`."""
    for name, value in (("width", width), ("height", height)):
        if value < multiple or value % multiple:
            raise RequestError(f"{name} must be a positive multiple of {multiple}, got {value}")


def check_user_size(
    width: int | None, height: int | None, *, max_side: int = limits.MAX_SIDE, min_side: int = limits.MIN_SIDE
) -> None:
    """The product's limits on a size a caller gives (the CLI and the server): multiples of `limits.SIZE_MULTIPLE`
    in [min_side, max_side]. Raises RequestError naming the side."""
    for name, value in (("width", width), ("height", height)):
        if value is None:
            continue
        if value % limits.SIZE_MULTIPLE or not min_side <= value <= max_side:
            raise RequestError(
                f"{name} must be a multiple of {limits.SIZE_MULTIPLE} from {min_side} to {max_side}, got {value}"
            )


def check_pixels(
    width: int, height: int, num_images: int, budget: int, why: str = "", *, masked: bool = False
) -> None:
    """Raises RequestError when width x height x num_images is over `budget` pixels; `why` (where the budget
    comes from) is added to the message. A `masked` edit has no size of its own (it keeps its picture's), so its
    message names the largest picture of this aspect ratio that fits instead of width and height."""
    total = width * height * num_images
    if total <= budget:
        return
    if masked:
        w, h = output_size(None, None, (width, height), max_pixels=budget // num_images)
        ways = [f"scale the picture down to at most {w}x{h} first"] if min(w, h) >= limits.MIN_SIDE else []
        ways += ["lower num_images"] if num_images > 1 and width * height <= budget else []
        remedy = (
            f"a masked edit keeps its picture's size, so {' or '.join(ways) or 'no picture fits this limit'}"
        )
    else:
        remedy = "lower width/height or num_images"
    raise RequestError(
        f"{num_images} image(s) of {width}x{height} is {total / 1e6:.2f} megapixels, over the "
        f"{budget / 1e6:.2f} megapixel limit per call{f' ({why})' if why else ''}: {remedy}"
    )


def draw_seed() -> int:
    """A random seed, leaving room for a batch above it."""
    return secrets.randbelow(limits.RANDOM_SEED_BOUND)


def batch_seeds(seed: int | None, num_images: int) -> tuple[int, ...]:
    """seed, seed + 1, ... for `num_images` pictures (a drawn seed when None). Raises RequestError for a count
    outside [1, MAX_IMAGES_PER_CALL] or a seed outside [0, MAX_SEED], including a batch that would run past MAX_SEED."""
    if not 1 <= num_images <= limits.MAX_IMAGES_PER_CALL:
        raise RequestError(f"num_images must be from 1 to {limits.MAX_IMAGES_PER_CALL}, got {num_images}")
    if seed is None:
        seed = draw_seed()
    if not 0 <= seed <= limits.MAX_SEED:
        raise RequestError(f"seed must be an integer from 0 to {limits.MAX_SEED}, got {seed}")
    last = seed + num_images - 1
    if last > limits.MAX_SEED:
        raise RequestError(
            f"seed {seed} with num_images {num_images} would use seeds up to {last}, past the largest seed "
            f"{limits.MAX_SEED}: use a seed of at most {limits.MAX_SEED - num_images + 1}"
        )
    return tuple(seed + k for k in range(num_images))


def check_steps(steps: int | None) -> None:
    """Raises RequestError for a step count outside [1, MAX_STEPS]; None (the model's default) passes."""
    if steps is not None and not 1 <= steps <= limits.MAX_STEPS:
        raise RequestError(f"steps must be from 1 to {limits.MAX_STEPS}, got {steps}")


def check_guidance(guidance: float | None) -> None:
    """Raises RequestError for a guidance scale that is not finite or outside [MIN_GUIDANCE, MAX_GUIDANCE]; None
    (the model's default) passes. A distilled model ignores a valid one (`guidance_note`)."""
    check_finite(guidance, "guidance")
    if guidance is not None and not limits.MIN_GUIDANCE <= guidance <= limits.MAX_GUIDANCE:
        raise RequestError(
            f"guidance must be from {limits.MIN_GUIDANCE:g} (no guidance) to {limits.MAX_GUIDANCE:g}, got {number_text(guidance)}"
        )


def resolve_sampling(
    steps: int | None, guidance: float | None, *, distilled: bool, default_steps: int, default_guidance: float
) -> tuple[int, float | None]:
    """(steps, guidance) to run. Distilled models take no guidance (None, whatever was asked); Base models use
    the asked scale or their default. Raises RequestError for steps outside [1, MAX_STEPS] or a scale that is not
    finite or outside [MIN_GUIDANCE, MAX_GUIDANCE]."""
    resolved_steps = default_steps if steps is None else steps
    check_steps(resolved_steps)
    check_guidance(guidance)
    if distilled:
        return resolved_steps, None
    return resolved_steps, default_guidance if guidance is None else float(guidance)


def guidance_note(guidance: float | None, *, distilled: bool) -> str | None:
    """The note for `guidance` given to a distilled model (klein 4B/9B and 9B-KV): it runs without it, so a
    caller who set it must hear that it changed nothing. None when there is nothing to say."""
    if guidance is None or not distilled:
        return None
    return (
        f"guidance {number_text(guidance)} is ignored by this distilled model: it has guidance built in, and "
        "only Base models take a guidance scale"
    )


def resolve_request(
    prompt: str,
    width: int | None,
    height: int | None,
    seed: int | None,
    num_images: int,
    steps: int | None,
    guidance: float | None,
    reference_sizes: Sequence[tuple[int, int]],
    *,
    multiple: int,
    distilled: bool,
    default_steps: int,
    default_guidance: float,
    max_references: int,
    reference_rule: ReferenceRule = flux2_reference_sizes,
) -> ResolvedRequest:
    """Resolve one request for a model with these properties. `reference_sizes` are the original (width, height)
    of the references, in order, prepared by the family's `reference_rule` (the crop-back box it gives applies only
    when no size is given, as in the reference). Raises RequestError naming the first argument that cannot work."""
    check_reference_count(len(reference_sizes), max_references)
    prepared, crop = reference_rule(reference_sizes, multiple)
    if width is not None or height is not None:
        crop = None
    out_w, out_h = output_size(width, height, prepared[0] if prepared else None, multiple)
    check_output_size(out_w, out_h, multiple)
    seeds = batch_seeds(seed, num_images)
    run_steps, run_guidance = resolve_sampling(
        steps, guidance, distilled=distilled, default_steps=default_steps, default_guidance=default_guidance
    )
    note = guidance_note(guidance, distilled=distilled)
    notes = () if note is None else (note,)
    return ResolvedRequest(
        prompt, out_w, out_h, seeds, run_steps, run_guidance, prepared, notes=notes, crop=crop
    )
