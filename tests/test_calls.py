"""The one way a call becomes a request (`rules.calls`), on its own: no model, no store, no torch. The CLI and the
studio both go through `ImageCall.check` and `prepare_call`; these tests pin what they share: the checks, the size
fitted to the pixel budget (now, or once the loading model's device is known), a masked edit's source and mask, and
the recipe's region."""

from __future__ import annotations

import math

import pytest
from PIL import Image

from klein_agent.rules import limits, resolution
from klein_agent.rules.calls import Budget, Compose, Decoded, Edit, Generate, Inpaint, Prepare, prepare_call
from klein_agent.rules.requests import GenerationResult, GeneratorInfo, resolve
from klein_agent.rules.resolution import RequestError
from klein_agent.rules.step_caches import StepCache


class Pictures:
    """A decoder of named sizes: "WxH" is a grey picture of that size; it records what it was asked."""

    def __init__(self) -> None:
        self.asked: list[tuple[str, int, int]] = []

    def image(self, argument: str, number: int, count: int, prepare: Prepare) -> Decoded[str]:
        self.asked.append((argument, number, count))
        w, h = (int(v) for v in argument.split("x"))
        return Decoded(prepare(Image.new("RGB", (w, h), "grey")), argument)

    def mask(self, argument: str) -> Decoded[str]:
        w, h = (int(v) for v in argument.split("x"))
        picture = Image.new("L", (w, h), 0)
        picture.paste(255, (0, 0, w // 2, h // 2))
        return Decoded(picture, argument)


def fixed(pixels: int) -> Budget:
    return lambda device: (pixels, "--max-megapixels raises it")


def info(device: str) -> GeneratorInfo:
    return GeneratorInfo(
        model="tiny",
        variant="tiny",
        device=device,
        dtype="float32",
        distilled=True,
        default_steps=limits.DISTILLED_STEPS,
        default_guidance=limits.MIN_GUIDANCE,
        max_references=limits.MAX_REFERENCES,
    )


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (Generate(prompt=" "), "prompt is empty"),
        (Generate(prompt="x", steps=0), f"steps must be from 1 to {limits.MAX_STEPS}, got 0"),
        (Generate(prompt="x", guidance=math.nan), "guidance"),
        (Generate(prompt="x", guidance=limits.MAX_GUIDANCE + 1), "guidance must be from"),
        (Generate(prompt="x", width=1000), "width must be a multiple of 16"),
        (Compose(prompt="x", images=["64x64"] * (limits.MAX_REFERENCES + 1)), "at most"),
        (Inpaint(prompt="x", image="64x64"), "no mask and no boxes given"),
        (Inpaint(prompt="x", image="64x64", boxes=[[0, 0, 8, 8]], width=64), "keeps the image's size"),
        (Inpaint(prompt="x", image="64x64", boxes=[[0, 0, 8, 8]], strength=0), "strength must be above 0"),
        (
            Generate(prompt="x", step_cache=("magcache", 1.5)),
            "step cache: threshold must be above 0 and at most",
        ),
        (
            Edit(prompt="x", image="64x64", step_cache=("magcache", 0)),
            "step cache: threshold must be above 0",
        ),
        (
            Compose(prompt="x", images=["64x64"] * 2, step_cache=("firstblock", None)),
            "step cache: kind must be",
        ),
        (
            Inpaint(prompt="x", image="64x64", boxes=[[0, 0, 8, 8]], step_cache=("magcache", math.nan)),
            "step cache: threshold must be a finite number",
        ),
    ],
)
def test_every_rule_that_needs_no_picture_is_checked_before_any_decoding(call: object, message: str) -> None:
    with pytest.raises(RequestError, match=message):
        call.check()  # type: ignore[attr-defined]


def test_named_checks_let_unset_values_pass_and_say_the_range() -> None:
    resolution.check_steps(None)
    resolution.check_guidance(None)
    with pytest.raises(RequestError, match=f"got {limits.MAX_STEPS + 1}"):
        resolution.check_steps(limits.MAX_STEPS + 1)


def test_an_unset_size_is_fitted_to_the_budget_and_a_set_one_is_refused_over_it() -> None:
    budget = 512 * 512
    prepared = prepare_call(Generate(prompt="x", num_images=2), Pictures(), multiple=16, budget=fixed(budget))
    request = prepared.request
    assert request.width is not None and request.height is not None
    assert request.width * request.height * 2 <= budget and request.width % 16 == 0
    assert prepared.finalize is None
    with pytest.raises(
        RequestError, match=r"over the 0\.26 megapixel limit per call \(--max-megapixels raises it\)"
    ):
        prepare_call(
            Generate(prompt="x", width=1024, height=1024), Pictures(), multiple=16, budget=fixed(budget)
        )


