"""What an image tool returns, for pictures a seeded model run made and for pictures no model run made (a tool over
stored images, such as an upscale): the second reports no seeds, steps or model time, and still fits the published
output schema."""

from __future__ import annotations

from typing import Any

import jsonschema
from PIL import Image

from klein_agent.rules.upsampling import CAPTION_SENTENCES
from klein_agent.server.models import ImagesResult
from klein_agent.server.results import images_result
from klein_agent.service.making import ModelRun, NewImages
from klein_agent.service.previews import make_preview
from klein_agent.service.store import StoredImage


def stored(image_id: str, parents: tuple[str, ...]) -> StoredImage:
    return StoredImage(
        image_id=image_id,
        width=128,
        height=96,
        size_bytes=1234,
        created_at=0.0,
        session=None,
        parents=parents,
        recipe={},
        blob_key=image_id,
    )


def made(run: ModelRun | None) -> NewImages:
    images = [
        stored("img_aaaaaaaaaaaaaaaaaaaaaa", ("img_pppppppppppppppppppppp",)),
        stored("img_bbbbbbbbbbbbbbbbbbbbbb", ()),
    ]
    preview = make_preview([Image.new("RGB", (128, 96))] * 2, ["1", "2"], max_edge=256)
    return NewImages(
        tool="upscale" if run is None else "edit",
        images=images,
        parents=["img_pppppppppppppppppppppp"],
        imported=[],
        preview=preview,
        session=None,
        elapsed_ms=12.0,
        run=run,
    )


def text_of(result: Any) -> str:
    return "\n".join(getattr(block, "text", "") for block in result.content)


def test_pictures_no_model_run_made_report_no_seeds_steps_or_model_time() -> None:
    result = images_result(made(None))
    text = text_of(result)
    assert "seed" not in text and "steps" not in text and "model" not in text, text
    assert "upscale: made 2 images of 128x96 in 12 ms." in text
    structured = result.structured_content
    assert structured is not None
    jsonschema.validate(structured, ImagesResult.model_json_schema())
    assert structured["steps"] is None and structured["model_ms"] == 0 and structured["cache_hits"] == {}
    assert [image["seed"] for image in structured["images"]] == [None, None]
    links = [block for block in result.content if getattr(block, "type", "") == "resource_link"]
    assert [link.description for link in links] == [
        "full-resolution 128x96 PNG; recipe at image://img_aaaaaaaaaaaaaaaaaaaaaa/meta",
        "full-resolution 128x96 PNG; recipe at image://img_bbbbbbbbbbbbbbbbbbbbbb/meta",
    ]


def test_pictures_of_a_model_run_report_its_seeds_steps_and_time() -> None:
    run = ModelRun(
        seeds=[7, 8], steps=4, guidance=None, model_ms=30.4, queued_ms=1.0, cache_hits={"prompt": 1}
    )
    result = images_result(made(run))
    text = text_of(result)
    assert "edit: made 2 images of 128x96 in 12 ms (model 30 ms), 4 steps, seeds 7-8." in text
    assert (
        "1. img_aaaaaaaaaaaaaaaaaaaaaa (seed 7)" in text and "Reused from earlier calls: prompt x1." in text
    )
    structured = result.structured_content
    assert structured is not None
    jsonschema.validate(structured, ImagesResult.model_json_schema())
    assert (structured["steps"], structured["model_ms"]) == (4, 30)
    assert [image["seed"] for image in structured["images"]] == [7, 8]


def test_a_flux3_run_says_which_text_its_model_encoded() -> None:
    """Each caption source gets its sentence and field; the prompt as given says BFL's advice and the way out."""
    for source in ("upsampler", "caller", "prompt"):
        run = ModelRun(
            seeds=[7, 8], steps=16, guidance=None, model_ms=1.0, queued_ms=0.0, caption_source=source
        )
        result = images_result(made(run))
        structured = result.structured_content
        assert structured is not None and structured["caption_source"] == source
        jsonschema.validate(structured, ImagesResult.model_json_schema())
        assert f"Text encoded: {CAPTION_SENTENCES[source]}." in text_of(result)
    assert "BFL trained FLUX 3 on upsampled captions" in CAPTION_SENTENCES["prompt"]
    flux2 = images_result(made(ModelRun(seeds=[7, 8], steps=4, guidance=None, model_ms=1.0, queued_ms=0.0)))
    assert "Text encoded" not in text_of(flux2) and flux2.structured_content["caption_source"] is None  # type: ignore[index]
