"""Structured content of compare_images and record_verdict, and what list_images shows of verdicts: small JSON
objects, never image bytes. They are also the tools' outputSchema (pinned by tests/snapshots/server_tools.json)."""

from __future__ import annotations

from pydantic import BaseModel, Field


# One changed region of a compare_images result.
class ChangedRegion(BaseModel):  # noqa: D101 - no docstring: it would change the published outputSchema
    box_px: list[int] = Field(description="[x, y, width, height] in px of b, on the 16-px token grid")
    box_frac: list[float] = Field(description="the same box in fractions of b's width and height")
    area_pct: float = Field(description="changed area of this region, % of the picture")
    mean_delta_e: float = Field(description="mean colour difference (CIE76 ΔE*ab) over the region")


class CompareResult(BaseModel):
    """What compare_images returns: the change from a to b, in b's pixels."""

    a: str
    b: str
    a_size: list[int] = Field(description="[width, height] of a")
    b_size: list[int] = Field(description="[width, height] of b")
    alignment: str = Field(description="how a was mapped onto b: same size, or prepared as an edit's input")
    verdict: str = Field(description="one line to act on")
    changed_pct: float = Field(description="% of b's area in tokens whose mean ΔE is above threshold")
    ssim: float = Field(description="structural similarity of a and b (1 = identical), grey, 7x7 windows")
    mean_delta_e: float = Field(description="mean CIE76 ΔE*ab (CIELAB, D65) over the picture")
    delta_e: str = Field(description="which colour difference the ΔE figures are")
    threshold: float = Field(description="ΔE above which a 16-px token counts as changed")
    regions: list[ChangedRegion] = Field(description="largest first, at most 8")
    region_count: int = Field(description="all regions found, including those not listed")
    expected_box: list[int] | None = Field(description="the box you said you meant to change, in px of b")
    outside_pct: float | None = Field(description="changed area outside expected_box, % of the picture")


class VerdictResult(BaseModel):
    """What record_verdict returns: the record and the image's standing after it."""

    image_id: str
    verdict: str = Field(description="pick, reject or note")
    reason: str
    recorded_at: str = Field(description="UTC ISO 8601")
    standing: str | None = Field(description="the image's standing now: its latest pick or reject, or null")
