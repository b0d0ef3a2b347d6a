"""Test doubles for the server tests: a fake ImageGenerator with gates, used only where a test needs control.

End-to-end tests use the real tiny model (`load_pipeline("tiny")`); this fake exists for concurrency, cancellation
and failure tests, where a test must hold a call at a known step or make the model fail on purpose.
"""

from __future__ import annotations

import hashlib
import threading
import time
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from klein_agent.rules import limits
from klein_agent.rules.requests import (
    GenerationRequest,
    GenerationResult,
    GeneratorInfo,
    ProgressCallback,
    resolve,
)

FAKE_INFO = GeneratorInfo(
    model="fake",
    variant="fake",
    device="cpu",
    dtype="float32",
    distilled=True,
    default_steps=limits.DISTILLED_STEPS,
    default_guidance=limits.DISTILLED_GUIDANCE,
    max_references=4,
)


def fake_picture(prompt: str, seed: int, width: int, height: int, references: int = 0) -> Image.Image:
    """A deterministic picture: a colour from the prompt and seed, plus a seed-driven noise texture."""
    digest = hashlib.sha256(f"{prompt}|{seed}|{references}".encode()).digest()
    rng = np.random.default_rng(int.from_bytes(digest[:8], "little"))
    base = np.array(list(digest[8:11]), dtype=np.int16)
    noise = rng.integers(-24, 25, size=(height, width, 3), dtype=np.int16)
    return Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8), "RGB")


@dataclass
class FakeGenerator:
    """Implements ImageGenerator. `gate` (if set) must be set before each step proceeds past `gate_at_step`; a call
    whose prompt is a key of `holds` waits there for that event instead, and sets `reached[prompt]` on arrival.
    `max_in_flight`: the calls it says it takes at once (rules.requests.max_in_flight). `log` records
    ("start" | "end", prompt, thread name) in the order they happened."""

    info: GeneratorInfo = FAKE_INFO
    max_in_flight: int = 1
    holds: dict[str, threading.Event] = field(default_factory=dict)
    reached: dict[str, threading.Event] = field(default_factory=dict)
    log: list[tuple[str, str, str]] = field(default_factory=list)
    step_delay_s: float = 0.0
    gate: threading.Event | None = None
    gate_at_step: int = 1
    fail_with: BaseException | None = None  # raised at step 2 of the next call, then cleared
    calls: list[GenerationRequest] = field(default_factory=list)
    steps_run: list[int] = field(default_factory=list)  # steps done per call; a cancelled call stops early
    entered: threading.Event = field(default_factory=threading.Event)  # set when a call reaches the gate
    active: int = 0
    max_active: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def generate(
        self, request: GenerationRequest, progress: ProgressCallback | None = None
    ) -> GenerationResult:
        with self._lock:
            self.active += 1
            self.max_active = max(self.max_active, self.active)
            self.calls.append(request)
            self.steps_run.append(0)
            index = len(self.calls) - 1
            self.log.append(("start", request.prompt, threading.current_thread().name))
        try:
            resolved = resolve(request, self.info)
            steps = resolved.steps
            total = steps + 2
            t0 = time.perf_counter()
            if progress:
                progress(1, total, "encoding prompt")
            for step in range(1, steps + 1):
                hold = self.holds.get(request.prompt)
                if step == self.gate_at_step and hold is not None:
                    self.reached.setdefault(request.prompt, threading.Event()).set()
                    if not hold.wait(30):
                        raise TimeoutError(f"the hold of {request.prompt!r} was never released")
                elif step == self.gate_at_step and self.gate is not None:
                    self.entered.set()
                    if not self.gate.wait(30):
                        raise TimeoutError("test gate was never opened")
                if self.step_delay_s:
                    time.sleep(self.step_delay_s)
                if step == 2 and self.fail_with is not None:
                    exc, self.fail_with = self.fail_with, None
                    raise exc
                self.steps_run[index] = step
                if progress:
                    progress(1 + step, total, f"step {step}/{steps}")
            images = [
                fake_picture(request.prompt, seed, resolved.width, resolved.height, len(request.references))
                for seed in resolved.seeds
            ]
            if progress:
                progress(total, total, "decoding")
            elapsed = (time.perf_counter() - t0) * 1000
            return GenerationResult(
                images=images,
                timings_ms={"total": elapsed},
                cache_hits={"prompt": 0, "references": 0},
                resolved=resolved,
                info=self.info,
            )
        finally:
            with self._lock:
                self.active -= 1
                self.log.append(("end", request.prompt, threading.current_thread().name))


def png_bytes(
    width: int = 96, height: int = 64, color: tuple[int, int, int] = (200, 40, 40), fmt: str = "PNG"
) -> bytes:
    """An encoded test picture: a colour field with a darker square, so edits have structure to keep."""
    import io

    img = Image.new("RGB", (width, height), color)
    img.paste((20, 20, 20), (width // 4, height // 4, width // 2, height // 2))
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def data_uri(data: bytes, mime: str = "image/png") -> str:
    import base64

    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


class SlowDecoder:
    """The autoencoder's decode made `delay_s` slower per call, pixels untouched: a stand-in for a large decode
    on a CPU (35-57 s at 1024x1024 x4 without progress before issue 9). Records each decode's (start, end) times
    (time.monotonic) in `windows`. Install with `with SlowDecoder(pipeline, 0.8) as slow: ...`; the original is
    put back on exit."""

    def __init__(self, pipeline: object, delay_s: float) -> None:
        self.autoencoder = pipeline.autoencoder  # type: ignore[attr-defined]
        self.delay_s = delay_s
        self.windows: list[tuple[float, float]] = []
        self._decode = self.autoencoder.decode

    def __call__(self, latents: object) -> object:
        start = time.monotonic()
        time.sleep(self.delay_s)
        pixels = self._decode(latents)
        self.windows.append((start, time.monotonic()))
        return pixels

    def __enter__(self) -> SlowDecoder:
        self.autoencoder.decode = self  # an instance attribute in front of the class's method
        return self

    def __exit__(self, *exc: object) -> None:
        del self.autoencoder.decode
