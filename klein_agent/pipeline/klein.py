"""The resident FLUX.2 [klein] pipeline: prompt and references in, pictures out.

Text-to-image, single-reference editing and multi-reference composition are one code path: references are encoded
to latent tokens and ride after the noisy tokens. Prompt embeddings and reference latents are cached, so an agent's
retry with the same prompt or the same reference skips that work.

A klein 9B-KV checkpoint (`kv_references`) runs references as diffusers' `Flux2KleinKVPipeline` does: they pass
through the transformer once, at timestep 0 and attending only to each other, and every step attends to their kept
keys and values. Those depend on the references alone, so they are cached across calls too (bounded in bytes): a
retry on the same references with a new prompt or seed skips the reference tokens at every step, step 0 included.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import torch
from PIL import Image
from torch import Tensor

from klein_agent.loading.lora import AdapterFile, read_lora
from klein_agent.model import lora, sampling
from klein_agent.model.autoencoder import AutoEncoder
from klein_agent.model.configs import SamplingDefaults, SchedulerConfig
from klein_agent.model.step_cache import MagCache
from klein_agent.model.text_encoder import TextEmbedder
from klein_agent.model.transformer import Flux2Transformer, ReferenceKV
from klein_agent.pipeline.caches import ByteLRUCache, EncodedReference, LRUCache
from klein_agent.pipeline.imaging import (
    ENCODER_LAYOUT,
    prepare_reference,
    to_images,
    to_tensor,
    to_unit,
)
from klein_agent.pipeline.offload import HostResident
from klein_agent.pipeline.progress import CallProgress
from klein_agent.rules.families import KV_NO_MASKED_EDITS
from klein_agent.rules.limits import (
    MAGCACHE_MAX_SKIP_STEPS,
    MAGCACHE_RETENTION_RATIO,
    MAX_REFERENCES,
)
from klein_agent.rules.loras import MAX_LORA_SCALE
from klein_agent.rules.masks import prepare_mask, prepare_source
from klein_agent.rules.requests import (
    GenerationRequest,
    GenerationResult,
    GeneratorInfo,
    NonFiniteOutputError,
    ProgressCallback,
    resolve,
)
from klein_agent.rules.resolution import ResolvedRequest
from klein_agent.speedups.attention import AttentionPlan
from klein_agent.speedups.cuda_graphs import StepGraphs
from klein_agent.speedups.devices import default_reference_kv_cache_bytes

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
    keeps the text encoder in host memory between prompts (ignored when the model runs on the CPU).
    `kv_references` runs references as klein 9B-KV does (tested equal to diffusers `Flux2KleinKVPipeline`);
    `reference_kv_cache_bytes` bounds the kept reference keys and values across calls (None: the device's default,
    `speedups.devices.default_reference_kv_cache_bytes`; 0: kept for one call only). Not thread-safe: one
    `generate` at a time.
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
        kv_references: bool = False,
        reference_kv_cache_bytes: int | None = None,
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
            # diffusers has no masked KV pipeline: `resolve` refuses a masked edit with the shared sentence
            no_masked_edits=KV_NO_MASKED_EDITS if kv_references else None,
        )
        # the SDPA kernel order of each model (speedups.attention): the autoencoder's one head is as wide as its
        # lowest-resolution channels (512 for klein), which flash and cuDNN do not take
        ae = autoencoder.config
        self.attention = AttentionPlan.for_device(
            self.device,
            transformer.config.head_dim,
            max(ae.block_out_channels[-1], ae.decoder_channels[-1]),
        )
        self.adapters: dict[str, AdapterFile] = {}  # loaded LoRA files by name (see load_lora)
        # --compile on CUDA: each step replayed from a CUDA graph per shape (set by load_pipeline)
        self.step_graphs: StepGraphs | None = None
        self._prompts: LRUCache[str, Tensor] = LRUCache(prompt_cache_size)
        self._references: LRUCache[str, EncodedReference] = LRUCache(reference_cache_size)
        self.kv_references = kv_references
        if reference_kv_cache_bytes is None:
            reference_kv_cache_bytes = default_reference_kv_cache_bytes(self.device)
        # keyed by the whole ordered list of references: each reference attends to all of them, so its keys and
        # values depend on the others, their places and their sizes, not on itself alone
        self._reference_kv: ByteLRUCache[tuple[str, ...], ReferenceKV] = ByteLRUCache(
            reference_kv_cache_bytes, lambda kv: kv.nbytes
        )
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
        """Make `request.num_images` pictures, as diffusers' `Flux2KleinPipeline.__call__` would (with a mask:
        as `Flux2KleinInpaintPipeline.__call__` would, the source being the first conditioning image).

        Each picture is denoised and decoded on its own (batch 1), so picture k is, byte for byte, the single
        run with seed + k; the prompt and the references are encoded once for all of them. Progress units: 1 for
        conditioning, then per picture one per step and one for its decode. Raises RequestError for a bad request
        (before any model work), NonFiniteOutputError when the model yields NaN or infinity, and whatever
        `progress` raises (that is how a caller stops a run between units).
        """
        started = time.perf_counter()
        resolved = self.resolve(request)
        count, steps = len(resolved.seeds), resolved.steps - resolved.first_step  # steps run per picture
        units = CallProgress(progress, count, steps)
        references = list(request.references)
        if request.mask is not None:  # the source is resized to whole tokens, not cropped (see rules.masks)
            references[0] = prepare_source(references[0], self.latent_factor)
        timings = {"text": 0.0, "references": 0.0, "denoise": 0.0, "decode": 0.0}

        with torch.inference_mode():
            mark = time.perf_counter()
            context, prompt_hit = self.encode_prompt(resolved.prompt)
            uncond = self.encode_prompt("")[0] if resolved.cfg else None
            timings["text"] = _ms_since(mark, self.device)
            mark = time.perf_counter()
            reference_kv: ReferenceKV | None = None
            kv_hit = False
            encoded: list[EncodedReference] = []
            if self.kv_references and references:
                reference_kv, kv_hit, reference_hits = self.encode_reference_kv(references)
            else:
                encoded, reference_hits = self.encode_references(references)
            timings["references"] = _ms_since(mark, self.device)
            units.encoded()

            h, w = resolved.height // self.latent_factor, resolved.width // self.latent_factor
            channels = self.transformer.config.in_channels
            ref_tokens = ref_ids = None
            if encoded:
                ref_tokens = torch.cat([r.tokens for r in encoded])[None]  # [1, R, C]
                ref_ids = sampling.reference_ids([r.grid for r in encoded]).to(self.device)
            ctx_ids = sampling.text_ids(context.shape[1]).to(self.device)
            noise_ids = sampling.image_ids(h, w).to(self.device)
            levels = sampling.sigmas(resolved.steps, h * w, self.scheduler)[resolved.first_step :]
            lora.activate(self.transformer, resolved.loras)
            if self.step_graphs is not None:  # a graph records the adapters active when it was captured
                self.step_graphs.context_key = resolved.loras
            mask = None
            if request.mask is not None:
                mask = self.mask_tokens(prepare_mask(request.mask, (resolved.width, resolved.height)), h, w)
            images: list[Image.Image] = []
            skipped = 0
            for k, seed in enumerate(resolved.seeds):
                on_step = units.on_step(k)
                mark = time.perf_counter()
                noise = sampling.pack(initial_noise(seed, channels, h, w).to(self.device, self.dtype))
                start, inpainting = noise, None
                if mask is not None:  # a masked edit starts from the source noised to the first level
                    clean = encoded[0].tokens[None]
                    inpainting = sampling.Inpainting(clean, noise, mask)
                    start = sampling.noised(clean, noise, levels[0])
                step_cache = None
                if (
                    resolved.step_cache is not None
                ):  # fresh per picture: picture k equals the run with seed + k
                    step_cache = MagCache(
                        resolved.step_cache.threshold,
                        len(levels) - 1,
                        max_skip_steps=MAGCACHE_MAX_SKIP_STEPS,
                        retention_ratio=MAGCACHE_RETENTION_RATIO,
                    )
                with self.attention.transformer():
                    latents = sampling.denoise(
                        self.transformer,
                        start,
                        noise_ids,
                        context,
                        ctx_ids,
                        levels,
                        references=ref_tokens,
                        references_ids=ref_ids,
                        reference_kv=reference_kv,
                        guidance=resolved.guidance if resolved.cfg else None,
                        uncond_context=uncond,
                        num_train_timesteps=self.scheduler.num_train_timesteps,
                        on_step=on_step,
                        inpainting=inpainting,
                        forward=self.step_graphs if step_cache is None else None,
                        step_cache=step_cache,
                    )
                skipped += 0 if step_cache is None else step_cache.skipped
                self._check_finite(latents, "latents")
                timings["denoise"] += _ms_since(mark, self.device)
                mark = time.perf_counter()
                unit = self.decode(sampling.unpack(latents, h, w))
                self._check_finite(unit, "decoded pixels")
                images.extend(to_images(unit))
                timings["decode"] += _ms_since(mark, self.device)
                units.decoded(k)
        timings["total"] = (time.perf_counter() - started) * 1000
        hits = {"prompt": int(prompt_hit), "references": reference_hits}
        if self.kv_references:
            hits["reference_kv"] = int(kv_hit)
        if resolved.step_cache is not None:  # transformer passes the step cache skipped, all pictures
            hits["steps_skipped"] = skipped
        return GenerationResult(
            images=images,
            timings_ms=timings,
            cache_hits=hits,
            resolved=resolved,
            info=self.info,
        )

    def load_lora(self, path: str | Path, name: str, scale: float = 1.0) -> AdapterFile:
        """Read a LoRA file (diffusers, kohya or ai-toolkit layout) or LoKr file (BFL, LyCORIS or diffusers layout)
        and add it to the transformer as adapter `name`, run by default at `scale`; the base weights are not
        changed. Raises LoRAError naming the first key that does not fit this model, ValueError for a name already
        loaded."""
        if any(known == name for known, _ in self.info.loras):
            raise ValueError(f"a LoRA adapter named {name!r} is already loaded")
        adapter = read_lora(path, self.transformer, self.info.variant, max_scale=MAX_LORA_SCALE)
        lora.attach(self.transformer, name, adapter.updates)
        self.info = replace(self.info, loras=(*self.info.loras, (name, float(scale))))
        self.adapters[name] = adapter
        log.info("LoRA %s: %s", name, adapter.summary)
        return adapter

    def clear_caches(self) -> None:
        """Forget cached prompt embeddings, reference latents and reference keys and values (benchmarks time the
        uncached path; whoever changes the weights must call it)."""
        self._prompts = LRUCache(self._prompts.capacity)
        self._references = LRUCache(self._references.capacity)
        self._reference_kv.clear()

    @property
    def reference_kv_cache_bytes(self) -> tuple[int, int]:
        """(bytes held, capacity) of the cross-call cache of reference keys and values."""
        return self._reference_kv.nbytes, self._reference_kv.capacity_bytes

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
        return self._encode_prepared([prepare_reference(image, self.latent_factor) for image in images])

    def encode_reference_kv(self, images: Sequence[Image.Image]) -> tuple[ReferenceKV, bool, int]:
        """klein 9B-KV: the references' keys and values in every block, whether they came from the cross-call
        cache, and how many reference latents did (on a hit none are needed, so 0).

        Keyed by each prepared picture's pixels and size, in order; on a miss the references are encoded (through
        the latent cache) and run once through the transformer (`Flux2Transformer.reference_kv`).
        """
        prepared = [prepare_reference(image, self.latent_factor) for image in images]
        key = tuple(_image_key(p) for p in prepared)
        cached = self._reference_kv.get(key)
        if cached is not None:
            return cached, True, 0
        encoded, hits = self._encode_prepared(prepared)
        tokens = torch.cat([r.tokens for r in encoded])[None]  # [1, R, C]
        ids = sampling.reference_ids([r.grid for r in encoded]).to(self.device)
        with self.attention.transformer():
            kv = self.transformer.reference_kv(tokens, ids)
        self._reference_kv.put(key, kv)
        return kv, False, hits

    def _encode_prepared(self, prepared: Sequence[Image.Image]) -> tuple[list[EncodedReference], int]:
        encoded, hits = [], 0
        for image in prepared:
            key = _image_key(image)
            cached = self._references.get(key)
            if cached is None:
                x = to_tensor(image).to(self.device, self.dtype, memory_format=ENCODER_LAYOUT)
                with self.attention.autoencoder():
                    latent = self.autoencoder.encode(x)  # [1, C, h, w]
                cached = EncodedReference(sampling.pack(latent)[0], (latent.shape[2], latent.shape[3]), key)
                self._references.put(key, cached)
            else:
                hits += 1
            encoded.append(cached)
        return encoded, hits

    def mask_tokens(self, mask: Image.Image, h: int, w: int) -> Tensor:
        """A prepared mask (L, 0 or 255, output size) -> [1, h*w, 1] per-token weights in the model dtype: scaled
        bilinearly to the token grid, as diffusers' `Flux2KleinInpaintPipeline.prepare_mask_latents` does."""
        data = torch.frombuffer(bytearray(mask.tobytes()), dtype=torch.uint8).view(
            1, 1, mask.height, mask.width
        )
        weights = torch.nn.functional.interpolate((data == 255).float(), size=(h, w), mode="bilinear")
        return sampling.pack(weights.to(self.device, self.dtype))

    def decode(self, latents: Tensor) -> Tensor:
        """[B, C, h, w] model latents -> [B, 3, H, W] float32 pixels in [0, 1] (before 8-bit rounding)."""
        with self.attention.autoencoder():
            return to_unit(self.autoencoder.decode(latents.to(self.dtype)))

    def _check_finite(self, x: Tensor, what: str) -> None:
        check_finite(x, what, self.dtype)


def check_finite(x: Tensor, what: str, dtype: torch.dtype) -> None:
    """Raises NonFiniteOutputError naming `what` and the likely cause (float16 overflow, damaged weights) when `x`
    holds NaN or infinity; a model in `dtype` made it."""
    if bool(torch.isfinite(x).all()):
        return
    if dtype == torch.float16:
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
