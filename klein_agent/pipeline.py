"""The resident FLUX.2 [klein] pipeline: prompt and references in, pictures out.

Text-to-image, single-reference editing and multi-reference composition are one code path: references are encoded
to latent tokens and ride after the noisy tokens. Prompt embeddings and reference latents are cached, so an agent's
retry with the same prompt or the same reference skips that work.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections import OrderedDict
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

import torch
from PIL import Image
from torch import Tensor

from klein_agent import sampling
from klein_agent.autoencoder import AutoEncoder
from klein_agent.configs import SamplingDefaults
from klein_agent.devices import resolve_device, resolve_dtype
from klein_agent.imaging import check_output_size, prepare_reference, to_images, to_tensor
from klein_agent.request import (
    GenerationRequest,
    GenerationResult,
    GeneratorInfo,
    ProgressCallback,
)
from klein_agent.text_encoder import TextEmbedder
from klein_agent.transformer import Flux2Transformer

log = logging.getLogger(__name__)

MAX_REFERENCES = 4
K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class LRUCache(Generic[K, V]):
    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._items: OrderedDict[K, V] = OrderedDict()

    def get(self, key: K) -> V | None:
        if key in self._items:
            self._items.move_to_end(key)
            return self._items[key]
        return None

    def put(self, key: K, value: V) -> None:
        self._items[key] = value
        self._items.move_to_end(key)
        while len(self._items) > self.capacity:
            self._items.popitem(last=False)

    def __len__(self) -> int:
        return len(self._items)


@dataclass(frozen=True)
class EncodedReference:
    tokens: Tensor  # [h*w, C] in the model dtype
    grid: tuple[int, int]  # latent (h, w)


def initial_noise(seed: int, channels: int, height: int, width: int) -> Tensor:
    """The reference pipeline's noise for one seed: drawn on the CPU in float32, so every device agrees."""
    generator = torch.Generator("cpu").manual_seed(seed)
    return torch.randn((1, channels, height, width), generator=generator, dtype=torch.float32)


class KleinPipeline:
    def __init__(
        self,
        transformer: Flux2Transformer,
        autoencoder: AutoEncoder,
        text_embedder: TextEmbedder,
        *,
        sampling_defaults: SamplingDefaults,
        model_name: str,
        variant: str,
        max_references: int = MAX_REFERENCES,
        prompt_cache_size: int = 32,
        reference_cache_size: int = 16,
        offload_text_encoder: bool = False,
    ) -> None:
        self.transformer = transformer
        self.autoencoder = autoencoder
        self.text_embedder = text_embedder
        self.defaults = sampling_defaults
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
        )
        self._prompts: LRUCache[str, Tensor] = LRUCache(prompt_cache_size)
        self._references: LRUCache[str, EncodedReference] = LRUCache(reference_cache_size)
        self.latent_factor = 2 * autoencoder.config.downsample_factor  # pixels per latent token side (16)
        # For smaller cards: the text encoder (8 GB for the 4B) waits in host memory and visits the accelerator
        # only for prompts not in the cache.
        self.offload_text_encoder = offload_text_encoder and self.device.type != "cpu"
        if self.offload_text_encoder:
            self.text_embedder.to("cpu")
            _pin(self.text_embedder)

    # ------------------------------------------------------------------------------------------------ public

    def generate(
        self, request: GenerationRequest, progress: ProgressCallback | None = None
    ) -> GenerationResult:
        self.validate(request)
        steps = request.steps or self.defaults.steps
        use_cfg = not self.defaults.distilled
        guidance = (
            (request.guidance if request.guidance is not None else self.defaults.guidance)
            if use_cfg
            else None
        )
        total_units = steps + 2
        timings: dict[str, float] = {}
        started = time.perf_counter()

        with torch.inference_mode():
            mark = time.perf_counter()
            context, prompt_hit = self.encode_prompt(request.prompt)
            uncond = self.encode_prompt("")[0] if use_cfg else None
            timings["text"] = _ms_since(mark, self.device)
            mark = time.perf_counter()
            encoded, reference_hits = self.encode_references(request.references)
            timings["references"] = _ms_since(mark, self.device)
            if progress:
                progress(1, total_units, "prompt and references encoded")

            h, w = request.height // self.latent_factor, request.width // self.latent_factor
            channels = self.transformer.config.in_channels
            seeds = [request.seed + k for k in range(request.num_images)]
            noise = torch.cat([initial_noise(s, channels, h, w) for s in seeds]).to(self.device)
            ref_tokens = ref_ids = None
            if encoded:
                ref_tokens = torch.cat([r.tokens for r in encoded])[None]  # [1, R, C]
                ref_ids = sampling.reference_ids([r.grid for r in encoded]).to(self.device)
            batch = len(seeds)
            ctx_ids = sampling.text_ids(context.shape[1]).to(self.device)

            def on_step(done: int, total: int) -> None:
                if progress:
                    progress(1 + done, total_units, f"step {done}/{total}")

            mark = time.perf_counter()
            latents = sampling.denoise(
                self.transformer,
                sampling.pack(noise),
                sampling.image_ids(h, w).to(self.device),
                context.expand(batch, -1, -1),
                ctx_ids,
                sampling.schedule(steps, h * w),
                references=ref_tokens,
                references_ids=ref_ids,
                guidance=guidance,
                uncond_context=None if uncond is None else uncond.expand(batch, -1, -1),
                on_step=on_step,
            )
            timings["denoise"] = _ms_since(mark, self.device)
            mark = time.perf_counter()
            images = self.decode(sampling.unpack(latents, h, w))
            timings["decode"] = _ms_since(mark, self.device)
        timings["total"] = (time.perf_counter() - started) * 1000
        if progress:
            progress(total_units, total_units, "decoded")
        return GenerationResult(
            images=images,
            timings_ms=timings,
            cache_hits={"prompt": int(prompt_hit), "references": reference_hits},
        )

    def clear_caches(self) -> None:
        """Forget cached prompt embeddings and reference latents (benchmarks time the uncached path)."""
        self._prompts = LRUCache(self._prompts.capacity)
        self._references = LRUCache(self._references.capacity)

    def validate(self, request: GenerationRequest) -> None:
        check_output_size(request.width, request.height)
        if request.num_images < 1:
            raise ValueError("num_images must be at least 1")
        if request.steps is not None and request.steps < 1:
            raise ValueError("steps must be at least 1")
        if len(request.references) > self.info.max_references:
            raise ValueError(
                f"{len(request.references)} reference images given; this model takes at most {self.info.max_references}"
            )

    def default_size(self, references: Sequence[Image.Image]) -> tuple[int, int]:
        """Width and height when the caller gives none: the first reference as prepared, else 1024 x 1024."""
        if references:
            return prepare_reference(references[0]).size
        return 1024, 1024

    def encode_prompt(self, prompt: str) -> tuple[Tensor, bool]:
        """[1, 512, C_ctx] in the model dtype, and whether it came from the cache."""
        cached = self._prompts.get(prompt)
        if cached is not None:
            return cached, True
        if self.offload_text_encoder:
            self.text_embedder.to(self.device, non_blocking=True)
            try:
                embedding = self.text_embedder([prompt]).to(self.dtype)
            finally:
                self.text_embedder.to("cpu")
                _pin(self.text_embedder)
        else:
            embedding = self.text_embedder([prompt]).to(self.dtype)
        self._prompts.put(prompt, embedding)
        return embedding, False

    def encode_references(self, images: Sequence[Image.Image]) -> tuple[list[EncodedReference], int]:
        encoded, hits = [], 0
        for image in images:
            prepared = prepare_reference(image)
            key = _image_key(prepared)
            cached = self._references.get(key)
            if cached is None:
                x = to_tensor(prepared).to(self.device, self.dtype)
                latent = self.autoencoder.encode(x)  # [1, C, h, w]
                cached = EncodedReference(sampling.pack(latent)[0], (latent.shape[2], latent.shape[3]))
                self._references.put(key, cached)
            else:
                hits += 1
            encoded.append(cached)
        return encoded, hits

    def decode(self, latents: Tensor) -> list[Image.Image]:
        return to_images(self.autoencoder.decode(latents.to(self.dtype)))


