"""The progress units of one call, for every pipeline: 1 for the prompt and references, then per picture one per
denoising step and one for its decode (`1 + count * (steps + 1)` in all). The engine forwards them to clients as
MCP progress, so both families must count alike; a `progress` that raises is how a caller stops a run between units.
"""

from __future__ import annotations

from dataclasses import dataclass

from klein_agent.model.sampling import StepCallback
from klein_agent.rules.requests import ProgressCallback


@dataclass(frozen=True)
class CallProgress:
    """Reports of one call of `count` pictures with `steps` denoising steps each to `progress` (None: silent)."""

    progress: ProgressCallback | None
    count: int
    steps: int

    @property
    def total(self) -> int:
        """All units of the call."""
        return 1 + self.count * (self.steps + 1)

    def encoded(self) -> None:
        """Unit 1: the prompt and the references are encoded."""
        if self.progress:
            self.progress(1, self.total, "prompt and references encoded")

    def _label(self, k: int) -> str:
        return f"image {k + 1}/{self.count}: " if self.count > 1 else ""

    def on_step(self, k: int) -> StepCallback:
        """The step callback of picture `k` (0-based): `(done, total)` steps become units after the ones before."""
        base, label = 1 + k * (self.steps + 1), self._label(k)

        def report(done: int, total: int) -> None:
            if self.progress:
                self.progress(base + done, self.total, f"{label}step {done}/{total}")

        return report

    def decoded(self, k: int) -> None:
        """Picture `k`'s last unit: it is decoded."""
        if self.progress:
            self.progress((k + 1) * (self.steps + 1) + 1, self.total, f"{self._label(k)}decoded")