def test_inputs_are_decoded_in_order_and_prepared_as_the_model_uses_them() -> None:
    pictures = Pictures()
    prepared = prepare_call(
        Compose(prompt="x", images=["100x70", "90x130"]), pictures, multiple=16, budget=fixed(10**7)
    )
    assert pictures.asked == [("100x70", 1, 2), ("90x130", 2, 2)]
    assert [image.size for image in prepared.request.references] == [(96, 64), (80, 128)]  # cropped to tokens
    assert (prepared.request.width, prepared.request.height) == (
        None,
        None,
    )  # image 1's size, by the pipeline
    edit = prepare_call(Edit(prompt="x", image="100x70"), Pictures(), multiple=None, budget=fixed(10**7))
    assert edit.request.references[0].size == (
        100,
        70,
    )  # model still loading: kept for the pipeline to prepare


def test_a_budget_unknown_while_the_model_loads_is_applied_once_its_device_is_known() -> None:
    known: dict[str, tuple[int, str]] = {}

    def budget(device: str | None) -> tuple[int, str] | None:
        return known.get(device or "")

    prepared = prepare_call(Generate(prompt="x"), Pictures(), multiple=None, budget=budget)
    assert prepared.finalize is not None and prepared.request.width is None
    known["cpu"] = (256 * 256, "the default on cpu")
    final = prepared.finalize(info("cpu"), prepared.request)
    assert final.width is not None and final.height is not None and final.width * final.height <= 256 * 256


def test_a_masked_edit_repaints_its_prepared_source_and_records_its_region() -> None:
    boxes = prepare_call(
        Inpaint(prompt="x", image="100x70", boxes=[[0, 0, 0.5, 0.5]], strength=0.8),
        Pictures(),
        multiple=16,
        budget=fixed(10**7),
    )
    source, mask = boxes.request.references[0], boxes.request.mask
    assert source.size == (96, 64) and mask is not None and mask.size == source.size  # resized, not cropped
    assert boxes.request.strength == 0.8 and boxes.mask is None
    drawn = prepare_call(
        Inpaint(prompt="x", image="100x70", mask="200x140", references=["64x64"]),
        Pictures(),
        multiple=16,
        budget=fixed(10**7),
    )
    assert drawn.mask is not None and drawn.mask.origin == "200x140"
    assert drawn.request.mask is not None and drawn.request.mask.size == (96, 64)
    assert len(drawn.request.references) == 2
    with pytest.raises(RequestError, match="aspect"):
        prepare_call(
            Inpaint(prompt="x", image="100x70", mask="100x100"), Pictures(), multiple=16, budget=fixed(10**7)
        )


@pytest.mark.parametrize("call_kind", ["generate", "inpaint"])
def test_a_calls_step_cache_goes_into_the_request_checked_and_into_every_recipe(call_kind: str) -> None:
    """The cache is a field of the call: prepare_call carries it (its default threshold filled in) into the
    request, and PreparedCall.recipe records it as it ran; a call without one runs and records none."""
    default = StepCache("magcache", limits.STEP_CACHE_DEFAULT_THRESHOLD)
    for choice, expected in (
        (("magcache", None), default),
        (("magcache", 0.25), StepCache("magcache", 0.25)),
    ):
        call = (
            Generate(prompt="x", width=64, height=64, step_cache=choice)
            if call_kind == "generate"
            else Inpaint(prompt="x", image="64x64", boxes=[[0, 0, 0.5, 0.5]], step_cache=choice)
        )
        prepared = prepare_call(call, Pictures(), multiple=16, budget=fixed(10**7))
        assert prepared.request.step_cache == expected
        ran = resolve(prepared.request, info("cpu"))
        result = GenerationResult([Image.new("RGB", (64, 64))], {}, {}, ran, info("cpu"))
        assert prepared.recipe(result, 0, parents=[])["cache"] == expected.as_dict()
    plain = prepare_call(
        Generate(prompt="x", width=64, height=64), Pictures(), multiple=16, budget=fixed(10**7)
    )
    assert plain.request.step_cache is None
    ran = resolve(plain.request, info("cpu"))
    assert "cache" not in plain.recipe(GenerationResult([], {}, {}, ran, info("cpu")), 0, parents=[])


def test_the_calls_idempotency_key_travels_on_its_request_to_the_generator() -> None:
    """The key a client sent (or the front-end minted) reaches the generator, so a replica's retry can name it."""
    keyed = prepare_call(
        Generate(prompt="x", call_id="retry-7"), Pictures(), multiple=16, budget=fixed(2**20)
    )
    assert keyed.request.call_id == "retry-7"
    unkeyed = prepare_call(Generate(prompt="x"), Pictures(), multiple=16, budget=fixed(2**20))
    assert unkeyed.request.call_id is None
