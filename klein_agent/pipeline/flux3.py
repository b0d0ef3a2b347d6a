"""The FLUX 3 [klein] pipeline: a prompt, references and seeds in, pictures out, as diffusers'
`Flux3DistilledAutoBlocks` / `Flux3AutoBlocks` make them (the prompt upsampler block removed: the prompt given is
the caption the model sees). Text-to-image, an edit (one reference on its padded canvas, cropped back) and a
composition (several references) are one code path: reference tokens ride in their own mode at timestep 0.

Not yet here (issue 21): the prompt upsampler, LoRA, caches, and the request/recipe protocol the CLI and server use.
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
from klein_agent.pipeline.imaging import ENCODER_LAYOUT, to_images, to_tensor, to_unit
from klein_agent.pipeline.klein import initial_noise
from klein_agent.rules import limits
from klein_agent.rules.flux3_references import Box, prepare_flux3_references


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

    def encode_references(
        self, images: Sequence[Image.Image]
    ) -> tuple[Tensor, Tensor, tuple[int, int], Box | None]:
        """References -> their tokens [1, R, C] and ids [R, 4], the first one's latent grid (h, w), and the crop-back
        box of a single reference (`rules.flux3_references`)."""
        prepared = prepare_flux3_references(images)
        tokens, grids = [], []
        for image in prepared.images:
            x = to_tensor(image).to(self.device, self.dtype, memory_format=ENCODER_LAYOUT)
            latent = self.autoencoder.encode(x)  # [1, C, h, w]
            tokens.append(sampling.pack(latent))
            grids.append((latent.shape[2], latent.shape[3]))
        ids = flux3_sampling.reference_ids(grids).to(self.device)
        return torch.cat(tokens, dim=1), ids, grids[0], prepared.crop

    @torch.inference_mode()
    def generate(
        self,
        prompt: str,
        seeds: Sequence[int],
        height: int | None = None,
        width: int | None = None,
        steps: int | None = None,
        guidance: float | None = None,
        references: Sequence[Image.Image] = (),
        on_step: StepCallback | None = None,
    ) -> list[Image.Image]:
        """One picture per seed, `width` x `height` px (multiples of 16; default 1024 x 1024, or with references the
        first prepared reference's size, a single reference's picture cropped back to the reference), `steps`
        (default: the model's: 16 distilled, 50 Base), Base's CFG scale `guidance` (default 3.5; 1 turns it off;
        the distilled model has none and ignores it). A given size disables the crop-back, as in the reference.

        Raises ValueError for sizes that are not multiples of 16 (as the reference does)."""
        multiple = limits.SIZE_MULTIPLE
        refs = ref_ids = None
        crop: Box | None = None
        if references:
            refs, ref_ids, (grid_h, grid_w), crop = self.encode_references(references)
            if height is not None or width is not None:
                crop = None
            height, width = height or grid_h * multiple, width or grid_w * multiple
        height, width = height or 1024, width or 1024
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
                references=refs,
                references_ids=ref_ids,
                guidance=scale if cfg else None,
                uncond_context=uncond,
                uncond_ids=uncond_ids,
                on_step=on_step,
            )
            decoded = self.autoencoder.decode(sampling.unpack(tokens, h, w).to(self.dtype))
            if crop is not None:
                left, top, right, bottom = crop
                decoded = decoded[..., top:bottom, left:right]
            pictures.extend(to_images(to_unit(decoded)))
        return pictures
