"""FLUX 3 [klein]'s rules behind every tool (issue 21, point 3), without a model: the reference limit of each family,
the canvas and crop-back sizing by sizes alone (against diffusers' own processor), the pixel budget counted on the
canvas, the masked-edit refusal shared with klein 9B-KV, the recipe a cropped-back picture carries and its rerun,
and the texts built from the defaults."""

from __future__ import annotations

import pytest
from diffusers.modular_pipelines.flux3.image_processor import Flux3ImageProcessor
from PIL import Image
from test_pipeline_parity import picture

from klein_agent.model.configs import PRESETS, Flux3TransformerConfig
from klein_agent.rules import families, limits
from klein_agent.rules.calls import Compose, Edit, Inpaint, fit_size, prepare_call
from klein_agent.rules.flux3_references import flux3_reference_sizes, prepare_flux3_input
from klein_agent.rules.recipes import rerun_call, rerun_command
from klein_agent.rules.requests import GenerationRequest, GeneratorInfo, resolve
from klein_agent.rules.resolution import RequestError

FLUX3_INFO = GeneratorInfo(
    model="flux3-tiny",
    variant="flux3-tiny",
    device="cpu",
    dtype="float32",
    distilled=True,
    default_steps=limits.FLUX3_DISTILLED_STEPS,
    default_guidance=1.0,
    max_references=families.FLUX3.max_references,
    family="flux3",
    no_masked_edits=families.FLUX3.no_masked_edits,
)
FLUX2_INFO = GeneratorInfo(
    model="tiny",
    variant="tiny",
    device="cpu",
    dtype="float32",
    distilled=True,
    default_steps=limits.DISTILLED_STEPS,
    default_guidance=1.0,
    max_references=families.FLUX2.max_references,
)


def test_every_preset_names_its_family() -> None:
    for name, preset in PRESETS.items():
        is_flux3 = isinstance(preset.transformer, Flux3TransformerConfig)
        assert (families.preset_family(name) is families.FLUX3) == is_flux3, name
        if is_flux3:
            steps = limits.FLUX3_DISTILLED_STEPS if preset.sampling.distilled else limits.FLUX3_BASE_STEPS
            assert preset.sampling.steps == steps, name
    assert {"flux3-tiny", "flux3-klein", "flux3-klein-base"} <= set(PRESETS)
    assert families.FLUX3.max_references == 10 and families.FLUX2.max_references == 4


def test_the_reference_limit_is_the_familys() -> None:
    ten = tuple(picture(64, 64, seed=k) for k in range(10))
    resolved = resolve(GenerationRequest("x", seed=1, references=ten), FLUX3_INFO)
    assert len(resolved.reference_sizes) == 10
    with pytest.raises(RequestError, match="11 reference images given, but this model takes at most 10"):
        resolve(GenerationRequest("x", seed=1, references=(*ten, ten[0])), FLUX3_INFO)
    with pytest.raises(RequestError, match="5 reference images given, but this model takes at most 4"):
        resolve(GenerationRequest("x", seed=1, references=ten[:5]), FLUX2_INFO)
    # the call's own check, which the CLI and the studio run with the family's limit before any decoding
    Compose(prompt="x", images=["a.png"] * 10).check(families.FLUX3.max_references)
    with pytest.raises(RequestError, match="at most 10"):
        Compose(prompt="x", images=["a.png"] * 11).check(families.FLUX3.max_references)
    # what the server's schema (the most any family takes) refuses names every family's limit
    with pytest.raises(
        RequestError, match=r"no model takes more than 10 \(FLUX.2 \[klein\] 4, FLUX 3 \[klein\] 10\)"
    ):
        families.check_most_references(11)


# (width, height) of a single reference: the canvas and the crop box by sizes alone must be what diffusers' processor
# makes of the pixels (3024x4032: a phone photo, scaled down to a 3.95 Mpx canvas; 72x40: padded to 80x64)
CANVAS_CASES = {"phone-photo": (3024, 4032), "small": (72, 40), "on-grid": (64, 128), "wide": (2100, 2300)}


@pytest.mark.parametrize("size", CANVAS_CASES.values(), ids=CANVAS_CASES.keys())
def test_the_canvas_rule_by_sizes_equals_diffusers(size: tuple[int, int]) -> None:
    image = Image.new("RGB", size, (90, 120, 30))  # the processor's sizes depend on the size alone
    want, kwargs = Flux3ImageProcessor().preprocess(image, resize_mode="fill")
    (canvas,), crop = flux3_reference_sizes([size])
    assert canvas == (want.shape[-1], want.shape[-2])
    assert crop == kwargs["reference_crop"]
    assert canvas[0] * canvas[1] <= 4 * 1024 * 1024
    # what the server and the CLI keep of the input: fitted to the canvas; the rule reads the same sizes again
    fitted = prepare_flux3_input(image, 1)
    assert flux3_reference_sizes([fitted.size]) == ((canvas,), crop)


