"""Which text a FLUX 3 call encodes (the caller's caption, the upsampler's, or the prompt as given), how the
recipe records it, and that a rerun from the recipe makes the same PNG bytes without upsampling again.

The generator is a fake whose picture is a function of the text it was handed to encode, so a caption that did not
reach the model, or a rerun that upsampled again, shows in the pixels. The upsampler here is a counting stand-in;
the real one is tested against diffusers in test_upsampler_parity.py.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import pytest
from PIL import Image

from klein_agent.pipeline.captioning import CaptionedGenerator
from klein_agent.rules import limits, upsampling
from klein_agent.rules.calls import Decoded, Edit, Generate, Prepare, prepare_call
from klein_agent.rules.layout import LayoutBox
from klein_agent.rules.recipes import rerun_call, rerun_command
from klein_agent.rules.requests import GenerationRequest, GenerationResult, GeneratorInfo, resolve
from klein_agent.rules.resolution import RequestError
from klein_agent.service.pngfile import encode_png

FLUX3 = GeneratorInfo(
    model="flux3-tiny",
    variant="flux3-tiny",
    device="cpu",
    dtype="float32",
    distilled=True,
    default_steps=limits.FLUX3_DISTILLED_STEPS,
    default_guidance=limits.DISTILLED_GUIDANCE,
    max_references=10,
    family="flux3",  # as Flux3Pipeline's info says: the family, not the preset's name, decides (rules.families)
)
FLUX2 = replace(
    FLUX3,
    model="tiny",
    variant="tiny",
    default_steps=limits.DISTILLED_STEPS,
    max_references=4,
    family="flux2",
)


@dataclass
class TextPainter:
    """A FLUX 3 stand-in: its picture is the SHA-256 of the text it encodes (caption, else prompt) and the seed."""

    info: GeneratorInfo = FLUX3
    encoded: list[str] = field(default_factory=list)

    def generate(self, request: GenerationRequest, progress: object = None) -> GenerationResult:
        resolved = resolve(request, self.info)
        text = request.caption if request.caption is not None else request.prompt
        self.encoded.append(text)
        digest = hashlib.sha256(f"{text}|{resolved.seeds[0]}".encode()).digest()
        picture = Image.frombytes("RGB", (4, 4), (digest * 2)[:48]).resize((resolved.width, resolved.height))
        return GenerationResult([picture], {}, {}, resolved, self.info)


@dataclass
class CountingUpsampler:
    """Writes "<prompt>, upsampled (<n> references)" and counts its calls."""

    calls: int = 0
    seen: list[list[Image.Image]] = field(default_factory=list)
    layouts: list[tuple[LayoutBox, ...]] = field(default_factory=list)

    def caption(
        self, request: str, references: list[Image.Image] | None = None, *, layout: Sequence[LayoutBox] = ()
    ) -> str:
        self.calls += 1
        self.seen.append(list(references or []))
        self.layouts.append(tuple(layout))
        return f"{request}, upsampled ({len(references or [])} references)"


class Pictures:
    """A decoder of named sizes ("WxH", a gradient so resizing shows)."""

    def image(self, argument: str, number: int, count: int, prepare: Prepare) -> Decoded[str]:
        w, h = (int(v) for v in argument.split("x"))
        picture = Image.linear_gradient("L").resize((w, h)).convert("RGB")
        return Decoded(prepare(picture), argument)

    def mask(self, argument: str) -> Decoded[str]:
        raise AssertionError("no masks here")


def budget(device: str | None) -> tuple[int, str]:
    return 10**7, "--max-megapixels raises it"


def run(generator: CaptionedGenerator, call: Generate | Edit, upsampler: bool) -> tuple[dict, bytes]:
    """One call as the CLI and the studio run it: check, prepare, generate; the recipe and the PNG bytes."""
    call.check(max_references=10)
    prepared = prepare_call(call, Pictures(), multiple=16, budget=budget, upsampler=upsampler)
    result = generator.generate(prepared.request)
    recipe = prepared.recipe(result, 0, parents=list(call.inputs))
    return recipe, encode_png(result.images[0], provenance=recipe)


def test_default_without_upsampler_is_the_prompt_as_given_and_says_so() -> None:
    painter = TextPainter()
    generator = CaptionedGenerator(painter, None)
    request = GenerationRequest(prompt="  a red fox  ", width=64, height=64, seed=1)
    assert generator.caption_for(request) == ("a red fox", "prompt")
    result = generator.generate(request)
    assert (result.caption, result.caption_source) == ("a red fox", "prompt")
    assert result.recipe(0)["caption"] == "a red fox"
    assert "upsample" in upsampling.CAPTION_SENTENCES["prompt"]


def test_upsampler_caption_is_encoded_recorded_and_a_rerun_does_not_upsample_again() -> None:
    painter, pup = TextPainter(), CountingUpsampler()
    generator = CaptionedGenerator(painter, pup)
    recipe, png = run(generator, Generate(prompt="a red fox", width=64, height=64, seed=5), upsampler=True)
    assert painter.encoded == ["a red fox, upsampled (0 references)"]
    assert recipe["prompt"] == "a red fox" and recipe["caption"] == "a red fox, upsampled (0 references)"
    call = rerun_call(recipe, [])
    assert call is not None and call["arguments"]["caption"] == recipe["caption"]
    again_recipe, again_png = run(generator, Generate(**call["arguments"]), upsampler=True)
    assert pup.calls == 1  # the rerun used the stored caption
    assert again_recipe == recipe and again_png == png
    argv = rerun_command(recipe, [], "out.png")
    assert argv is not None and argv[argv.index("--caption") + 1] == recipe["caption"]


@dataclass
class StrayControlUpsampler(CountingUpsampler):
    """Writes what a small or broken upsampler may: a control character inside and space around the caption."""

    def caption(
        self, request: str, references: list[Image.Image] | None = None, *, layout: Sequence[LayoutBox] = ()
    ) -> str:
        return f" {super().caption(request, references, layout=layout)}\x0b done \n"


def test_an_upsampled_caption_is_cleaned_as_a_callers_so_its_rerun_encodes_the_same_text() -> None:
    painter = TextPainter()
    generator = CaptionedGenerator(painter, StrayControlUpsampler())
    recipe, png = run(generator, Generate(prompt="a red fox", width=64, height=64, seed=5), upsampler=True)
    assert painter.encoded == [recipe["caption"]] == ["a red fox, upsampled (0 references) done"]
    call = rerun_call(recipe, [])
    assert call is not None
    again_recipe, again_png = run(generator, Generate(**call["arguments"]), upsampler=True)
    assert painter.encoded[1] == recipe["caption"] and again_png == png and again_recipe == recipe


def test_rerun_of_a_prompt_as_given_stays_byte_exact_on_a_server_with_an_upsampler() -> None:
    plain, with_pup = (
        CaptionedGenerator(TextPainter(), None),
        CaptionedGenerator(TextPainter(), CountingUpsampler()),
    )
    recipe, png = run(plain, Generate(prompt="a red fox", width=64, height=64, seed=5), upsampler=False)
    call = rerun_call(recipe, [])
    assert call is not None
    again_recipe, again_png = run(with_pup, Generate(**call["arguments"]), upsampler=True)
    assert again_png == png and again_recipe == recipe


def test_caller_caption_is_used_verbatim_and_the_upsampler_not_run() -> None:
    painter, pup = TextPainter(), CountingUpsampler()
    caption = "Full-color outdoor photograph, a red fox sitting in fresh snow.\nMorning light."
    recipe, _ = run(
        CaptionedGenerator(painter, pup), Generate(prompt="fox", caption=caption, width=64, height=64), True
    )
    assert painter.encoded == [caption] and pup.calls == 0
    assert recipe["prompt"] == "fox" and recipe["caption"] == caption


def test_an_edit_hands_the_upsampler_its_references_prepared_from_the_decoded_pictures() -> None:
    pup = CountingUpsampler()
    call = Edit(prompt="make it blue", image="300x201", seed=2)
    recipe, _ = run(CaptionedGenerator(TextPainter(), pup), call, upsampler=True)
    decoded = Image.linear_gradient("L").resize((300, 201)).convert("RGB")
    (seen,) = pup.seen
    assert [p.tobytes() for p in seen] == [upsampling.prepare_reference(decoded, 1).tobytes()]
    assert recipe["caption"] == "make it blue, upsampled (1 references)"
    # without an upsampler loaded nothing is prepared for it
    prepared = prepare_call(call, Pictures(), multiple=16, budget=budget)
    assert prepared.request.upsampler_references == ()


@pytest.mark.parametrize(
    ("caption", "message"),
    [
        ("   ", "the caption is empty: leave it out"),
        ("x" * (limits.MAX_CAPTION_CHARS + 1), f"over the {limits.MAX_CAPTION_CHARS} limit"),
        ("bad \udcff byte", "the caption is not valid UTF-8"),
    ],
)
def test_a_bad_caption_is_refused_before_any_work(caption: str, message: str) -> None:
    with pytest.raises(RequestError, match=message):
        Generate(prompt="fox", caption=caption).check()


def test_a_caption_for_a_flux2_model_is_refused_not_ignored() -> None:
    with pytest.raises(
        RequestError,
        match=r"caption is for FLUX 3 \[klein\] models.*a FLUX\.2 \[klein\] model encodes the prompt",
    ):
        resolve(GenerationRequest(prompt="fox", caption="a fox"), FLUX2)
