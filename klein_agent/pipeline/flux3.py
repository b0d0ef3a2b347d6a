"""The FLUX 3 [klein] pipeline: a prompt, references and seeds in, pictures out, as diffusers'
`Flux3DistilledAutoBlocks` / `Flux3AutoBlocks` make them after their prompt upsampler block: the model encodes
`request.caption` when one is set (a caller's, or the upsampler's: `pipeline.captioning`), else the prompt as given
(diffusers with its upsampler block removed). Text-to-image, an edit (one reference on its padded canvas, cropped back) and a
composition (several references) are one code path: reference tokens ride in their own mode at timestep 0.

`generate` is the `ImageGenerator` the engine and the CLI drive (requests resolved by the shared rules, progress
per step, batch seeds, recipes); `pictures` is the same run with plain arguments, for the parity tests.
LoRA adapters are attached unfused (`model.lora`) and each call runs the ones its request names, at their scales,
as `KleinPipeline` does. The speed-ups are FLUX.2's: the SDPA kernel order (`attention`), and with `--compile`
(`pipeline.build`) the regional compile of the mode and joint blocks over the shape buckets and, on CUDA, graphs of
the steps (`step_graphs`), and `--fp8`'s block linears. Not yet here: step caches, prompt and reference caches.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path

import torch
from PIL import Image
from torch import Tensor

from klein_agent.loading.lora import AdapterFile, read_lora
from klein_agent.model import flux3_sampling, lora, sampling
from klein_agent.model.autoencoder import AutoEncoder
from klein_agent.model.configs import SamplingDefaults
from klein_agent.model.flux3_text_encoder import Flux3TextEmbedder
from klein_agent.model.flux3_transformer import Flux3Transformer
from klein_agent.model.sampling import StepCallback
from klein_agent.pipeline.imaging import ENCODER_LAYOUT, to_images, to_tensor, to_unit
from klein_agent.pipeline.klein import check_finite, initial_noise
from klein_agent.pipeline.progress import CallProgress
from klein_agent.rules import limits
from klein_agent.rules.families import FLUX3
from klein_agent.rules.flux3_references import Box, prepare_flux3_references
from klein_agent.rules.loras import MAX_LORA_SCALE
from klein_agent.rules.requests import (
    GenerationRequest,
    GenerationResult,
    GeneratorInfo,
    ProgressCallback,
    resolve,
)
from klein_agent.rules.resolution import RequestError, ResolvedRequest
from klein_agent.rules.upsampling import clean_caption
from klein_agent.speedups.attention import AttentionPlan
from klein_agent.speedups.cuda_graphs import Flux3StepGraphs

log = logging.getLogger(__name__)

# The conditioning of one prompt: (context [1, window, C_ctx], ids [window, 4]) and, with CFG, the empty prompt's
Conditioning = tuple[Tensor, Tensor, Tensor | None, Tensor | None]


class Flux3Pipeline:
    """The loaded FLUX 3 model; tested equal to diffusers' modular pipelines (text-to-image, edit, compose, both
    variants). The three models share one device and dtype, read from the transformer. Not thread-safe: one
    `generate` at a time."""

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
        self.info = GeneratorInfo(
            model=model_name,
            variant=variant,
            device=str(self.device),
            dtype=str(self.dtype).removeprefix("torch."),
            distilled=sampling_defaults.distilled,
            default_steps=sampling_defaults.steps,
            default_guidance=sampling_defaults.guidance,
            max_references=FLUX3.max_references,
            size_multiple=limits.SIZE_MULTIPLE,  # diffusers' Flux3ImageProcessor: 16 px a token, hard-coded
            family=FLUX3.name,
            no_masked_edits=FLUX3.no_masked_edits,
        )
        self.adapters: dict[str, AdapterFile] = {}  # loaded LoRA files by name (see load_lora)
        # CUDA graphs of the steps: load_pipeline sets them with --compile on CUDA
        self.step_graphs: Flux3StepGraphs | None = None
        # the SDPA kernel order of each model (speedups.attention), as KleinPipeline's: the autoencoder's one head
        # is as wide as its lowest-resolution channels, which flash and cuDNN do not take
        ae = autoencoder.config
        self.attention = AttentionPlan.for_device(
            self.device,
            transformer.config.head_dim,
            max(ae.block_out_channels[-1], ae.decoder_channels[-1]),
        )

    # ------------------------------------------------------------------------------------------------ public

    def resolve(self, request: GenerationRequest) -> ResolvedRequest:
        """What `generate` will run for `request` (the shared rules with FLUX 3's references, limit and defaults);
        raises RequestError naming a bad argument (a masked edit, 11 references, ...)."""
        resolved = resolve(request, self.info)
        if resolved.step_cache is not None:
            raise RequestError(
                f"step caches are not available for {FLUX3.title} models yet: leave the cache unset "
                "(--step-cache, cache)"
            )
        return resolved

    def generate(
        self, request: GenerationRequest, progress: ProgressCallback | None = None
    ) -> GenerationResult:
        """Make `request.num_images` pictures, as diffusers' modular FLUX 3 pipeline would from the text
        `caption` chooses (the result records a caption encoded instead of the prompt). Each picture is denoised and decoded on its own, so picture k is, byte for byte, the single run
        with seed + k. A single reference given without a size is run on its canvas and the picture cropped back
        (`resolved.crop`). Progress units: 1 for conditioning, then per picture one per step and one for its
        decode. Raises RequestError before any model work, NonFiniteOutputError for NaN or infinity, and whatever
        `progress` raises (how a caller stops a run between units)."""
        started = time.perf_counter()
        resolved = self.resolve(request)
        count, steps = len(resolved.seeds), resolved.steps
        units = CallProgress(progress, count, steps)
        timings = {"text": 0.0, "references": 0.0, "denoise": 0.0, "decode": 0.0}
        with torch.inference_mode():
            mark = time.perf_counter()
            caption = self.caption(request, resolved)  # checked before any model work
            conditioning = self.condition(caption, resolved.cfg)
            timings["text"] = (time.perf_counter() - mark) * 1000
            mark = time.perf_counter()
            refs = ref_ids = None
            if request.references:
                refs, ref_ids, _, crop = self.encode_references(request.references)
                if (
                    resolved.crop is not None and crop != resolved.crop
                ):  # the rule by sizes and the pixels agree
                    raise RuntimeError(f"reference crop {crop} differs from the rule's {resolved.crop}")
            timings["references"] = (time.perf_counter() - mark) * 1000
            units.encoded()
            # only the adapters this call names, at its scales; a step graph records those active at its capture
            lora.activate(self.transformer, resolved.loras)
            if self.step_graphs is not None:
                self.step_graphs.context_key = resolved.loras
            images: list[Image.Image] = []
            for k, seed in enumerate(resolved.seeds):
                on_step = units.on_step(k)
                mark = time.perf_counter()
                tokens = self.denoise(
                    seed, resolved.height, resolved.width, conditioning, refs, ref_ids, steps,
                    resolved.guidance if resolved.cfg else None, on_step,
                )  # fmt: skip
                check_finite(tokens, "latents", self.dtype)
                timings["denoise"] += (time.perf_counter() - mark) * 1000
                mark = time.perf_counter()
                pixels = self.decode(tokens, resolved.height, resolved.width, resolved.crop)
                check_finite(pixels, "decoded pixels", self.dtype)
                images.extend(to_images(pixels))
                timings["decode"] += (time.perf_counter() - mark) * 1000
                units.decoded(k)
        timings["total"] = (time.perf_counter() - started) * 1000
        # no prompt or reference caches yet: every call encodes both
        hits = {"prompt": 0, "references": 0}
        # a caption encoded instead of the prompt is recorded, so the recipe's rerun encodes it again
        given = None if request.caption is None else caption
        return GenerationResult(
            images,
            timings,
            hits,
            resolved,
            self.info,
            caption=given,
            caption_source=None if given is None else "caller",
        )

    def load_lora(self, path: str | Path, name: str, scale: float = 1.0) -> AdapterFile:
        """Read a FLUX 3 LoRA file (diffusers/PEFT `transformer.` or BFL `diffusion_model.` names) and add it to
        the transformer as adapter `name`, run at `scale` when a call names it without one; the base weights are not
        changed. Raises LoRAError naming the file and the first key that does not fit this model (a FLUX.2 adapter, a
        LoKr file, a wrong shape), ValueError for a name already loaded."""
        if any(known == name for known, _ in self.info.loras):
            raise ValueError(f"a LoRA adapter named {name!r} is already loaded")
        adapter = read_lora(path, self.transformer, self.variant, max_scale=MAX_LORA_SCALE)
        lora.attach(self.transformer, name, adapter.updates)
        self.info = replace(self.info, loras=(*self.info.loras, (name, float(scale))))
        self.adapters[name] = adapter
        log.info("LoRA %s: %s", name, adapter.summary)
        return adapter

    def caption(self, request: GenerationRequest, resolved: ResolvedRequest) -> str:
        """The text the model is conditioned on: `request.caption` when set (a caller's, or the prompt upsampler's
        that `pipeline.captioning.CaptionedGenerator` put there), cleaned as every caption is; else the prompt as
        given, which is what diffusers runs with its upsampler block removed. Raises RequestError for a caption
        `upsampling.clean_caption` refuses (empty, too long)."""
        return resolved.prompt if request.caption is None else clean_caption(request.caption)

    @torch.inference_mode()
    def pictures(
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
        The reference's own argument names and defaults, without the shared rules (the parity tests call it).

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
        conditioning = self.condition(prompt, cfg)
        out: list[Image.Image] = []
        for seed in seeds:
            tokens = self.denoise(
                seed, height, width, conditioning, refs, ref_ids, steps, scale if cfg else None, on_step
            )
            out.extend(to_images(self.decode(tokens, height, width, crop)))
        return out

    # ------------------------------------------------------------------------------------------------ stages

    def encode_prompt(self, prompt: str) -> tuple[Tensor, Tensor]:
        """The prompt's conditioning [1, window, C_ctx] in the model dtype and device, and its ids [window, 4]."""
        context = self.text_embedder([prompt]).to(self.device, self.dtype)
        return context, flux3_sampling.text_ids(context.shape[1]).to(self.device)

    def condition(self, prompt: str, cfg: bool) -> Conditioning:
        """The prompt's context and ids, and with `cfg` the empty prompt's (in its own window), else None, None."""
        context, context_ids = self.encode_prompt(prompt)
        uncond, uncond_ids = self.encode_prompt("") if cfg else (None, None)
        return context, context_ids, uncond, uncond_ids

    def encode_references(
        self, images: Sequence[Image.Image]
    ) -> tuple[Tensor, Tensor, tuple[int, int], Box | None]:
        """References -> their tokens [1, R, C] and ids [R, 4], the first one's latent grid (h, w), and the crop-back
        box of a single reference (`rules.flux3_references`)."""
        prepared = prepare_flux3_references(images)
        tokens, grids = [], []
        for image in prepared.images:
            x = to_tensor(image).to(self.device, self.dtype, memory_format=ENCODER_LAYOUT)
            with self.attention.autoencoder():
                latent = self.autoencoder.encode(x)  # [1, C, h, w]
            tokens.append(sampling.pack(latent))
            grids.append((latent.shape[2], latent.shape[3]))
        ids = flux3_sampling.reference_ids(grids).to(self.device)
        return torch.cat(tokens, dim=1), ids, grids[0], prepared.crop

    def denoise(
        self,
        seed: int,
        height: int,
        width: int,
        conditioning: Conditioning,
        refs: Tensor | None,
        ref_ids: Tensor | None,
        steps: int,
        guidance: float | None,
        on_step: Callable[[int, int], None] | None,
    ) -> Tensor:
        """One seed's picture as latent tokens [1, L, C] (height x width px; `guidance`: Base's CFG scale, None
        for none)."""
        context, context_ids, uncond, uncond_ids = conditioning
        h, w = height // limits.SIZE_MULTIPLE, width // limits.SIZE_MULTIPLE
        channels = self.transformer.config.in_channels
        # diffusers draws float32 noise on the CPU generator, then casts: the same seed, the same picture
        noise = sampling.pack(initial_noise(seed, channels, h, w)).to(self.device, self.dtype)
        with self.attention.transformer():
            return flux3_sampling.denoise(
                self.transformer,
                noise,
                flux3_sampling.image_ids(h, w).to(self.device),
                context,
                context_ids,
                flux3_sampling.noise_levels(steps),
                references=refs,
                references_ids=ref_ids,
                guidance=guidance,
                uncond_context=uncond,
                uncond_ids=uncond_ids,
                on_step=on_step,
                forward=self.step_graphs,
            )

    def decode(self, tokens: Tensor, height: int, width: int, crop: Box | None) -> Tensor:
        """Latent tokens of a height x width picture -> [1, 3, H, W] float32 pixels in [0, 1], cropped to `crop`
        ((left, top, right, bottom) px) when given."""
        h, w = height // limits.SIZE_MULTIPLE, width // limits.SIZE_MULTIPLE
        with self.attention.autoencoder():
            decoded = self.autoencoder.decode(sampling.unpack(tokens, h, w).to(self.dtype))
        if crop is not None:
            left, top, right, bottom = crop
            decoded = decoded[..., top:bottom, left:right]
        return to_unit(decoded)
