"""MagCache for the flow transformer: skip the blocks at some steps, reusing the residual they added last time.

The rule is diffusers 0.42's MagCache (`diffusers/hooks/mag_cache.py`), as it runs on FLUX.2: its head hook sits on
the first double block and its tail hook on the last single block, so a skipped step sets the image tokens to
(their embedding + the residual the whole block stack added at the last computed step) and the text tokens are
not needed (the final layer reads image tokens only). Whether a step is skipped depends only on the step index and
the magnitude ratios, never on the tensors, so the decision costs no device sync. The classifier-free guidance
passes keep separate residuals and counters (diffusers' "cond" and "uncond" cache contexts).

The arithmetic of the decision follows the reference in float32 (its ratios are a float32 tensor), so the same
steps are skipped at a threshold on the edge. The ratios are the only ones diffusers ships (`FLUX_MAG_RATIOS`,
calibrated on FLUX.1-dev over 28 steps, interpolated to the step count); no ratios for klein are published.
"""

from __future__ import annotations

import torch
from torch import Tensor

# diffusers 0.42 `hooks/mag_cache.py` FLUX_MAG_RATIOS (from https://github.com/Zehong-Ma/MagCache), step 0 first.
FLUX_MAG_RATIOS = (
    1.0,
    1.21094,
    1.11719,
    1.07812,
    1.0625,
    1.03906,
    1.03125,
    1.03906,
    1.02344,
    1.03125,
    1.02344,
    0.98047,
    1.01562,
    1.00781,
    1.0,
    1.00781,
    1.0,
    1.00781,
    1.0,
    1.0,
    0.99609,
    0.99609,
    0.98047,
    0.98828,
    0.96484,
    0.95703,
    0.93359,
    0.89062,
)


def step_ratios(steps: int, ratios: tuple[float, ...] = FLUX_MAG_RATIOS) -> Tensor:
    """[steps] float32 magnitude ratios: `ratios` as they are for the same length, else resampled by nearest
    index as diffusers' `nearest_interp` does (the index scale rounded to float32 first, as its tensor product
    does). Raises ValueError for steps < 1."""
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    source = torch.tensor(ratios, dtype=torch.float32)
    if len(source) == steps:
        return source
    if steps == 1:
        return source[-1:]
    scale = (len(source) - 1) / (steps - 1)
    grid = torch.arange(steps, dtype=torch.float32)
    return source[torch.round(grid * scale).long()]


class MagCache:
    """One picture's MagCache over `steps` denoising steps: `threshold` on the accumulated error, at most
    `max_skip_steps` skipped in a row, none in the first `retention_ratio` of the steps.

    Each guidance pass ("cond", "uncond") has its own `MagCachePass`, which `Flux2Transformer.forward` is given as
    `step_cache`; `computed` and `skipped` count block-stack runs over all passes. Not thread-safe.
    """

    def __init__(
        self,
        threshold: float,
        steps: int,
        *,
        max_skip_steps: int,
        retention_ratio: float,
        ratios: tuple[float, ...] = FLUX_MAG_RATIOS,
    ) -> None:
        self.threshold = threshold
        self.steps = steps
        self.max_skip_steps = max_skip_steps
        self.ratios = step_ratios(steps, ratios)
        # diffusers: int(retention_ratio * num_inference_steps + 0.5)
        self.retention_step = int(retention_ratio * steps + 0.5)
        self.passes: dict[str, MagCachePass] = {}

    def pass_cache(self, name: str) -> MagCachePass:
        """The cache of one guidance pass, made on first use."""
        return self.passes.setdefault(name, MagCachePass(self))

    @property
    def computed(self) -> int:
        """Block-stack runs made, over every pass."""
        return sum(p.computed for p in self.passes.values())

    @property
    def skipped(self) -> int:
        """Block-stack runs skipped, over every pass."""
        return sum(p.skipped for p in self.passes.values())


class MagCachePass:
    """One guidance pass's state: the residual of its last computed step and the rule's accumulators.

    Per step the transformer calls `skip()` before its blocks, then either `reuse(start)` instead of them or
    `keep(start, out)` after them; `start` is the image tokens entering the first block, `out` those leaving the
    last, [B, L, D] in the model dtype.
    """

    def __init__(self, cache: MagCache) -> None:
        self.cache = cache
        self.residual: Tensor | None = None
        self.step = 0
        self.computed = 0
        self.skipped = 0
        self._reset_accumulators()

    def _reset_accumulators(self) -> None:
        # float32 scalars, as the reference's products with its float32 ratios are
        self.ratio = torch.tensor(1.0)
        self.error = torch.tensor(0.0)
        self.run = 0

    def skip(self) -> bool:
        """Whether this step reuses the last residual (diffusers `MagCacheHeadHook.new_forward`); updates the
        accumulators, so call it once per step."""
        cache = self.cache
        if self.step < cache.retention_step:
            return False
        scale = cache.ratios[self.step] if self.step < len(cache.ratios) else torch.tensor(1.0)
        self.ratio = self.ratio * scale
        self.run += 1
        self.error = self.error + (1.0 - self.ratio).abs()
        if (
            self.residual is not None
            and bool(self.error <= cache.threshold)
            and self.run <= cache.max_skip_steps
        ):
            return True
        self._reset_accumulators()
        return False

    def reuse(self, start: Tensor) -> Tensor:
        """The image tokens the blocks would give, estimated: `start` + the last residual."""
        assert self.residual is not None  # skip() says True only with one
        out = start + self.residual
        self.skipped += 1
        self._advance()  # after the sum: the last step's advance forgets the residual
        return out

    def keep(self, start: Tensor, out: Tensor) -> None:
        """After a computed step: remember what the blocks added."""
        self.residual = out - start
        self.computed += 1
        self._advance()

    def _advance(self) -> None:
        # the reference's tail hook: after the last step the pass starts over (counters kept for reports)
        self.step += 1
        if self.step >= self.cache.steps:
            self.step, self.residual = 0, None
            self._reset_accumulators()
