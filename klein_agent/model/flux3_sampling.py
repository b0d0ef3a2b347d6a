"""FLUX 3 [klein] sampling: position ids, the constant-shift schedule and the Euler loop (distilled flow map or
Base with CFG), as diffusers' modular blocks run them (0.42.1, `modular_pipelines/flux3/`).

What differs from FLUX.2 (`sampling.py`, whose schedule code and packing this reuses):
- the schedule's shift is a constant 6.93, never the image-size-dependent `mu`;
- positions are floats: image rows and columns at half their index, reference k on the l axis at -(k + 1);
- the model's timestep is `(t / 1000)` cast to the model dtype (FLUX.2 casts first, then divides);
- the distilled model also gets the timestep the step jumps to (the next one, 0 after the last);
- references keep timestep 0 inside the model, and only the image tokens are predicted.
Pure tensor functions over a transformer; no images, files or devices chosen here.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from klein_agent.model.configs import FLUX3_SCHEDULER
from klein_agent.model.flux3_transformer import Flux3Transformer
from klein_agent.model.sampling import StepCallback, sigmas

IMAGE_ROPE_SCALE = 0.5  # diffusers Flux3PrepareLatentsStep image_rope_scale: the model was trained with it


def image_ids(height: int, width: int, l_coord: int = 0) -> Tensor:
    """(0, 0.5 row, 0.5 col, l) for a row-major grid of latent tokens: [height * width, 4] float32."""
    ids = torch.cartesian_prod(
        torch.arange(1), torch.arange(height), torch.arange(width), torch.tensor([l_coord])
    ).to(torch.float32)
    ids[:, 1:3] = ids[:, 1:3] * IMAGE_ROPE_SCALE
    return ids


def reference_ids(grids: Sequence[tuple[int, int]]) -> Tensor:
    """Ids of references given as latent (h, w) grids, reference k on l = -(k + 1): [sum h * w, 4] float32."""
    if not grids:
        return torch.zeros((0, 4), dtype=torch.float32)
    return torch.cat([image_ids(h, w, l_coord=-(1 + k)) for k, (h, w) in enumerate(grids)], dim=0)


def text_ids(length: int) -> Tensor:
    """(0, 0, 0, i) for text token i, padding included: [length, 4] float32."""
    return torch.cartesian_prod(torch.arange(1), torch.arange(1), torch.arange(1), torch.arange(length)).to(
        torch.float32
    )


def noise_levels(steps: int) -> Tensor:
    """[steps + 1] float32 noise levels, 1 down to 0: linspace(1, 1/steps) shifted by the constant 6.93, bit for bit
    diffusers' `FlowMatchEulerDiscreteScheduler(shift=6.93)`. Raises ValueError for steps < 1."""
    return sigmas(steps, 0, FLUX3_SCHEDULER)


@torch.inference_mode()
def denoise(
    model: Flux3Transformer,
    noise: Tensor,  # [B, L, C] image tokens, in the model dtype
    noise_ids: Tensor,  # [L, 4]
    context: Tensor,  # [B, T, C_ctx] in the model dtype
    context_ids: Tensor,  # [T, 4]
    levels: Tensor,  # [steps + 1] float32, from `noise_levels`
    references: Tensor | None = None,  # [1, R, C] reference tokens, shared by the batch
    references_ids: Tensor | None = None,  # [R, 4]
    guidance: float | None = None,  # Base: the CFG scale; None (or the distilled model): no CFG
    uncond_context: Tensor | None = None,  # [B, T', C_ctx]: the empty prompt in its own window, with guidance
    uncond_ids: Tensor | None = None,  # [T', 4]
    on_step: StepCallback | None = None,
    forward: Callable[..., Tensor] | None = None,  # stands in for `model(...)`, same positional arguments
) -> Tensor:  # [B, L, C] in the model dtype
    """Euler integration over `levels`, as diffusers' `Flux3DenoiseStep` / `Flux3DistilledDenoiseStep` run it.

    Each step: the model sees `(sigma * 1000 / 1000)` cast to its dtype (and, for a flow map, the next level's the
    same way); with guidance the conditional and unconditional passes are separate calls (each text window its own
    length), combined as `uncond + scale * (cond - uncond)` in the model dtype; the update is
    `x.float() + dt * v` cast back to the model dtype. Raises ValueError when guidance is asked of a flow map or
    comes without the unconditional context. `forward` (CUDA graphs of the steps, `speedups.cuda_graphs`) is
    called instead of the model with the same arguments.
    """
    dtype = next(model.parameters()).dtype
    flow_map = model.config.flow_map
    if guidance is not None and (flow_map or uncond_context is None or uncond_ids is None):
        raise ValueError("CFG needs a Base (not flow-map) model and the unconditional context with its ids")
    batch = noise.shape[0]
    refs = None if references is None else references.to(dtype).expand(batch, -1, -1)
    levels = levels.to(device=noise.device, dtype=torch.float32)
    timesteps = levels[:-1] * 1000  # diffusers' scheduler timesteps; the loop's last target is 0
    total = len(timesteps)
    x = noise.to(dtype)
    call = model if forward is None else forward
    for i in range(total):
        t = (timesteps[i] / 1000).expand(batch).to(dtype)
        target = None
        if flow_map:
            t_next = timesteps[i + 1] if i + 1 < total else torch.zeros_like(timesteps[i])
            target = (t_next / 1000).expand(batch).to(dtype)
        pred = call(x, noise_ids, context, context_ids, t, target, refs, references_ids)
        if guidance is not None and uncond_context is not None and uncond_ids is not None:
            uncond = call(x, noise_ids, uncond_context, uncond_ids, t, None, refs, references_ids)
            pred = uncond + guidance * (pred - uncond)
        x = (x.float() + (levels[i + 1] - levels[i]) * pred).to(pred.dtype)
        if on_step is not None:
            on_step(i + 1, total)
    return x