def test_a_single_reference_resolves_to_its_canvas_and_crops_back() -> None:
    resolved = resolve(GenerationRequest("x", seed=1, references=(picture(72, 40, seed=1),)), FLUX3_INFO)
    assert (resolved.width, resolved.height) == (80, 64) and resolved.crop == (4, 12, 76, 52)
    assert resolved.picture_size == (72, 40)
    # a size given turns the crop-back off, as in diffusers
    sized = resolve(
        GenerationRequest("x", seed=1, width=96, references=(picture(72, 40, seed=1),)), FLUX3_INFO
    )
    assert sized.crop is None and sized.picture_size == (sized.width, sized.height)
    # FLUX.2 prepares the same input its own way (1 Mpx crop; no side under 64 px)
    with pytest.raises(RequestError, match="at least 64 px"):
        resolve(GenerationRequest("x", seed=1, references=(picture(72, 40, seed=1),)), FLUX2_INFO)


def test_the_pixel_budget_counts_the_4mp_canvas() -> None:
    photo = [(3024, 4032)]
    call = Edit(prompt="x", image="photo.jpg")
    # CUDA's default budget holds the whole canvas: nothing is changed, the picture is cropped back
    size, _ = fit_size(call, photo, 16, lambda d: (limits.MAX_PIXELS_PER_CALL, ""), fit=True, family="flux3")
    assert size is None
    # a CPU budget scales the default down, as for FLUX.2 (a size is then given, and the crop-back is off)
    size, _ = fit_size(call, photo, 16, lambda d: (512 * 512, ""), fit=True, family="flux3")
    assert size is not None and size[0] * size[1] <= 512 * 512
    # a size asked over the budget is refused naming it
    with pytest.raises(RequestError, match="megapixel limit per call"):
        fit_size(
            Edit(prompt="x", image="p.jpg", width=2048, height=2048),
            photo,
            16,
            lambda d: (2**20, ""),
            fit=True,
            family="flux3",
        )


class _Pictures:
    """A decoder of names like "72x40" into pictures of that size (the rules need nothing more)."""

    def image(self, argument: str, number: int, count: int, prepare: object) -> object:
        from klein_agent.rules.calls import Decoded

        w, h = (int(v) for v in argument.split("x"))
        return Decoded(prepare(picture(w, h, seed=number)), argument)  # type: ignore[operator]

    def mask(self, argument: str) -> object:
        raise AssertionError("no mask is decoded for a refused call")


def test_inpaint_is_refused_on_flux3_and_klein_9b_kv_with_one_sentence() -> None:
    call = Inpaint(prompt="x", image="128x128", boxes=[[0, 0, 64, 64]])
    budget = lambda d: (limits.MAX_PIXELS_PER_CALL, "")  # noqa: E731
    with pytest.raises(RequestError) as flux3:
        prepare_call(call, _Pictures(), multiple=16, budget=budget, family="flux3")  # type: ignore[arg-type]
    assert str(flux3.value).startswith("masked edits (inpaint) are not supported on FLUX 3 [klein] models: ")
    assert "use edit" in str(flux3.value)
    kv = GeneratorInfo(**{**FLUX2_INFO.__dict__, "no_masked_edits": families.KV_NO_MASKED_EDITS})
    mask = Image.new("L", (64, 64), 255)
    with pytest.raises(RequestError) as refused:
        resolve(GenerationRequest("x", seed=1, references=(picture(64, 64, seed=1),), mask=mask), kv)
    assert str(refused.value) == str(flux3.value).replace("FLUX 3 [klein] models", "klein 9B-KV checkpoints")
    # FLUX.2 klein prepares it
    prepare_call(call, _Pictures(), multiple=16, budget=budget, family="flux2")  # type: ignore[arg-type]


def test_a_cropped_back_picture_reruns_without_a_size() -> None:
    recipe = {
        "tool": "edit",
        "prompt": "make it night",
        "seed": 5,
        "width": 72,
        "height": 40,
        "steps": 16,
        "guidance": None,
        "model": "flux3-tiny",
        "variant": "flux3-tiny",
        "reference_crop": [4, 12, 76, 52],
        "parents": ["img_a"],
    }
    call = rerun_call(recipe, ["img_a"])
    assert call is not None and "width" not in call["arguments"] and "height" not in call["arguments"]
    argv = rerun_command(recipe, ["img_a"], "out.png")
    assert argv is not None and "--width" not in argv and "--height" not in argv
    # without a crop the size stays in the rerun
    plain = rerun_call({**recipe, "reference_crop": None}, ["img_a"])
    assert plain is not None and plain["arguments"]["width"] == 72


def test_texts_are_built_from_the_defaults() -> None:
    text = families.defaults_text()
    assert f"{limits.FLUX3_DISTILLED_STEPS} for distilled FLUX 3 [klein]" in text
    assert f"{limits.FLUX3_BASE_STEPS} (guidance {limits.FLUX3_BASE_GUIDANCE:g}) for its Base" in text
    assert f"{limits.DISTILLED_STEPS} for distilled FLUX.2 [klein]" in text
    from klein_agent.server.app import instructions

    assert "compose combines up to 10" in instructions(families.FLUX3)
    assert "inpaint is refused on FLUX 3 [klein] models" in instructions(families.FLUX3)
    assert "compose combines up to 4" in instructions(families.FLUX2)
