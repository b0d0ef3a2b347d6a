"""Rectified-flow sampling for FLUX.2 [klein]: position ids, the time schedule, and the Euler loop.

Pure tensor functions over a transformer; no images, files or devices chosen here.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from klein_agent.model.configs import SchedulerConfig
from klein_agent.model.step_cache import MagCache
from klein_agent.model.transformer import Flux2Transformer, ReferenceKV

REFERENCE_TIME_OFFSET = 10  # reference i sits at RoPE time coordinate 10 * (i + 1)


def empirical_mu(image_tokens: int, steps: int) -> float:
    """The schedule's shift: grows with the output token count, and for small images also with the step count.

    A linear fit BFL made between 10 and 200 steps; beyond 4300 tokens the step count no longer matters
    (BFL `sampling.py` compute_empirical_mu; diffusers `pipeline_flux2_klein.py` compute_empirical_mu).
    """
    a1, b1 = 8.73809524e-05, 1.89833333
    a2, b2 = 0.00016927, 0.45666666
    if image_tokens > 4300:
        return a2 * image_tokens + b2
    m200 = a2 * image_tokens + b2
    m10 = a1 * image_tokens + b1
    a = (m200 - m10) / 190.0
    b = m200 - 200.0 * a
    return a * steps + b


def sigmas(steps: int, image_tokens: int, scheduler: SchedulerConfig | None = None) -> Tensor:
    """[steps + 1] float32 noise levels from 1 (pure noise) down to 0, shifted toward the noisy end.

    Bit for bit what diffusers' `Flux2KleinPipeline` gets from `FlowMatchEulerDiscreteScheduler.set_timesteps(
    sigmas=linspace(1, 1/steps, steps), mu=empirical_mu(...))` under the checkpoint's scheduler config: the linear
    ramp in float64 rounded to float32, then the shift in float32. `image_tokens` counts output tokens only.
    Raises ValueError for steps < 1.
    """
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    config = scheduler or SchedulerConfig()
    # numpy's linspace: start + i * step, with the end point set exactly
    step = (1.0 / steps - 1.0) / (steps - 1) if steps > 1 else 0.0
    ramp = torch.arange(steps, dtype=torch.float64) * step + 1.0
    ramp[-1] = 1.0 / steps
    s = ramp.to(torch.float32)
    if config.use_dynamic_shifting:
        mu = empirical_mu(image_tokens, steps)
        shift = mu if config.time_shift_type == "linear" else math.exp(mu)
        s = _scalar_div(shift, shift + (_scalar_div(1.0, s) - 1))
    else:
        s = config.shift * s / (1 + (config.shift - 1) * s)
    if config.shift_terminal:
        if steps < 2:
            # the reference divides 0 by 0 here and samples from NaN
            raise ValueError(
                "this checkpoint's schedule stretches to a terminal value: it needs at least 2 steps"
            )
        one_minus = 1 - s
        s = 1 - one_minus / (one_minus[-1] / (1 - config.shift_terminal))
    return torch.cat((s.to(torch.float32), torch.zeros(1)))


def _scalar_div(numerator: float, t: Tensor) -> Tensor:
    # a true float32 division, as numpy does it: torch computes `number / tensor` as a reciprocal times the
    # number, which is off by one unit in the last place for some values
    return torch.full_like(t, numerator).div(t)


def schedule(steps: int, image_tokens: int, scheduler: SchedulerConfig | None = None) -> list[float]:
    """`sigmas` as Python floats (for reports and tests)."""
    return sigmas(steps, image_tokens, scheduler).tolist()


def image_ids(height: int, width: int, time: int = 0) -> Tensor:
    """(t, h, w, l) for a row-major grid of latent tokens: [h*w, 4] int64."""
    return torch.cartesian_prod(
        torch.tensor([time]), torch.arange(height), torch.arange(width), torch.tensor([0])
    )


def text_ids(length: int) -> Tensor:
    """(0, 0, 0, l) for text token l: [length, 4] int64."""
    return torch.cartesian_prod(torch.tensor([0]), torch.tensor([0]), torch.tensor([0]), torch.arange(length))


def reference_ids(grids: Sequence[tuple[int, int]]) -> Tensor:
    """Ids for references given as latent (h, w) grids, each at its own time coordinate: [sum h*w, 4]."""
    if not grids:
        return torch.zeros((0, 4), dtype=torch.int64)
    return torch.cat(
        [image_ids(h, w, time=REFERENCE_TIME_OFFSET * (i + 1)) for i, (h, w) in enumerate(grids)], dim=0
    )


def pack(latents: Tensor) -> Tensor:
    """[B, C, h, w] -> [B, h*w, C] (row-major tokens)."""
    return latents.flatten(2).transpose(1, 2)


def unpack(tokens: Tensor, height: int, width: int) -> Tensor:
    """[B, h*w, C] -> [B, C, h, w]."""
    return tokens.transpose(1, 2).unflatten(2, (height, width))


@dataclass(frozen=True)
class Inpainting:
    """What a masked edit keeps: after every step the unmasked tokens are put back to the source, noised to the
    next level with the starting noise (diffusers `Flux2KleinInpaintPipeline`, step 7)."""

    clean: Tensor  # [1, L, C] the source's latent tokens, model dtype
    noise: Tensor  # [B, L, C] the noise the run started from, model dtype
    mask: Tensor  # [1, L, 1] per token in [0, 1] (1 repaints), model dtype


def noised(clean: Tensor, noise: Tensor, level: Tensor) -> Tensor:
    """The flow's forward process at one noise level: level * noise + (1 - level) * clean, in the inputs' dtype
    (the level is cast to it first, as diffusers' `FlowMatchEulerDiscreteScheduler.scale_noise` does)."""
    sigma = level.to(clean.dtype)
    return sigma * noise + (1.0 - sigma) * clean


StepCallback = Callable[[int, int], None]  # (step done, total steps); may raise to stop between steps


@torch.inference_mode()
def denoise(
    model: Flux2Transformer,
    noise: Tensor,  # [B, L, C] in the model dtype
    noise_ids: Tensor,  # [L, 4]
    context: Tensor,  # [B, T, C_ctx] in the model dtype
    context_ids: Tensor,  # [T, 4]
    noise_levels: Tensor,  # [steps + 1] float32, from `sigmas`
    references: Tensor | None = None,  # [1, R, C] reference tokens, shared by the batch
    references_ids: Tensor | None = None,  # [R, 4]
    reference_kv: ReferenceKV | None = None,  # klein 9B-KV: the references' kept keys and values instead
    guidance: float | None = None,  # true CFG scale (Base models); None for no CFG
    uncond_context: Tensor | None = None,  # [B, T, C_ctx], the empty prompt, with guidance
    num_train_timesteps: int = 1000,
    on_step: StepCallback | None = None,
    inpainting: Inpainting | None = None,
    forward: Callable[..., Tensor] | None = None,  # the step's transformer call, if not `model` itself
    step_cache: MagCache | None = None,  # skips the blocks at some steps (model.step_cache), for this picture
) -> Tensor:  # [B, L, C] in the model dtype
    """Euler integration of the predicted velocity over `noise_levels`, as diffusers' `Flux2KleinPipeline` runs it.

    The precision follows the reference step by step, so bfloat16 pictures match it too: the state lives in the
    model dtype; the timestep the model sees is `(sigma * num_train_timesteps).to(dtype) / 1000`; the
    conditional and unconditional predictions are separate passes combined in the model dtype; the Euler update is
    `x.float() + dt * v` (dt a float32 scalar, so the product stays in the model dtype) cast back to the model
    dtype. Reference tokens ride after the noisy ones with the current timestep and are dropped from the prediction.
    With `reference_kv` (klein 9B-KV, `Flux2Transformer.reference_kv`), every step runs over [text, noisy] only and
    attends to the kept reference keys and values, as diffusers' `Flux2KleinKVPipeline` does from its second step
    (its first computes the same keys and values in the same pass). Raises ValueError for both kinds of reference.
    With `inpainting`, the kept tokens are reset after each step to the source noised to the next level (the
    clean source after the last), and the mask blends: (1 - mask) * kept + mask * x, in the model dtype.
    `forward` replaces `model(...)` for each step with a callable of the same signature and result (CUDA-graph
    replays, `speedups.cuda_graphs.StepGraphs`); `on_step` runs between two of its calls. With `step_cache`, the
    conditional and unconditional passes each run with their own part of it (diffusers' "cond" and "uncond" cache
    contexts); a replayed graph cannot skip its blocks, so `forward` and `step_cache` are refused together.
    """
    dtype = next(model.parameters()).dtype
    batch, num_noisy = noise.shape[0], noise.shape[1]
    if reference_kv is not None and references is not None:
        raise ValueError("give the references either as tokens or as kept keys and values, not both")
    ids = noise_ids if references is None else torch.cat((noise_ids, references_ids), dim=0)  # type: ignore[arg-type]
    if guidance is not None and uncond_context is None:
        raise ValueError("classifier-free guidance needs the unconditional context")
    if forward is not None and step_cache is not None:
        raise ValueError("a step cache runs the transformer itself: give forward or step_cache, not both")
    rope = model.rope(context_ids, ids)  # positions never change across steps
    refs = None if references is None else references.to(dtype).expand(batch, -1, -1)
    levels = noise_levels.to(device=noise.device, dtype=torch.float32)
    timesteps = levels[:-1] * num_train_timesteps
    x = noise.to(dtype)
    total = len(levels) - 1
    step = model if forward is None else forward
    cond_extra: dict[str, object] = {}
    uncond_extra: dict[str, object] = {}
    if step_cache is not None:  # only then: a StepGraphs replay takes no such argument
        cond_extra = {"step_cache": step_cache.pass_cache("cond")}
        uncond_extra = {"step_cache": step_cache.pass_cache("uncond")}
    for i in range(total):
        t = timesteps[i].expand(batch).to(dtype) / 1000
        inp = x if refs is None else torch.cat((x, refs), dim=1)
        pred = step(inp, ids, context, context_ids, t, rope=rope, reference_kv=reference_kv, **cond_extra)
        pred = pred[:, :num_noisy]
        if guidance is not None:
            uncond = step(
                inp, ids, uncond_context, context_ids, t, rope=rope, reference_kv=reference_kv, **uncond_extra
            )
            uncond = uncond[:, :num_noisy]
            pred = uncond + guidance * (pred - uncond)
        x = (x.float() + (levels[i + 1] - levels[i]) * pred).to(pred.dtype)
        if inpainting is not None:
            kept = inpainting.clean
            if i < total - 1:
                kept = noised(kept, inpainting.noise, levels[i + 1])
            x = (1 - inpainting.mask) * kept + inpainting.mask * x
        if on_step is not None:
            on_step(i + 1, total)
    return x