def _pin(module: torch.nn.Module) -> None:
    """Page-locked host copies make the next host-to-device transfer faster and asynchronous."""
    if torch.cuda.is_available():
        for param in module.parameters():
            param.data = param.data.pin_memory()


def _image_key(image: Image.Image) -> str:
    digest = hashlib.sha256(image.tobytes())
    digest.update(f"{image.size}{image.mode}".encode())
    return digest.hexdigest()


def _ms_since(mark: float, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - mark) * 1000


def load_pipeline(
    model: str,
    *,
    device: str | None = None,
    dtype: str | None = None,
    transformer_file: str | None = None,
    allow_download: bool = False,
    offload_text_encoder: bool = False,
    fp8: bool = False,
    compile: bool = False,
) -> KleinPipeline:
    """Build the pipeline a model name points at: `tiny`, a diffusers-layout folder, or a Hugging Face repo id."""
    torch_device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, torch_device)
    pipeline = _build_pipeline(
        model, torch_device, torch_dtype, transformer_file, allow_download, offload_text_encoder
    )
    if fp8:
        from klein_agent.fp8 import quantize_transformer_, scaled_mm_available

        if not scaled_mm_available(torch_device):
            log.warning("--fp8 on %s runs a float32 reference path: numerically FP8, but slow", torch_device)
        replaced = quantize_transformer_(pipeline.transformer)
        log.info("fp8: %d block linears quantized", len(replaced))
    if compile:
        from klein_agent.compilation import compile_transformer_

        compile_transformer_(pipeline.transformer)
    return pipeline


def _build_pipeline(
    model: str,
    torch_device: torch.device,
    torch_dtype: torch.dtype,
    transformer_file: str | None,
    allow_download: bool,
    offload_text_encoder: bool,
) -> KleinPipeline:
    if model == "tiny":
        from klein_agent.configs import preset
        from klein_agent.tiny import build_tiny

        if transformer_file:
            raise ValueError("--transformer-file cannot be combined with --model tiny")
        transformer, autoencoder, text = build_tiny()
        return KleinPipeline(
            transformer.to(torch_device, torch_dtype),
            autoencoder.to(torch_device, torch_dtype),
            text.to(torch_device, torch_dtype),
            sampling_defaults=preset("tiny").sampling,
            model_name="tiny",
            variant="tiny",
            offload_text_encoder=offload_text_encoder,
        )
    from klein_agent.checkpoints import load_components, resolve_model_path

    folder = resolve_model_path(model, allow_download=allow_download)
    components = load_components(folder, torch_device, torch_dtype, transformer_file=transformer_file)
    return KleinPipeline(
        components.transformer,
        components.autoencoder,
        components.text_embedder,
        sampling_defaults=components.sampling,
        model_name=model,
        variant=components.variant,
        offload_text_encoder=offload_text_encoder,
    )
