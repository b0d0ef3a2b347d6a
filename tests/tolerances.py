"""How close two float32 computations of the same thing must be, derived from the arithmetic rather than one CPU.

Why not a fixed `atol`/`rtol`: a float32 result carries a rounding error of about κ·u, the unit roundoff
u = 2^-24 times a condition factor κ that depends on the computation (its depth, its norms and softmaxes, the
magnitudes it sums) and on the summation order the kernels pick, which depends on the CPU (AVX2, AVX-512 and AMX
block their dot products differently; Inductor and AOT decompositions reorder them again). A fixed 1e-5 tuned on
one machine is a guess about κ on that machine, and it fails on another.

What is asserted instead. The *reference* computation (diffusers' module, or our own uncompiled one) is run twice
on the same inputs: in float64, whose own rounding (~1e-16 relative) is negligible here, so it stands for the exact
result; and in float32, on this CPU, with this CPU's kernels. The float32 run's distance from the float64 one is
this computation's rounding error measured where the test runs: an empirical κ·u, no closed form needed. The
result under test, also float32, must be no further from the float64 result than a small multiple of that:

    max|got − ref64| ≤ FACTOR · (max|ref32 − ref64| + FLOOR_ULPS · eps_f32 · max|ref64|)

FACTOR allows for a different but equally sound summation order: two sound orders' largest errors differ by a
small factor (the CPU's fused attention kernel: 1.4x the math path's; where both sides run the same kernels, as
our modules and diffusers' do on one machine, 1x), and each test prints its measured error, limit and ratio. The floor, a few units in the last place of the output's magnitude, keeps a reference that happens
to round luckily from demanding the same luck of the result under test. Both terms scale with the machine's actual
rounding, so the bound holds on any CPU, and stays three orders of magnitude below what a real bug does: each
test that uses it also checks that a run with one weight scaled by 1 + 1e-3 (or one position id moved) fails it.

The norm is the largest elementwise difference over one tensor; a test whose output joins parts of very different
magnitude (the text encoder's three layers, keys and values per block) checks each part on its own, so a bug in a
small part is not hidden under the large part's rounding.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor, nn

EPS_F32 = torch.finfo(torch.float32).eps  # 2^-23: one unit in the last place at 1.0
FACTOR = 8.0
FLOOR_ULPS = 4.0


@dataclass(frozen=True)
class RoundingBound:
    """The float64 result of one reference computation and the error its float32 run showed on this CPU.

    `reference` is float64; `rounding` is max|ref32 − ref64| (the measured float32 error, absolute units of the
    output) and `floor` is FLOOR_ULPS·eps_f32·max|ref64|. `limit` is the largest max-abs error a float32 result of the
    same computation may have.
    """

    what: str
    reference: Tensor
    rounding: float
    floor: float

    @property
    def limit(self) -> float:
        """FACTOR · (measured rounding + floor), in the output's units."""
        return FACTOR * (self.rounding + self.floor)

    def error(self, got: Tensor) -> float:
        """max|got − reference|, computed in float64; shapes must match exactly."""
        assert got.shape == self.reference.shape, (self.what, got.shape, self.reference.shape)
        return float((got.double() - self.reference).abs().max())

    def ratio(self, got: Tensor) -> float:
        """error / limit: below 1 passes."""
        return self.error(got) / self.limit

    def check(self, got: Tensor) -> float:
        """Assert `got` is within the limit; return (and print, for the test's figures) its error/limit ratio."""
        ratio = self.ratio(got)
        print(
            f"{self.what}: error {self.error(got):.3g}, limit {self.limit:.3g} "
            f"(float32 reference's own {self.rounding:.3g}), ratio {ratio:.3f}"
        )
        assert ratio <= 1.0, (
            f"{self.what}: max|got − float64 reference| = {self.error(got):.3g} exceeds {self.limit:.3g} "
            f"= {FACTOR} × (the float32 reference's own error {self.rounding:.3g} + floor {self.floor:.3g})"
        )
        return ratio

    def check_catches(self, broken: Tensor, bug: str) -> float:
        """The self-check: a deliberately broken result must fail the bound; returns its ratio (printed)."""
        ratio = self.ratio(broken)
        print(f"{self.what}: {bug} gives ratio {ratio:.3g}")
        assert ratio > 1.0, (
            f"{self.what}: {bug} stays within the bound (ratio {ratio:.3g}): the check is too loose"
        )
        return ratio


def rounding_bound(what: str, reference64: Tensor, reference32: Tensor) -> RoundingBound:
    """The bound for one output: the reference computation's float64 result and its float32 result on this CPU.

    Raises AssertionError if the dtypes are not float64 and float32 or the shapes differ (a test wiring mistake).
    """
    assert reference64.dtype == torch.float64 and reference32.dtype == torch.float32, (
        what,
        reference64.dtype,
        reference32.dtype,
    )
    assert reference64.shape == reference32.shape, (what, reference64.shape, reference32.shape)
    rounding = float((reference32.double() - reference64).abs().max())
    floor = FLOOR_ULPS * EPS_F32 * float(reference64.abs().max())
    return RoundingBound(what, reference64, rounding, floor)


def check_against_float64(what: str, got: Tensor, reference64: Tensor, reference32: Tensor) -> float:
    """`rounding_bound(what, reference64, reference32).check(got)`: assert and return the error/limit ratio."""
    return rounding_bound(what, reference64, reference32).check(got)


@contextmanager
def scaled_weight(module: nn.Module, name: str, relative: float = 1e-3) -> Iterator[None]:
    """Multiply the parameter or buffer `name` of `module` by (1 + relative) for the block's duration, then restore
    it exactly (in place, so compiled graphs that read it see the change without recompiling).

    Pick a weight that no normalization follows directly (an output projection, an MLP's second layer, an FP8
    layer's scale): a normalization would divide the scale back out. Raises KeyError for an unknown name.
    """
    tensor = dict(module.named_parameters()) | dict(module.named_buffers())
    target = tensor[name]
    saved = target.detach().clone()
    with torch.no_grad():
        target.mul_(1 + relative)
    try:
        yield
    finally:
        with torch.no_grad():
            target.copy_(saved)
