"""Which text a FLUX 3 call encodes: the caller's caption, the upsampler's, or the prompt as given.

`CaptionedGenerator` wraps the FLUX 3 `ImageGenerator` (the seam: the FLUX 3 generator encodes `request.caption`
when it is set, else `request.prompt`). For each request without a caption it runs the loaded prompt upsampler on
the engine's thread, before the model, and records the caption and where it came from on the result; the recipe
keeps the caption, so a rerun passes it verbatim and never re-upsamples. The default per call, for the user:

- a caption given: used verbatim ("caller");
- else, with `--prompt-upsampler`: the upsampler's caption ("upsampler"), as BFL says to run FLUX 3;
- else the prompt as given ("prompt"), and the result says BFL trained on upsampled captions and how to get one.

With a layout (`request.layout`, boxes placing objects) every one of the three ends in the box table with the
caller's boxes exactly (`rules.layout.reconcile`, diffusers' `reconcile_boxes`): the upsampler runs in its box mode;
a caller's caption has its table checked the same way (malformed rows dropped, near-duplicates renamed, the given
boxes put back, appended when it has none); the prompt as given gets the table appended. Reconciling is idempotent,
so a rerun passing the recorded caption and layout encodes the same text.
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING

from klein_agent.loading.errors import CheckpointError
from klein_agent.rules import families, upsampling
from klein_agent.rules.layout import reconcile
from klein_agent.rules.requests import (
    GenerationRequest,
    GenerationResult,
    GeneratorInfo,
    ImageGenerator,
    ProgressCallback,
)
from klein_agent.rules.resolution import RequestError, clean_prompt
from klein_agent.rules.upsampling import clean_caption

if TYPE_CHECKING:
    from klein_agent.pipeline.upsampler import PromptUpsampler


class CaptionedGenerator:
    """A FLUX 3 generator with the caption chosen per request (module docstring); `upsampler` may be None."""

    def __init__(self, inner: ImageGenerator, upsampler: PromptUpsampler | None) -> None:
        self.inner = inner
        self.upsampler = upsampler
        self.info: GeneratorInfo = inner.info

    def caption_for(self, request: GenerationRequest) -> tuple[str, str]:
        """(caption, source) for `request`: source is "caller", "upsampler" or "prompt" (limits.CAPTION_SOURCES).
        Raises RequestError for a reference the upsampler refuses, RuntimeError for an upsampled caption that is
        empty or over limits.MAX_CAPTION_CHARS once cleaned; with a layout, RequestError for a caller's caption
        (or prompt) too long once its box table is put back."""
        rows = upsampling.layout_rows(request.layout, len(request.references)) if request.layout else None
        if request.caption is not None or self.upsampler is None:
            source = "prompt" if request.caption is None else "caller"
            text = (
                clean_caption(request.caption)
                if request.caption is not None
                else clean_prompt(request.prompt)
            )
            if rows:
                text = clean_caption(reconcile(text, rows))
            return text, source
        prompt = clean_prompt(request.prompt)
        try:
            written = self.upsampler.caption(
                prompt, list(request.upsampler_references), layout=request.layout
            )
        except ValueError as err:  # more than 10 references, one over 200:1
            raise RequestError(str(err)) from err
        # The one caption rule, as a caller's caption gets it: the recipe's rerun passes this text as `caption`
        # and must encode the same characters (an upsampler's stray control character would otherwise differ)
        try:
            return clean_caption(written), "upsampler"
        except RequestError as err:
            raise RuntimeError(f"the prompt upsampler's caption cannot be encoded: {err}") from err

    def generate(
        self, request: GenerationRequest, progress: ProgressCallback | None = None
    ) -> GenerationResult:
        """The inner generator's result for `request` with its caption chosen, recorded on the result."""
        caption, source = self.caption_for(request)
        result = self.inner.generate(replace(request, caption=caption, upsampler_references=()), progress)
        return replace(result, caption=caption, caption_source=source)


def with_captions(generator: ImageGenerator, upsampler_source: str | None) -> ImageGenerator:
    """`generator` as `--prompt-upsampler` asks: a FLUX 3 model wrapped in `CaptionedGenerator` (with the upsampler
    loaded on the model's device and dtype when one is named); another model as it is.

    Raises CheckpointError for an upsampler named with a model that is not FLUX 3, or one that cannot load."""
    info = generator.info
    if info.family != families.FLUX3.name:
        if upsampler_source is not None:  # `check_model_options` refuses it before loading; the same sentence
            try:
                families.check_flux3_only("--prompt-upsampler", info.family)
            except ValueError as exc:
                raise CheckpointError(f"--model {info.model}: {exc}") from None
        return generator
    upsampler = None
    if upsampler_source is not None:
        import torch

        from klein_agent.pipeline.upsampler import load_upsampler

        upsampler = load_upsampler(upsampler_source, device=info.device, dtype=getattr(torch, info.dtype))
    return CaptionedGenerator(generator, upsampler)
