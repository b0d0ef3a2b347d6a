"""The resident FLUX.2 [klein] pipeline: prompt and references in, pictures out.

Text-to-image, single-reference editing and multi-reference composition are one code path: references are encoded
to latent tokens and ride after the noisy tokens. Prompt embeddings and reference latents are cached, so an agent's
retry with the same prompt or the same reference skips that work.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Sequence

import torch
from PIL import Image
from torch import Tensor

from klein_agent.model import sampling
from klein_agent.model.autoencoder import AutoEncoder
from klein_agent.model.configs import SamplingDefaults, SchedulerConfig
from klein_agent.model.text_encoder import TextEmbedder
from klein_agent.model.transformer import Flux2Transformer
from klein_agent.pipeline.caches import EncodedReference, LRUCache
from klein_agent.pipeline.imaging import (
    ENCODER_LAYOUT,
    prepare_reference,
    to_images,
    to_tensor,
    to_unit,
)
from klein_agent.pipeline.offload import HostResident
from klein_agent.rules.limits import MAX_REFERENCES
from klein_agent.rules.requests import (
    GenerationRequest,
    GenerationResult,
    GeneratorInfo,
    NonFiniteOutputError,
    ProgressCallback,
    resolve,
)
from klein_agent.rules.resolution import ResolvedRequest

log = logging.getLogger(__name__)


def initial_noise(seed: int, channels: int, height: int, width: int) -> Tensor:
    """The reference pipeline's noise for one seed: drawn on the CPU in float32, so every device agrees."""
    generator = torch.Generator("cpu").manual_seed(seed)
    return torch.randn((1, channels, height, width), generator=generator, dtype=torch.float32)


