"""The FLUX 3 [klein] pipeline, text-to-image: a prompt and seeds in, pictures out, as diffusers'
`Flux3DistilledAutoBlocks` / `Flux3AutoBlocks` make them (the prompt upsampler block removed: the prompt given is
the caption the model sees).

Not yet here (issue 21): references (the single-reference canvas with its crop-back, several references), the
prompt upsampler, LoRA, the request/recipe protocol the CLI and server use. `generate` refuses references clearly.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from PIL import Image
from torch import Tensor

from klein_agent.model import flux3_sampling, sampling
from klein_agent.model.autoencoder import AutoEncoder
from klein_agent.model.configs import SamplingDefaults
from klein_agent.model.flux3_text_encoder import Flux3TextEmbedder
from klein_agent.model.flux3_transformer import Flux3Transformer
from klein_agent.model.sampling import StepCallback
from klein_agent.pipeline.imaging import to_images, to_unit
from klein_agent.pipeline.klein import initial_noise
from klein_agent.rules import limits


class Flux3Pipeline:
    """The loaded FLUX 3 model; tested equal to diffusers' modular pipelines for text-to-image, both variants."""

    def __init__(
        self,
        transformer: Flux3Transformer,
        autoencoder: AutoEncoder,
        text_embedder: Flux3TextEmbedder,
        sampling_defaults: SamplingDefaults,
        model_name: str = "flux3",
        variant: str = "flux3-custom",
    ) -> None:
        self.transformer = transformer
        self.autoencoder = autoencoder
        self.text_embedder = text_embedder
        self.sampling_defaults = sampling_defaults
        self.model_name = model_name
        self.variant = variant
        first = next(transformer.parameters())
        self.device, self.dtype = first.device, first.dtype

    def encode_prompt(self, prompt: str) -> tuple[Tensor, Tensor]:
        """The prompt's conditioning [1, window, C_ctx] in the model dtype and device, and its ids [window, 4]."""
        context = self.text_embedder([prompt]).to(self.device, self.dtype)
        return context, flux3_sampling.text_ids(context.shape[1]).to(self.device)

    @torch.inference_mode()
    def generate(
        self,
        prompt: str,
        seeds: Sequence[int],
        height: int = 1024,
        width: int = 1024,
        steps: int | None = None,
        guidance: float | None = None,
        references: Sequence[Image.Image] = (),
        on_step: StepCallback | None = None,
    ) -> list[Image.Image]:
        """One picture per seed, `width` x `height` px (multiples of 16), `steps` (default: the model's: 16
        distilled, 50 Base), Base's CFG scale `guidance` (default 3.5; 1 turns it off; ignored by the distilled
        model, which has none).

        Raises ValueError for sizes that are not multiples of 16 (as the reference does) and for references, which
        this pipeline does not take yet."""
        if references:
            raise ValueError(
                "FLUX 3 edits and compositions (references) are not supported yet; run text-to-image"
            )
        multiple = limits.SIZE_MULTIPLE
        if height % multiple or width % multiple:
            raise ValueError(f"height and width must be multiples of {multiple}, got {height} x {width}")
        steps = steps or self.sampling_defaults.steps
        scale = self.sampling_defaults.guidance if guidance is None else guidance
        cfg = not self.sampling_defaults.distilled and scale > limits.MIN_GUIDANCE
        context, context_ids = self.encode_prompt(prompt)
        uncond, uncond_ids = self.encode_prompt("") if cfg else (None, None)
        h, w = height // multiple, width // multiple
        ids = flux3_sampling.image_ids(h, w).to(self.device)
        levels = flux3_sampling.noise_levels(steps)
        channels = self.transformer.config.in_channels
        pictures: list[Image.Image] = []
        for seed in seeds:
            # diffusers draws float32 noise on the CPU generator, then casts: the same seed, the same picture
            noise = sampling.pack(initial_noise(seed, channels, h, w)).to(self.device, self.dtype)
            tokens = flux3_sampling.denoise(
                self.transformer,
                noise,
                ids,
                context,
                context_ids,
                levels,
                guidance=scale if cfg else None,
                uncond_context=uncond,
                uncond_ids=uncond_ids,
                on_step=on_step,
            )
            decoded = self.autoencoder.decode(sampling.unpack(tokens, h, w).to(self.dtype))
            pictures.extend(to_images(to_unit(decoded)))
        return pictures
