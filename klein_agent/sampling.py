"""Rectified-flow sampling for FLUX.2 [klein]: position ids, the time schedule, and the Euler loop.

Pure tensor functions over a transformer; no images, files or devices chosen here.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from klein_agent.transformer import Flux2Transformer

REFERENCE_TIME_OFFSET = 10  # reference i sits at RoPE time coordinate 10 * (i + 1)


def empirical_mu(image_tokens: int, steps: int) -> float:
    """The schedule's shift: grows with the output token count, and for small images also with the step count.

    A linear fit BFL made between 10 and 200 steps; beyond 4300 tokens the step count no longer matters.
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


def schedule(steps: int, image_tokens: int) -> list[float]:
    """steps + 1 times from 1 (pure noise) to 0 (image), shifted toward the noisy end."""
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    mu = empirical_mu(image_tokens, steps)
    times = [1.0 - i / steps for i in range(steps)]
    return [math.exp(mu) / (math.exp(mu) + (1.0 / t - 1.0)) for t in times] + [0.0]


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


StepCallback = Callable[[int, int], None]  # (step done, total steps); may raise to stop between steps


@torch.inference_mode()
def denoise(
    model: Flux2Transformer,
    noise: Tensor,  # [B, L, C] float32
    noise_ids: Tensor,  # [L, 4]
    context: Tensor,  # [B, T, C_ctx]
    context_ids: Tensor,  # [T, 4]
    times: Sequence[float],
    references: Tensor | None = None,  # [1, R, C] reference tokens, shared by the batch
    references_ids: Tensor | None = None,  # [R, 4]
    guidance: float | None = None,  # true CFG scale (Base models); None for distilled models
    uncond_context: Tensor | None = None,  # [B, T, C_ctx], the empty prompt, with guidance
    on_step: StepCallback | None = None,
) -> Tensor:  # [B, L, C] float32
    """Euler integration of the predicted velocity from times[0] to times[-1].

    The state stays in float32 whatever the model's dtype; reference tokens ride after the noisy ones with the
    current timestep and are dropped from the prediction. With guidance, conditional and unconditional passes run as
    one doubled batch.
    """
    dtype = next(model.parameters()).dtype
    batch, num_noisy = noise.shape[0], noise.shape[1]
    ids = noise_ids if references is None else torch.cat((noise_ids, references_ids), dim=0)  # type: ignore[arg-type]
    cfg = guidance is not None
    if cfg and uncond_context is None:
        raise ValueError("classifier-free guidance needs the unconditional context")
    ctx = torch.cat((uncond_context, context), dim=0) if cfg else context  # type: ignore[arg-type]
    ctx = ctx.to(dtype)
    rope = model.rope(context_ids, ids)  # positions never change across steps
    refs = None if references is None else references.to(dtype).expand(ctx.shape[0], -1, -1)
    x = noise.float()
    total = len(times) - 1
    for i, (t_cur, t_next) in enumerate(itertools.pairwise(times)):
        inp = x.to(dtype)
        if cfg:
            inp = torch.cat((inp, inp), dim=0)
        if refs is not None:
            inp = torch.cat((inp, refs), dim=1)
        t = torch.full((inp.shape[0],), t_cur, dtype=torch.float32, device=x.device)
        pred = model(inp, ids, ctx, context_ids, t, rope=rope)[:, :num_noisy].float()
        if cfg:
            uncond, cond = pred[:batch], pred[batch:]
            pred = uncond + guidance * (cond - uncond)
        x = x + (t_next - t_cur) * pred
        if on_step is not None:
            on_step(i + 1, total)
    return x