class KleinPipeline:
    """The loaded model, its caches and `generate`; tested equal to diffusers `Flux2KleinPipeline`.

    The three models must share one device and dtype, which are read from the transformer. `model_name` and
    `variant` (the preset the weights match, or "custom") are reported in `info`; `scheduler` defaults to
    klein's schedule; `prompt_cache_size` and `reference_cache_size` count entries; `offload_text_encoder`
    keeps the text encoder in host memory between prompts (ignored when the model runs on the CPU). Not
    thread-safe: one `generate` at a time.
    """

    def __init__(
        self,
        transformer: Flux2Transformer,
        autoencoder: AutoEncoder,
        text_embedder: TextEmbedder,
        *,
        sampling_defaults: SamplingDefaults,
        model_name: str,
        variant: str,
        scheduler: SchedulerConfig | None = None,
        max_references: int = MAX_REFERENCES,
        prompt_cache_size: int = 32,
        reference_cache_size: int = 16,
        offload_text_encoder: bool = False,
    ) -> None:
        self.transformer = transformer
        self.autoencoder = autoencoder
        self.text_embedder = text_embedder
        self.defaults = sampling_defaults
        self.scheduler = scheduler or SchedulerConfig()
        self.latent_factor = (
            autoencoder.config.pixels_per_token
        )  # pixels per latent token side (16 for klein)
        param = next(transformer.parameters())
        self.device, self.dtype = param.device, param.dtype
        self.info = GeneratorInfo(
            model=model_name,
            variant=variant,
            device=str(self.device),
            dtype=str(self.dtype).removeprefix("torch."),
            distilled=sampling_defaults.distilled,
            default_steps=sampling_defaults.steps,
            default_guidance=sampling_defaults.guidance,
            max_references=max_references,
            size_multiple=self.latent_factor,
        )
        self._prompts: LRUCache[str, Tensor] = LRUCache(prompt_cache_size)
        self._references: LRUCache[str, EncodedReference] = LRUCache(reference_cache_size)
        # For smaller cards: the text encoder (8 GB for the 4B) waits in host memory and visits the accelerator
        # only for prompts not in the cache.
        self.offload_text_encoder = offload_text_encoder and self.device.type != "cpu"
        self._host_text = HostResident(self.text_embedder) if self.offload_text_encoder else None

    # ------------------------------------------------------------------------------------------------ public

    def resolve(self, request: GenerationRequest) -> ResolvedRequest:
        """What `generate` will run for `request`; raises RequestError (a ValueError) naming a bad argument."""
        return resolve(request, self.info)

    def generate(
        self, request: GenerationRequest, progress: ProgressCallback | None = None
    ) -> GenerationResult:
        """Make `request.num_images` pictures, as diffusers' `Flux2KleinPipeline.__call__` would.

        Each picture is denoised and decoded on its own (batch 1), so picture k is, byte for byte, the single
        run with seed + k; the prompt and the references are encoded once for all of them. Progress units: 1 for
        conditioning, then per picture one per step and one for its decode. Raises RequestError for a bad request
        (before any model work), NonFiniteOutputError when the model yields NaN or infinity, and whatever
        `progress` raises (that is how a caller stops a run between units).
        """
        started = time.perf_counter()
        resolved = self.resolve(request)
        count, steps = len(resolved.seeds), resolved.steps
        total_units = 1 + count * (steps + 1)
        timings = {"text": 0.0, "references": 0.0, "denoise": 0.0, "decode": 0.0}

        with torch.inference_mode():
            mark = time.perf_counter()
            context, prompt_hit = self.encode_prompt(resolved.prompt)
            uncond = self.encode_prompt("")[0] if resolved.cfg else None
            timings["text"] = _ms_since(mark, self.device)
            mark = time.perf_counter()
            encoded, reference_hits = self.encode_references(request.references)
            timings["references"] = _ms_since(mark, self.device)
            if progress:
                progress(1, total_units, "prompt and references encoded")

            h, w = resolved.height // self.latent_factor, resolved.width // self.latent_factor
            channels = self.transformer.config.in_channels
            ref_tokens = ref_ids = None
            if encoded:
                ref_tokens = torch.cat([r.tokens for r in encoded])[None]  # [1, R, C]
                ref_ids = sampling.reference_ids([r.grid for r in encoded]).to(self.device)
            ctx_ids = sampling.text_ids(context.shape[1]).to(self.device)
            noise_ids = sampling.image_ids(h, w).to(self.device)
            levels = sampling.sigmas(steps, h * w, self.scheduler)
            images: list[Image.Image] = []
            for k, seed in enumerate(resolved.seeds):
                done_before = 1 + k * (steps + 1)
                label = f"image {k + 1}/{count}: " if count > 1 else ""

                def on_step(done: int, total: int, base: int = done_before, label: str = label) -> None:
                    if progress:
                        progress(base + done, total_units, f"{label}step {done}/{total}")

                mark = time.perf_counter()
                noise = initial_noise(seed, channels, h, w).to(self.device, self.dtype)
                latents = sampling.denoise(
                    self.transformer,
                    sampling.pack(noise),
                    noise_ids,
                    context,
                    ctx_ids,
                    levels,
                    references=ref_tokens,
                    references_ids=ref_ids,
                    guidance=resolved.guidance if resolved.cfg else None,
                    uncond_context=uncond,
                    num_train_timesteps=self.scheduler.num_train_timesteps,
                    on_step=on_step,
                )
                self._check_finite(latents, "latents")
                timings["denoise"] += _ms_since(mark, self.device)
                mark = time.perf_counter()
                unit = self.decode(sampling.unpack(latents, h, w))
                self._check_finite(unit, "decoded pixels")
                images.extend(to_images(unit))
                timings["decode"] += _ms_since(mark, self.device)
                if progress:
                    progress(done_before + steps + 1, total_units, f"{label}decoded")
        timings["total"] = (time.perf_counter() - started) * 1000
        return GenerationResult(
            images=images,
            timings_ms=timings,
            cache_hits={"prompt": int(prompt_hit), "references": reference_hits},
            resolved=resolved,
            info=self.info,
        )

    def clear_caches(self) -> None:
        """Forget cached prompt embeddings and reference latents (benchmarks time the uncached path)."""
        self._prompts = LRUCache(self._prompts.capacity)
        self._references = LRUCache(self._references.capacity)

    def encode_prompt(self, prompt: str) -> tuple[Tensor, bool]:
        """[1, 512, C_ctx] in the model dtype, and whether it came from the cache."""
        cached = self._prompts.get(prompt)
        if cached is not None:
            return cached, True
        if self._host_text is not None:
            embedding = self._host_text.run(self.device, [prompt]).to(self.dtype)
        else:
            embedding = self.text_embedder([prompt]).to(self.dtype)
        self._prompts.put(prompt, embedding)
        return embedding, False

    def encode_references(self, images: Sequence[Image.Image]) -> tuple[list[EncodedReference], int]:
        """Each picture prepared as the reference does and encoded to latent tokens (cached by content), and
        how many came from the cache."""
        encoded, hits = [], 0
        for image in images:
            prepared = prepare_reference(image, self.latent_factor)
            key = _image_key(prepared)
            cached = self._references.get(key)
            if cached is None:
                x = to_tensor(prepared).to(self.device, self.dtype, memory_format=ENCODER_LAYOUT)
                latent = self.autoencoder.encode(x)  # [1, C, h, w]
                cached = EncodedReference(sampling.pack(latent)[0], (latent.shape[2], latent.shape[3]))
                self._references.put(key, cached)
            else:
                hits += 1
            encoded.append(cached)
        return encoded, hits

    def decode(self, latents: Tensor) -> Tensor:
        """[B, C, h, w] model latents -> [B, 3, H, W] float32 pixels in [0, 1] (before 8-bit rounding)."""
        return to_unit(self.autoencoder.decode(latents.to(self.dtype)))

    def _check_finite(self, x: Tensor, what: str) -> None:
        if bool(torch.isfinite(x).all()):
            return
        if self.dtype == torch.float16:
            cause = "FLUX overflows in float16: run with --dtype bfloat16 (or float32 on a CPU)"
        else:
            cause = (
                "the weights are probably damaged (a corrupt or truncated checkpoint): download it again, "
                "or try --dtype float32"
            )
        raise NonFiniteOutputError(
            f"the model produced non-finite values (NaN or infinity) in the {what}, so no picture was made and "
            f"nothing was stored; {cause}"
        )


def _image_key(image: Image.Image) -> str:
    digest = hashlib.sha256(image.tobytes())
    digest.update(f"{image.size}{image.mode}".encode())
    return digest.hexdigest()


def _ms_since(mark: float, device: torch.device) -> float:
    """Host milliseconds since `mark`. Never synchronizes the device: a production call must not stall the GPU
    queue for a report. On CUDA a stage's figure is therefore when the host finished issuing it; the finite-value
    checks (which read one flag back) bound the denoise and decode figures. tools/bench.py syncs for its own timings."""
    del device  # kept in the signature: the figures' meaning depends on it (see above)
    return (time.perf_counter() - mark) * 1000
